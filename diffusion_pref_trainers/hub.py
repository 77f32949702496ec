"""The Hub, both ways: model cards, what is uploaded and how, and loading an aligned pipeline back.

Out: `create_repo` and `push_folder` upload a saved run in one commit, only the files of `UPLOAD_ALLOW_LIST` (never
checkpoints, pickles or dotfiles); offline, with no token, or with the Hub unreachable, they fail at once in words.
In: `load_aligned_pipeline` reads a pushed card for the base model and builds the pipeline with the weights loaded;
`adapter_file` finds the adapter that the config's `lora_name_or_path` names (`init_lora_weights` before, a name now
deprecated).
Everything read back is safetensors or text: nothing is unpickled, no remote code runs.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.metadata
import json
import os
import re
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    get_session,
    get_token,
    hf_hub_download,
)
from huggingface_hub.errors import EntryNotFoundError
from PIL import Image

LORA_FILE = "pytorch_lora_weights.safetensors"
SAMPLES_FILE = "samples/validation.png"
WIDGET_FILE = "samples/prompt_{}.png"  # the aligned image of validation prompt i, first seed
# What `push_folder` uploads: exactly the files a run writes for users (adapter or full denoiser weights as
# safetensors, the model card, the settings, the sample grid). A `*` never crosses a `/`, and no path with a dotfile
# or dot-folder goes, so checkpoints, the run record (`run.json`: local paths, for resuming), caches, secrets and
# pickles never leave the machine.
UPLOAD_ALLOW_LIST = (
    "*.safetensors",
    "README.md",
    "training_config.json",
    "samples/*.png",
    *(f"{folder}/{name}" for folder in ("unet", "transformer") for name in ("*.safetensors", "config.json")),
    *(f"{folder}/*.safetensors.index.json" for folder in ("unet", "transformer")),
)
# Keyword arguments `load_aligned_pipeline` refuses: they would run code from the Hub or read pickles.
UNSAFE_LOAD_KWARGS = ("trust_remote_code", "custom_pipeline", "custom_revision", "use_safetensors")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")

CARD_TEMPLATE = """{weights} for `{base_model}` aligned with **{method}** by
[diffusion_pref_trainers](https://github.com/diffusion-pref-trainers/diffusion_pref_trainers).

## Use

```python
{usage}
image = pipe({prompt}).images[0]
```

or, reading the base model from this card: `pipe = diffusion_pref_trainers.load_aligned_pipeline("{load_from}")`.
{samples}
## License

{license}

## Training

- method: {method}
- dataset: {dataset}
- steps: {steps}

| hyperparameter | value |
|---|---|
{hyperparameters}
{lora}
## Final metrics

| metric | value |
|---|---|
{metrics}

## Framework versions

{versions}
{citation}"""

LORA_SECTION = """
### LoRA

| setting | value |
|---|---|
{rows}
"""

CITATION_SECTION = """
## Citation

```bibtex
{entries}
```
"""

SAMPLES_SECTION = """
## Samples

Base model and aligned model, side by side for each seed (same prompt, same starting noise):

![base vs aligned]({path})

Prompts: {prompts}
"""

CARD_KEYS = (
    "learning_rate", "beta", "loss_type", "per_device_train_batch_size", "gradient_accumulation_steps",
    "max_steps", "resolution", "mixed_precision", "optim", "seed",
    "distance_temperature", "similarity", "timestep_sharing", "proportion_empty_prompts",
)  # fmt: skip

# The papers of each method, for the card's BibTeX block.
CITATIONS = {
    "diffusion-dpo": (
        """@inproceedings{wallace2024diffusion,
  title={Diffusion Model Alignment Using Direct Preference Optimization},
  author={Wallace, Bram and Dang, Meihua and Rafailov, Rafael and Zhou, Linqi and Lou, Aaron and Purushwalkam, Senthil
    and Ermon, Stefano and Xiong, Caiming and Joty, Shafiq and Naik, Nikhil},
  booktitle={CVPR},
  year={2024},
  eprint={2311.12908},
  archivePrefix={arXiv}
}""",
    ),
    "diffusion-rpo": (
        """@article{gu2024diffusionrpo,
  title={Diffusion-RPO: Aligning Diffusion Models through Relative Preference Optimization},
  author={Gu, Yi and Wang, Zhendong and Yin, Yueqin and Xie, Yujia and Zhou, Mingyuan},
  journal={arXiv preprint arXiv:2406.06382},
  year={2024}
}""",
        """@article{yin2024relative,
  title={Relative Preference Optimization: Enhancing LLM Alignment through Contrasting Responses across Identical
    and Diverse Prompts},
  author={Yin, Yueqin and Wang, Zhendong and Gu, Yi and Huang, Hai and Chen, Weizhu and Zhou, Mingyuan},
  journal={arXiv preprint arXiv:2402.10958},
  year={2024}
}""",
    ),
    "diffusion-kto": (
        """@article{li2024aligning,
  title={Aligning Diffusion Models by Optimizing Human Utility},
  author={Li, Shufan and Kallidromitis, Konstantinos and Gokul, Akash and Kato, Yusuke and Kozuka, Kazuki},
  journal={arXiv preprint arXiv:2404.04465},
  year={2024}
}""",
    ),
    "diffusion-mapo": (
        """@article{hong2024mapo,
  title={Margin-aware Preference Optimization for Aligning Diffusion Models without Reference},
  author={Hong, Jiwoo and Paul, Sayak and Lee, Noah and Rasul, Kashif and Thorne, James and Jeong, Jongheon},
  journal={arXiv preprint arXiv:2406.06424},
  year={2024}
}""",
    ),
}
# The packages whose versions a card lists (`framework_versions`).
VERSIONED_PACKAGES = ("diffusion_pref_trainers", "torch", "diffusers", "transformers", "peft", "accelerate")
UNKNOWN_LICENSE = (
    "The base model's license could not be read (its model card was not found locally or in the Hugging Face "
    "cache), so this card says `other`: as a derivative of `{base_model}`, this model is under that model's license."
)


def hub_is_offline() -> bool:
    """True when huggingface_hub is in offline mode (`HF_HUB_OFFLINE=1`): any push would fail."""
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in (
        "1",
        "true",
        "yes",
    )


def ensure_hub_reachable(token: str | None = None) -> None:
    """Fail at once, in words, where a push cannot succeed: offline mode, no token anywhere, or no answer from the
    Hub's endpoint.

    The token is looked up as huggingface_hub does (`HF_TOKEN`, then the file `hf auth login` writes); it is
    only checked for presence, never printed or stored.
    """
    if hub_is_offline():
        raise RuntimeError(
            "push_to_hub needs the Hugging Face Hub, but HF_HUB_OFFLINE is set. Unset it (and log in with "
            "`hf auth login`), or set push_to_hub=False and upload `output_dir` later."
        )
    if token is None and get_token() is None:
        raise RuntimeError(
            "push_to_hub needs a Hugging Face token: run `hf auth login`, set the HF_TOKEN environment variable, "
            "or pass `hub_token`; or set push_to_hub=False."
        )
    probe_hub(constants.ENDPOINT)


def probe_hub(endpoint: str, timeout: float = 10.0) -> None:
    """Fail in words when `endpoint` cannot be reached at all (any HTTP answer counts as reachable)."""
    try:
        get_session().head(endpoint, timeout=timeout)
    # The session is huggingface_hub's (requests or httpx, by version): any error here is a transport error,
    # as an HTTP status does not raise.
    except Exception as error:
        raise RuntimeError(
            f"push_to_hub needs the Hugging Face Hub, but {endpoint} cannot be reached ({type(error).__name__}: "
            f"{error}). Check the network (and HF_ENDPOINT), or set push_to_hub=False and upload `output_dir` later."
        ) from None


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id (`owner/name`) rather than a local path."""
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).exists()


@functools.lru_cache(maxsize=8)
def base_model_license(base_model: str, token: str | None = None) -> str | None:
    """The license in the base model's own card: a local folder's README.md, or the Hub repo's (read from the
    Hugging Face cache when offline); None when it has no card, names no license, or cannot be reached. Read once
    per base model: every save's card asks again."""
    local = _local(base_model)
    if local is not None:
        card_path = local / "README.md" if local.is_dir() else local
        if not card_path.is_file():
            return None
        location = str(card_path)
    elif is_hub_id(base_model):
        location = base_model
    else:
        return None
    try:
        license_ = ModelCard.load(location, token=token).data.license
    except (OSError, ValueError, EntryNotFoundError):  # offline and not cached, no such repo, no README.md
        return None
    return license_ if isinstance(license_, str) else None


def framework_versions() -> str:
    """The installed versions of `VERSIONED_PACKAGES`, one Markdown list item each."""
    return "\n".join(f"- {name}: {_version(name)}" for name in VERSIONED_PACKAGES)


def _version(package: str) -> str:
    """A package's installed version, or `not installed`."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def build_model_card(
    *,
    base_model: str,
    method: str,
    family: str,
    repo_id: str,
    load_from: str,
    prompt: str,
    dataset: str | None,
    config: dict[str, Any],
    metrics: dict[str, float],
    steps: int,
    license: str | None = None,
    lora: dict[str, Any] | None = None,
    full_weights: tuple[str, str] | None = None,
    samples: str | None = None,
    widget: list[dict[str, Any]] | None = None,
    for_hub: bool = False,
) -> ModelCard:
    """A card with YAML metadata (base model, license, tags, widget, dataset) and the run's settings, samples, final
    metrics, framework versions and the method's papers, its tags added with diffusers' `populate_model_card`.

    `load_from` is where the usage snippet loads the weights (the Hub repo, or the folder's absolute path) and
    `prompt` the prompt it generates with. `license` is the base model's (`base_model_license`; None: `other`, with a
    note). `lora` holds the adapter's settings as trained (rank, alpha, targets...); `full_weights` is the
    (sub-folder, class name) of a fully fine-tuned denoiser, None for a LoRA adapter. `samples` is the card-relative
    path of the sample grid, if any, and `widget` the Hub gallery's entries (`hub.widget`). A card `for_hub` names a
    local base model only in its text: the Hub's `base_model` metadata must be a Hub id.
    """
    from diffusers.utils.hub_utils import populate_model_card

    weights, usage = _weights_and_usage(base_model, load_from, full_weights)
    data = ModelCardData(
        base_model=base_model if not for_hub or is_hub_id(base_model) else None,
        license=license or "other",
        datasets=[dataset] if dataset and (not for_hub or is_hub_id(dataset)) else None,
        pipeline_tag="text-to-image",
        widget=widget or None,
    )
    prompts = config.get("validation_prompts") or []
    lora_rows = "\n".join(f"| {key} | {value} |" for key, value in (lora or {}).items())
    content = CARD_TEMPLATE.format(
        weights=weights,
        usage=usage,
        load_from=load_from,
        prompt=json.dumps(prompt),
        samples=SAMPLES_SECTION.format(path=samples, prompts="; ".join(prompts)) if samples else "",
        license=f"`{license}`, the base model's license." if license else UNKNOWN_LICENSE.format(base_model=base_model),
        base_model=base_model,
        method=method,
        dataset=dataset or "(in-memory dataset)",
        steps=steps,
        hyperparameters="\n".join(f"| {key} | {config[key]} |" for key in CARD_KEYS if key in config),
        lora=LORA_SECTION.format(rows=lora_rows) if lora else "",
        metrics="\n".join(f"| {key} | {value:.6g} |" for key, value in sorted(metrics.items())) or "| - | - |",
        versions=framework_versions(),
        citation=CITATION_SECTION.format(entries="\n\n".join(CITATIONS[method])) if method in CITATIONS else "",
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {repo_id.split('/')[-1]}\n\n{content}")
    kind = ["lora", "template:sd-lora"] if full_weights is None else []
    return populate_model_card(
        card, tags=["diffusers", *kind, "text-to-image", method, family, "diffusion_pref_trainers"]
    )


def _weights_and_usage(base_model: str, load_from: str, full_weights: tuple[str, str] | None) -> tuple[str, str]:
    """What the card calls the weights, and the code that loads them onto the base model."""
    if full_weights is None:
        usage = (
            f'from diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained("{base_model}")\n'
            f'pipe.load_lora_weights("{load_from}", weight_name="{LORA_FILE}")'
        )
        return "A LoRA adapter", usage
    folder, model_class = full_weights
    usage = (
        f"from diffusers import DiffusionPipeline, {model_class}\n\n"
        f'{folder} = {model_class}.from_pretrained("{load_from}", subfolder="{folder}")\n'
        f'pipe = DiffusionPipeline.from_pretrained("{base_model}", {folder}={folder})'
    )
    return f"A fully fine-tuned `{model_class}`", usage


def render_comparison(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    base_weights: Callable[[], AbstractContextManager] | None,
    **call_kwargs: Any,
) -> tuple[Image.Image, list[list[Image.Image]]]:
    """Generate `prompts` x `seeds` with the pipeline as it is (aligned) and, inside `base_weights()`, as the base
    model; returns one grid (base next to aligned per seed, a row per prompt) and the aligned images. Without
    `base_weights` (a full fine-tune kept no base copy) the grid holds the aligned images only."""
    from diffusion_pref_trainers.evaluation import generate, make_comparison_grid, make_grid

    aligned = generate(pipe, prompts, seeds, desc="generating aligned samples", **call_kwargs)
    if base_weights is None:
        columns = [f"aligned {seed}" for seed in seeds]
        return make_grid(aligned, row_labels=list(prompts), column_labels=columns), aligned
    with base_weights():
        base = generate(pipe, prompts, seeds, desc="generating base samples", **call_kwargs)
    return make_comparison_grid(prompts, base, aligned, seeds), aligned


def render_samples(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    folder: str | Path,
    base_weights: Callable[[], AbstractContextManager] | None,
    **call_kwargs: Any,
) -> Image.Image:
    """`render_comparison`, saved into `folder`: the grid as `SAMPLES_FILE`, and each prompt's aligned image of the
    first seed as `WIDGET_FILE` (the card's widget gallery); returns the grid."""
    grid, aligned = render_comparison(pipe, prompts, seeds, base_weights, **call_kwargs)
    Path(folder, SAMPLES_FILE).parent.mkdir(parents=True, exist_ok=True)
    grid.save(Path(folder, SAMPLES_FILE))
    for index, images in enumerate(aligned):
        images[0].save(Path(folder, WIDGET_FILE.format(index)))
    return grid


def widget(folder: str | Path, prompts: Sequence[str]) -> list[dict[str, Any]]:
    """The card's `widget` entries, as diffusers' training scripts write them: each validation prompt whose image
    `render_samples` saved in `folder`, with that image's card-relative path."""
    entries = []
    for index, prompt in enumerate(prompts):
        if Path(folder, WIDGET_FILE.format(index)).is_file():
            entries.append({"text": prompt, "output": {"url": WIDGET_FILE.format(index)}})
    return entries


def _allowed(path: str) -> bool:
    """Whether the relative POSIX `path` matches an allow-list pattern segment by segment (no dot-segments)."""
    parts = path.split("/")
    if any(part.startswith(".") for part in parts):
        return False
    for pattern in UPLOAD_ALLOW_LIST:
        globs = pattern.split("/")
        if len(globs) == len(parts) and all(map(fnmatch.fnmatchcase, parts, globs)):
            return True
    return False


def upload_plan(folder: str | Path) -> list[str]:
    """The files (relative POSIX paths, sorted) that `push_folder` uploads from `folder`: those that
    `UPLOAD_ALLOW_LIST` names, nothing else."""
    root = Path(folder)
    # os.walk, unlike glob, shrugs off a checkpoint folder renamed or rotated away while a background push lists.
    files = sorted(Path(top, name).relative_to(root).as_posix() for top, _, names in os.walk(root) for name in names)
    return [name for name in files if _allowed(name)]


def create_repo(repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create the model repo if needed; returns its full id (`owner/name`, the owner added to a bare name)."""
    ensure_hub_reachable(token)
    return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id


def push_folder(
    folder: str | Path, repo_id: str, *, card: ModelCard | None = None, token: str | None = None, commit_message: str
) -> str:
    """Upload the files of `upload_plan(folder)` to an existing repo in one commit; returns the commit URL.

    `card`, if given, is uploaded as README.md in place of the folder's own (the Hub's variant of the card).
    """
    ensure_hub_reachable(token)
    root = Path(folder)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(root / name))
        for name in upload_plan(root)
        if not (card is not None and name == "README.md")
    ]
    if card is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.content.encode()))
    info = HfApi(token=token).create_commit(repo_id, operations, commit_message=commit_message, repo_type="model")
    return str(getattr(info, "commit_url", info))


# ------------------------------------------------------------------------------------------------ hub in
def _local(source: str | os.PathLike) -> Path | None:
    """`source` as an existing local path, or None for a Hub id."""
    path = Path(source).expanduser()
    return path if path.exists() else None


def read_card(source: str | os.PathLike, token: str | None = None) -> ModelCard:
    """The model card of a pushed repo (downloads README.md only) or of a local output folder."""
    local = _local(source)
    if local is not None:
        card = local / "README.md" if local.is_dir() else local
        if not card.is_file():
            raise FileNotFoundError(f"{source} has no README.md model card to read the base model from.")
        return ModelCard.load(card)
    return ModelCard.load(str(source), token=token)


def adapter_file(source: str | os.PathLike, token: str | None = None) -> Path:
    """The local `pytorch_lora_weights.safetensors` of a folder, a file, or a Hub repo (downloaded, that file only).

    Only safetensors files are accepted: a pickled adapter (`.bin`) is never read.
    """
    local = _local(source)
    if local is not None:
        path = local / LORA_FILE if local.is_dir() else local
        if path.suffix != ".safetensors" or not path.is_file():
            raise FileNotFoundError(
                f"{source} holds no {LORA_FILE}: adapters are read from safetensors files written by `save_model`."
            )
        return path
    if not is_hub_id(str(source)):
        raise FileNotFoundError(f"{source} is neither an existing folder or file nor a Hub repo id (`owner/name`).")
    return Path(hf_hub_download(str(source), LORA_FILE, token=token))


def load_aligned_pipeline(
    source: str | os.PathLike, base_model: str | None = None, token: str | None = None, **kwargs: Any
) -> Any:
    """The pipeline an aligned run describes: its card's base model with the trained weights loaded.

    `source` is a Hub repo pushed by `push_to_hub` or a local `output_dir`. `base_model` overrides the card's
    (needed when the run started from a local folder). `kwargs` go to `DiffusionPipeline.from_pretrained`
    (`torch_dtype`, `variant`, ...). Weights are read as safetensors only and no remote code runs.
    """
    unsafe = sorted(set(kwargs) & set(UNSAFE_LOAD_KWARGS))
    if unsafe:
        raise ValueError(f"load_aligned_pipeline never runs remote code or reads pickles: drop {unsafe}.")
    from diffusers import DiffusionPipeline

    card = read_card(source, token)
    base = base_model or card.data.base_model
    if isinstance(base, list):
        base = base[0] if len(base) == 1 else None
    if not base:
        raise ValueError(f"The card of {source} names no single base model: pass `base_model=`.")
    pipe = DiffusionPipeline.from_pretrained(base, use_safetensors=True, token=token, **kwargs)
    location = str(source)
    if "lora" in (card.data.tags or []):
        pipe.load_lora_weights(location, weight_name=LORA_FILE, use_safetensors=True, token=token)
        return pipe
    from diffusion_pref_trainers.families import get_family

    attr = get_family(pipe).denoiser_attr
    dtype = {"torch_dtype": kwargs["torch_dtype"]} if "torch_dtype" in kwargs else {}
    denoiser = type(getattr(pipe, attr)).from_pretrained(
        location, subfolder=attr, use_safetensors=True, token=token, **dtype
    )
    pipe.register_modules(**{attr: denoiser})
    return pipe
