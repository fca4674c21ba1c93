"""Diffusion-DPO: the preference loss on final images, for pairs from any sampler.

Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024
(arXiv 2311.12908), eq. 14, in the form of diffusers'
``examples/research_projects/diffusion_dpo`` (which folds the paper's ½ into β). For a pair of
final latents (x₀ʷ, x₀ˡ), one timestep t and one noise ε shared by both:

    x_t^j = √ᾱ_t·x₀ʲ + √(1−ᾱ_t)·ε,        e^j = mean over C·H·W of (f(x_t^j, t) − target^j)²
    L = −log σ(−β·[(eʷ_θ − eˡ_θ) − (eʷ_ref − eˡ_ref)])

target is ε for epsilon models and v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀ for v-prediction models; ref is
the same UNet with the LoRA off; the conditional prediction (no guidance) is trained, as in the
paper. Pairs are ``(winner, loser)``, winner first, as everywhere.
"""
from __future__ import annotations

import torch

from .loss import preference_loss
from .lora import lora_disabled
from .sampling import Trajectory, make_scheduler, predict_noise
from .update import pair_slots


def diffusion_dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor,
                       ref_err_l: torch.Tensor, beta: float,
                       part: str = "whole") -> tuple[torch.Tensor, dict[str, float]]:
    """Mean Diffusion-DPO loss over pairs (inputs [P]: per-pair denoising errors) and metrics.
    ``part``: which part of the gradient to keep (``core.loss.preference_loss``)."""
    model_diff = err_w - err_l
    ref_diff = ref_err_w - ref_err_l
    logits = -beta * (model_diff - ref_diff)
    loss = preference_loss(logits, part)
    metrics = {"loss": loss.item(), "accuracy": (logits > 0).float().mean().item(),
               "error_winner": err_w.mean().item(), "error_loser": err_l.mean().item()}
    return loss, metrics


def noised(x0: torch.Tensor, noise: torch.Tensor, alpha_prod: float, prediction_type: str):
    """(x_t, regression target) for clean latents ``x0`` and a noise shared by the batch."""
    a = torch.tensor(alpha_prod, dtype=torch.float32)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if prediction_type == "epsilon":
        return x_t, noise.expand_as(x0)
    if prediction_type == "v_prediction":
        return x_t, a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"prediction_type {prediction_type!r}: Diffusion-DPO supports epsilon and v_prediction")


def accumulate_diffusion_dpo_gradients(pipe, trajectory: Trajectory, pairs: list[tuple[int, int]], *,
                                       timesteps: int, beta: float, device, generator: torch.Generator,
                                       progress=None, weight: float = 1.0, part: str = "whole") -> dict[str, float]:
    """Backward ``weight`` × the loss averaged over ``timesteps`` random timesteps, one timestep's
    graph at a time. Returns the metrics averaged over the timesteps."""
    unet = pipe.unet
    scheduler = make_scheduler(pipe, len(trajectory.timesteps))
    images, w, l = pair_slots(pairs, device)
    x0 = trajectory.latents[-1, images].float()
    cond = {key: v.to(device) for key, v in trajectory.cond.items()}
    kind = scheduler.config.prediction_type
    totals: dict[str, float] = {}
    for i in range(timesteps):
        t = int(torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator))
        noise = torch.randn((1, *x0.shape[1:]), generator=generator)
        x_t, target = noised(x0, noise, float(scheduler.alphas_cumprod[t]), kind)
        x_t, target = x_t.to(device), target.to(device)
        with torch.no_grad(), lora_disabled(unet):
            ref_err = _errors(predict_noise(unet, x_t, t, cond, 1.0), target)
        err = _errors(predict_noise(unet, x_t, t, cond, 1.0), target)
        loss, metrics = diffusion_dpo_loss(err[w], err[l], ref_err[w], ref_err[l], beta, part)
        (loss * (weight / timesteps)).backward()
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value / timesteps
        if progress:
            progress(i + 1, timesteps)
    return totals


def _errors(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, prediction.ndim)))
