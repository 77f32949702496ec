"""A TRL user's DPO script runs after changing only the class names: its TrainingArguments keywords, a
transformers callback, `train()`'s result and `save_model()` all work as they do with TRL."""

from __future__ import annotations

import re
from pathlib import Path

from diffusers import StableDiffusionPipeline

# A script as a TRL user writes it for `trl.DPOTrainer` (keywords of TRL's DPOConfig and transformers'
# TrainingArguments); MODEL, the datasets and OUTPUT_DIR come from the test.
TRL_SCRIPT = """
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer


class RecordLogs(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        seen.append((state.global_step, dict(logs)))


training_args = DPOConfig(
    output_dir=OUTPUT_DIR,
    run_name="trl-user",
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    gradient_accumulation_steps=1,
    learning_rate=1e-3,
    lr_scheduler_type="cosine",
    warmup_steps=0.25,
    max_steps=4,
    logging_steps=1,
    logging_first_step=True,
    eval_strategy="steps",
    eval_steps=2,
    save_strategy="steps",
    save_steps=2,
    save_total_limit=1,
    metric_for_best_model="eval_loss",
    greater_is_better=False,
    bf16=False,
    optim="adamw_torch",
    beta=50.0,
    seed=42,
    report_to="none",
)
trainer = DPOTrainer(
    model=MODEL,
    args=training_args,
    train_dataset=train_dataset,
    eval_dataset=eval_dataset,
    callbacks=[RecordLogs()],
)
result = trainer.train()
trainer.save_model(training_args.output_dir)
"""

# The only edit: the class names (and the package they come from).
RENAMES = {
    r"\btrl\b": "diffusion_pref_trainers",
    r"\bDPOConfig\b": "DiffusionDPOConfig",
    r"\bDPOTrainer\b": "DiffusionDPOTrainer",
}


def test_a_trl_dpo_script_runs_after_renaming_the_classes(tiny_pipe_dir, pairs, tmp_path: Path) -> None:
    script = TRL_SCRIPT
    for old, new in RENAMES.items():
        script, count = re.subn(old, new, script)
        assert count, old
    seen: list = []
    namespace = {
        "MODEL": StableDiffusionPipeline.from_pretrained(tiny_pipe_dir),
        "train_dataset": pairs,
        "eval_dataset": pairs.select(range(4)),
        "OUTPUT_DIR": str(tmp_path / "out"),
        "seen": seen,
    }
    exec(script, namespace)  # noqa: S102 - the user's script, as they would run it

    result, trainer = namespace["result"], namespace["trainer"]
    assert result.global_step == 4 and result.metrics["train_runtime"] > 0
    assert [step for step, logs in seen if "loss" in logs] == [1, 2, 3, 4]  # logging_first_step and every step
    assert [step for step, logs in seen if "eval_loss" in logs] == [2, 4]  # eval_strategy="steps", eval_steps=2
    assert trainer.state.best_metric is not None and trainer.state.best_model_checkpoint is not None
    assert trainer.lr_scheduler.get_last_lr()[0] < 1e-3  # cosine after a warm-up of 1 step (0.25 of 4)
    kept = {p.name for p in (tmp_path / "out").glob("checkpoint-*")}  # save_total_limit=1, never the best one
    assert "checkpoint-4" in kept and kept <= {"checkpoint-2", "checkpoint-4"}
    assert Path(trainer.state.best_model_checkpoint).name in kept
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
