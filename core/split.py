"""The D3PO update with one image's graph at a time: about half the activation memory of the
joint update, for one extra forward pass without a graph per kept step.

Why it is exact. Per kept step the loss depends on the policy only through the log-probs
ℓ_j = log π_θ(x^j_{k-1} | x^j_k) of the images in some pair, so by the chain rule

    ∇_θ L = Σ_j (∂L/∂ℓ_j) · ∇_θ ℓ_j.

For one pair (w, l), L = −log σ(β(Δ_w − Δ_l)) gives the scalars
∂L/∂ℓ_w = −c and ∂L/∂ℓ_l = +c with c = β·σ(−β(Δ_w − Δ_l)). They need only the *values* of the
log-probs, so (1) a forward without a graph gives every ℓ_j and the reference, (2) autograd on
the loss as a function of those values gives every coefficient ∂L/∂ℓ_j (this also covers
best-of-N pairs, the mean over pairs and the official ratio clamp, which zeroes coefficients),
and (3) each image is forwarded again with its graph and ``(∂L/∂ℓ_j · ℓ_j).backward()`` adds
its share, before the next image's graph exists.

Same signature and return value as ``core.update.accumulate_d3po_gradients``.
"""
from __future__ import annotations

import torch

from .logprob import step_weight
from .lora import lora_disabled
from .loss import d3po_loss
from .sampling import Trajectory, make_scheduler
from .errors import ConfigError
from .update import accumulate_d3po_gradients, pair_slots, seen_part, step_logprobs


def accumulate_d3po_gradients_split(pipe, trajectory: Trajectory, pairs: list[tuple[int, int]], *,
                                    steps: list[int], beta: float, guidance: float, eta: float,
                                    reduction: str, ratio_clip: float | None, device,
                                    weight: float = 1.0, progress=None,
                                    weighting: str = "none", pool: int | tuple[int, int] = 1,
                                    part: str = "whole", seen: dict | None = None) -> dict[str, float]:
    """Backward the D3PO loss of every kept step in ``steps``, one image's graph at a time.

    Gradients accumulate in the LoRA parameters, scaled by ``weight / len(steps)`` (as in the
    joint version). Returns the metrics averaged over steps.
    """
    unet = pipe.unet
    scheduler = make_scheduler(pipe, len(trajectory.timesteps))
    images, w, l = pair_slots(pairs, device)
    totals: dict[str, float] = {}
    kw = dict(guidance=guidance, eta=eta, reduction=reduction, device=device, pool=pool)
    for i, k in enumerate(steps):
        # 1. reference and policy log-probs of all images, no graph
        with torch.no_grad():
            with lora_disabled(unet):
                ref = step_logprobs(unet, scheduler, trajectory, k, images, **kw, seen=seen_part(seen, "base", k))
            values = step_logprobs(unet, scheduler, trajectory, k, images, **kw, seen=seen_part(seen, "policy", k))
        # 2. coefficients ∂L/∂ℓ_j from the loss as a function of the log-prob values
        beta_k = beta * step_weight(scheduler, int(trajectory.timesteps[k]), eta, weighting)
        coefficients, metrics = loss_coefficients(values, ref, w, l, beta_k, ratio_clip, weight / len(steps), part)
        # 3. one image at a time: forward with a graph, backward of coefficient × log-prob
        for s, img in enumerate(images):
            if coefficients[s] != 0:
                logp = step_logprobs(unet, scheduler, trajectory, k, [img], **kw)
                (coefficients[s] * logp.sum()).backward()
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value / len(steps)
        if progress:
            progress(i + 1, len(steps))
    return totals


def loss_coefficients(values: torch.Tensor, ref: torch.Tensor, w: torch.Tensor, l: torch.Tensor,
                      beta: float, ratio_clip: float | None, scale: float, part: str = "whole"):
    """∂(scale · L)/∂ℓ_j for each image slot j, and the loss metrics, from log-prob values."""
    logp = values.detach().float().clone().requires_grad_(True)
    loss, metrics = d3po_loss(logp[w], logp[l], ref[w].float(), ref[l].float(), beta, ratio_clip, part)
    (grad,) = torch.autograd.grad(loss * scale, logp)
    return grad.tolist(), metrics


# Registry of the ways to backpropagate an update (Settings.backward).
BACKWARDS = {"joint": accumulate_d3po_gradients, "split": accumulate_d3po_gradients_split}


def gradient_function(name: str):
    """The gradient accumulator named by Settings.backward."""
    try:
        return BACKWARDS[name]
    except KeyError:
        raise ConfigError(f"backward={name!r} is unknown: use one of {sorted(BACKWARDS)}") from None
