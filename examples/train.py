"""Train a preference-aligned LoRA: `python examples/train.py --config examples/configs/<recipe>.yaml`, or
`accelerate launch --config_file examples/accelerate_configs/<machine>.yaml examples/train.py --config ...`.
The same command line as the installed `dpt-train` command (TRL's `TrlParser`), with a default recipe.

With no `--config` it runs `configs/default.yaml`: Diffusion-RPO aligns the shipped toy-world pipeline to
prefer large shapes (offline, minutes on a CPU). Any recipe key can be
overridden on the command line: `--learning_rate 1e-4 --max_steps 200`; `--help` lists them all.
"""

import sys
from pathlib import Path

from diffusion_pref_trainers.cli import main

if __name__ == "__main__":
    main(sys.argv[1:], default_recipe=str(Path(__file__).parent / "configs" / "default.yaml"))
