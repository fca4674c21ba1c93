"""One stochastic DDIM step that both samples and scores: the only sampler math D3PO needs.

Adapted from ddpo-pytorch ``diffusers_patch/ddim_with_logprob.py`` (MIT), which follows
diffusers' ``DDIMScheduler.step``; the scheduler is passed in and never mutated.

Symbols (DDIM paper, eq. 12; diffusers names in brackets):
    ᾱ_t      alpha_prod_t          ᾱ_{t-1}  alpha_prod_t_prev (final_alpha_cumprod past t=0)
    ε̂        pred_epsilon          x̂_0      pred_original_sample
    σ_t = η · sqrt((1-ᾱ_{t-1})/(1-ᾱ_t) · (1-ᾱ_t/ᾱ_{t-1}))          [std_dev_t]
    μ_t = sqrt(ᾱ_{t-1}) · x̂_0 + sqrt(1-ᾱ_{t-1}-σ_t²) · ε̂
    x_{t-1} ~ N(μ_t, σ_t² I)
    log p(x_{t-1} | x_t) = Σ_i [ -(x_{t-1,i} - μ_{t,i})² / (2σ_t²) - log σ_t - log √(2π) ]

The sum runs over the C·H·W latent elements ("sum" reduction); the official D3PO code takes
the mean instead, which divides every log-ratio, and so the effective β, by C·H·W.
Gradients flow only through μ_t (x_{t-1} is treated as data).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

REDUCTIONS = ("sum", "mean")
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def step_coefficients(scheduler, timestep: int, eta: float) -> tuple[float, float, float]:
    """(ᾱ_t, ᾱ_{t-1}, σ_t) of the DDIM step from ``timestep`` (run ``set_timesteps`` first)."""
    if scheduler.num_inference_steps is None:
        raise ValueError("the scheduler has no timesteps: run scheduler.set_timesteps(steps) first")
    t = int(timestep)
    # 1. previous timestep t-1 on the inference grid
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    # 2. cumulative alphas
    alpha_prod_t = float(scheduler.alphas_cumprod[t])
    alpha_prod_t_prev = (float(scheduler.alphas_cumprod[prev_t]) if prev_t >= 0
                         else float(scheduler.final_alpha_cumprod))
    # 3. σ_t
    variance = (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    sigma_t = eta * math.sqrt(max(variance, 0.0))
    return alpha_prod_t, alpha_prod_t_prev, sigma_t


STEP_WEIGHTS = ("noise", "x0", "none")


def output_coefficient(scheduler, timestep: int, eta: float) -> float:
    """c_t: the coefficient of the model output in the DDIM mean μ_t (∂μ_t/∂output, per element).

    epsilon:      μ_t = √ᾱ_{t-1}·(x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t + √(1−ᾱ_{t-1}−σ_t²)·ε̂
                  ⇒ c_t = √(1−ᾱ_{t-1}−σ_t²) − √ᾱ_{t-1}·√(1−ᾱ_t)/√ᾱ_t
    v_prediction: x̂_0 = √ᾱ_t·x_t − √(1−ᾱ_t)·v, ε̂ = √ᾱ_t·v + √(1−ᾱ_t)·x_t
                  ⇒ c_t = −√ᾱ_{t-1}·√(1−ᾱ_t) + √(1−ᾱ_{t-1}−σ_t²)·√ᾱ_t
    sample:       c_t = √ᾱ_{t-1} − √(1−ᾱ_{t-1}−σ_t²)·√ᾱ_t/√(1−ᾱ_t)
    """
    a_t, a_prev, sigma_t = step_coefficients(scheduler, timestep, eta)
    direction = max(1 - a_prev - sigma_t ** 2, 0.0) ** 0.5
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return direction - a_prev ** 0.5 * (1 - a_t) ** 0.5 / a_t ** 0.5
    if kind == "v_prediction":
        return -(a_prev ** 0.5) * (1 - a_t) ** 0.5 + direction * a_t ** 0.5
    if kind == "sample":
        return a_prev ** 0.5 - direction * a_t ** 0.5 / (1 - a_t) ** 0.5
    raise ValueError(f"prediction_type {kind!r} is not supported: use epsilon, v_prediction or sample")


def step_weight(scheduler, timestep: int, eta: float, weighting: str = "noise") -> float:
    """The factor w_t that puts a step's log-ratio on the scale of the model's output space.

    With μ_θ − μ_ref = c_t·(f_θ − f_ref) (f: the model output) and x_{t-1} = μ + σ_t·z,

        log π_θ − log π_ref = (c_t/σ_t)·⟨z, f_θ − f_ref⟩ − (c_t²/2σ_t²)·‖f_θ − f_ref‖²,

    so the raw log-ratio scales with (c_t/σ_t)²: on a DDIM grid the last step (σ_t ≈ 0.03 against
    ≈ 0.3 elsewhere) dominates every other step by two orders of magnitude. ``"noise"`` multiplies
    it by w_t = σ_t²/c_t², which leaves (σ_t/c_t)·⟨z, δ⟩ − ½‖δ‖², δ = f_θ − f_ref: every step
    counts on the scale of the noise prediction, as in Diffusion-DPO (Wallace et al. 2023, eq. 14).
    ``"x0"`` weights each step by what its noise does to the final image instead:
    w_t = σ_t²/(|c_t|·√ᾱ_{t-1}), which leaves (σ_t/√ᾱ_{t-1})·⟨±z, δ⟩ + O(δ²). A coarse
    perturbation of x_{t-1} reaches x_0 about 1/√ᾱ_{t-1} times larger (the model reads it as
    image, not noise), so σ_t/√ᾱ_{t-1} is the share of the chooser's signal that step's noise
    can hold; weighting each step's term by it maximises the agreement of two clicks'
    gradients (docs/algorithm.md). ``"none"`` is the official D3PO (w_t = 1).
    """
    if weighting == "none":
        return 1.0
    if weighting not in STEP_WEIGHTS:
        raise ValueError(f"step_weight={weighting!r}: use one of {STEP_WEIGHTS}")
    _, alpha_prod_t_prev, sigma_t = step_coefficients(scheduler, timestep, eta)
    c_t = output_coefficient(scheduler, timestep, eta)
    if c_t == 0.0:
        return 0.0
    if weighting == "x0":
        return sigma_t ** 2 / (abs(c_t) * alpha_prod_t_prev ** 0.5)
    return sigma_t ** 2 / c_t ** 2


def step_mean(scheduler, model_output: torch.Tensor, timestep: int, sample: torch.Tensor,
              eta: float = 1.0) -> tuple[torch.Tensor, float]:
    """(μ_t, σ_t) of the DDIM step from ``sample`` = x_t: x_{t-1} ~ N(μ_t, σ_t² I), in float32."""
    alpha_prod_t, alpha_prod_t_prev, sigma_t = step_coefficients(scheduler, timestep, eta)
    x_t = sample.float()
    out = model_output.float()
    beta_prod_t = 1 - alpha_prod_t

    # 4. x̂_0 and ε̂ from the model output (DDIM eq. 12 "predicted x_0")
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        pred_x0 = (x_t - beta_prod_t ** 0.5 * out) / alpha_prod_t ** 0.5
        pred_eps = out
    elif kind == "v_prediction":
        pred_x0 = alpha_prod_t ** 0.5 * x_t - beta_prod_t ** 0.5 * out
        pred_eps = alpha_prod_t ** 0.5 * out + beta_prod_t ** 0.5 * x_t
    elif kind == "sample":
        pred_x0 = out
        pred_eps = (x_t - alpha_prod_t ** 0.5 * pred_x0) / beta_prod_t ** 0.5
    else:
        raise ValueError(f"prediction_type {kind!r} is not supported: use epsilon, v_prediction or sample")

    # 5-7. mean of x_{t-1}: "direction pointing to x_t" plus the rescaled x̂_0
    direction = max(1 - alpha_prod_t_prev - sigma_t ** 2, 0.0) ** 0.5 * pred_eps
    mean = alpha_prod_t_prev ** 0.5 * pred_x0 + direction
    return mean, sigma_t


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: int,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "sum",
    pool: int | tuple[int, int] = 1,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw x_{t-1} (or score the given ``prev_sample``) and return ``(x_{t-1}, log p)``.

    model_output: the (guided) UNet prediction for ``sample`` = x_t, shape [B, C, H, W].
    generator:    draws the step noise on the CPU (reproducible on any device).
    noise:        the step's standard normal draw, already made (x_{t-1} = μ_t + σ_t·noise).
    pool:         r > 1 scores the r×r average-pooled step instead: pooling is linear, so
                  pool(x_{t-1}) ~ N(pool(μ_t), (σ_t/r)² I) exactly — the density of a coarse view
                  of the step, which keeps its low frequencies and drops (r²−1)/r² of the noise.
                  A pair (kh, kw) pools kh×kw blocks, σ_t/√(kh·kw) (see ``grid_pool``).
    Returns log p per batch element, shape [B], in float32; ``None`` when σ_t = 0
    (eta = 0 or a deterministic last step), where no density exists.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: use one of {REDUCTIONS}")
    mean, sigma_t = step_mean(scheduler, model_output, timestep, sample, eta)
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        prev_sample = mean + sigma_t * noise.to(mean.device)
    prev_sample = prev_sample.detach().to(mean.device, torch.float32)
    if sigma_t == 0.0:
        return prev_sample, None
    kh, kw = (pool, pool) if isinstance(pool, int) else pool
    if kh * kw > 1:
        return prev_sample, gaussian_logprob(F.avg_pool2d(prev_sample, (kh, kw)), F.avg_pool2d(mean, (kh, kw)),
                                             sigma_t / math.sqrt(kh * kw), reduction)
    return prev_sample, gaussian_logprob(prev_sample, mean, sigma_t, reduction)


def grid_pool(height: int, width: int, grid: int) -> tuple[int, int]:
    """The block (kh, kw) that pools a ``height`` × ``width`` latent to ``grid`` × ``grid`` block
    means (``Settings.logprob_grid``); grid 1 = each channel's mean, on any latent size."""
    if grid < 1 or height % grid or width % grid:
        raise ValueError(f"logprob_grid={grid} does not divide the {height}×{width} latent: use 1, or a "
                         "grid that divides both sides")
    return height // grid, width // grid


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, sigma: float, reduction: str = "sum"):
    """log N(x; mean, σ² I) per batch element, summed (or averaged) over the other dims."""
    elementwise = -((x - mean) ** 2) / (2 * sigma ** 2) - math.log(sigma) - _LOG_SQRT_2PI
    dims = tuple(range(1, elementwise.ndim))
    return elementwise.sum(dims) if reduction == "sum" else elementwise.mean(dims)
