"""A preference model fitted to the clicks, ranking extra self-sampled images (``proxy_candidates``).

Why: a click's D3PO gradient is mostly the noise the sampler happened to draw, so the share f
of it that carries the preference is small, and after N clicks the LoRA's displacement has a
signal-to-noise ratio of about f·√N (docs/algorithm.md, "How much one click can teach"). Each
click is made worth more here by letting it teach a small model of the user's taste, which then
labels K extra images sampled for the same prompt: their best and worst by that model become one
more (winner, loser) pair in the click's update. The clicks stay the only ground truth, and the
extra pair is used only while the model has shown that it predicts the user:

    features   generic image statistics of the decoded images (a thumbnail, contrast, detail,
               saturation); nothing about any simulated chooser
    model      Bradley–Terry, P(a ≻ b) = σ(w·(φ(a) − φ(b))), ridge-regularised logistic regression
               on the standardised feature differences of every clicked pair (no bias: symmetric)
    gate       before each click's model is refitted, every earlier click in the last WINDOW was
               predicted by a model fitted only on the clicks before it ("prequential": no click
               predicts itself); the extra pair is used only when those predictions beat chance
               (1/n per click of n images) with a one-sided binomial p < ALPHA. Random clicks
               mostly leave the gate shut (the model predicts them at chance), and the option then
               does nothing and costs nothing; the window is tested again at every click, so it
               does open by chance now and then (docs/algorithm.md: do not combine with
               ``step_evidence``, which reads the extra pairs' agreement as the user's).

All functions here are pure (numpy in, numpy out); ``core.session`` gathers the clicks and samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

THUMB = 8           # the thumbnail is THUMB × THUMB RGB
L2 = 1.0            # ridge penalty on the standardised weights (not tuned: see docs/settings.md)
WINDOW = 20         # clicks whose prequential predictions decide the gate
MIN_HISTORY = 5     # clicks a model must have been fitted on before its predictions count
MIN_PREDICTED = 8   # predicted clicks needed before the gate can open
ALPHA = 0.05        # one-sided binomial p-value under which the gate opens


@dataclass(frozen=True)
class Click:
    """One clicked round: the features of its n images and its (winner, loser) pairs."""
    features: np.ndarray          # [n, D]
    pairs: tuple[tuple[int, int], ...]

    @property
    def winner(self) -> int:
        return self.pairs[0][0]


def image_features(images) -> np.ndarray:
    """[n, D] generic statistics of PIL images: an 8×8 RGB thumbnail (area-averaged), the
    per-channel standard deviation, the mean luminance gradient at full and half size, and the
    mean HSV saturation. All in [0, 1]-scaled units."""
    from PIL import Image
    rows = []
    for image in images:
        rgb = image.convert("RGB")
        a = np.asarray(rgb, dtype=np.float64) / 255.0
        thumb = np.asarray(rgb.resize((THUMB, THUMB), Image.BOX), dtype=np.float64).ravel() / 255.0
        lum = a @ np.array([0.299, 0.587, 0.114])
        half = lum[: lum.shape[0] // 2 * 2, : lum.shape[1] // 2 * 2]
        half = half.reshape(half.shape[0] // 2, 2, half.shape[1] // 2, 2).mean(axis=(1, 3))
        sat = np.asarray(rgb.convert("HSV"), dtype=np.float64)[..., 1].mean() / 255.0
        rows.append(np.concatenate([thumb, a.reshape(-1, 3).std(axis=0),
                                    [_gradient(lum), _gradient(half), sat]]))
    return np.stack(rows)


def _gradient(x: np.ndarray) -> float:
    return float(np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean())


def feature_scale(clicks: list[Click]) -> np.ndarray:
    """Per-feature standard deviation over every image of the clicks (1 where it is 0)."""
    allf = np.concatenate([c.features for c in clicks])
    sd = allf.std(axis=0)
    return np.where(sd > 1e-12, sd, 1.0)


def differences(clicks: list[Click], scale: np.ndarray) -> np.ndarray:
    """[P, D] standardised φ(winner) − φ(loser) of every pair of the clicks."""
    return np.array([(c.features[w] - c.features[l]) / scale for c in clicks for w, l in c.pairs])


def fit(diffs: np.ndarray, l2: float = L2, iterations: int = 50) -> np.ndarray:
    """The Bradley–Terry weights w minimising Σ log(1 + exp(−w·d)) + l2/2·|w|² (Newton's method;
    the objective is strictly convex, so the minimum is unique)."""
    dim = diffs.shape[1]
    w = np.zeros(dim)
    for _ in range(iterations):
        p = _sigmoid(diffs @ w)
        grad = -diffs.T @ (1.0 - p) + l2 * w
        hess = diffs.T @ (diffs * (p * (1.0 - p))[:, None]) + l2 * np.eye(dim)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return w


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def model(clicks: list[Click], l2: float = L2):
    """(weights, scale) fitted to the clicks: score an image by ``(φ / scale) @ weights``."""
    scale = feature_scale(clicks)
    return fit(differences(clicks, scale), l2), scale


def scores(features: np.ndarray, fitted) -> np.ndarray:
    weights, scale = fitted
    return (features / scale) @ weights


def prequential(clicks: list[Click], window: int | None = None, min_history: int | None = None) -> list[bool]:
    """For each of the last ``window`` clicks that has at least ``min_history`` clicks before it
    (defaults WINDOW, MIN_HISTORY): did a model fitted only on the clicks before it score that
    click's winner highest?"""
    window = WINDOW if window is None else window
    min_history = MIN_HISTORY if min_history is None else min_history
    hits = []
    for i in range(max(min_history, len(clicks) - window), len(clicks)):
        predicted = scores(clicks[i].features, model(clicks[:i]))
        hits.append(int(np.argmax(predicted)) == clicks[i].winner)
    return hits


def binomial_p(hits: int, total: int, chance: float) -> float:
    """One-sided p-value of ``hits`` or more successes in ``total`` trials at rate ``chance``."""
    return float(sum(math.comb(total, k) * chance ** k * (1 - chance) ** (total - k)
                     for k in range(hits, total + 1)))


def gate(clicks: list[Click], alpha: float | None = None) -> dict:
    """Whether the clicks' model predicts the user (p < ``alpha``, default ALPHA):
    ``{"open", "hits", "predicted", "p"}``."""
    alpha = ALPHA if alpha is None else alpha
    hits = prequential(clicks)
    if len(hits) < MIN_PREDICTED:
        return {"open": False, "hits": sum(hits), "predicted": len(hits), "p": 1.0}
    chance = float(np.mean([1.0 / len(clicks[-len(hits) + i].features) for i in range(len(hits))]))
    p = binomial_p(sum(hits), len(hits), chance)
    return {"open": p < alpha, "hits": sum(hits), "predicted": len(hits), "p": p}


def extreme_pair(candidate_scores: np.ndarray) -> tuple[int, int]:
    """(best, worst) of the candidates by the model's scores."""
    return int(np.argmax(candidate_scores)), int(np.argmin(candidate_scores))


__all__ = ["Click", "image_features", "model", "scores", "prequential", "gate", "binomial_p", "fit",
           "extreme_pair"]
