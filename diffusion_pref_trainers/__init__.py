"""diffusion_pref_trainers: TRL-style trainers that align text-to-image diffusion models with preferences.

The configs import eagerly (they are light); the trainers and helpers, which pull in torch and diffusers,
import on first use, so `import diffusion_pref_trainers.configs` and the command line's `--help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from diffusion_pref_trainers.configs import (
    DiffusionDPOConfig,
    DiffusionKTOConfig,
    DiffusionMaPOConfig,
    DiffusionRPOConfig,
    DiffusionSFTConfig,
    DiffusionTrainingConfig,
)
from diffusion_pref_trainers.notices import drop_known_import_notices

drop_known_import_notices()

__version__ = "0.1.0"

# Public name -> the module that defines it, imported when the name is first read.
_LAZY = {
    "load_aligned_pipeline": "diffusion_pref_trainers.hub",
    "load_negative_adapter": "diffusion_pref_trainers.npo",
    "negative_guidance": "diffusion_pref_trainers.npo",
    "TrainerCallback": "diffusion_pref_trainers.state",
    "TrainerControl": "diffusion_pref_trainers.state",
    "TrainerState": "diffusion_pref_trainers.state",
    "DiffusionDPOTrainer": "diffusion_pref_trainers.trainers",
    "DiffusionKTOTrainer": "diffusion_pref_trainers.trainers",
    "DiffusionMaPOTrainer": "diffusion_pref_trainers.trainers",
    "DiffusionPreferenceTrainer": "diffusion_pref_trainers.trainers",
    "DiffusionRPOTrainer": "diffusion_pref_trainers.trainers",
    "DiffusionSFTTrainer": "diffusion_pref_trainers.trainers",
}

__all__ = [
    "DiffusionDPOConfig",
    "DiffusionDPOTrainer",
    "DiffusionKTOConfig",
    "DiffusionKTOTrainer",
    "DiffusionMaPOConfig",
    "DiffusionMaPOTrainer",
    "DiffusionPreferenceTrainer",
    "DiffusionRPOConfig",
    "DiffusionRPOTrainer",
    "DiffusionSFTConfig",
    "DiffusionSFTTrainer",
    "DiffusionTrainingConfig",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "load_aligned_pipeline",
    "load_negative_adapter",
    "negative_guidance",
]


def __getattr__(name: str) -> Any:
    """Import a trainer or helper on first access (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'diffusion_pref_trainers' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, the lazy ones included (for completion)."""
    return sorted(set(globals()) | set(__all__))
