"""Toy preference tasks: exact rewards on rendered scenes, and datasets built from a sampler in real schemas."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from diffusion_pref_trainers.data import detect_schema, row_images
from diffusion_pref_trainers.toy import tasks, world
from diffusion_pref_trainers.toy.tasks import (
    PICKAPIC_FEATURES,
    TASKS,
    UNPAIRED_FEATURES,
    RendererSampler,
    build_preference_dataset,
    build_unpaired_dataset,
    get_task,
    prompt_split,
    sample_and_score,
    task_prompts,
)
from diffusion_pref_trainers.toy.world import Attributes, render

BLANK = Image.new("RGB", (64, 64), "white")


def scene(**changes: str) -> Attributes:
    """A default scene with some attributes changed."""
    values = dict(shape="square", colour="blue", size="small", position="center", background="white", style="flat")
    return Attributes(**{**values, **changes})


@pytest.mark.parametrize("colour", world.COLOURS)
def test_warm_reward_is_one_for_warm_colours_and_zero_for_cold(colour: str) -> None:
    expected = 1.0 if colour in ("red", "orange", "yellow") else 0.0
    assert TASKS["warm"].score(render(scene(colour=colour, style="striped"))) == expected


def test_large_reward_is_the_shape_extent() -> None:
    rng = np.random.default_rng(0)
    for shape in world.SHAPES:
        for size, extent in world.SIZE_EXTENT.items():
            reward = TASKS["large"].score(render(scene(shape=shape, size=size), 64, rng))
            assert reward == pytest.approx(extent, abs=extent * world.SIZE_JITTER + 2 / 64)


def test_striped_reward_separates_striped_from_other_styles() -> None:
    for style in world.STYLES:
        reward = TASKS["striped"].score(render(scene(style=style, shape="circle", size="large")))
        assert reward > 0.9 if style == "striped" else reward < 0.1


@pytest.mark.parametrize("position", world.POSITIONS)
def test_centred_reward_falls_with_distance_from_the_centre(position: str) -> None:
    x, y = world.POSITION_CENTRE[position]
    expected = 1 - 2 * np.hypot(x - 0.5, y - 0.5)
    assert TASKS["centred"].score(render(scene(position=position))) == pytest.approx(expected, abs=2 / 64)


def test_every_reward_is_zero_without_a_shape_and_the_batch_call_matches() -> None:
    images = [BLANK, render(scene(colour="red", size="large", style="striped"))]
    for task in TASKS.values():
        scores = task(images, ["ignored", "ignored"])
        assert scores[0] == 0.0 and scores.dtype == np.float64
        assert scores[1] == task.score(images[1]) > 0


def test_get_task_names_the_registered_tasks() -> None:
    assert get_task("striped") is TASKS["striped"]
    with pytest.raises(ValueError, match="warm, large, striped, centred"):
        get_task("shiny")


def test_renderer_sampler_is_seeded_and_follows_the_prompt_when_asked() -> None:
    prompt = world.caption(scene(colour="green", style="dotted"))
    sampler = RendererSampler(follow=0.5)
    assert np.array_equal(np.asarray(sampler(prompt, 7)), np.asarray(sampler(prompt, 7)))
    assert all(world.detect(RendererSampler(follow=1.0)(prompt, s)) == world.parse_caption(prompt) for s in range(5))
    varied = {world.detect(RendererSampler(follow=0.0)(prompt, s)) for s in range(10)}
    assert len(varied) > 5


def test_prompt_split_is_disjoint_and_deterministic() -> None:
    train, held_out = prompt_split(50, 20, seed=1)
    assert len(set(train)) == 50 and len(set(held_out)) == 20 and not set(train) & set(held_out)
    assert (train, held_out) == prompt_split(50, 20, seed=1)
    assert all(world.parse_caption(p) for p in train + held_out)
    with pytest.raises(ValueError, match="captions"):
        prompt_split(2000, 500)


def _decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@pytest.mark.parametrize("task", list(TASKS))
def test_preference_dataset_is_pickapic_labelled_by_the_reward(task: str) -> None:
    prompts, _ = prompt_split(40, 0, seed=2)
    margin = 0.1
    data = build_preference_dataset(RendererSampler(), prompts, task, min_margin=margin)
    assert data.features == PICKAPIC_FEATURES and detect_schema(data.column_names) == "pickapic"
    groups = sample_and_score(RendererSampler(), prompts, task)  # the same samples, counted independently
    decisive = [g for g in groups if abs(g[0].reward - g[1].reward) >= margin]
    assert 0 < len(data) == len(decisive) < len(prompts)
    assert 0 < sum(data["label_0"]) < len(data)  # winners sit in both columns
    for row in data:
        rewards = [TASKS[task].score(_decode(row[f"jpg_{i}"])) for i in (0, 1)]
        assert rewards == [row["reward_0"], row["reward_1"]]
        assert row["label_0"] == float(rewards[0] > rewards[1]) == 1 - row["label_1"]
        assert row["best_image_uid"] == row[f"image_{int(row['label_1'])}_uid"]
        assert row["model_0"] == row["model_1"] == "toy-renderer" and row["num_example_per_prompt"] == 1
        _, (winner, loser), _ = row_images(row, "pickapic")
        assert TASKS[task].score(_decode(winner)) - TASKS[task].score(_decode(loser)) >= margin


def test_a_margin_above_every_difference_leaves_an_empty_dataset_with_the_schema() -> None:
    data = build_preference_dataset(RendererSampler(), prompt_split(4, 0)[0], "warm", min_margin=1.5)
    assert len(data) == 0 and data.features == PICKAPIC_FEATURES


def test_more_samples_per_prompt_give_disjoint_pairs() -> None:
    data = build_preference_dataset(RendererSampler(), prompt_split(8, 0)[0], "warm", samples_per_prompt=4)
    uids: dict[str, list[str]] = {}
    for row in data:
        uids.setdefault(row["caption"], []).extend([row["image_0_uid"], row["image_1_uid"]])
        assert row["image_0_uid"].split("-")[0] == row["image_1_uid"].split("-")[0]  # same prompt index
    assert any(len(ids) == 4 for ids in uids.values())
    for prompt, ids in uids.items():
        assert len(set(ids)) == len(ids) == 2 * data[data["caption"].index(prompt)]["num_example_per_prompt"]


@pytest.mark.parametrize("task", ["large", "centred"])
def test_unpaired_dataset_labels_images_against_the_threshold(task: str) -> None:
    prompts, _ = prompt_split(20, 0, seed=3)
    data = build_unpaired_dataset(RendererSampler(), prompts, task, min_margin=0.1)
    assert data.features == UNPAIRED_FEATURES and detect_schema(data.column_names) == "unpaired"
    all_rewards = np.array([s.reward for g in sample_and_score(RendererSampler(), prompts, task) for s in g])
    threshold = all_rewards.mean()
    assert len(data) == int((np.abs(all_rewards - threshold) >= 0.05).sum())
    assert 0 < sum(data["label"]) < len(data)
    for row in data:
        assert row["label"] == (TASKS[task].score(row["image"]) > threshold)
    fixed = build_unpaired_dataset(RendererSampler(), prompts, task, threshold=0.0, min_margin=0.0)
    assert len(fixed) == len(all_rewards) and all(fixed["label"]) == bool((all_rewards > 0).all())


def test_toy_fidelity_reads_each_prompt() -> None:
    prompts = [world.caption(scene()), world.caption(scene(colour="red"))]
    images = [render(scene()), render(scene())]
    assert tasks.toy_fidelity(images, prompts).tolist() == [1.0, 5 / 6]


def test_toy_datasets_train_the_dpo_and_kto_trainers(make_config, tmp_path) -> None:
    from diffusion_pref_trainers import DiffusionDPOTrainer, DiffusionKTOConfig, DiffusionKTOTrainer
    from diffusion_pref_trainers.testing import tiny_sd_pipeline

    prompts, _ = prompt_split(16, 0, seed=4)
    pairs = build_preference_dataset(RendererSampler(size=32), prompts, "warm")
    dpo = DiffusionDPOTrainer(tiny_sd_pipeline(), make_config(per_device_train_batch_size=2), pairs)
    dpo.train()
    state = dpo.state
    losses = [log["loss"] for log in state.log_history if "loss" in log]
    assert state.global_step == 2 and len(losses) == 2 and np.isfinite(losses).all()
    singles = build_unpaired_dataset(RendererSampler(size=32), prompts, "warm")
    args = DiffusionKTOConfig(output_dir=str(tmp_path / "kto"), resolution=32, per_device_train_batch_size=2,
                              max_steps=2, learning_rate=1e-3, logging_steps=1, save_steps=0)  # fmt: skip
    kto = DiffusionKTOTrainer(tiny_sd_pipeline(), args, singles)
    kto.train()
    state = kto.state
    losses = [log["loss"] for log in state.log_history if "loss" in log]
    assert state.global_step == 2 and len(losses) == 2 and np.isfinite(losses).all()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_prompts_leave_the_rewarded_attribute_open(task: str) -> None:
    train, held_out = task_prompts(task, 20, 5, seed=3)
    assert len(set(train)) == 20 and len(set(held_out)) == 5 and not set(train) & set(held_out)
    assert task_prompts(task, 20, 5, seed=3) == (train, held_out)
    attribute = TASKS[task].attribute
    for prompt in train + held_out:
        named = world.parse_prompt(prompt)
        assert attribute not in named and len(named) == 5


def test_task_prompts_refuse_more_than_the_world_has() -> None:
    with pytest.raises(ValueError, match="distinct prompts"):
        task_prompts("warm", 400, 1)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_in_style_is_one_exactly_for_preferred_values(task: str) -> None:
    spec = TASKS[task]
    values = world.ATTRIBUTE_VALUES[spec.attribute]
    base = Attributes("square", "blue", "small", "left", "white", "flat").as_dict()
    images = [render(Attributes(**{**base, spec.attribute: value})) for value in values]
    assert spec.in_style(images).tolist() == [float(value in spec.preferred) for value in values]


def test_renderer_sampler_draws_what_a_partial_prompt_leaves_open() -> None:
    sampler = RendererSampler(follow=1.0)

    def colours(prompt: str, n: int) -> set[str]:
        return {world.detect_attributes(sampler(prompt, seed))["colour"] for seed in range(n)}

    assert len(colours("a large flat circle in the center", 40)) >= 4  # colour unspecified: drawn from six
    assert colours("a large red flat circle in the center", 5) == {"red"}
