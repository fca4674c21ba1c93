"""Oracles: automatic stand-ins for a human click. Each scores images; higher = preferred.

An oracle is a plain function `(images: list[PIL.Image], prompt: str) -> list[float]`, one score
per image. Only the order within a pair matters to D3PO. Registered by name:

    @register_oracle("redder")
    def redder(images, prompt): ...

    get_oracle("brighter")(pair, "a red circle")  ->  [0.41, 0.37]

Built-ins:
    brighter           mean luminance in [0, 1] (D3PO paper: aesthetic proxy "brightness")
    jpeg-compressible  -(JPEG size in kB at quality 95) (D3PO/DDPO paper's compressibility proxy)
    larger-shape       share of pixels that differ from the border colour (area of the drawn shape)
    saturated          mean HSV saturation in [0, 1] (vivid colours over washed-out ones)
    warmer             mean red minus mean blue in [-1, 1] (a warm colour cast over a cool one)
    centered           minus the distance of the shape's centre of mass from the image centre,
                       as a share of the half-diagonal (shapes drawn nearer the middle)
    random             control: a hash of pixels and prompt mapped to [0, 1); reproducible, and
                       carries no information about the image content
"""
from __future__ import annotations

import hashlib
import io
from typing import Callable

import numpy as np
from PIL import Image

from .errors import ConfigError

Oracle = Callable[[list, str], list]
ORACLES: dict[str, Oracle] = {}  # the registry: name -> oracle (filled by @register_oracle)

SHAPE_DISTANCE = 60.0  # RGB distance (0-255 scale) from the border colour that counts as "shape"


def register_oracle(name: str) -> Callable[[Oracle], Oracle]:
    """Decorator: add an oracle to ORACLES under `name` (a name may be registered once)."""
    def decorate(fn: Oracle) -> Oracle:
        if name in ORACLES:
            raise ConfigError(f"oracle {name!r} is already registered; choose another name")
        ORACLES[name] = fn
        return fn
    return decorate


def get_oracle(name: str) -> Oracle:
    """The oracle registered as `name`; ConfigError listing the valid names otherwise."""
    if name not in ORACLES:
        raise ConfigError(f"unknown oracle {name!r}; valid: {', '.join(sorted(ORACLES))}")
    return ORACLES[name]


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _channel_means(image: Image.Image) -> tuple[float, float, float]:
    """Mean red, green and blue (0-255) of an image."""
    rgb = _rgb(image)
    return rgb[..., 0].mean(), rgb[..., 1].mean(), rgb[..., 2].mean()


@register_oracle("brighter")
def brighter(images: list[Image.Image], prompt: str) -> list[float]:
    """Mean luminance (ITU-R 601 luma, PIL mode "L") in [0, 1]."""
    return [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255.0) for im in images]


@register_oracle("jpeg-compressible")
def jpeg_compressible(images: list[Image.Image], prompt: str) -> list[float]:
    """-(size of the image as JPEG at quality 95, in kB): smaller file = preferred."""
    scores = []
    for im in images:
        buffer = io.BytesIO()
        im.convert("RGB").save(buffer, format="JPEG", quality=95)
        scores.append(-buffer.tell() / 1000.0)
    return scores


def shape_area(image: Image.Image, distance: float = SHAPE_DISTANCE) -> float:
    """Share of pixels whose RGB differs from the median border colour by more than `distance`."""
    pixels = _rgb(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    far = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1) > distance
    return float(far.mean())


@register_oracle("larger-shape")
def larger_shape(images: list[Image.Image], prompt: str) -> list[float]:
    """Area of the drawn shape as a share of the image (see shape_area)."""
    return [shape_area(im) for im in images]


@register_oracle("random")
def random_oracle(images: list[Image.Image], prompt: str) -> list[float]:
    """SHA-256 of (prompt, size, pixel bytes) mapped to [0, 1): reproducible, content-blind order."""
    scores = []
    for im in images:
        rgb = im.convert("RGB")
        digest = hashlib.sha256(prompt.encode() + repr(rgb.size).encode() + rgb.tobytes()).digest()
        scores.append(int.from_bytes(digest[:8], "big") / 2.0**64)
    return scores


@register_oracle("saturated")
def saturated(images: list[Image.Image], prompt: str) -> list[float]:
    """Mean HSV saturation in [0, 1] (PIL's HSV mode)."""
    return [float(np.asarray(im.convert("RGB").convert("HSV"), dtype=np.float64)[..., 1].mean() / 255.0)
            for im in images]


def shape_offset(image: Image.Image, distance: float = SHAPE_DISTANCE) -> float:
    """Distance of the shape's centre of mass from the image centre, as a share of the
    half-diagonal (1.0 when no pixel differs from the border: no shape, as far as it gets)."""
    pixels = _rgb(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    far = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1) > distance
    if not far.any():
        return 1.0
    h, w = far.shape
    ys, xs = np.nonzero(far)
    dy, dx = ys.mean() - (h - 1) / 2, xs.mean() - (w - 1) / 2
    return float(np.hypot(dy, dx) / np.hypot((h - 1) / 2, (w - 1) / 2))


@register_oracle("warmer")
def warmer(images: list[Image.Image], prompt: str) -> list[float]:
    """Colour temperature: (mean red - mean blue) / 255, in [-1, 1]; warmer tones score higher."""
    return [float((r - b) / 255.0) for r, _, b in map(_channel_means, images)]


@register_oracle("greener")
def greener(images: list[Image.Image], prompt: str) -> list[float]:
    """Green cast: (mean green - (mean red + mean blue) / 2) / 255, in [-1, 1]; an axis of colour
    that ``warmer`` (red against blue) does not see."""
    return [float((g - (r + b) / 2) / 255.0) for r, g, b in map(_channel_means, images)]


@register_oracle("centered")
def centered(images: list[Image.Image], prompt: str) -> list[float]:
    """Minus shape_offset: a shape nearer the middle of the image scores higher."""
    return [-shape_offset(im) for im in images]
