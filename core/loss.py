"""The D3PO loss and the pairs a choice yields: pure functions of tensors and indices.

D3PO (Yang et al., CVPR 2024, arXiv 2311.13231, eq. 9), per kept denoising step k:

    Δ_w = log π_θ(x^w_{k-1} | x^w_k) − log π_ref(x^w_{k-1} | x^w_k)      (winner)
    Δ_l = log π_θ(x^l_{k-1} | x^l_k) − log π_ref(x^l_{k-1} | x^l_k)      (loser)
    L_k = −log σ(β · (Δ_w − Δ_l))

π_θ is the UNet with the LoRA on, π_ref the same UNet with the LoRA off.
Batch convention, used everywhere: a pair is ``(winner, loser)``, winner first.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import GRADIENT_PARTS


def preference_loss(logits: torch.Tensor, part: str = "whole") -> torch.Tensor:
    """Mean −log σ(logits) over pairs, the loss of every preference objective here.

    Its gradient splits exactly (docs/algorithm.md): −½∇z, whose sign the choice sets (swap
    winner and loser and z changes sign), plus ½·tanh(z/2)·∇z, the same whichever image was
    picked — the pull back toward the reference. ``part="choice"`` keeps the value and only the
    first part of the gradient (the gradient at z = 0); ``"whole"`` is the loss as written.
    """
    loss = -F.logsigmoid(logits).mean()
    if part == "whole":
        return loss
    if part != "choice":
        raise ValueError(f"part={part!r}: use one of {GRADIENT_PARTS}")
    choice = -0.5 * logits.mean()
    return loss.detach() + (choice - choice.detach())


def d3po_loss(
    logp_w: torch.Tensor,
    logp_l: torch.Tensor,
    ref_logp_w: torch.Tensor,
    ref_logp_l: torch.Tensor,
    beta: float,
    ratio_clip: float | None = None,
    part: str = "whole",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean D3PO loss over pairs, and its metrics.

    All inputs have shape [P] (one entry per pair). ``ratio_clip`` = c reproduces the official
    code's clamp of π_θ/π_ref to [1−c, 1+c] (which zeroes the gradient outside it); None is off.
    ``part``: which part of the gradient to keep (``preference_loss``).
    """
    delta_w = logp_w - ref_logp_w
    delta_l = logp_l - ref_logp_l
    if ratio_clip is not None:
        lo, hi = math.log(1 - ratio_clip), math.log(1 + ratio_clip)
        delta_w = delta_w.clamp(lo, hi)
        delta_l = delta_l.clamp(lo, hi)
    logits = beta * (delta_w - delta_l)
    loss = preference_loss(logits, part)
    metrics = {
        "loss": loss.item(),
        "accuracy": (logits > 0).float().mean().item(),
        "logratio_winner": delta_w.mean().item(),
        "logratio_loser": delta_l.mean().item(),
    }
    return loss, metrics


def pairs_from_best(n: int, best: int) -> list[tuple[int, int]]:
    """Best of N: the picked image beats each of the others (N−1 pairs)."""
    if n < 2:
        raise ValueError(f"a preference needs at least 2 images, got n={n}")
    if not 0 <= best < n:
        raise ValueError(f"best={best} is out of range: pick an image index from 0 to {n - 1}")
    return [(best, j) for j in range(n) if j != best]


def pairs_from_ranking(n: int, ranking: list[int]) -> list[tuple[int, int]]:
    """A full ranking, best first: every ordered pair (i above j) — N(N−1)/2 pairs."""
    if sorted(ranking) != list(range(n)):
        raise ValueError(f"ranking={ranking} must list each image index 0..{n - 1} exactly once, best first")
    return [(ranking[i], ranking[j]) for i in range(n) for j in range(i + 1, n)]
