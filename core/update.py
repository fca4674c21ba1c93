"""One D3PO update from a sampled trajectory and a set of (winner, loser) pairs.

Memory-lean by construction: one timestep's graph at a time (backward per kept step,
gradients accumulated), the reference as the same UNet with the LoRA off under no_grad,
only LoRA parameters trainable. The caller owns the optimizer step (see ``apply_gradients``),
so that a non-finite loss or gradient can be refused before anything changes.
"""
from __future__ import annotations

import math
import time

import torch

from .logprob import ddim_step_with_logprob, step_coefficients, step_weight
from .lora import group_by_targets, lora_disabled
from .memory import offload_for_update
from .loss import d3po_loss
from .sampling import Trajectory, make_scheduler, predict_noise


def steps_to_train(trajectory: Trajectory, scheduler, eta: float, fraction: float,
                   generator: torch.Generator, window: float = 1.0) -> list[int]:
    """Indices of the kept steps to train: all with σ_t > 0 among the first ``window`` share of
    the trajectory (its noisiest steps), or a random ``fraction`` of those."""
    first = max(1, math.ceil(window * len(trajectory.timesteps)))
    usable = [k for k, t in enumerate(trajectory.timesteps.tolist()[:first])
              if step_coefficients(scheduler, t, eta)[2] > 0]
    if fraction >= 1.0 or not usable:
        return usable
    count = max(1, round(fraction * len(usable)))
    order = torch.randperm(len(usable), generator=generator)[:count].sort().values
    return [usable[i] for i in order.tolist()]


def step_logprobs(unet, scheduler, trajectory: Trajectory, k: int, images: list[int], *,
                  guidance: float, eta: float, reduction: str, device, pool: int | tuple[int, int] = 1,
                  seen: dict | None = None) -> torch.Tensor:
    """log π(x_{t-1} | x_t) at kept step k for the given images, with the UNet as it is now.
    ``seen``: a dict that also gets the (guided) prediction behind them, detached on the CPU, as
    ``seen[k]``."""
    x_t = trajectory.latents[k, images].to(device, torch.float32)
    x_prev = trajectory.latents[k + 1, images].to(device, torch.float32)
    cond = {key: v.to(device) for key, v in trajectory.cond.items()}
    t = int(trajectory.timesteps[k])
    eps = predict_noise(unet, x_t, t, cond, guidance)
    if seen is not None:
        seen[k] = eps.detach().cpu()
    _, logp = ddim_step_with_logprob(scheduler, eps, t, x_t, eta, prev_sample=x_prev, reduction=reduction, pool=pool)
    return logp


def accumulate_d3po_gradients(pipe, trajectory: Trajectory, pairs: list[tuple[int, int]], *,
                              steps: list[int], beta: float, guidance: float, eta: float,
                              reduction: str, ratio_clip: float | None, device,
                              weight: float = 1.0, progress=None, weighting: str = "none",
                              pool: int | tuple[int, int] = 1, part: str = "whole",
                              seen: dict | None = None) -> dict[str, float]:
    """Backward the D3PO loss of every kept step in ``steps``, one step's graph at a time.

    Gradients accumulate in the LoRA parameters, scaled by ``weight / len(steps)`` so that the
    total is ``weight`` × the loss averaged over steps and pairs. ``weighting`` scales each step's
    log-ratios (``core.logprob.step_weight``: "x0", "noise" or the official "none"), i.e. step k uses
    β·w_k. ``pool`` > 1 scores the r×r-pooled steps (``ddim_step_with_logprob``). ``part``: the
    whole gradient or the choice's part of it (``core.loss.preference_loss``). ``seen``: a dict
    whose ``"policy"`` and ``"base"`` dicts get the predictions for the pairs' images at the steps
    of its ``"steps"`` (``step_logprobs``), for the trust region to reuse. Returns averaged metrics.
    """
    unet = pipe.unet
    scheduler = make_scheduler(pipe, len(trajectory.timesteps))
    images, w, l = pair_slots(pairs, device)
    totals: dict[str, float] = {}
    kw = dict(guidance=guidance, eta=eta, reduction=reduction, device=device, pool=pool)
    for i, k in enumerate(steps):
        # 1. reference log-probs: same UNet, LoRA off, no graph
        with torch.no_grad(), lora_disabled(unet):
            ref = step_logprobs(unet, scheduler, trajectory, k, images, **kw, seen=seen_part(seen, "base", k))
        # 2. policy log-probs with the graph of this step only
        logp = step_logprobs(unet, scheduler, trajectory, k, images, **kw, seen=seen_part(seen, "policy", k))
        # 3. loss of this step, backward now (frees the graph before the next step)
        beta_k = beta * step_weight(scheduler, int(trajectory.timesteps[k]), eta, weighting)
        loss, metrics = d3po_loss(logp[w], logp[l], ref[w], ref[l], beta_k, ratio_clip, part)
        (loss * (weight / len(steps))).backward()
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value / len(steps)
        if progress:
            progress(i + 1, len(steps))
    return totals


def seen_part(seen: dict | None, name: str, k: int) -> dict | None:
    """Where step k's predictions of the pass ``name`` are to be left: ``seen[name]`` (made if
    missing), if ``seen`` asks for step k (its ``"steps"``); else None."""
    return seen.setdefault(name, {}) if seen is not None and k in seen.get("steps", ()) else None


def pair_slots(pairs: list[tuple[int, int]], device):
    """The images in some pair (sorted), and each pair's winner and loser as slots among them."""
    images = sorted({i for pair in pairs for i in pair})
    slot = {img: s for s, img in enumerate(images)}
    w = torch.tensor([slot[a] for a, _ in pairs], device=device)
    l = torch.tensor([slot[b] for _, b in pairs], device=device)
    return images, w, l


def gradient_norm(params) -> float:
    """The global norm of the LoRA's current gradients (float32)."""
    return float(torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params if p.grad is not None])))


def apply_gradients(params: list[torch.nn.Parameter], optimizer, grad_clip: float) -> float:
    """Clip, check and step. Returns the gradient norm; raises FloatingPointError if non-finite
    (the optimizer has then not stepped and the gradients are cleared)."""
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = gradient_norm(params)
    norm = float(norm)
    if not torch.isfinite(torch.tensor(norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite gradient norm ({norm})")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def train_step(pipe, traj: Trajectory, pairs, s, params, optimizer, *, device, update_index: int,
               progress=None, extra=(), evidence=None, anchors=()) -> tuple[dict[str, float], float]:
    """One whole update for one click: objective gradients, checks, optimizer step, trust region.

    1. the objective named by ``s.objective`` (core/objectives.py) accumulates its gradients;
    2. a non-finite loss or gradient raises FloatingPointError before anything has stepped;
    3. the optimizer steps; with ``s.step_rms`` the step is then rescaled so that the model's
       predictions along this batch's trajectory move by exactly that RMS, and with
       ``s.drift_budget`` cut where they would leave the budget around the base's
       (core/trust_region.py).
    ``extra``: more ``(trajectory, pairs)`` to train in the same step (the pairs a preference
    model labelled, core/proxy.py); every pair weighs the same. The metrics are the click's own
    (its ``accuracy`` stays the fresh-pair accuracy) and the trust region is measured on the
    click's images. With ``s.step_evidence`` the step is not the optimizer's: it goes along the
    sum of the session's unit click gradients (their agreed direction), sized ρ × the evidence
    that they agree (``core.trust_region.evidence_scale``; without a trust region, lr × the
    evidence RMS per LoRA weight); ``evidence`` (a
    ``core.trust_region.Evidence``) gains this click, in place, once the step has succeeded.
    ``anchors``: earlier clicks' ``core.trust_region.Anchor``s, on which ``s.drift_budget`` also holds.
    Returns ``(metrics, gradient norm)``.
    """
    from .objectives import get_objective
    from .trust_region import Evidence, TrustRegion, add_click, evidence_step, gate_evidence, probe_steps, unit_gradient
    generator = torch.Generator("cpu").manual_seed(s.seed * 1_000_003 + update_index)
    with offload_for_update(pipe, device):   # text encoders and VAE off the accelerator meanwhile
        objective = get_objective(s.objective)
        total = len(pairs) + sum(len(p) for _, p in extra)
        # the objective's predictions at the trust region's probes, for it to reuse
        passes: dict = {"steps": set(probe_steps(len(traj.timesteps), s.step_probes))}
        metrics = objective(pipe, traj, pairs, s, device=device, generator=generator, progress=progress,
                            weight=len(pairs) / total, seen=passes)
        for more, more_pairs in extra:
            more_metrics = objective(pipe, more, more_pairs, s, device=device, generator=generator,
                                     weight=len(more_pairs) / total)
            metrics["extra_loss"] = metrics.get("extra_loss", 0.0) + more_metrics["loss"] / len(extra)
    if not all(torch.isfinite(torch.tensor(v)) for v in metrics.values()):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"non-finite loss ({metrics['loss']})")
    measured = s.step_rms is not None or s.drift_budget is not None
    seen = None
    if s.step_evidence:       # the step goes along the clicks' agreed direction, sized by the evidence
        if len(named := s.resolved_parts) > 1:   # each part of a click's gradient a unit vector of its own
            params, parts = group_by_targets(pipe.unet, params, named)
        else:                 # the whole LoRA as one part
            parts = [sum(p.numel() for p in params)]
        seen = add_click(evidence if evidence is not None else Evidence(), unit_gradient(params, parts), parts)
        scale, agreed, weights, per_part = gate_evidence(seen, parts, s.evidence_z, s.evidence_gate)
        for i, (x, (power, sd)) in enumerate(per_part if len(parts) > 1 else ()):
            metrics[f"evidence_scale_{i}"] = x
            if seen.count:
                metrics[f"evidence_power_{i}"], metrics[f"evidence_null_sd_{i}"] = power / seen.count, sd / seen.count
        metrics["evidence_scale"] = scale
        if seen.count:      # the agreement and its null per click, for the study (bench/agreement.py)
            metrics["evidence_power"], metrics["evidence_null_sd"] = (v / seen.count for v in agreed)
        # a click without evidence takes no step, so it has nothing for the trust region to measure
        region = (TrustRegion.before_step(pipe, traj, pairs, s, params, device, anchors, passes)
                  if measured and scale > 0 else None)
        lr = (s.lr if s.step_rms is not None else s.lr * scale) if scale > 0 else 0.0
        grad_norm = evidence_step(params, optimizer, seen, lr, parts, weights)
        if region is not None:       # a target of None keeps the step's size (the anchor alone)
            target = s.step_rms * scale if s.step_rms is not None else None
            metrics.update(region.rescale(pipe, params, target))
        elif measured:
            metrics.update(step_rms_raw=0.0, step_scale=0.0)
    else:
        region = TrustRegion.before_step(pipe, traj, pairs, s, params, device, anchors, passes) if measured else None
        grad_norm = apply_gradients(params, optimizer, s.grad_clip)
        if region is not None:
            metrics.update(region.rescale(pipe, params, s.step_rms))
    if not all(torch.isfinite(p).all() for p in params):
        raise FloatingPointError("the optimizer step made the LoRA non-finite")
    if seen is not None and evidence is not None:
        evidence.assign(seen)
    return metrics, grad_norm


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
