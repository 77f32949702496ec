"""The toy world: captions round-trip and the detectors read back every attribute of rendered scenes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from diffusion_pref_trainers.toy import world
from diffusion_pref_trainers.toy.world import (
    ATTRIBUTE_VALUES,
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    UNKNOWN,
    Attributes,
    attribute_embedding,
    caption,
    detect,
    detect_attributes,
    parse_caption,
    prompt_fidelity,
    render,
    style_probabilities,
)


def geometric_scenes() -> list[Attributes]:
    """Every (shape, style, size, position), with colours and backgrounds cycled so all 18 pairs of them occur."""
    combos = itertools.product(SHAPES, STYLES, SIZES, POSITIONS)
    return [
        Attributes(shape, COLOURS[i % 6], size, position, BACKGROUNDS[(i // 6) % 3], style)
        for i, (shape, style, size, position) in enumerate(combos)
    ]


@pytest.mark.parametrize("size", [32, 64, 128])
def test_detectors_recover_every_attribute_of_rendered_scenes(size: int) -> None:
    rng = np.random.default_rng(size)
    scenes = geometric_scenes()
    assert {(s.colour, s.background) for s in scenes} == set(itertools.product(COLOURS, BACKGROUNDS))
    wrong = [(scene, found) for scene in scenes if (found := detect(render(scene, size, rng))) != scene]
    assert wrong == []


def test_detectors_tolerate_pixel_noise() -> None:
    rng = np.random.default_rng(0)
    for scene in geometric_scenes()[::3]:
        pixels = np.asarray(render(scene, 64, rng), dtype=np.float64)
        noisy = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
        assert detect_attributes(noisy) == scene.as_dict()


def test_detectors_read_array_layouts_like_pil_images() -> None:
    scene = Attributes("triangle", "green", "large", "right", "gray", "dotted")
    image = render(scene, 64)
    chw_float = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    assert detect(chw_float) == detect(np.asarray(image)) == detect(image) == scene


def test_an_image_without_a_shape_reads_as_unknown() -> None:
    found = detect_attributes(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert found == {**dict.fromkeys(ATTRIBUTE_VALUES, UNKNOWN), "background": "gray"}
    assert detect(Image.new("RGB", (64, 64), (128, 128, 128))) is None


def test_render_is_deterministic_and_jitter_moves_the_shape() -> None:
    scene = Attributes("circle", "red", "small", "center", "white", "flat")
    first = np.asarray(render(scene, 64, np.random.default_rng(3)))
    assert np.array_equal(first, np.asarray(render(scene, 64, np.random.default_rng(3))))
    assert not np.array_equal(first, np.asarray(render(scene, 64, np.random.default_rng(4))))


def test_captions_round_trip_for_every_scene() -> None:
    for scene in world.all_attributes():
        assert parse_caption(caption(scene)) == scene
    assert sum(1 for _ in world.all_attributes()) == np.prod([len(v) for v in ATTRIBUTE_VALUES.values()])


def test_caption_parsing_tolerates_case_and_spacing_and_rejects_other_text() -> None:
    scene = Attributes("square", "blue", "large", "top", "black", "striped")
    assert caption(scene) == "a large blue striped square at the top, black background"
    assert parse_caption("  A LARGE blue   striped square at the top,  black background ") == scene
    for text in (
        "a large blue striped square at the top",  # no background
        "a large teal striped square at the top, black background",  # unknown colour
        "a large blue striped square in the corner, black background",  # unknown position phrase
        "a blue large striped square at the top, black background",  # words out of order
    ):
        with pytest.raises(ValueError):
            parse_caption(text)


def test_attributes_reject_values_outside_the_world() -> None:
    with pytest.raises(ValueError, match="colour"):
        Attributes("circle", "teal", "small", "center", "white", "flat")


def test_vocabulary_covers_every_caption_token() -> None:
    vocabulary = set(world.vocabulary())
    prompts = [caption(scene, omit) for scene in world.all_attributes() for omit in ((), ("shape",))]
    tokens = {token for prompt in prompts for token in prompt.replace(",", " ,").split()}
    assert tokens == vocabulary


@pytest.mark.parametrize("omit", [(), ("colour",), ("size", "style"), ("shape", "position"), tuple(ATTRIBUTE_VALUES)])
def test_partial_prompts_name_exactly_the_attributes_kept(omit: tuple[str, ...]) -> None:
    scene = Attributes("triangle", "green", "small", "left", "gray", "dotted")
    prompt = caption(scene, omit)
    expected = {name: value for name, value in scene.as_dict().items() if name not in omit}
    assert world.parse_prompt(prompt) == expected
    if omit:
        with pytest.raises(ValueError, match="full toy-world caption"):
            parse_caption(prompt)


def test_partial_prompt_examples_and_errors() -> None:
    scene = Attributes("circle", "red", "large", "center", "white", "striped")
    assert caption(scene, ("colour", "background")) == "a large striped circle in the center"
    assert caption(scene, tuple(ATTRIBUTE_VALUES)) == "a shape"
    with pytest.raises(ValueError, match="cannot omit"):
        caption(scene, ("texture",))
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        world.parse_prompt("a red circle with a hat")


def test_prompt_fidelity_of_a_partial_prompt_counts_only_named_attributes() -> None:
    scene = Attributes("square", "blue", "large", "right", "black", "flat")
    image = render(scene)
    assert prompt_fidelity(image, world.parse_prompt("a large red square")) == pytest.approx(2 / 3)
    assert prompt_fidelity(image, world.parse_prompt("a shape")) == 1.0


def test_prompt_fidelity_is_the_share_of_matching_attributes() -> None:
    scene = Attributes("circle", "orange", "large", "left", "black", "outlined")
    image = render(scene, 64)
    assert prompt_fidelity(image, scene) == 1.0
    names = list(ATTRIBUTE_VALUES)
    for k in range(1, len(names) + 1):
        changed = scene.as_dict()
        for name in names[:k]:
            changed[name] = next(v for v in ATTRIBUTE_VALUES[name] if v != changed[name])
        assert prompt_fidelity(image, Attributes(**changed)) == pytest.approx((len(names) - k) / len(names))


def test_style_probabilities_peak_at_the_rendered_style() -> None:
    for style in STYLES:
        probabilities = style_probabilities(render(Attributes("square", "purple", "large", "center", "white", style)))
        assert sum(probabilities.values()) == pytest.approx(1.0)
        assert max(probabilities, key=probabilities.get) == style
        assert probabilities[style] > 0.9


def test_attribute_embedding_distance_is_the_share_of_differing_attributes() -> None:
    scenes = [
        Attributes("circle", "red", "small", "left", "white", "flat"),
        Attributes("circle", "red", "large", "left", "black", "flat"),
        Attributes("triangle", "blue", "large", "top", "black", "dotted"),
    ]
    vectors = attribute_embedding([render(scene, 64) for scene in scenes])
    assert vectors.shape == (3, sum(len(v) + 1 for v in ATTRIBUTE_VALUES.values()))
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for a, b in itertools.combinations(range(3), 2):
        differing = sum(x != y for x, y in zip(scenes[a].as_dict().values(), scenes[b].as_dict().values(), strict=True))
        assert 1 - unit[a] @ unit[b] == pytest.approx(differing / 6)
