"""Does an image show what its prompt asks for? Classical image analysis of the procedural world.

    check(image, "a large red circle") -> {"colour": "red", "kind": "circle", "colour_ok": True, ...}
    fidelity(images, prompts)          -> {"colour": 0.97, "kind": 0.88, ...}  (rates over the images)

1. Background = median colour of the 2-pixel border.
2. Foreground = pixels farther than FG_DISTANCE (RGB, 0-255) from the background; keep the largest
   4-connected component.
3. Colour = the base colour whose hue is nearest the median hue of the foreground (circular).
4. Kind = from fill ratio, area / bounding-box area: square ~1.0, circle ~pi/4 = 0.785,
   upright triangle ~0.5; thresholds halfway between.
5. Size = half-extent from the area and the kind's area formula, compared with the midpoint
   between the "small" and "large" ranges. Background = nearest base background to the border.
"""
from __future__ import annotations

import colorsys
import math
from collections import deque

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .world import BACKGROUNDS, COLOURS, SIZES, parse_prompt

FG_DISTANCE = 60.0          # RGB distance from the background that makes a pixel foreground
MIN_AREA = 12               # fewer foreground pixels than this = no shape drawn
SQUARE_MIN_FILL = 0.89      # fill ratio above: square
CIRCLE_MIN_FILL = 0.64      # fill ratio above (and below SQUARE_MIN_FILL): circle; below: triangle
# Area of a kind in units of radius**2 (world.shape_polygon: square half-side 0.9 r, triangle circumradius 1.15 r).
_AREA_PER_RADIUS2 = {"circle": math.pi, "square": 4 * 0.9**2, "triangle": 3 * math.sqrt(3) / 4 * 1.15**2}
_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected region of a boolean mask (breadth-first search; images are small)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        region, queue = [], deque([(y0, x0)])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


def background_colour(pixels: np.ndarray) -> np.ndarray:
    """Median RGB of the 2-pixel border of an (H, W, 3) array."""
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def foreground_mask(pixels: np.ndarray) -> np.ndarray:
    """Pixels that differ from the border colour by more than FG_DISTANCE."""
    distance = np.linalg.norm(pixels.astype(np.float64) - background_colour(pixels), axis=-1)
    return distance > FG_DISTANCE


def _nearest(value, table: dict, distance) -> str:
    return min(table, key=lambda name: distance(value, table[name]))


def _hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


def analyse(image: Image.Image) -> dict:
    """What is drawn: colour, kind, size, background (None where no shape is found) and the measures."""
    pixels = np.asarray(image.convert("RGB"))
    bg = background_colour(pixels)
    background = _nearest(bg, BACKGROUNDS, lambda v, ref: np.linalg.norm(v - np.array(ref)))
    shape = _largest_component(foreground_mask(pixels))
    area = int(shape.sum())
    if area < MIN_AREA:
        return dict(colour=None, kind=None, size=None, background=background, area=area, fill=0.0)
    ys, xs = np.nonzero(shape)
    fill = area / float((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    rgb = np.median(pixels[shape], axis=0) / 255.0
    hue = colorsys.rgb_to_hsv(*rgb)[0]
    colour = _nearest(hue, _HUES, _hue_distance)
    kind = "square" if fill >= SQUARE_MIN_FILL else "circle" if fill >= CIRCLE_MIN_FILL else "triangle"
    radius = math.sqrt(area / _AREA_PER_RADIUS2[kind])
    size = "large" if radius >= (SIZES["small"][1] + SIZES["large"][0]) / 2 else "small"
    return dict(colour=colour, kind=kind, size=size, background=background, area=area, fill=fill)


def check(image: Image.Image, prompt: str) -> dict:
    """analyse() plus, for each thing the prompt says, whether the image agrees (`<field>_ok`)."""
    spec = parse_prompt(prompt)
    found = analyse(image)
    result = dict(found)
    result["colour_ok"] = found["colour"] == spec.colour
    result["kind_ok"] = found["kind"] == spec.kind
    if spec.size is not None:
        result["size_ok"] = found["size"] == spec.size
    if spec.background is not None:
        result["background_ok"] = found["background"] == spec.background
    return result


def fidelity(images: list[Image.Image], prompts: list[str]) -> dict:
    """Share of images whose colour / kind / (size, background where said) match their prompt."""
    if len(images) != len(prompts) or not images:
        raise ConfigError(f"need as many prompts as images (and at least one): {len(images)} images, {len(prompts)} prompts")
    results = [check(image, prompt) for image, prompt in zip(images, prompts)]
    rates = {"n": len(results)}
    for field in ("colour", "kind", "size", "background"):
        said = [r[f"{field}_ok"] for r in results if f"{field}_ok" in r]
        if said:
            rates[field] = sum(said) / len(said)
    rates["both"] = sum(r["colour_ok"] and r["kind_ok"] for r in results) / len(results)
    return rates


# ---------------------------------------------------------------- evaluation of a model folder
def sample_pairs(pipe, prompts: list[str], seed: int = 0, **settings) -> list[Image.Image]:
    """Two images per prompt (one call each, as a D3PO pair is sampled), settings = DEFAULTS."""
    import torch

    from . import DEFAULTS

    s = {**DEFAULTS, **settings}
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + i)
        images += pipe(prompt, num_images_per_prompt=2, num_inference_steps=s["steps"], guidance_scale=s["guidance"],
                       eta=s["eta"], height=s["height"], width=s["width"], generator=generator).images
    return images


def pair_latency(pipe, prompt: str = "a large blue triangle on a white background", repeats: int = 10) -> float:
    """Median seconds to sample one pair at DEFAULTS, after two warm-up calls."""
    import statistics
    import time

    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        sample_pairs(pipe, [prompt], seed=i)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


GRID_PROMPTS = [
    "a red circle", "a yellow square", "a green triangle", "a cyan circle on a black background",
    "a large blue square", "a small purple triangle", "a large red triangle on a gray background",
    "a small green circle on a white background", "a blue triangle on a black background",
    "a large yellow circle on a gray background", "a cyan square on a white background",
    "a purple circle on a black background",
]


def prompt_grid(pipe, prompts: list[str] = GRID_PROMPTS, pairs: int = 3, seed: int = 0, **settings) -> Image.Image:
    """One row per prompt: the prompt, then `pairs` pairs sampled at DEFAULTS."""
    from PIL import ImageDraw

    rows = [sample_pairs(pipe, [prompt] * pairs, seed=seed + 1000 * i, **settings) for i, prompt in enumerate(prompts)]
    w, h = rows[0][0].size
    label_w = 220
    grid = Image.new("RGB", (label_w + len(rows[0]) * (w + 2), len(rows) * (h + 2)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (prompt, images) in enumerate(zip(prompts, rows)):
        draw.text((4, r * (h + 2) + h // 2 - 6), prompt, fill=(0, 0, 0))
        for c, im in enumerate(images):
            grid.paste(im, (label_w + c * (w + 2), r * (h + 2)))
    return grid


def main(argv=None) -> None:
    """python -m d3po_studio.core.embedded.checker [--weights DIR] [--pairs 120] [--grid PNG]"""
    import argparse
    import json
    import random

    import torch
    from diffusers import StableDiffusionPipeline

    from . import WEIGHTS_DIR
    from .world import random_prompt

    p = argparse.ArgumentParser(description="Prompt fidelity and pair latency of a model folder at DEFAULTS.")
    p.add_argument("--weights", default=str(WEIGHTS_DIR))
    p.add_argument("--pairs", type=int, default=120, help="prompts; two images each")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--grid", help="save a grid of GRID_PROMPTS x 3 pairs as PNG here")
    p.add_argument("--no-latency", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    pipe = StableDiffusionPipeline.from_pretrained(args.weights, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    settings = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance)) if v is not None}
    rng = random.Random(args.seed)
    prompts = [random_prompt(rng) for _ in range(args.pairs)]
    images = sample_pairs(pipe, prompts, seed=args.seed, **settings)
    report = fidelity(images, [q for q in prompts for _ in range(2)])
    report["settings"] = settings
    if not args.no_latency and not settings:
        report["pair_latency_s"] = round(pair_latency(pipe), 3)
    if args.grid:
        prompt_grid(pipe, seed=args.seed, **settings).save(args.grid)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
