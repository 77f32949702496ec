"""Procedural toy world: one coloured shape on a plain background, with captions and detectors.

Every image is fully described by an :class:`Attributes` value, so captions, rewards and prompt
fidelity can be computed exactly without any learned model. Detectors classify pixels by nearest
palette colour and use tolerant thresholds, so they also read imperfect generated images.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
SIZES = ("small", "large")
POSITIONS = ("left", "center", "right", "top", "bottom")
BACKGROUNDS = ("white", "black", "gray")
STYLES = ("flat", "outlined", "striped", "dotted")
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
    "style": STYLES,
}
UNKNOWN = "unknown"

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 130, 20),
    "yellow": (235, 225, 25),
    "green": (30, 170, 50),
    "blue": (40, 80, 220),
    "purple": (150, 40, 200),
}
BACKGROUND_PALETTE: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
# Shape extent (circle diameter, square side, triangle base and height) as a fraction of the image side.
SIZE_EXTENT = {"small": 0.30, "large": 0.48}
# Bounding-box centre (x, y) of the shape as a fraction of the image side.
POSITION_CENTRE = {
    "left": (0.28, 0.5),
    "center": (0.5, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
}
POSITION_PHRASE = {
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_PHRASE_POSITION = {phrase: position for position, phrase in POSITION_PHRASE.items()}
ANY_SHAPE = "shape"  # the noun of a prompt that leaves the shape open


def _choice(values: Sequence[str]) -> str:
    """A regex group matching exactly one of ``values``."""
    return "(" + "|".join(re.escape(value) for value in values) + ")"


# Every attribute but the shape noun may be left out of a prompt; the order of the words is fixed.
_PROMPT_RE = re.compile(
    f"a(?: {_choice(SIZES)})?(?: {_choice(COLOURS)})?(?: {_choice(STYLES)})? {_choice((*SHAPES, ANY_SHAPE))}"
    f"(?: {_choice(list(POSITION_PHRASE.values()))})?(?:, {_choice(BACKGROUNDS)} background)?"
)
_PROMPT_GROUPS = ("size", "colour", "style", "shape", "position", "background")

POSITION_JITTER = 0.015  # max random offset of the centre, fraction of the image side
SIZE_JITTER = 0.04  # max relative random change of the extent
SIZE_THRESHOLD = 0.40  # extents below are "small", above "large"
SIZE_RANGE = (0.15, 0.70)  # extents outside this range are "unknown"
POSITION_TOLERANCE = 0.15  # max distance of the detected centre to the nearest anchor
BACKGROUND_TOLERANCE = 0.40  # max RGB distance (in [0, 1] units) of the corners to a background colour
COLOUR_MAJORITY = 0.5  # min share of the dominant colour among shape pixels
MIN_SHAPE_FRACTION = 0.004  # min share of image pixels a shape must cover to be detected
# Prototype features: shapes by (bounding-box fill, bottom-minus-top width), styles by interior
# background-likeness (mean, change across rows, change across columns, both at a lag of one stripe).
SHAPE_PROTOTYPES = {"circle": (np.pi / 4, 0.0), "square": (1.0, 0.0), "triangle": (0.5, 0.5)}
SHAPE_TOLERANCE = 0.2
STYLE_PROTOTYPES = {
    "flat": (0.0, 0.0, 0.0),
    "outlined": (1.0, 0.0, 0.0),
    "striped": (0.5, 1.0, 0.0),
    "dotted": (0.25, 0.5, 0.5),
}
STYLE_TOLERANCE = 0.35  # under half the smallest distance between two style prototypes (0.75)
STYLE_TEMPERATURE = 0.02

ImageLike = Image.Image | np.ndarray


@dataclass(frozen=True)
class Attributes:
    """One toy-world scene; each field takes a value from the matching tuple in ``ATTRIBUTE_VALUES``."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    style: str

    def __post_init__(self) -> None:
        """Reject values outside the world so typos fail at construction, not at render time."""
        for name, allowed in ATTRIBUTE_VALUES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")

    def as_dict(self) -> dict[str, str]:
        """Attribute name -> value, in the same layout as :func:`detect_attributes` returns."""
        return asdict(self)


def all_attributes() -> Iterator[Attributes]:
    """Every scene of the world, in a fixed order (for exhaustive tests and balanced datasets)."""
    for values in itertools.product(*ATTRIBUTE_VALUES.values()):
        yield Attributes(*values)


def sample_attributes(rng: np.random.Generator) -> Attributes:
    """A scene with every attribute drawn uniformly and independently from ``rng``."""
    return Attributes(**{name: values[rng.integers(len(values))] for name, values in ATTRIBUTE_VALUES.items()})


def caption(attrs: Attributes, omit: Collection[str] = ()) -> str:
    """Deterministic caption, e.g. ``"a large red striped circle on the left, white background"``.

    Attributes named in ``omit`` are left out (an omitted shape reads "shape"): such prompts leave that
    attribute to the model, as real prompts leave aesthetics open, which is what preference tasks act on.
    """
    unknown = set(omit) - set(ATTRIBUTE_VALUES)
    if unknown:
        raise ValueError(f"cannot omit {sorted(unknown)}; attributes are {list(ATTRIBUTE_VALUES)}")
    words = ["a"] + [getattr(attrs, name) for name in ("size", "colour", "style") if name not in omit]
    words.append(ANY_SHAPE if "shape" in omit else attrs.shape)
    if "position" not in omit:
        words.append(POSITION_PHRASE[attrs.position])
    text = " ".join(words)
    return text if "background" in omit else f"{text}, {attrs.background} background"


def parse_prompt(text: str) -> dict[str, str]:
    """The attributes a (possibly partial) toy prompt specifies; ValueError on text outside the grammar."""
    match = _PROMPT_RE.fullmatch(" ".join(text.lower().split()))
    if match is None:
        raise ValueError(f"not a toy-world prompt: {text!r}")
    found = {name: value for name, value in zip(_PROMPT_GROUPS, match.groups(), strict=True) if value is not None}
    if found.get("shape") == ANY_SHAPE:
        del found["shape"]
    if "position" in found:
        found["position"] = _PHRASE_POSITION[found["position"]]
    return found


def parse_caption(text: str) -> Attributes:
    """Inverse of :func:`caption` for a full caption (case and extra whitespace tolerated); ValueError otherwise."""
    try:
        return Attributes(**parse_prompt(text))
    except (TypeError, ValueError):
        raise ValueError(f"not a full toy-world caption: {text!r}") from None


def vocabulary() -> list[str]:
    """Sorted list of every token a caption can contain (words plus ","), to build a small tokenizer."""
    phrase_words = {word for phrase in POSITION_PHRASE.values() for word in phrase.split()}
    words = {",", "a", "background", ANY_SHAPE, *SIZES, *COLOURS, *STYLES, *SHAPES, *BACKGROUNDS, *phrase_words}
    return sorted(words)


def border_width(size: int) -> int:
    """Outline thickness and stripe/dot period unit in pixels, scaled with the image side."""
    return max(1, round(size / 32))


def _box_sum(mask: np.ndarray, radius: int) -> np.ndarray:
    """Count of set pixels in the (2r+1)-square window around each pixel, outside the image counting 0."""
    out = mask.astype(np.int32)
    for _ in range(2):  # sum along rows, transpose, sum along the other axis, transpose back
        n = out.shape[0]
        cum = np.zeros((n + 1, out.shape[1]), dtype=np.int32)
        np.cumsum(out, axis=0, out=cum[1:])
        index = np.arange(n)
        out = (cum[np.minimum(index + radius + 1, n)] - cum[np.maximum(index - radius, 0)]).T
    return out


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion by a (2r+1)-square; pixels near the image edge erode as if outside were empty."""
    return _box_sum(mask, radius) == (2 * radius + 1) ** 2


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1)-square, as r rounds of 3x3 dilation (shifted ORs are cheap)."""
    out = mask.copy()
    for _ in range(radius):
        source = out.copy()
        out[1:] |= source[:-1]
        out[:-1] |= source[1:]
        source = out.copy()
        out[:, 1:] |= source[:, :-1]
        out[:, :-1] |= source[:, 1:]
    return out


def _shape_region(shape: str, cx: float, cy: float, extent: float, size: int) -> np.ndarray:
    """Pixels whose centres lie inside the shape (all coordinates in pixels)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    half = extent / 2
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    depth = y - (cy - half)  # an upward-pointing isosceles triangle as wide at its base as it is tall
    return (depth >= 0) & (depth <= extent) & (np.abs(x - cx) <= depth / 2)


def _painted(style: str, region: np.ndarray, unit: int) -> np.ndarray:
    """Pixels of ``region`` painted in the shape colour; the outline is always painted, the interior per style."""
    interior = _erode(region, unit)
    rows, cols = np.indices(region.shape) // unit
    holes = {
        "flat": np.zeros_like(region),
        "outlined": interior,
        "striped": interior & (rows % 2 == 1),
        "dotted": interior & (rows % 2 == 1) & (cols % 2 == 1),
    }[style]
    return region & ~holes


def render(attrs: Attributes, size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``attrs`` as a ``size`` x ``size`` RGB image; with ``rng``, jitter the centre and extent slightly."""
    cx, cy = POSITION_CENTRE[attrs.position]
    extent = SIZE_EXTENT[attrs.size]
    if rng is not None:
        cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        extent *= 1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)
    region = _shape_region(attrs.shape, cx * size, cy * size, extent * size, size)
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = BACKGROUND_PALETTE[attrs.background]
    pixels[_painted(attrs.style, region, border_width(size))] = PALETTE[attrs.colour]
    return Image.fromarray(pixels)


def to_array(image: ImageLike) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1] from a PIL image or an HWC/CHW/HW uint8 or [0, 1] float array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"expected an image array with 2 or 3 dims, got shape {array.shape}")
    if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    array = np.broadcast_to(array, (*array.shape[:2], 3)) if array.shape[-1] == 1 else array[..., :3]
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    return np.clip(array.astype(np.float64), 0.0, 1.0)


def _palette_array(palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    """Palette colours as a (K, 3) float array in [0, 1]."""
    return np.array(list(palette.values()), dtype=np.float64) / 255.0


def _nearest(colours: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of and distance to the nearest palette entry for each colour of an (..., 3) array."""
    squared = ((colours[..., None, :] - palette) ** 2).sum(axis=-1)
    index = squared.argmin(axis=-1)
    return index, np.sqrt(np.take_along_axis(squared, index[..., None], axis=-1)[..., 0])


def _main_blob(foreground: np.ndarray) -> np.ndarray:
    """Foreground pixels connected (across 1-pixel gaps) to the densest foreground spot."""
    blob = np.zeros_like(foreground)
    if not foreground.any():
        return blob
    blob[np.unravel_index(np.argmax(_box_sum(foreground, 2)), foreground.shape)] = True
    reachable = _dilate(foreground, 1)
    while True:
        grown = _dilate(blob, 1) & reachable
        if np.array_equal(grown, blob):
            return blob & foreground
        blob = grown


def _fill_rows(mask: np.ndarray) -> np.ndarray:
    """Each row of ``mask`` filled between its leftmost and rightmost set pixel (outlines become solid)."""
    width = mask.shape[1]
    present = mask.any(axis=1)
    first = np.where(present, mask.argmax(axis=1), width)
    last = np.where(present, width - 1 - mask[:, ::-1].argmax(axis=1), -1)
    cols = np.arange(width)
    return (cols >= first[:, None]) & (cols <= last[:, None])


@dataclass(frozen=True)
class Segmentation:
    """Background/shape split of one image, shared by the detectors and the rewards."""

    pixels: np.ndarray  # (H, W, 3) float RGB in [0, 1]
    background: str  # background palette name or "unknown"
    background_rgb: np.ndarray  # (3,) reference background colour in [0, 1]
    labels: np.ndarray  # (H, W) index into COLOURS of the nearest shape colour, -1 where background wins
    blob: np.ndarray  # (H, W) bool, shape-coloured pixels of the main connected shape
    silhouette: np.ndarray  # (H, W) bool, blob with every row filled between its extremes

    @property
    def empty(self) -> bool:
        """True when no shape large enough to measure was found."""
        return int(self.blob.sum()) < max(4, MIN_SHAPE_FRACTION * self.blob.size)

    def box(self) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) pixel bounds of the silhouette, bottom and right exclusive (not empty)."""
        rows, cols = np.nonzero(self.silhouette)
        return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1

    def extent(self) -> float:
        """Longer side of the silhouette's bounding box as a fraction of the image side (not empty)."""
        top, bottom, left, right = self.box()
        height, width = self.silhouette.shape
        return max((bottom - top) / height, (right - left) / width)

    def centre(self) -> np.ndarray:
        """(x, y) centre of the silhouette's bounding box as fractions of the image side (not empty)."""
        top, bottom, left, right = self.box()
        height, width = self.silhouette.shape
        return np.array([(left + right) / 2 / width, (top + bottom) / 2 / height])

    def colour_index(self) -> int:
        """Index into COLOURS of the most frequent colour of the shape (call only when not empty)."""
        return int(np.bincount(self.labels[self.blob], minlength=len(COLOURS)).argmax())


def segment(image: ImageLike) -> Segmentation:
    """Split an image into background (from its corners) and the main shape (nearest-palette pixels)."""
    pixels = to_array(image)
    k = max(2, min(pixels.shape[:2]) // 16)
    corners = np.concatenate([pixels[:k, :k], pixels[:k, -k:], pixels[-k:, :k], pixels[-k:, -k:]]).reshape(-1, 3)
    reference = np.median(corners, axis=0)
    backgrounds = _palette_array(BACKGROUND_PALETTE)
    index, distance = _nearest(reference, backgrounds)
    known = distance <= BACKGROUND_TOLERANCE
    background = BACKGROUNDS[int(index)] if known else UNKNOWN
    background_rgb = backgrounds[int(index)] if known else reference
    labels, _ = _nearest(pixels, np.vstack([background_rgb, _palette_array(PALETTE)]))
    labels = labels - 1
    blob = _main_blob(labels >= 0)
    return Segmentation(pixels, background, background_rgb, labels, blob, _fill_rows(blob))


def _nearest_prototype(features: np.ndarray, prototypes: dict[str, tuple[float, ...]], tolerance: float) -> str:
    """Name of the prototype closest to ``features``, or "unknown" when none is within ``tolerance``."""
    names = list(prototypes)
    distances = np.linalg.norm(np.array([prototypes[name] for name in names]) - features, axis=1)
    return names[int(distances.argmin())] if distances.min() <= tolerance else UNKNOWN


def _geometry(seg: Segmentation) -> dict[str, str]:
    """Shape (fill ratio and top/bottom asymmetry), size (extent) and position (box centre) of the silhouette."""
    top, bottom, left, right = seg.box()
    box_h, box_w = bottom - top, right - left
    widths = seg.silhouette[top:bottom].sum(axis=1)
    half = box_h // 2
    asymmetry = (widths[box_h - half :].mean() - widths[:half].mean()) / box_w if half else 0.0
    fill = widths.sum() / (box_h * box_w)
    shape = _nearest_prototype(np.array([fill, asymmetry]), SHAPE_PROTOTYPES, SHAPE_TOLERANCE)
    extent = seg.extent()
    size = UNKNOWN if not SIZE_RANGE[0] <= extent <= SIZE_RANGE[1] else "small" if extent < SIZE_THRESHOLD else "large"
    position = _nearest_prototype(seg.centre(), POSITION_CENTRE, POSITION_TOLERANCE)
    return {"shape": shape, "size": size, "position": position}


def style_features(image: ImageLike | Segmentation) -> np.ndarray | None:
    """(mean, vertical change, horizontal change) of background-likeness inside the shape; None if no interior.

    Background-likeness places each pixel between the shape colour (0) and the background (1); the changes
    are mean absolute differences between interior pixels one stripe width (:func:`border_width`) apart, so
    they do not depend on the image size. Flat ~ (0, 0, 0), outlined ~ (1, 0, 0), horizontal stripes
    ~ (.5, 1, 0), dots ~ (.25, .5, .5).
    """
    seg = image if isinstance(image, Segmentation) else segment(image)
    if seg.empty:
        return None
    unit = border_width(min(seg.blob.shape))
    interior = _erode(seg.silhouette, unit)
    if interior.sum() < 6:
        return None
    shape_rgb = _palette_array(PALETTE)[seg.colour_index()]
    direction = seg.background_rgb - shape_rgb
    likeness = np.clip((seg.pixels - shape_rgb) @ direction / max(direction @ direction, 1e-8), 0.0, 1.0)
    changes = [_change(likeness, interior, axis, unit) for axis in (0, 1)]
    return np.array([likeness[interior].mean(), *changes])


def _change(values: np.ndarray, mask: np.ndarray, axis: int, lag: int) -> float:
    """Mean absolute difference of ``values`` between pixels ``lag`` apart along ``axis``, both in ``mask``."""
    values, mask = np.moveaxis(values, axis, 0), np.moveaxis(mask, axis, 0)
    diff = np.abs(values[lag:] - values[:-lag])
    pairs = mask[lag:] & mask[:-lag]
    return float(diff[pairs].mean()) if pairs.any() else 0.0


def style_probabilities(image: ImageLike | Segmentation) -> dict[str, float]:
    """Soft style membership: softmax of negative squared distances to the style prototypes (all 0 without a shape)."""
    features = style_features(image)
    if features is None:
        return dict.fromkeys(STYLES, 0.0)
    distances = np.array([np.sum((features - np.array(STYLE_PROTOTYPES[s])) ** 2) for s in STYLES])
    weights = np.exp(-(distances - distances.min()) / STYLE_TEMPERATURE)
    return dict(zip(STYLES, (weights / weights.sum()).tolist(), strict=True))


def detect_attributes(image: ImageLike) -> dict[str, str]:
    """Per-attribute reading of an image; any attribute that cannot be read confidently is "unknown"."""
    seg = segment(image)
    result = dict.fromkeys(ATTRIBUTE_VALUES, UNKNOWN)
    result["background"] = seg.background
    if seg.empty:
        return result
    colour_counts = np.bincount(seg.labels[seg.blob], minlength=len(COLOURS))
    if colour_counts.max() >= COLOUR_MAJORITY * colour_counts.sum():
        result["colour"] = COLOURS[int(colour_counts.argmax())]
    result.update(_geometry(seg))
    features = style_features(seg)
    if features is not None:
        result["style"] = _nearest_prototype(features, STYLE_PROTOTYPES, STYLE_TOLERANCE)
    return result


def detect(image: ImageLike) -> Attributes | None:
    """The scene shown in ``image``, or None when any attribute is unknown."""
    found = detect_attributes(image)
    return None if UNKNOWN in found.values() else Attributes(**found)


def prompt_fidelity(image: ImageLike, attrs: Attributes | Mapping[str, str]) -> float:
    """Share of the attributes in ``attrs`` (all six, or those a partial prompt names) read back from ``image``.

    A prompt that names no attribute constrains nothing, so its fidelity is 1.0.
    """
    expected = attrs.as_dict() if isinstance(attrs, Attributes) else dict(attrs)
    if not expected:
        return 1.0
    found = detect_attributes(image)
    return sum(found[name] == value for name, value in expected.items()) / len(expected)


def attribute_embedding(images: Sequence[ImageLike]) -> np.ndarray:
    """One-hot detected attributes, one block per attribute with an "unknown" slot: ``(N, 6 + sum of values)``.

    Every block holds exactly one 1, so the cosine of two rows is the share of attributes they agree on
    and ``1 - cos`` the share that differ: a diversity embedding for :func:`evaluation.diversity`.
    """
    width = sum(len(values) + 1 for values in ATTRIBUTE_VALUES.values())
    out = np.zeros((len(images), width))
    for row, image in enumerate(images):
        found, offset = detect_attributes(image), 0
        for name, values in ATTRIBUTE_VALUES.items():
            slots = (*values, UNKNOWN)
            out[row, offset + slots.index(found[name])] = 1.0
            offset += len(slots)
    return out
