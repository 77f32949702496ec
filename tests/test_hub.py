"""The Hub both ways, offline: samples and card, the exact upload, the calls made to huggingface_hub (patched at
its client), fast failures, loading an aligned pipeline back, resuming from a saved adapter, and safe loading only."""

from __future__ import annotations

import ast
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl
from peft.utils import get_peft_model_state_dict
from PIL import Image

from diffusion_pref_trainers import (
    DiffusionDPOConfig,
    DiffusionDPOTrainer,
    TrainerCallback,
    hub,
    load_aligned_pipeline,
)
from diffusion_pref_trainers.evaluation import generate
from diffusion_pref_trainers.evaluation.grid import HEADER_HEIGHT, LABEL_WIDTH, PADDING

TOKEN = "hf_secret_test_token_0123456789"
PROMPTS = ["a red cat", "a blue dog"]
SAMPLING = dict(num_inference_steps=2, height=32, width=32)


def _config(tmp_path: Path, **overrides) -> DiffusionDPOConfig:
    values = dict(
        output_dir=str(tmp_path / "tiny-dpo"), resolution=32, per_device_train_batch_size=4, max_steps=2,
        beta=50.0, learning_rate=1e-2, logging_steps=1, save_steps=1, eval_noise_draws=1,
    )  # fmt: skip
    values.update(overrides)
    return DiffusionDPOConfig(**values)


@pytest.fixture(scope="module")
def run(tiny_pipe_dir, pairs, tmp_path_factory) -> DiffusionDPOTrainer:
    """Two LoRA steps from a saved pipeline, with checkpoints, a Hub token and validation samples."""
    args = _config(
        tmp_path_factory.mktemp("hub"), validation_prompts=PROMPTS, num_validation_images=2, validation_seed=7,
        validation_inference_steps=2, hub_token=TOKEN,
    )  # fmt: skip
    trainer = DiffusionDPOTrainer(tiny_pipe_dir, args, pairs)
    trainer.train()
    return trainer


class HubRecorder:
    """The calls made to huggingface_hub's client; `before_return(commit_message)` runs inside each commit."""

    def __init__(self) -> None:
        self.calls: list[SimpleNamespace] = []
        self.before_return = lambda message: None

    def of(self, kind: str) -> list[SimpleNamespace]:
        return [call for call in self.calls if call.kind == kind]


@pytest.fixture
def online(monkeypatch, tmp_path) -> HubRecorder:
    """Offline mode lifted for one test (no token file either) and HfApi patched at its boundary."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(hub, "probe_hub", lambda endpoint: None)
    recorder = HubRecorder()

    def create_repo(self, repo_id, *, private=False, exist_ok=False, repo_type=None, **_):
        recorder.calls.append(SimpleNamespace(kind="create_repo", token=self.token, repo_id=repo_id, private=private,
                                              exist_ok=exist_ok, repo_type=repo_type))  # fmt: skip
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'me/' + repo_id}")

    def create_commit(self, repo_id, operations, *, commit_message, repo_type=None, **_):
        files = {op.path_in_repo: _content(op.path_or_fileobj) for op in operations}
        recorder.calls.append(SimpleNamespace(kind="create_commit", token=self.token, repo_id=repo_id, files=files,
                                              message=commit_message, repo_type=repo_type))  # fmt: skip
        recorder.before_return(commit_message)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{len(recorder.calls)}")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: pytest.fail("uploads go through create_commit"))
    return recorder


def _content(source) -> bytes:
    return source if isinstance(source, bytes) else Path(source).read_bytes()


def _cell(grid: Image.Image, row: int, column: int, size: int = 32) -> np.ndarray:
    """One image cell of a labelled grid, cut where `make_grid` pastes it."""
    left, top = LABEL_WIDTH + column * (size + PADDING), HEADER_HEIGHT + row * (size + PADDING)
    return np.asarray(grid.crop((left, top, left + size, top + size)))


# ------------------------------------------------------------------------------------ samples and card
def test_training_renders_base_and_aligned_samples_with_the_same_seeds(run, tiny_pipe_dir) -> None:
    from diffusers import StableDiffusionPipeline

    out = Path(run.args.output_dir)
    grid = Image.open(out / hub.SAMPLES_FILE)
    assert grid.size == (LABEL_WIDTH + 4 * (32 + PADDING), HEADER_HEIGHT + 2 * (32 + PADDING))
    # Computed independently: the base pipeline from disk, and the base with the saved adapter loaded.
    base = StableDiffusionPipeline.from_pretrained(tiny_pipe_dir)
    base.set_progress_bar_config(disable=True)
    expected_base = generate(base, PROMPTS, [7, 8], **SAMPLING)
    base.load_lora_weights(str(out))
    expected_aligned = generate(base, PROMPTS, [7, 8], **SAMPLING)
    for i in range(2):
        for j in range(2):
            assert np.array_equal(_cell(grid, i, 2 * j), np.asarray(expected_base[i][j]))
            assert np.array_equal(_cell(grid, i, 2 * j + 1), np.asarray(expected_aligned[i][j]))
    assert not np.array_equal(_cell(grid, 0, 0), _cell(grid, 0, 1))  # the adapter changed the images


def test_the_local_card_names_the_base_model_and_shows_the_samples(run, tiny_pipe_dir) -> None:
    card = ModelCard.load(Path(run.args.output_dir) / "README.md")
    assert card.data.base_model == tiny_pipe_dir and "lora" in card.data.tags
    assert f"![base vs aligned]({hub.SAMPLES_FILE})" in card.text and "a red cat; a blue dog" in card.text
    assert f'load_aligned_pipeline("{Path(run.args.output_dir).resolve()}")' in card.text  # loads from anywhere


def test_the_card_shows_each_prompts_aligned_image_in_a_widget(run) -> None:
    out = Path(run.args.output_dir)
    card = ModelCard.load(out / "README.md")
    assert card.data.widget == [
        {"text": prompt, "output": {"url": f"samples/prompt_{index}.png"}} for index, prompt in enumerate(PROMPTS)
    ]
    grid = Image.open(out / hub.SAMPLES_FILE)
    for index in range(len(PROMPTS)):  # the aligned image of the first seed
        assert np.array_equal(np.asarray(Image.open(out / f"samples/prompt_{index}.png")), _cell(grid, index, 1))


def test_the_card_has_the_hub_tags_versions_and_the_methods_paper(run) -> None:
    card = ModelCard.load(Path(run.args.output_dir) / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"diffusers", "lora", "template:sd-lora", "text-to-image", "diffusion-dpo", "stable-diffusion"} <= set(
        card.data.tags
    )
    import diffusers
    import peft

    assert f"- diffusers: {diffusers.__version__}" in card.text and f"- peft: {peft.__version__}" in card.text
    assert "```bibtex\n@inproceedings{wallace2024diffusion" in card.text and "2311.12908" in card.text


def test_a_base_model_without_a_card_gets_license_other_with_a_note_never_a_guess(run, tiny_pipe_dir) -> None:
    card = ModelCard.load(Path(run.args.output_dir) / "README.md")
    assert card.data.license == "other" and "apache" not in card.content.lower()
    assert f"as a derivative of `{tiny_pipe_dir}`, this model is under that model's license" in card.text


def test_the_card_takes_the_base_models_license_and_the_lora_settings_that_trained(
    tiny_pipe_dir, pairs, tmp_path
) -> None:
    from peft import LoraConfig

    base = tmp_path / "base"
    shutil.copytree(tiny_pipe_dir, base)
    (base / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# base\n")
    peft_config = LoraConfig(r=2, lora_alpha=8, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
    trainer = DiffusionDPOTrainer(str(base), _config(tmp_path, lora_rank=16), pairs, peft_config=peft_config)
    card = ModelCard(trainer.model_card("me/tiny-dpo", for_hub=True).content)  # renders and parses back
    assert card.data.license == "creativeml-openrail-m" and "`creativeml-openrail-m`, the base model's" in card.text
    for row in (
        "| r | 2 |",
        "| lora_alpha | 8 |",
        "| target_modules | to_q, to_v |",
        "| text encoders | not trained |",
    ):
        assert row in card.text
    assert "16" not in card.text.split("### LoRA")[1].split("##")[0] and "lora_rank" not in card.text


@pytest.mark.parametrize(
    ("method", "papers"),
    [("diffusion-rpo", ["2406.06382", "2402.10958"]), ("diffusion-kto", ["2404.04465"]),
     ("diffusion-mapo", ["2406.06424"]), ("diffusion-sft", [])],
)  # fmt: skip
def test_each_method_cites_its_papers(method: str, papers: list[str]) -> None:
    card = hub.build_model_card(
        base_model="owner/base", method=method, family="stable-diffusion", repo_id="me/run", load_from="me/run",
        prompt="a cat", dataset=None, config={}, metrics={}, steps=1,
    )  # fmt: skip
    assert [paper for paper in papers if paper in card.text] == papers
    assert ("```bibtex" in card.text) == bool(papers)


# ----------------------------------------------------------------------------------------- push out
def test_the_upload_is_weights_card_config_and_samples_without_checkpoints_or_pickles(run, tmp_path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(run.args.output_dir, folder)
    assert {"checkpoint-1", "checkpoint-2"} <= {path.name for path in folder.iterdir()}
    clutter = (
        "optimizer.pt", "notes.pkl", "head.pth", "tmp-checkpoint-3/adapter_model.safetensors", ".env",
        ".ssh/id_rsa", ".git-credentials", "frame.pickle", "embeddings.npy", "model.joblib", "weights.bin",
        ".cache/hidden.safetensors", ".hidden.safetensors", "samples/latents.npy", "samples/old/grid.png",
        "unet/diffusion_pytorch_model.bin", "runs/events.out.tfevents.1", "trainer_state.json", "run.json", ".lock",
    )  # fmt: skip
    for stray in clutter:
        (folder / stray).parent.mkdir(parents=True, exist_ok=True)
        (folder / stray).write_bytes(b"x")
    assert hub.upload_plan(folder) == [
        "README.md", "pytorch_lora_weights.safetensors", "samples/prompt_0.png", "samples/prompt_1.png",
        "samples/validation.png", "training_config.json",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "written",
    [
        ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"],
        ["transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
         "transformer/diffusion_pytorch_model.safetensors.index.json"],
    ],
)  # fmt: skip
def test_the_allow_list_takes_a_full_fine_tune(tmp_path, written: list[str]) -> None:
    for name in [*written, "run.json", ".lock", "unet/notes.txt", "transformer/sub/x.safetensors"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert hub.upload_plan(tmp_path) == sorted(written)


def test_no_file_the_run_wrote_holds_the_token(run) -> None:
    files = [path for path in Path(run.args.output_dir).rglob("*") if path.is_file()]
    assert any("checkpoint-" in str(path) for path in files)
    assert all(TOKEN.encode() not in path.read_bytes() for path in files)
    assert TOKEN not in repr(run.args) and "hub_token" not in run.args.to_dict()


def test_push_to_hub_creates_the_repo_and_commits_the_plan_with_the_hub_card(run, online, tiny_pipe_dir) -> None:
    run.args.hub_model_id, run.args.hub_private_repo = "tiny-dpo", True
    try:
        url = run.push_to_hub()
    finally:
        run.args.hub_model_id, run.args.hub_private_repo = None, False
    create, commit = online.calls
    assert (create.kind, create.repo_id, create.private, create.exist_ok, create.token) == (
        "create_repo", "tiny-dpo", True, True, TOKEN
    )  # fmt: skip
    assert (commit.repo_id, commit.repo_type, commit.token) == ("me/tiny-dpo", "model", TOKEN)
    assert url == "https://huggingface.co/me/tiny-dpo/commit/2"
    folder = Path(run.args.output_dir)
    assert sorted(commit.files) == hub.upload_plan(folder)
    assert commit.files[hub.LORA_FILE] == (folder / hub.LORA_FILE).read_bytes()
    assert all(TOKEN.encode() not in content for content in commit.files.values())
    card = ModelCard(commit.files["README.md"].decode())
    # A local base model stays out of the Hub metadata (which wants a Hub id) but is named in the text.
    assert card.data.base_model is None and tiny_pipe_dir in card.text
    assert {"diffusers", "lora", "diffusion-dpo"} <= set(card.data.tags)
    assert 'pipe.load_lora_weights("me/tiny-dpo", weight_name=' in card.text and "![base vs aligned]" in card.text
    # The local card keeps the path, so the folder still loads without the Hub.
    assert ModelCard.load(folder / "README.md").data.base_model == tiny_pipe_dir


def test_push_to_hub_true_pushes_every_save_in_the_background_and_at_the_end(
    pairs, tmp_path, online, monkeypatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    release = threading.Event()
    online.before_return = lambda message: release.wait(30) if "step 1" in message else None

    class ReleaseAtStep2(TrainerCallback):
        """Holds the step-1 upload until step 2 is done, then lets it finish before step 3."""

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            if state.global_step == 2:  # step 3 begins
                release.set()
                trainer._push_future.result(timeout=30)

    from diffusion_pref_trainers.testing import tiny_sd_pipeline

    args = _config(tmp_path, push_to_hub=True, hub_strategy="every_save", hub_model_id="me/live", max_steps=3)
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs, callbacks=[ReleaseAtStep2])
    trainer.train()
    commits = online.of("create_commit")
    # Step 1 is still uploading at step 2 (skipped); step 3 is pushed after it finished; then the final push.
    assert [call.message for call in commits] == [
        "Training in progress, step 1", "Training in progress, step 3", "Upload aligned model"
    ]  # fmt: skip
    assert [call.repo_id for call in online.of("create_repo")] == ["me/live"]
    for call in commits:
        assert sorted(call.files) == ["README.md", "pytorch_lora_weights.safetensors", "training_config.json"]
    assert trainer._push_future is None  # nothing left running after train()


def test_offline_pushes_fail_fast_without_touching_the_client(run, monkeypatch) -> None:
    monkeypatch.setattr(HfApi, "create_commit", lambda *a, **k: pytest.fail("no Hub call offline"))
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
        hub.push_folder(run.args.output_dir, "me/x", commit_message="x")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
        run.push_to_hub()
    assert time.perf_counter() - start < 5.0


def test_a_push_without_a_token_fails_before_training(pairs, tmp_path, online, monkeypatch) -> None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    from diffusion_pref_trainers.testing import tiny_sd_pipeline

    args = _config(tmp_path, push_to_hub=True)
    with pytest.raises(RuntimeError, match="needs a Hugging Face token: run `hf auth login`"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)
    assert online.calls == [] and not Path(args.output_dir).exists()


def test_an_unreachable_hub_with_a_token_fails_before_training(pairs, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port
    from diffusion_pref_trainers.testing import tiny_sd_pipeline

    args = _config(tmp_path, push_to_hub=True, hub_token=TOKEN)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"http://127.0.0.1:9 cannot be reached.*push_to_hub=False"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)
    assert time.perf_counter() - start < 15.0
    assert not Path(args.output_dir).exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(hub_strategy="checkpoint"), "hub_strategy='checkpoint'.*end, every_save"),
        (dict(push_to_hub=True, hub_strategy="every_save", save_steps=0), "save_steps=0"),
        (dict(use_lora=False, lora_name_or_path="me/adapter"), "needs `use_lora=True`"),
    ],
)
def test_hub_settings_are_validated(tmp_path, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        _config(tmp_path, **overrides)


# ------------------------------------------------------------------------------------------- hub in
def test_load_aligned_pipeline_reads_the_card_of_a_pushed_folder(run, tmp_path) -> None:
    from diffusion_pref_trainers.testing import tiny_sd_pipeline

    pipe = load_aligned_pipeline(run.args.output_dir)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    pipe.set_progress_bar_config(disable=True)
    run.pipe.set_progress_bar_config(disable=True)
    loaded = generate(pipe, PROMPTS[:1], [0], **SAMPLING)[0][0]
    trained = generate(run.pipe, PROMPTS[:1], [0], **SAMPLING)[0][0]
    assert np.array_equal(np.asarray(loaded), np.asarray(trained))
    # A folder laid out like the pushed repo (its card has no local base path) needs the base named.
    repo = tmp_path / "me" / "tiny-dpo"
    repo.mkdir(parents=True)
    shutil.copy(Path(run.args.output_dir, hub.LORA_FILE), repo)
    run.model_card("me/tiny-dpo", for_hub=True).save(str(repo / "README.md"))
    with pytest.raises(ValueError, match="names no single base model: pass `base_model=`"):
        load_aligned_pipeline(repo)
    base_dir = tmp_path / "base"
    tiny_sd_pipeline().save_pretrained(base_dir)
    again = load_aligned_pipeline(repo, base_model=str(base_dir))
    again.set_progress_bar_config(disable=True)
    assert np.array_equal(np.asarray(generate(again, PROMPTS[:1], [0], **SAMPLING)[0][0]), np.asarray(trained))


def test_load_aligned_pipeline_loads_a_full_fine_tune_from_its_subfolder(tiny_pipe_dir, pairs, tmp_path) -> None:
    trainer = DiffusionDPOTrainer(tiny_pipe_dir, _config(tmp_path, use_lora=False, max_steps=1, save_steps=0), pairs)
    trainer.train()
    out = Path(trainer.args.output_dir)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and not list(out.rglob("*.bin"))
    pipe = load_aligned_pipeline(out)
    trained = trainer._unwrapped.state_dict()
    loaded = pipe.unet.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)


def test_load_aligned_pipeline_refuses_remote_code_and_pickles(run, tmp_path, monkeypatch) -> None:
    for unsafe in ("trust_remote_code", "custom_pipeline", "use_safetensors"):
        with pytest.raises(ValueError, match="never runs remote code or reads pickles"):
            load_aligned_pipeline(run.args.output_dir, **{unsafe: True})
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(Path(run.args.output_dir, "README.md"), pickled)
    from safetensors.torch import load_file

    torch.save(load_file(Path(run.args.output_dir, hub.LORA_FILE)), pickled / "pytorch_lora_weights.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    with pytest.raises(OSError, match="pytorch_lora_weights.safetensors"):
        load_aligned_pipeline(pickled)


# -------------------------------------------------------------------------------- lora_name_or_path
def test_lora_name_or_path_starts_from_the_saved_adapter(run, pairs, tmp_path) -> None:
    from diffusion_pref_trainers.testing import tiny_sd_pipeline

    resumed = DiffusionDPOTrainer(tiny_sd_pipeline(), _config(tmp_path, lora_name_or_path=run.args.output_dir), pairs)
    saved, loaded = get_peft_model_state_dict(run._unwrapped), get_peft_model_state_dict(resumed._unwrapped)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in loaded.items())  # not a fresh adapter
    resumed.train()  # and it trains on from there


def test_lora_name_or_path_downloads_only_the_safetensors_file_of_a_repo(run, pairs, tmp_path, monkeypatch) -> None:
    requested = []

    def download(repo_id, filename, **kwargs):
        requested.append((repo_id, filename))
        return str(Path(run.args.output_dir, filename))

    monkeypatch.setattr(hub, "hf_hub_download", download)
    from diffusion_pref_trainers.testing import tiny_sd_pipeline

    DiffusionDPOTrainer(tiny_sd_pipeline(), _config(tmp_path, lora_name_or_path="me/tiny-dpo"), pairs)
    assert requested == [("me/tiny-dpo", "pytorch_lora_weights.safetensors")]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(lora_rank=4, lora_alpha=8), "has lora_rank=8 for unet; this run has 4"),
        (dict(lora_alpha=16), "has lora_alpha=8 for unet; this run has 16"),
        (dict(lora_target_modules=["to_q", "to_v"]), "targets other unet modules.*set `lora_target_modules`"),
        (dict(lora_name_or_path="missing/folder/x"), "neither an existing folder"),
    ],
)
def test_lora_name_or_path_mismatches_are_clear_errors(run, pairs, tmp_path, overrides, message) -> None:
    from diffusion_pref_trainers.testing import tiny_sd_pipeline

    args = _config(tmp_path, **{"lora_name_or_path": run.args.output_dir, **overrides})
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)


def test_lora_name_or_path_restores_text_encoder_adapters_only_when_they_are_trained(pairs, tmp_path) -> None:
    from diffusion_pref_trainers.adapters import lora_config_from_args
    from diffusion_pref_trainers.families import get_family
    from diffusion_pref_trainers.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=3)
    pipe.unet.add_adapter(lora_config_from_args(8, 8, 0.0, ["to_q", "to_k", "to_v", "to_out.0"]))
    pipe.text_encoder.add_adapter(lora_config_from_args(8, 8, 0.0, ["q_proj", "k_proj", "v_proj", "out_proj"]))
    for module in (pipe.unet, pipe.text_encoder):
        for name, param in module.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param)
    saved = tmp_path / "saved"
    get_family(pipe).save_lora_weights(str(saved), {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    args = _config(tmp_path, lora_name_or_path=str(saved))
    with pytest.raises(ValueError, match=r"\['text_encoder'\], which this run does not adapt \(set `train_text_enc"):
        DiffusionDPOTrainer(tiny_sd_pipeline(), args, pairs)
    trainer = DiffusionDPOTrainer(tiny_sd_pipeline(), _config(tmp_path, lora_name_or_path=str(saved),
                                                              train_text_encoder=True), pairs)  # fmt: skip
    for module, loaded in ((pipe.unet, trainer._unwrapped), (pipe.text_encoder, trainer.text_encoders["text_encoder"])):
        expected, got = get_peft_model_state_dict(module), get_peft_model_state_dict(loaded)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_lora_name_or_path_never_reads_a_pickled_adapter(tmp_path) -> None:
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="safetensors files"):
        hub.adapter_file(tmp_path)


# -------------------------------------------------------------------------------------------- security
def test_the_package_never_enables_remote_code_or_unpickles() -> None:
    package = Path(hub.__file__).parent
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                assert not any(name.split(".")[0] in ("pickle", "dill") for name in names), path
            if isinstance(node, ast.Call):
                called = ast.unparse(node.func)
                assert called not in ("torch.load", "torch.save", "load_state_dict_from_url"), (path, node.lineno)
                # accelerate's save_state/load_state pickle the optimizer and random states: checkpoints use train_state
                assert not called.endswith((".save_state", ".load_state")), (path, node.lineno)
                keywords = {keyword.arg: ast.unparse(keyword.value) for keyword in node.keywords}
                for name in ("trust_remote_code", "custom_pipeline", "allow_pickle"):
                    assert keywords.get(name, "None") in ("False", "None"), (path, node.lineno)
                loads_weights = not called.startswith(("CLIPProcessor", "AutoTokenizer"))  # text/json files only
                if called.endswith((".load_lora_weights", ".from_pretrained")) and loads_weights:
                    assert keywords.get("use_safetensors") == "True", (path, node.lineno)


def _usage_snippet(card_text: str) -> str:
    """The Python code block of a model card."""
    return card_text.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_local_cards_snippet_runs_and_loads_the_adapter(run) -> None:
    # The run's base model is the tiny pipeline's folder, so the snippet runs as written, offline.
    folder = Path(run.args.output_dir)
    snippet = _usage_snippet((folder / "README.md").read_text())
    assert f'load_lora_weights("{folder.resolve()}"' in snippet and f'pipe("{PROMPTS[0]}")' in snippet
    namespace: dict = {}
    exec(snippet, namespace)  # noqa: S102 - the card's own code, as a user would paste it
    pipe = namespace["pipe"]
    assert pipe.get_active_adapters() and namespace["image"].size == (32, 32)
    loaded = get_peft_model_state_dict(pipe.unet, adapter_name=pipe.get_active_adapters()[0])
    trained = get_peft_model_state_dict(run._unwrapped)
    assert loaded.keys() == trained.keys()
    assert all(torch.equal(loaded[key].cpu(), trained[key].cpu().to(loaded[key].dtype)) for key in trained)


def test_the_cards_prompt_is_the_first_training_prompt_without_validation_prompts(
    tiny_pipe_dir, pairs, tmp_path
) -> None:
    trainer = DiffusionDPOTrainer(tiny_pipe_dir, _config(tmp_path), pairs)
    local = _usage_snippet(trainer.model_card("tiny-dpo", folder=tmp_path / "tiny-dpo").text)
    hub_card = _usage_snippet(trainer.model_card("me/tiny-dpo", folder=tmp_path / "tiny-dpo", for_hub=True).text)
    assert f'pipe("{pairs[0]["prompt"]}")' in local and "photo of a cat" not in local
    assert f'load_lora_weights("{(tmp_path / "tiny-dpo").resolve()}"' in local
    assert 'load_lora_weights("me/tiny-dpo"' in hub_card
