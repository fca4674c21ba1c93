"""Updates with a deep-copied reference UNet, for comparison with ours (benchmarks only).

``official_accumulate`` replays the training loop of the official D3PO code
(yk7333/D3PO ``scripts/train.py``, lines ~320-416) on a ``core`` trajectory: per timestep,
the policy UNet and the reference copy ``ref`` each run on image 0 then on image 1, each a
CFG batch of 2 (not under ``no_grad``: the copy's parameters have ``requires_grad=False``,
so no graph is recorded for it), both policy graphs stay alive until one backward of
``−log(sigmoid(β·log clamp(ratio_0) − β·log clamp(ratio_1)))``; log-probs are means over the
latent elements. One optimizer step per pair is left to the caller, as in ours.

``accumulate_with_reference_copy`` is ours (``core.update.accumulate_d3po_gradients``) with only
the reference swapped for a copy, to show what the LoRA-off reference saves.
"""
from __future__ import annotations

import torch

from ..core.loss import d3po_loss
from ..core.sampling import Trajectory, make_scheduler
from ..core.split import pair_slots
from ..core.update import step_logprobs

OFFICIAL = dict(beta=0.1, ratio_clip=0.1, reduction="mean", guidance=5.0, eta=1.0)


def official_accumulate(pipe, ref, trajectory: Trajectory, pair: tuple[int, int], *, steps: list[int],
                        beta: float, guidance: float, eta: float, ratio_clip: float, device,
                        progress=None) -> dict[str, float]:
    unet = pipe.unet
    scheduler = make_scheduler(pipe, len(trajectory.timesteps))
    kw = dict(guidance=guidance, eta=eta, reduction="mean", device=device)
    totals: dict[str, float] = {}
    for i, k in enumerate(steps):
        logp, ref_logp = [], []
        for image in pair:                       # winner then loser, as sample_0 / sample_1
            logp.append(step_logprobs(unet, scheduler, trajectory, k, [image], **kw))
            ref_logp.append(step_logprobs(ref, scheduler, trajectory, k, [image], **kw))
        loss, metrics = _official_loss(logp, ref_logp, beta, ratio_clip)
        loss.backward()
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value / len(steps)
        if progress:
            progress(i + 1, len(steps))
    return totals


def _official_loss(logp, ref_logp, beta: float, eps: float):
    """The official loss, written as it is there (``log(sigmoid(·))``, clamped ratios)."""
    ratio_w = torch.clamp(torch.exp(logp[0] - ref_logp[0]), 1 - eps, 1 + eps)
    ratio_l = torch.clamp(torch.exp(logp[1] - ref_logp[1]), 1 - eps, 1 + eps)
    logits = beta * torch.log(ratio_w) - beta * torch.log(ratio_l)
    loss = -torch.log(torch.sigmoid(logits)).mean()
    return loss, {"loss": loss.item(), "accuracy": (logits > 0).float().mean().item()}


def accumulate_with_reference_copy(pipe, ref, trajectory: Trajectory, pairs: list[tuple[int, int]], *,
                                   steps: list[int], beta: float, guidance: float, eta: float,
                                   reduction: str, ratio_clip: float | None, device,
                                   progress=None) -> dict[str, float]:
    unet = pipe.unet
    scheduler = make_scheduler(pipe, len(trajectory.timesteps))
    images, w, l = pair_slots(pairs, device)
    kw = dict(guidance=guidance, eta=eta, reduction=reduction, device=device)
    totals: dict[str, float] = {}
    for i, k in enumerate(steps):
        with torch.no_grad():
            ref_logp = step_logprobs(ref, scheduler, trajectory, k, images, **kw)
        logp = step_logprobs(unet, scheduler, trajectory, k, images, **kw)
        loss, metrics = d3po_loss(logp[w], logp[l], ref_logp[w], ref_logp[l], beta, ratio_clip)
        (loss / len(steps)).backward()
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value / len(steps)
        if progress:
            progress(i + 1, len(steps))
    return totals
