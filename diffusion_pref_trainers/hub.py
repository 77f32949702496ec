"""Model cards and pushes: what lands on the Hub, and a fast error when the Hub is out of reach."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData, constants

# Never uploaded: resumable training state and temporary folders stay local.
IGNORE_PATTERNS = [
    "checkpoint-*",
    "checkpoint-*/**",
    "tmp-checkpoint-*",
    "tmp-checkpoint-*/**",
    "*.pt",
    "*.bin",
]

CARD_TEMPLATE = """---
{card_data}
---

# {title}

A LoRA adapter for `{base_model}` aligned with **{method}** by
[diffusion_pref_trainers](https://github.com/diffusion-pref-trainers/diffusion_pref_trainers).

## Use

```python
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base_model}")
pipe.load_lora_weights("{repo_id}")
image = pipe("a photo of a cat").images[0]
```

## Training

- method: {method}
- dataset: {dataset}
- steps: {steps}

| hyperparameter | value |
|---|---|
{hyperparameters}

## Final metrics

| metric | value |
|---|---|
{metrics}
"""

CARD_KEYS = (
    "learning_rate", "beta", "loss_type", "per_device_train_batch_size", "gradient_accumulation_steps",
    "max_steps", "resolution", "use_lora", "lora_rank", "lora_alpha", "mixed_precision", "optim", "seed",
    "distance_temperature", "similarity", "timestep_sharing",
)  # fmt: skip


def hub_is_offline() -> bool:
    """True when huggingface_hub is in offline mode (`HF_HUB_OFFLINE=1`): any push would fail."""
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in (
        "1",
        "true",
        "yes",
    )


def ensure_hub_reachable() -> None:
    """Fail at once, in words, instead of hanging on a network call that cannot succeed."""
    if hub_is_offline():
        raise RuntimeError(
            "push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set. Unset it (and log in with "
            "`hf auth login`), or set push_to_hub=False and upload `output_dir` later."
        )


def build_model_card(
    *,
    base_model: str,
    method: str,
    repo_id: str,
    dataset: str | None,
    config: dict[str, Any],
    metrics: dict[str, float],
    steps: int,
) -> ModelCard:
    """A card with YAML metadata (base model, tags, dataset) and the run's settings and final metrics."""
    data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        license="apache-2.0",
        tags=["diffusers", "lora", "text-to-image", method, "diffusion_pref_trainers"],
        datasets=[dataset] if dataset else None,
        pipeline_tag="text-to-image",
    )
    rows = "\n".join(f"| {key} | {config[key]} |" for key in CARD_KEYS if key in config)
    metric_rows = "\n".join(f"| {key} | {value:.6g} |" for key, value in sorted(metrics.items())) or "| - | - |"
    content = CARD_TEMPLATE.format(
        card_data=data.to_yaml(),
        title=repo_id.split("/")[-1],
        base_model=base_model,
        method=method,
        repo_id=repo_id,
        dataset=dataset or "(in-memory dataset)",
        steps=steps,
        hyperparameters=rows,
        metrics=metric_rows,
    )
    return ModelCard(content)


def push_folder(
    folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None, commit_message: str
) -> str:
    """Create the repo if needed and upload `folder` without checkpoints; returns the commit URL."""
    ensure_hub_reachable()
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        commit_message=commit_message,
        ignore_patterns=IGNORE_PATTERNS,
    )
    return str(getattr(info, "commit_url", info))
