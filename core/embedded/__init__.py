"""The small text-to-image model that ships with D3PO Studio (see docs/embedded.md).

A diffusers StableDiffusionPipeline folder (64x64 images, 32x32x4 latents, ~5 M parameters) trained
by `train.py` on the procedural shapes of `world.py`; `checker.py` measures how well it follows
prompts. Load it offline with

    StableDiffusionPipeline.from_pretrained(WEIGHTS_DIR, local_files_only=True)

and sample at DEFAULTS (DDIM steps, CFG scale, size, eta = 1 as in D3PO). It knows only the
words of `world.VOCABULARY`; `vocabulary_text()` says them in one line.
"""
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# Sampling settings the model was tuned and measured at (docs/embedded.md).
DEFAULTS = dict(steps=10, guidance=6.0, height=64, width=64, eta=1.0)


def vocabulary_text() -> str:
    """Every word the model knows and its prompt grammar, in one line (for tooltips and docs)."""
    from . import world
    return (f"colours {' '.join(world.COLOURS)}; shapes {' '.join(world.KINDS)}; sizes {' '.join(world.SIZES)}; "
            f"backgrounds {' '.join(world.BACKGROUNDS)}. Prompts: a [SIZE] COLOUR SHAPE "
            "[on a BACKGROUND background], e.g. 'a large red circle on a white background'.")
