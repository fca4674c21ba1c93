"""The procedural world the embedded model is trained on: one flat shape on a flat background.

Vocabulary (every word the tokenizer knows, see `VOCABULARY`):

    colours      red yellow green cyan blue purple
    kinds        circle square triangle
    sizes        small large
    backgrounds  white black gray
    glue         a on background

Prompt grammar (brackets = optional):

    a [SIZE] COLOUR KIND [on a BACKGROUND background]

e.g. "a red circle", "a large blue triangle on a white background".
A word left out is drawn at random. Within a prompt, images still vary in size (continuous
within the size class), position, and shade of the shape and of the background, so there is
something to prefer.

    >>> rng = random.Random(0)
    >>> prompt = random_prompt(rng)
    >>> image = render(sample_scene(parse_prompt(prompt), rng))   # 64x64 PIL image
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from ..errors import ConfigError

RESOLUTION = 64          # side of a rendered image in pixels
SUPERSAMPLE = 4          # shapes are drawn this many times larger, then box-filtered (anti-aliasing)

# Base colours, 6 hues roughly 60 degrees apart (so a checker can tell them apart by hue).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "yellow": (235, 210, 30),
    "green": (35, 175, 55),
    "cyan": (30, 200, 210),
    "blue": (35, 65, 215),
    "purple": (150, 50, 200),
}
KINDS = ("circle", "square", "triangle")
# Half-extent of the shape in pixels (radius of a circle), drawn uniformly within the class.
SIZES: dict[str, tuple[float, float]] = {"small": (9.0, 13.0), "large": (17.0, 24.0)}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "black": (18, 18, 18),
    "gray": (128, 128, 128),
}
GLUE = ("a", "on", "background")
VOCABULARY = (*GLUE, *SIZES, *COLOURS, *KINDS, *BACKGROUNDS)


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for; None = not said (drawn at random)."""

    colour: str
    kind: str
    size: str | None = None
    background: str | None = None

    def __post_init__(self):
        _check_word("colour", self.colour, COLOURS)
        _check_word("kind", self.kind, KINDS)
        if self.size is not None:
            _check_word("size", self.size, SIZES)
        if self.background is not None:
            _check_word("background", self.background, BACKGROUNDS)

    def to_prompt(self) -> str:
        words = ["a"] + ([self.size] if self.size else []) + [self.colour, self.kind]
        if self.background:
            words += ["on", "a", self.background, "background"]
        return " ".join(words)


@dataclass(frozen=True)
class Scene:
    """Every continuous choice of one image: enough to redraw it exactly."""

    colour: str
    kind: str
    size: str
    background: str
    radius: float                       # half-extent in pixels
    cx: float                           # centre, pixels from the left
    cy: float                           # centre, pixels from the top
    rgb: tuple[int, int, int]           # shaded shape colour
    bg_rgb: tuple[int, int, int]        # shaded background colour


def _check_word(field: str, word: str, allowed) -> None:
    if word not in allowed:
        raise ConfigError(f"unknown {field} {word!r}; valid: {', '.join(allowed)}")


def random_prompt(rng: random.Random, p_size: float = 0.5, p_background: float = 0.5) -> str:
    """A prompt of the grammar; size and background are each said with the given probability."""
    return PromptSpec(
        colour=rng.choice(list(COLOURS)),
        kind=rng.choice(KINDS),
        size=rng.choice(list(SIZES)) if rng.random() < p_size else None,
        background=rng.choice(list(BACKGROUNDS)) if rng.random() < p_background else None,
    ).to_prompt()


def parse_prompt(prompt: str) -> PromptSpec:
    """Read a prompt of the grammar; raise ConfigError naming the word that does not fit."""
    words = prompt.lower().replace(",", " ").split()
    found: dict[str, str] = {}
    tables = {"size": SIZES, "colour": COLOURS, "kind": KINDS, "background": BACKGROUNDS}
    for word in words:
        if word in GLUE:
            continue
        field = next((f for f, table in tables.items() if word in table), None)
        if field is None:
            raise ConfigError(f"word {word!r} of prompt {prompt!r} is not in the vocabulary: {' '.join(VOCABULARY)}")
        if field in found:
            raise ConfigError(f"prompt {prompt!r} names two {field}s ({found[field]!r}, {word!r})")
        found[field] = word
    for field in ("colour", "kind"):
        if field not in found:
            raise ConfigError(f"prompt {prompt!r} names no {field}; e.g. 'a red circle'")
    return PromptSpec(**found)


def _shade(rgb, factor: float, jitter: int, rng: random.Random) -> tuple[int, int, int]:
    return tuple(max(0, min(255, round(c * factor + rng.uniform(-jitter, jitter)))) for c in rgb)


def sample_scene(spec: PromptSpec, rng: random.Random, resolution: int = RESOLUTION) -> Scene:
    """Draw the unsaid words and every continuous choice (size, position, shades)."""
    size = spec.size or rng.choice(list(SIZES))
    background = spec.background or rng.choice(list(BACKGROUNDS))
    radius = rng.uniform(*SIZES[size]) * resolution / RESOLUTION
    margin = radius * 1.05 + 1
    cx, cy = (rng.uniform(margin, resolution - margin) for _ in range(2))
    rgb = _shade(COLOURS[spec.colour], rng.uniform(0.75, 1.1), 12, rng)
    bg_rgb = _shade(BACKGROUNDS[background], 1.0, 14, rng)
    return Scene(spec.colour, spec.kind, size, background, radius, cx, cy, rgb, bg_rgb)


def shape_polygon(kind: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]] | None:
    """Vertices of a square or an upright triangle (None for a circle)."""
    if kind == "square":
        h = radius * 0.9
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        # Equilateral, pointing up, centred on its centroid; circumradius slightly above `radius`.
        r = radius * 1.15
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    return None


def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """Draw a scene as an RGB image of `resolution` x `resolution` pixels."""
    s = SUPERSAMPLE
    big = Image.new("RGB", (resolution * s, resolution * s), scene.bg_rgb)
    draw = ImageDraw.Draw(big)
    cx, cy, r = scene.cx * s, scene.cy * s, scene.radius * s
    polygon = shape_polygon(scene.kind, cx, cy, r)
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=scene.rgb)
    else:
        draw.polygon(polygon, fill=scene.rgb)
    return big.resize((resolution, resolution), Image.BOX)


def render_prompt(prompt: str, rng: random.Random, resolution: int = RESOLUTION) -> Image.Image:
    """One random image that matches a prompt."""
    return render(sample_scene(parse_prompt(prompt), rng, resolution), resolution)
