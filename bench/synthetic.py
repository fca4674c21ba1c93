"""Full-size UNets with random weights and synthetic trajectories, for measuring an update.

No download: the UNet is built from the published config in ``core/configs/<family>/unet``
directly in the weight dtype (no float32 copy first, so the peak memory is the update's, not
the loading's). A ``BenchPipeline`` holds just what ``core.update`` reads: the UNet and the
scheduler. A trajectory has random latents and random conditioning of the right shapes: the
memory and time of an update do not depend on their values.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from ..core.sampling import STORE_DTYPE, Trajectory, make_scheduler

CONFIGS = Path(__file__).resolve().parent.parent / "core" / "configs"
FAMILIES = ("sd1", "sdxl", "tiny-sd1", "tiny-sdxl")
VAE_SCALE = 8        # pixels per latent (all Stable Diffusion VAEs)


@dataclass
class BenchPipeline:
    """What the update code reads from a pipeline: ``unet`` and ``scheduler``."""
    unet: UNet2DConditionModel
    scheduler: DDIMScheduler
    family: str


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_pipeline(family: str, dtype: torch.dtype, seed: int = 0) -> BenchPipeline:
    """A random-weight UNet of ``family`` built in ``dtype``, with the family's DDIM scheduler."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: use one of {FAMILIES}")
    if family.startswith("tiny-"):
        from ..core.tiny import tiny_pipeline
        pipe = tiny_pipeline(family.removeprefix("tiny-"), seed=seed)
        return BenchPipeline(pipe.unet.to(dtype), DDIMScheduler.from_config(pipe.scheduler.config), family)
    config = json.loads((CONFIGS / family / "unet" / "config.json").read_text())
    with default_dtype(dtype), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(config)
    scheduler = DDIMScheduler.from_config(json.loads((CONFIGS / family / "scheduler" / "scheduler_config.json").read_text()))
    return BenchPipeline(unet, scheduler, family)


def synthetic_trajectory(pipe: BenchPipeline, size: int, steps: int = 20, n: int = 2, seed: int = 0) -> Trajectory:
    """A ``steps``-step trajectory of ``n`` images at ``size``×``size`` px with random contents."""
    g = torch.Generator("cpu").manual_seed(seed)
    cfg = pipe.unet.config
    h = size // VAE_SCALE
    scheduler = make_scheduler(pipe, steps)
    latents = torch.randn(steps + 1, n, cfg.in_channels, h, h, generator=g)
    # keep successive latents close, as in a real trajectory (only the log-prob values change)
    latents = torch.cumsum(latents * 0.1, dim=0) + latents[:1]
    dim = cfg.cross_attention_dim
    cond = {"prompt_embeds": torch.randn(1, 77, dim, generator=g),
            "negative_prompt_embeds": torch.randn(1, 77, dim, generator=g)}
    if cfg.addition_embed_type == "text_time":
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        cond["pooled"] = torch.randn(1, pooled_dim, generator=g)
        cond["negative_pooled"] = torch.randn(1, pooled_dim, generator=g)
        cond["time_ids"] = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    return Trajectory(latents=latents.to(STORE_DTYPE), timesteps=scheduler.timesteps.clone().long(),
                      log_probs=torch.zeros(steps, n),
                      cond={k: v.to(STORE_DTYPE) for k, v in cond.items()})
