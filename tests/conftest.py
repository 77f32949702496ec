"""Shared fixtures: an offline environment, a tiny saved pipeline and small preference datasets."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

# Offline before anything imports huggingface_hub: a Hub call would otherwise hang ~23 s before failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="dpt-hf-home-")  # datasets' caches stay out of the user's home
atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from diffusion_pref_trainers import DiffusionDPOConfig  # noqa: E402
from diffusion_pref_trainers.testing import make_preference_dataset, tiny_clip_model, tiny_sd_pipeline  # noqa: E402

# The test machine's few cores are shared: one intra-op thread per process avoids oversubscription, which
# made a tiny-UNet evaluation about 10x slower with two threads under load (measured here: 48.7 s vs 4.3 s).
torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked `slow` unless DPT_SLOW_TESTS is set (CI leaves it unset)."""
    if os.environ.get("DPT_SLOW_TESTS"):
        return
    skip = pytest.mark.skip(reason="slow on a CPU (minutes); set DPT_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Stable Diffusion pipeline written with `save_pretrained`, loaded by path like a Hub model."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny CLIP model and processor saved like a Hub checkpoint, loaded by path (`similarity_model_name_or_path`)."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    model, processor = tiny_clip_model()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def pairs() -> datasets.Dataset:
    """Eight learnable pairs in the TRL schema (prompt, chosen, rejected), 32 px."""
    return make_preference_dataset(8)


@pytest.fixture(scope="session")
def pickapic_pairs() -> datasets.Dataset:
    """Eight pairs in the Pick-a-Pic schema (PNG bytes, odd rows with the winner second) plus two ties."""
    return make_preference_dataset(8, schema="pickapic", ties=2)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., DiffusionDPOConfig]:
    """A factory of small DPO configs writing under this test's tmp folder; keyword arguments override."""

    def build(**overrides) -> DiffusionDPOConfig:
        values = dict(
            output_dir=str(tmp_path / "out"), resolution=32, per_device_train_batch_size=4, max_steps=2,
            beta=50.0, learning_rate=1e-3, logging_steps=1, save_steps=0, eval_noise_draws=2,
        )  # fmt: skip
        values.update(overrides)
        return DiffusionDPOConfig(**values)

    return build


@pytest.fixture(scope="session")
def launch_two_processes() -> Callable[..., None]:
    """Runs a script of tests/scripts/ on two CPU processes (accelerate launch) with this checkout's package."""

    def launch(script: str, *script_args: str) -> None:
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            str(ROOT / "tests" / "scripts" / script), *script_args,
        ]  # fmt: skip
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    return launch
