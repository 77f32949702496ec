"""Launching: the shipped accelerate configs load, the two-process CPU config trains as ONE run over two processes,
and a multi-process launch that accelerate set up as single processes stops with the fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from diffusion_pref_trainers import DiffusionDPOTrainer

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((ROOT / "examples" / "accelerate_configs").glob("*.yaml"))


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=[c.stem for c in ACCELERATE_CONFIGS])
def test_every_shipped_accelerate_config_loads_as_accelerate_launch_reads_it(config: Path) -> None:
    loaded = load_config_from_file(str(config))
    assert loaded.num_processes >= 1 and loaded.compute_environment.value == "LOCAL_MACHINE"


def test_the_cpu_two_process_config_trains_once_on_two_processes_as_the_readme_launches_it(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    assert "accelerate launch --config_file examples/accelerate_configs/cpu_two_processes.yaml" in readme
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}  # as a user's shell
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # this checkout's package
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        "examples/accelerate_configs/cpu_two_processes.yaml", "examples/train.py",
        "--config", "examples/configs/tiny_kit_rpo.yaml", "--max_steps", "2", "--builtin_pairs", "8",
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = re.findall(r"^\{$.*?^\}$", result.stdout, flags=re.MULTILINE | re.DOTALL)
    assert len(summaries) == 1, result.stdout  # one run printed by its main process, not two independent runs
    summary = json.loads(summaries[0])
    assert summary["processes"] == 2 and summary["steps"] == 2


def test_several_processes_set_up_as_one_stop_with_the_fix(
    tiny_pipe_dir: str, pairs, make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")  # as a launcher sets it; accelerate, without CPU mode, sees one process
    with pytest.raises(RuntimeError, match="2 processes were launched.*ACCELERATE_USE_CPU=true"):
        DiffusionDPOTrainer(tiny_pipe_dir, make_config(), pairs)
