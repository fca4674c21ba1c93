"""Train the embedded text-to-image model on the procedural world (see docs/embedded.md).

    python -m d3po_studio.core.embedded.train --out .work/embedded-run            # VAE, then UNet, then export
    python -m d3po_studio.core.embedded.train --out .work/embedded-run --resume   # go on after a stop

Stages: 1. build the CLIP tokenizer of the world's vocabulary; 2. train the AutoencoderKL
(64x64 RGB <-> 32x32x4 latents); 3. train UNet + CLIP text encoder (epsilon prediction,
min-SNR-5 weighting, 10% empty prompts for classifier-free guidance, EMA of the weights);
4. export a diffusers StableDiffusionPipeline folder (safetensors) to core/embedded/weights/.
Batches are a pure function of (seed, stage, step), so a resumed run equals an uninterrupted one.
Checkpoints (<out>/vae.pt, <out>/unet.pt) are written atomically every --checkpoint-every steps.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import ConfigError
from . import WEIGHTS_DIR
from .world import RESOLUTION, VOCABULARY, parse_prompt, random_prompt, render, sample_scene

MAX_TOKENS = 16  # tokenizer.model_max_length: the longest prompt of the grammar is 10 tokens

VAE_CONFIG = dict(  # one downsampling: 64x64x3 -> 32x32x4
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
    block_out_channels=(32, 64), mid_block_add_attention=False, sample_size=RESOLUTION,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
)
UNET_CONFIG = dict(  # 32x32 -> 16x16 -> 8x8; cross-attention at 16x16, 8x8 and in the middle
    sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 128), norm_num_groups=16, cross_attention_dim=64, attention_head_dim=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=MAX_TOKENS, projection_dim=64)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                        steps_offset=1, timestep_spacing="trailing", prediction_type="epsilon")


@dataclass(frozen=True)
class TrainConfig:
    out: Path                      # run folder: checkpoints, tokenizer, logs
    export_to: Path = WEIGHTS_DIR  # where the diffusers folder is written at the end
    seed: int = 0                  # seeds models, batches and noise
    vae_batch_size: int = 16       # images per optimizer step, autoencoder
    batch_size: int = 16           # images per optimizer step, UNet + text encoder
    vae_steps: int = 800           # optimizer steps of the autoencoder
    unet_steps: int = 3800         # optimizer steps of UNet + text encoder (the shipped weights)
    vae_lr: float = 1e-3           # AdamW peak learning rate, autoencoder
    unet_lr: float = 8e-4          # AdamW learning rate (constant after warm-up), UNet + text encoder
    p_uncond: float = 0.1          # share of empty prompts (trains the unconditional branch of CFG)
    ema_decay: float = 0.999       # EMA of UNet + text encoder weights; the EMA is exported
    checkpoint_every: int = 100    # steps between atomic checkpoints
    scale_images: int = 256        # images used to set the VAE scaling factor (latent std -> 1)

    def __post_init__(self):
        for name in ("vae_batch_size", "batch_size", "vae_steps", "unet_steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ConfigError(f"p_uncond must be in [0, 1), got {self.p_uncond}")


# ---------------------------------------------------------------- tokenizer
def build_tokenizer(folder: Path):
    """Write vocab.json + merges.txt so that every vocabulary word is one CLIP token, and load it.

    Each word is built by left-to-right merges ("c i" -> "ci", "ci r" -> "cir", ..., "circl e</w>");
    every part of every merge is itself in the vocab (transformers 5 requires it).
    """
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [c + "</w>" for c in letters]:
        vocab[token] = len(vocab)
    merges = []
    for word in VOCABULARY:
        prefix = word[0]
        for i, ch in enumerate(word[1:], start=1):
            piece = ch + "</w>" if i == len(word) - 1 else ch
            merges.append(f"{prefix} {piece}")
            prefix += piece
            vocab.setdefault(prefix, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="CLIPTokenizer", model_max_length=MAX_TOKENS, bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>"), indent=2))
    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


# ---------------------------------------------------------------- models and data
def make_models(tokenizer, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return vae, text_encoder, unet


def make_batch(seed: int, stage: str, step: int, batch_size: int, p_uncond: float = 0.0):
    """Images in [-1, 1] (B, 3, 64, 64) and their prompts ("" with probability p_uncond)."""
    rng = random.Random(f"{seed}/{stage}/{step}")
    prompts, pixels = [], []
    for _ in range(batch_size):
        prompt = random_prompt(rng)
        pixels.append(np.asarray(render(sample_scene(parse_prompt(prompt), rng))))
        prompts.append("" if rng.random() < p_uncond else prompt)
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, prompts


# ---------------------------------------------------------------- losses
def vae_loss(vae, x: torch.Tensor, kl_weight: float = 1e-6):
    """L1 + MSE reconstruction of x plus a small KL; returns (loss, metrics)."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample()).sample.float()
    mse, l1 = F.mse_loss(recon, x), F.l1_loss(recon, x)
    kl = posterior.kl().mean() / x[0].numel()
    loss = l1 + mse + kl_weight * kl
    return loss, {"mse": mse.item(), "l1": l1.item()}


def diffusion_loss(unet, text_embeds, latents, noise_scheduler, generator, snr_gamma: float = 5.0):
    """Epsilon-prediction MSE, weighted per sample by min(SNR, gamma)/SNR (Hang et al. 2023, min-SNR)."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
    x_t = noise_scheduler.add_noise(latents, noise, t)
    eps_hat = unet(x_t, t, text_embeds).sample.float()
    alpha_bar = noise_scheduler.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    weight = torch.clamp(snr, max=snr_gamma) / snr
    per_sample = (eps_hat - noise).pow(2).mean(dim=(1, 2, 3))
    return (weight * per_sample).mean(), {"mse": per_sample.mean().item()}


# ---------------------------------------------------------------- checkpoints
def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def lr_at(step: int, total: int, peak: float, warmup: int = 100, cosine: bool = True) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak (or constant: cosine=False)."""
    if step < warmup or not cosine:
        return peak * min(1.0, (step + 1) / warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _resume(path: Path, resume: bool, modules: dict, optimizer):
    if not path.exists():
        return 0
    if not resume:
        raise ConfigError(f"{path} exists: pass --resume to go on, or choose a new --out folder")
    state = torch.load(path, map_location="cpu", weights_only=False)
    for name, module in modules.items():
        module.load_state_dict(state[name])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


# ---------------------------------------------------------------- stages
def train_vae(cfg: TrainConfig, vae, resume: bool) -> None:
    path = cfg.out / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = _resume(path, resume, {"vae": vae}, opt)
    bar = tqdm(range(start, cfg.vae_steps), initial=start, total=cfg.vae_steps, desc="vae")
    for step in bar:
        torch.manual_seed(cfg.seed * 100_003 + step)  # posterior sampling noise
        x, _ = make_batch(cfg.seed, "vae", step, cfg.vae_batch_size)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, metrics = vae_loss(vae, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(metrics)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            save_atomic({"vae": vae.state_dict(), "optimizer": opt.state_dict(), "step": step + 1}, path)
    set_scaling_factor(vae, cfg.seed, cfg.scale_images)


@torch.no_grad()
def set_scaling_factor(vae, seed: int, n: int = 256) -> None:
    """SD convention: latents * scaling_factor have unit variance over the data."""
    x, _ = make_batch(seed, "scale", 0, n)
    std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)


def train_unet(cfg: TrainConfig, vae, text_encoder, unet, tokenizer, resume: bool):
    """Train UNet + text encoder; returns their EMA copies."""
    import copy

    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    ema = {"unet": copy.deepcopy(unet).requires_grad_(False), "text_encoder": copy.deepcopy(text_encoder).requires_grad_(False)}
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    path = cfg.out / "unet.pt"
    start = _resume(path, resume, {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema["unet"],
                                   "ema_text_encoder": ema["text_encoder"]}, opt)
    vae.requires_grad_(False).eval()
    sf = vae.config.scaling_factor
    bar = tqdm(range(start, cfg.unet_steps), initial=start, total=cfg.unet_steps, desc="unet")
    for step in bar:
        x, prompts = make_batch(cfg.seed, "unet", step, cfg.batch_size, cfg.p_uncond)
        with torch.no_grad():
            latents = vae.encode(x).latent_dist.mean * sf
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.unet_steps, cfg.unet_lr, cosine=False)
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            text_embeds = text_encoder(tokenize(tokenizer, prompts))[0]
            loss, metrics = diffusion_loss(unet, text_embeds, latents, noise_scheduler, generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _ema_update(ema, unet, text_encoder, min(cfg.ema_decay, (1 + step) / (10 + step)))
        bar.set_postfix(metrics)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps:
            save_atomic({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                         "ema_unet": ema["unet"].state_dict(), "ema_text_encoder": ema["text_encoder"].state_dict(),
                         "optimizer": opt.state_dict(), "step": step + 1}, path)
    return ema["unet"], ema["text_encoder"]


@torch.no_grad()
def _ema_update(ema: dict, unet, text_encoder, decay: float) -> None:
    for target, source in ((ema["unet"], unet), (ema["text_encoder"], text_encoder)):
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), 1 - decay)


def export(folder: Path, vae, text_encoder, unet, tokenizer, tokenizer_files: Path | None = None) -> None:
    """Write a StableDiffusionPipeline folder (safetensors, no safety checker).

    `tokenizer_files`: the folder of build_tokenizer, whose vocab.json and merges.txt are copied
    next to tokenizer.json so that slow (pure-Python) CLIP tokenizers load the folder too.
    UNet and VAE are stored in float16 (half the size; diffusers loads them as float32 unless
    told otherwise); the text encoder stays float32, since transformers keeps a stored dtype.
    """
    import copy
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    vae, unet = (copy.deepcopy(m).half() for m in (vae, unet))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("vocab.json", "merges.txt") if tokenizer_files else ():
        shutil.copyfile(tokenizer_files / name, Path(folder) / "tokenizer" / name)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, tokenizer)")
    p.add_argument("--resume", action="store_true", help="go on from the checkpoints in --out")
    p.add_argument("--export-to", type=Path, default=WEIGHTS_DIR, help="diffusers folder to write at the end")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); 1 is faster on a shared machine")
    for name in ("seed", "vae_batch_size", "batch_size", "vae_steps", "unet_steps", "checkpoint_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=TrainConfig.__dataclass_fields__[name].default)
    for name in ("vae_lr", "unet_lr"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=TrainConfig.__dataclass_fields__[name].default)
    args = vars(p.parse_args(argv))
    resume, threads = args.pop("resume"), args.pop("threads")
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(**args)
    cfg.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(cfg.out / "tokenizer")
    vae, text_encoder, unet = make_models(tokenizer, cfg.seed)
    train_vae(cfg, vae, resume)
    ema_unet, ema_text_encoder = train_unet(cfg, vae, text_encoder, unet, tokenizer, resume)
    export(cfg.export_to, vae, ema_text_encoder, ema_unet, tokenizer, cfg.out / "tokenizer")
    print(f"exported to {cfg.export_to}")


if __name__ == "__main__":
    main()
