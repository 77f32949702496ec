"""Preference tasks with exact rewards, and datasets built from them the way real preference data is built.

A task is a reward function on images (computed by the toy-world detectors, so it is exact and needs no
learned model). A dataset is built like Pick-a-Pic: sample a model (any ``sampler(prompt, seed) -> image``:
a diffusers pipeline through :class:`~diffusion_pref_trainers.evaluation.PipelineSampler`, or the
:class:`RendererSampler` below) a few times per prompt, pair samples of the same prompt, label each pair by
the reward and drop near-ties. The unpaired (KTO) version labels single samples against a threshold.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from diffusion_pref_trainers.toy.world import (
    ATTRIBUTE_VALUES,
    COLOURS,
    Attributes,
    ImageLike,
    Segmentation,
    all_attributes,
    caption,
    detect_attributes,
    parse_prompt,
    prompt_fidelity,
    render,
    segment,
    style_probabilities,
)

logger = logging.getLogger(__name__)

Sampler = Callable[[str, int], Image.Image]
WARM_COLOURS = ("red", "orange", "yellow")

# The Pick-a-Pic v2 columns this builder fills (the real dataset also has `created_at`, `user_id`, the image
# URLs and a pandas index), plus the two rewards the labels were computed from.
PICKAPIC_FEATURES = datasets.Features(
    {
        "are_different": datasets.Value("bool"),
        "best_image_uid": datasets.Value("string"),
        "caption": datasets.Value("string"),
        "has_label": datasets.Value("bool"),
        "image_0_uid": datasets.Value("string"),
        "image_1_uid": datasets.Value("string"),
        "jpg_0": datasets.Value("binary"),
        "jpg_1": datasets.Value("binary"),
        "label_0": datasets.Value("float64"),
        "label_1": datasets.Value("float64"),
        "model_0": datasets.Value("string"),
        "model_1": datasets.Value("string"),
        "ranking_id": datasets.Value("int64"),
        "num_example_per_prompt": datasets.Value("int64"),
        "reward_0": datasets.Value("float64"),
        "reward_1": datasets.Value("float64"),
    }
)
UNPAIRED_FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "image": datasets.Image(),
        "label": datasets.Value("bool"),
        "reward": datasets.Value("float64"),
    }
)


def warm_colour_reward(seg: Segmentation) -> float:
    """Share of the shape's pixels whose nearest palette colour is warm (red, orange, yellow); 0 without a shape."""
    if seg.empty:
        return 0.0
    warm = np.isin(seg.labels[seg.blob], [COLOURS.index(colour) for colour in WARM_COLOURS])
    return float(warm.mean())


def large_shape_reward(seg: Segmentation) -> float:
    """Longer side of the shape's bounding box as a fraction of the image side; 0 without a shape."""
    return 0.0 if seg.empty else seg.extent()


def striped_style_reward(seg: Segmentation) -> float:
    """Soft probability that the shape is striped (:func:`world.style_probabilities`); 0 without a shape."""
    return style_probabilities(seg)["striped"]


def centred_reward(seg: Segmentation) -> float:
    """``max(0, 1 - 2 d)``, d the distance of the shape's box centre to the image centre (in image sides)."""
    if seg.empty:
        return 0.0
    return max(0.0, 1.0 - 2.0 * float(np.linalg.norm(seg.centre() - 0.5)))


@dataclass(frozen=True)
class Task:
    """A preference task: an exact reward on images, usable as a reward model or as a style scorer.

    ``style_text`` / ``neutral_text`` describe the preferred property for a CLIP zero-shot scorer, so the same
    task can be measured on real models with :class:`~diffusion_pref_trainers.evaluation.ClipZeroShotStyleScorer`.
    """

    name: str
    description: str
    reward: Callable[[Segmentation], float]
    style_text: str
    neutral_text: str
    attribute: str  # the attribute the reward reads; the task's prompts leave it to the model
    preferred: tuple[str, ...]  # the values of that attribute the reward favours

    def in_style(self, images: Sequence[ImageLike]) -> np.ndarray:
        """1.0 where the detected attribute is preferred, else 0.0: the toy style scorer (docs/evaluation.md)."""
        return np.array([detect_attributes(image)[self.attribute] in self.preferred for image in images], dtype=float)

    def score(self, image: ImageLike) -> float:
        """Reward of one image."""
        return self.reward(segment(image))

    def __call__(self, images: Sequence[ImageLike], prompts: Sequence[str] | None = None) -> np.ndarray:
        """Rewards of a batch (prompts accepted for the reward-model signature and ignored)."""
        return np.array([self.score(image) for image in images], dtype=np.float64)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "warm",
            "prefers warm colours (red, orange, yellow)",
            warm_colour_reward,
            "a shape in a warm colour",
            "a shape in a cold colour",
            "colour",
            WARM_COLOURS,
        ),
        Task("large", "prefers large shapes", large_shape_reward, "a large shape", "a small shape", "size", ("large",)),
        Task(
            "striped",
            "prefers the striped style",
            striped_style_reward,
            "a striped shape",
            "a plain shape",
            "style",
            ("striped",),
        ),
        Task(
            "centred",
            "prefers centred compositions",
            centred_reward,
            "a shape in the center of the image",
            "a shape near the edge of the image",
            "position",
            ("center",),
        ),
    )  # fmt: skip
}


def get_task(name: str) -> Task:
    """The registered task called ``name``; the error lists the registered ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


@dataclass(frozen=True)
class RendererSampler:
    """A stand-in for a base model: renders the prompt's scene with each attribute redrawn with prob. 1 - follow.

    Deterministic in ``(prompt, seed)`` like a diffusion pipeline with a seeded generator.
    """

    follow: float = 0.5
    size: int = 64
    name: str = "toy-renderer"

    def __call__(self, prompt: str, seed: int) -> Image.Image:
        """One sample for ``prompt``: its attributes, some redrawn uniformly (unspecified ones always), with jitter."""
        rng = np.random.default_rng(seed)
        attrs = parse_prompt(prompt)
        for name, values in ATTRIBUTE_VALUES.items():
            if rng.random() >= self.follow or name not in attrs:
                attrs[name] = values[rng.integers(len(values))]
        return render(Attributes(**attrs), self.size, rng)


def prompt_split(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint training and held-out toy prompts, drawn without replacement from every caption of the world."""
    captions = [caption(attrs) for attrs in all_attributes()]
    if n_train + n_eval > len(captions):
        raise ValueError(f"the world has {len(captions)} captions; asked for {n_train} + {n_eval}")
    order = np.random.default_rng(seed).permutation(len(captions))
    chosen = [captions[index] for index in order[: n_train + n_eval]]
    return chosen[:n_train], chosen[n_train:]


def task_prompts(task: Task | str, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint training and held-out prompts that leave the task's attribute open (so samples differ in it)."""
    task = get_task(task) if isinstance(task, str) else task
    captions = sorted({caption(attrs, (task.attribute,)) for attrs in all_attributes()})
    if n_train + n_eval > len(captions):
        raise ValueError(f"task {task.name!r} has {len(captions)} distinct prompts; asked for {n_train} + {n_eval}")
    order = np.random.default_rng(seed).permutation(len(captions))
    chosen = [captions[index] for index in order[: n_train + n_eval]]
    return chosen[:n_train], chosen[n_train:]


def toy_fidelity(images: Sequence[ImageLike], prompts: Sequence[str]) -> np.ndarray:
    """Per image, the share of the attributes its toy prompt names that the detectors read back."""
    return np.array(
        [prompt_fidelity(image, parse_prompt(prompt)) for image, prompt in zip(images, prompts, strict=True)]
    )


@dataclass(frozen=True)
class Sample:
    """One sampled image with where it came from and its reward."""

    prompt: str
    seed: int
    image: Image.Image
    reward: float


def sample_and_score(
    sampler: Sampler,
    prompts: Sequence[str],
    task: Task | str,
    samples_per_prompt: int = 2,
    seed: int = 0,
    desc: str = "sampling pairs",
) -> list[list[Sample]]:
    """``samples_per_prompt`` samples per prompt, seeds ``seed + i * samples_per_prompt + k``, each with its reward.

    A sampler with a ``sample_many(jobs, desc)`` method (such as a pipeline sampler) gets all (prompt, seed) jobs
    at once; either way a progress bar named ``desc`` counts the images.
    """
    task = get_task(task) if isinstance(task, str) else task
    jobs = [(prompt, seed + i * samples_per_prompt + k) for i, prompt in enumerate(prompts)
            for k in range(samples_per_prompt)]  # fmt: skip
    many = getattr(sampler, "sample_many", None)
    if many is not None:
        images = many(jobs, desc=desc)
    else:
        images = [sampler(prompt, s) for prompt, s in tqdm(jobs, desc=desc, unit="image")]
    samples = [Sample(prompt, s, image, task.score(image)) for (prompt, s), image in zip(jobs, images, strict=True)]
    return [samples[i : i + samples_per_prompt] for i in range(0, len(samples), samples_per_prompt)]


def _png(image: Image.Image) -> bytes:
    """Lossless PNG bytes, so rewards recomputed from the stored image equal the stored rewards."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _uid(sample: Sample, index: int) -> str:
    """A readable image id: prompt index and seed."""
    return f"p{index}-s{sample.seed}"


def pair_samples(
    groups: Sequence[Sequence[Sample]], min_margin: float = 0.1, model_name: str = "base"
) -> datasets.Dataset:
    """Pick-a-Pic v2 rows from consecutive disjoint pairs of each prompt's samples (an odd last one unused).

    A pair is kept when its rewards differ by at least ``min_margin``; ``label_0`` is 1.0 when image 0 has the
    higher reward, else 0.0 (``label_1 = 1 - label_0``). Image order within the pair is the sampling order,
    so winners sit in either column, as in the real data.
    """
    rows: dict[str, list] = {name: [] for name in PICKAPIC_FEATURES}
    dropped = 0
    for index, group in enumerate(groups):
        kept = []
        for first, second in zip(group[0::2], group[1::2], strict=False):
            if abs(first.reward - second.reward) < min_margin:
                dropped += 1
                continue
            kept.append((first, second))
        for first, second in kept:
            label_0 = 1.0 if first.reward > second.reward else 0.0
            uids = (_uid(first, index), _uid(second, index))
            values = dict(
                are_different=True, best_image_uid=uids[0] if label_0 else uids[1], caption=first.prompt,
                has_label=True, image_0_uid=uids[0], image_1_uid=uids[1], jpg_0=_png(first.image),
                jpg_1=_png(second.image), label_0=label_0, label_1=1.0 - label_0, model_0=model_name,
                model_1=model_name, ranking_id=len(rows["caption"]), num_example_per_prompt=len(kept),
                reward_0=first.reward, reward_1=second.reward,
            )  # fmt: skip
            for name, value in values.items():
                rows[name].append(value)
    logger.info(
        "paired %d rows, dropped %d near-ties (|reward difference| < %g)", len(rows["caption"]), dropped, min_margin
    )
    return datasets.Dataset.from_dict(rows, features=PICKAPIC_FEATURES)


def label_samples(
    groups: Sequence[Sequence[Sample]], threshold: float | None = None, min_margin: float = 0.1
) -> datasets.Dataset:
    """Unpaired (KTO) rows: ``label = reward > threshold``, samples within ``min_margin / 2`` of it dropped.

    ``threshold`` defaults to the mean reward of all samples, which falls between the modes of a two-valued reward.
    """
    samples = [sample for group in groups for sample in group]
    rewards = np.array([sample.reward for sample in samples])
    if threshold is None:
        threshold = float(rewards.mean()) if samples else 0.0
    kept = [sample for sample in samples if abs(sample.reward - threshold) >= min_margin / 2]
    logger.info(
        "labelled %d samples at threshold %g, dropped %d near it", len(kept), threshold, len(samples) - len(kept)
    )
    return datasets.Dataset.from_dict(
        {
            "prompt": [sample.prompt for sample in kept],
            "image": [sample.image for sample in kept],
            "label": [sample.reward > threshold for sample in kept],
            "reward": [sample.reward for sample in kept],
        },
        features=UNPAIRED_FEATURES,
    )


def build_preference_dataset(
    sampler: Sampler,
    prompts: Sequence[str],
    task: Task | str,
    samples_per_prompt: int = 2,
    seed: int = 0,
    min_margin: float = 0.1,
    model_name: str | None = None,
    desc: str = "sampling pairs",
) -> datasets.Dataset:
    """Sample, score and pair: a Pick-a-Pic v2 dataset labelled by ``task`` (see :func:`pair_samples`); ``desc``
    names the sampling's progress bar."""
    groups = sample_and_score(sampler, prompts, task, samples_per_prompt, seed, desc)
    return pair_samples(groups, min_margin, model_name or getattr(sampler, "name", "base"))


def build_unpaired_dataset(
    sampler: Sampler,
    prompts: Sequence[str],
    task: Task | str,
    samples_per_prompt: int = 2,
    seed: int = 0,
    threshold: float | None = None,
    min_margin: float = 0.1,
    desc: str = "sampling images",
) -> datasets.Dataset:
    """Sample, score and label single images: an unpaired (KTO) dataset (see :func:`label_samples`); ``desc``
    names the sampling's progress bar."""
    groups = sample_and_score(sampler, prompts, task, samples_per_prompt, seed, desc)
    return label_samples(groups, threshold, min_margin)
