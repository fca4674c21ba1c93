"""Sampling n images that share a prompt and an initial noise x_T, keeping the trajectory.

D3PO compares images of the same prompt and the same x_T, which diverge only through the
fresh noise each stochastic DDIM step injects. Every step (x_t, x_{t-1}, t) is kept, with the
prompt conditioning, on the CPU in half precision: enough to recompute any log-prob later.
Works for SD 1.x/2.x (one text encoder) and SDXL (two, plus pooled embeds and time ids).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from .logprob import ddim_step_with_logprob

STORE_DTYPE = torch.float16  # kept steps live on the CPU in half precision


@dataclass
class Trajectory:
    """What one sampled batch keeps. Index i of dim 1 of ``latents`` is image i."""
    latents: torch.Tensor            # [T+1, n, C, h, w]: x_T, x_{T-1}, ..., x_0 (CPU, fp16)
    timesteps: torch.Tensor          # [T] int64: t of the step from latents[k] to latents[k+1]
    log_probs: torch.Tensor          # [T, n] float32 at sampling time (NaN where σ_t = 0)
    cond: dict[str, torch.Tensor]    # conditioning, batch 1 each (see encode_conditioning)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        out = {"latents": self.latents, "timesteps": self.timesteps, "log_probs": self.log_probs}
        out.update({f"cond.{k}": v for k, v in self.cond.items()})
        return {k: v.contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Trajectory":
        cond = {k[len("cond."):]: v for k, v in t.items() if k.startswith("cond.")}
        return cls(t["latents"], t["timesteps"], t["log_probs"], cond)

    @property
    def n(self) -> int:
        return self.latents.shape[1]


def make_scheduler(pipe, steps: int) -> DDIMScheduler:
    """A DDIM scheduler with the model's noise schedule, set to ``steps`` steps."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


@torch.no_grad()
def encode_conditioning(pipe, prompt: str, negative_prompt: str, height: int, width: int,
                        device) -> dict[str, torch.Tensor]:
    """Prompt embeddings (and for SDXL pooled embeds and time ids), batch 1, on ``device``."""
    if is_sdxl(pipe):
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=negative_prompt)
        proj_dim = pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=pe.dtype,
                                          text_encoder_projection_dim=proj_dim).to(device)
        return {"prompt_embeds": pe, "negative_prompt_embeds": npe, "pooled": pooled,
                "negative_pooled": npooled, "time_ids": time_ids}
    pe, npe = pipe.encode_prompt(prompt, device, 1, True, negative_prompt=negative_prompt)
    return {"prompt_embeds": pe, "negative_prompt_embeds": npe}


def predict_noise(unet, x_t: torch.Tensor, t, cond: dict[str, torch.Tensor], guidance: float) -> torch.Tensor:
    """The (guided) UNet prediction for a batch x_t; float32 out. ``t``: one timestep for the batch,
    or a 1-D tensor of one per image. Each tensor of ``cond`` has batch 1 (one conditioning shared
    by the batch) or one row per image.

    With guidance > 1 the batch is [unconditional; conditional] and
    ε̂ = ε_u + w · (ε_c − ε_u) (classifier-free guidance).
    """
    n = x_t.shape[0]
    dtype = unet.dtype
    use_cfg = guidance > 1.0
    keys = (["negative_prompt_embeds", "prompt_embeds"] if use_cfg else ["prompt_embeds"])
    emb = torch.cat([cond[k].expand(n, -1, -1) for k in keys]).to(x_t.device, dtype)
    x_in = torch.cat([x_t] * len(keys)).to(dtype)
    kwargs = {}
    if "time_ids" in cond:
        pooled_keys = ["negative_pooled", "pooled"] if use_cfg else ["pooled"]
        pooled = torch.cat([cond[k].expand(n, -1) for k in pooled_keys]).to(x_t.device, dtype)
        time_ids = torch.cat([cond["time_ids"].expand(n, -1)] * len(keys)).to(x_t.device, dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    if isinstance(t, torch.Tensor) and t.ndim == 1:
        t_in = torch.cat([t.to(x_t.device)] * len(keys))
    else:
        t_in = torch.as_tensor(int(t), device=x_t.device)
    out = unet(x_in, t_in, encoder_hidden_states=emb, return_dict=False, **kwargs)[0].float()
    if not use_cfg:
        return out
    uncond, text = out.chunk(2)
    return uncond + guidance * (text - uncond)


@torch.no_grad()
def sample_trajectory(pipe, prompt: str, negative_prompt: str, n: int, seed: int, *, steps: int,
                      guidance: float, eta: float, height: int, width: int, reduction: str = "sum",
                      device=None, progress=None) -> Trajectory:
    """Sample n latents from one prompt and one shared x_T; return the whole trajectory.

    Reproducible from ``seed`` on any device: all noise is drawn on the CPU.
    ``progress(i, total)`` is called after each step, if given.
    """
    device = device or pipe.unet.device
    scheduler = make_scheduler(pipe, steps)
    cond = encode_conditioning(pipe, prompt, negative_prompt, height, width, device)
    scale = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // scale, width // scale)
    x_T, noise = drawn_noise(seed, n, shape[1:], len(scheduler.timesteps))
    x = (x_T * scheduler.init_noise_sigma).expand(n, -1, -1, -1).to(device)   # one x_T shared by all n images
    latents, log_probs = [x.to("cpu", STORE_DTYPE)], []
    for i, t in enumerate(scheduler.timesteps):
        eps = predict_noise(pipe.unet, x, t, cond, guidance)
        x, logp = ddim_step_with_logprob(scheduler, eps, t, x, eta, noise=noise[i], reduction=reduction)
        latents.append(x.to("cpu", STORE_DTYPE))
        log_probs.append(logp.cpu() if logp is not None else torch.full((n,), float("nan")))
        if progress:
            progress(i + 1, len(scheduler.timesteps))
    return Trajectory(
        latents=torch.stack(latents),
        timesteps=scheduler.timesteps.clone().long(),
        log_probs=torch.stack(log_probs).float(),
        cond={k: v.to("cpu", STORE_DTYPE) for k, v in cond.items()},
    )


def drawn_noise(seed: int, n: int, latent_shape: tuple[int, int, int], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard normal draws ``sample_trajectory(..., n, seed, steps=steps)`` samples with: x_T
    before ``init_noise_sigma`` [1, C, h, w] and each step's noise [steps, n, C, h, w]
    (x_{t-1} = μ_t + σ_t·noise), all from one CPU generator. So a kept round's noise is known from its
    seed without the model (tests/test_noise_agreement.py checks it against a sampled trajectory)."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    x_T = torch.randn((1, *latent_shape), generator=generator)
    noise = [torch.randn((n, *latent_shape), generator=generator, dtype=torch.float32) for _ in range(steps)]
    return x_T, torch.stack(noise)


@torch.no_grad()
def decode(pipe, latents: torch.Tensor):
    """Latents x_0 [n, C, h, w] → list of PIL images (the VAE runs in float32)."""
    vae = pipe.vae
    x = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:
        x = x + shift
    images = vae.decode(x, return_dict=False)[0]
    return pipe.image_processor.postprocess(images.float(), output_type="pil")
