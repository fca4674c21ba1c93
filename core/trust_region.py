"""A trust region in function space: each click moves the model's predictions by a set amount.

A learning rate means something different on every model (and Adam moves every LoRA weight by
≈ lr per click whatever the evidence). Instead, after the optimizer has proposed a step
Δθ = θ₁ − θ₀, the step is rescaled to θ₀ + s·Δθ with

    s = ρ / RMS(f_θ₁ − f_θ₀),

the RMS taken over the model's (guided) outputs f on the images of this click at a few of its
own trajectory steps ("probes": ``Settings.step_probes`` steps, at each ``Settings.probe_images``
of the images in turn, or all of them; ``probe_plan``). ρ (``Settings.step_rms``) is in units of the noise prediction,
which has unit variance on every model, so one setting carries over from the embedded model to
SD 1.5 and SDXL. A LoRA's change is bilinear in its factors, so the change is measured at one
more scale (the first guess, or where it clears the weights' rounding floor in fp16 and bf16)
and s solves the quadratic through both (``TrustRegion.rescale``); the update itself is unchanged.
The predictions before the step (and the base's) are the ones the objective's own passes made at
those steps (D3PO, guided as it samples: the default), so a click that steps adds one to three
measurements of its probes without a graph, after the step, each in forwards of up to
``PROBE_BATCH`` images whatever their steps (``probe_predictions``); a click without evidence adds none.

An anchor to the base (``Settings.drift_budget``): the same probes are also taken with the LoRA off,
and the step is cut so that the predictions end no further than the budget B from the base's,
RMS(f − f_ref) ≤ max(B, where they were): the step is projected onto a ball in function space
around the base model (``anchored_scale``). Steps sideways or back toward the base stay allowed.
With ``Settings.anchor_clicks`` = K the same ball also holds, each on its own, for the winners of
the last K trained clicks (their prompts and trajectories): the step is cut at the first of them
to reach the edge, so the budget bounds the drift on every recent prompt, not only on this one.
Their base predictions never change, so each is measured once (``Anchor``), at
``Settings.anchor_probes`` of its steps; their probes run in batches, before the step and after
it (not at all after it once the step is already cut to nothing). With ``Settings.anchor_stride``
= G a click checks every G-th of them, newest first, so each in turn on every G-th click.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .lora import lora_disabled
from .sampling import Trajectory, predict_noise
from .update import gradient_norm, pair_slots

PROBES = 3   # trajectory steps at which the change of the predictions is measured


def probe_steps(num_steps: int, count: int = PROBES) -> list[int]:
    """``count`` step indices spread evenly over a trajectory of ``num_steps`` steps, ends included
    (one: the middle step)."""
    if num_steps <= count:
        return list(range(num_steps))
    if count == 1:
        return [round((num_steps - 1) / 2)]
    return sorted({round(i * (num_steps - 1) / (count - 1)) for i in range(count)})


def rms_change(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """Root mean square of the element-wise change between two lists of same-shaped tensors."""
    total = sum(float(((a.float() - b.float()) ** 2).sum()) for a, b in zip(after, before))
    count = sum(b.numel() for b in before)
    return (total / count) ** 0.5


def probe_plan(steps: list[int], images: list[int], per_step: int = 0) -> list[tuple[int, list[int]]]:
    """Which images are measured at which step: every image at every step (``per_step`` 0, or at
    least as many as there are images), else ``per_step`` of them at each step, taken in turn
    (``Settings.probe_images``), so that over the steps each image is measured about equally often."""
    if per_step <= 0 or per_step >= len(images):
        return [(k, list(images)) for k in steps]
    return [(k, sorted(images[(j * per_step + i) % len(images)] for i in range(per_step)))
            for j, k in enumerate(steps)]


PROBE_BATCH = 4     # images per forward when probes are batched (bounds the forward's memory)


@torch.no_grad()
def probe_predictions(pipe, probes: list[tuple[Trajectory, int, list[int]]], guidance: float, device,
                      batch: int = PROBE_BATCH) -> list[torch.Tensor]:
    """The model's guided outputs, as it is now, at each probe (trajectory, step k, images), in
    forwards of up to ``batch`` images of one latent size, each image with its own timestep and
    prompt (a probe of more images than ``batch`` is a forward of its own). Fewer, fuller forwards:
    on the embedded model three one-image probes at three steps take 0.12 s as one forward against
    0.17 s as three, on this CPU, with the same numbers."""
    out: list[torch.Tensor | None] = [None] * len(probes)
    by_size: dict[tuple, list[int]] = {}
    for i, (trajectory, _, _) in enumerate(probes):
        by_size.setdefault(tuple(trajectory.latents.shape[2:]), []).append(i)
    for indices in by_size.values():
        chunks, count = [[]], 0
        for i in indices:
            n = len(probes[i][2])
            if chunks[-1] and count + n > batch:
                chunks.append([])
                count = 0
            chunks[-1].append(i)
            count += n
        for chunk in chunks:
            xs, ts, conds = [], [], []
            for i in chunk:
                trajectory, k, images = probes[i]
                xs.append(trajectory.latents[k, images])
                ts.append(trajectory.timesteps[k].reshape(1).expand(len(images)))
                conds.append({key: v.expand(len(images), *v.shape[1:]) for key, v in trajectory.cond.items()})
            cond = {key: torch.cat([c[key] for c in conds]).to(device) for key in conds[0]}
            eps = predict_noise(pipe.unet, torch.cat(xs).to(device, torch.float32), torch.cat(ts), cond, guidance).cpu()
            for i, part in zip(chunk, eps.split([len(probes[i][2]) for i in chunk])):
                out[i] = part
    return out


def plan_predictions(pipe, trajectory: Trajectory, plan: list[tuple[int, list[int]]], guidance: float,
                     device) -> list[torch.Tensor]:
    """The model's guided outputs, as it is now, for each (step, images) of ``plan``."""
    return probe_predictions(pipe, [(trajectory, k, images) for k, images in plan], guidance, device)


def predictions(pipe, trajectory: Trajectory, steps: list[int], images: list[int], guidance: float,
                device) -> list[torch.Tensor]:
    """The model's guided outputs for ``images`` at the given trajectory steps, as it is now."""
    return plan_predictions(pipe, trajectory, [(k, images) for k in steps], guidance, device)


PROBE_MARGIN = 5.0   # the change at the trust region's probe scale is at least this many rounding floors


def rounding_floor(dtype: torch.dtype, device, guidance: float) -> float:
    """About how much any LoRA move changes the guided prediction by rounding alone, RMS: the
    weights' machine epsilon times the guidance (bench/precision.py measured 0.0043–0.0053 in fp16
    and 0.034–0.037 in bf16 at guidance 6 on the embedded model, 0.0061 on an H100 in fp16). float32
    convolutions on CUDA run in TF32 (10 mantissa bits, as fp16) while cuDNN allows it."""
    eps = torch.finfo(dtype).eps
    if dtype == torch.float32 and torch.device(device).type == "cuda" and torch.backends.cudnn.allow_tf32:
        eps = torch.finfo(torch.float16).eps
    return eps * max(1.0, guidance)


def quadratic_terms(first: tuple[float, torch.Tensor], second: tuple[float, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) such that s·u + s²·v passes through two measured (scale, change) points, at two
    different nonzero scales: a LoRA step's change of the predictions to second order in its scale."""
    (m1, d1), (m2, d2) = first, second
    v = (d2 / m2 - d1 / m1) / (m2 - m1)
    return d1 / m1 - m1 * v, v


def quadratic_scale(u: torch.Tensor, v: torch.Tensor, target: float, hint: float) -> float:
    """The smallest s > 0 with RMS(s·u + s²·v) = target (bisection; ``hint``: a scale of about the
    right size to bracket from). If the model turns back before it reaches the target (v against
    u), the linear scale target / RMS(u): beyond its turn the quadratic is no longer a step's change."""
    a, c, r = (float(x) for x in (u.pow(2).mean(), (u * v).mean(), v.pow(2).mean()))
    if target <= 0 or a <= 0:
        return 0.0

    def rms(s: float) -> float:
        return max(s * s * a + 2 * s ** 3 * c + s ** 4 * r, 0.0) ** 0.5

    # the first rising branch ends where d/ds of the mean square, 2s(a + 3cs + 2rs²), first turns 0
    turn = 9 * c * c - 8 * a * r
    if c >= 0 or turn < 0:
        peak = math.inf
    else:
        peak = (-3 * c - turn ** 0.5) / (4 * r) if r > 0 else -a / (3 * c)
    if peak < math.inf and rms(peak) < target:   # past its turn the quadratic is extrapolation
        return target / a ** 0.5
    lo, hi = 0.0, min(max(hint, target / a ** 0.5), peak)
    while rms(hi) < target:              # grow the bracket until it holds the target
        lo, hi = hi, min(hi * 2, peak)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rms(mid) < target else (lo, mid)
    return (lo + hi) / 2


def anchored_scale(drift: torch.Tensor, change: torch.Tensor, scale: float, budget: float) -> float:
    """The largest s' in [0, scale] with RMS(drift + s'·change) ≤ max(budget, RMS(drift)).

    ``drift``: the predictions now minus the base's (LoRA off); ``change``: what the proposed step
    does to them per unit of scale (linearised). Solves the quadratic R s² + 2C s + A ≤ bound² with
    A = mean(drift²), C = mean(drift·change), R = mean(change²): a step that would leave the ball is
    cut at its edge; one that starts outside may only go back in (or sideways) as far as it started.
    """
    a, c, r = (float(v) for v in (drift.pow(2).mean(), (drift * change).mean(), change.pow(2).mean()))
    bound = max(budget * budget, a)
    if r == 0 or a + 2 * c * scale + r * scale * scale <= bound:
        return scale
    root = (-c + math.sqrt(max(c * c - r * (a - bound), 0.0))) / r
    return min(scale, max(0.0, root))


def flat_difference(after: list[torch.Tensor], before: list[torch.Tensor]) -> torch.Tensor:
    """after − before, element-wise, over two lists of same-shaped tensors, as one flat vector."""
    return torch.cat([(a - b).reshape(-1) for a, b in zip(after, before)])


@dataclass(frozen=True)
class Anchor:
    """An earlier click's winner on which the drift budget also holds: its trajectory, the images
    probed, the probe steps, and the base's (LoRA off) predictions there. The base never changes,
    so a session measures each anchor once and hands it back on every later click."""
    trajectory: Trajectory
    images: list[int]
    steps: list[int]
    base: list[torch.Tensor]

    @classmethod
    def measure(cls, pipe, trajectory: Trajectory, images: list[int], guidance: float, device,
                probes: int = PROBES) -> "Anchor":
        """``probes``: how many of its trajectory's steps are probed (``probe_steps``)."""
        steps = probe_steps(len(trajectory.timesteps), probes)
        with lora_disabled(pipe.unet):
            base = predictions(pipe, trajectory, steps, images, guidance, device)
        return cls(trajectory, list(images), steps, base)


def anchor_predictions(pipe, anchors: list[Anchor], guidance: float, device,
                       batch: int = PROBE_BATCH) -> list[list[torch.Tensor]]:
    """The model's guided outputs at every anchor's probes, as it is now (per anchor, per probe:
    what ``predictions`` gives), computed in forwards of up to ``batch`` images (``probe_predictions``)."""
    flat = probe_predictions(pipe, [(a.trajectory, k, a.images) for a in anchors for k in a.steps], guidance,
                             device, batch)
    out, start = [], 0
    for anchor in anchors:
        out.append(flat[start:start + len(anchor.steps)])
        start += len(anchor.steps)
    return out


def _reuse(seen: dict | None, plan: list[tuple[int, list[int]]], images: list[int]) -> list[torch.Tensor] | None:
    """The predictions ``seen`` holds (for ``images``, in order) at every (step, images) of ``plan``;
    None if a step is missing."""
    if not seen or any(k not in seen for k, _ in plan):
        return None
    return [seen[k] if chosen == images else seen[k][[images.index(i) for i in chosen]] for k, chosen in plan]


def move_weights(params, start: list[torch.Tensor], delta: list[torch.Tensor], scale: float) -> None:
    """Set the weights to start + scale·delta, in place."""
    for p, p0, d in zip(params, start, delta):
        p.copy_(p0 + scale * d)


@dataclass
class TrustRegion:
    """What is needed to rescale one optimizer step: the weights and predictions before it (and
    the base's, LoRA off, when the step is anchored, also on earlier clicks' winners)."""
    weights: list[torch.Tensor]
    outputs: list[torch.Tensor]
    trajectory: Trajectory
    plan: list[tuple[int, list[int]]]    # (trajectory step, the click's images measured there)
    guidance: float
    device: torch.device
    base: list[torch.Tensor] | None = None
    budget: float | None = None
    anchors: tuple[Anchor, ...] = ()
    earlier: list[list[torch.Tensor]] | None = None     # the anchors' predictions before the step
    both_sides: bool = False     # Settings.probe_both_sides

    @classmethod
    def before_step(cls, pipe, trajectory: Trajectory, pairs, s, params, device, anchors=(),
                    seen: dict | None = None) -> "TrustRegion":
        """``anchors``: earlier clicks' ``Anchor``s, newest first, whose drift the budget also
        bounds, every ``s.anchor_stride``-th of them on this click. ``seen``: the predictions the
        objective's passes already made with the weights as they are (see core/objectives.py), used
        instead of running them again when they cover every probe step. The click's images are
        measured at ``s.step_probes`` steps, ``s.probe_images`` of them at each (``probe_plan``)."""
        images = pair_slots(pairs, device)[0]
        plan = probe_plan(probe_steps(len(trajectory.timesteps), s.step_probes), images, s.probe_images)
        seen = seen or {}
        outputs = (_reuse(seen.get("policy"), plan, images)
                   or plan_predictions(pipe, trajectory, plan, s.guidance, device))
        anchors = tuple(anchors)[::s.anchor_stride] if s.drift_budget is not None else ()
        base = None
        if s.drift_budget is not None:
            base = _reuse(seen.get("base"), plan, images)
            if base is None:
                with lora_disabled(pipe.unet):
                    base = plan_predictions(pipe, trajectory, plan, s.guidance, device)
        earlier = anchor_predictions(pipe, list(anchors), s.guidance, device) if anchors else None
        return cls([p.detach().clone() for p in params], outputs, trajectory, plan, s.guidance, device,
                   base, s.drift_budget, anchors, earlier, s.probe_both_sides)

    def _change(self, pipe, params, delta, scale: float) -> torch.Tensor:
        """The change of the predictions at the probes with the step scaled by ``scale``, flat."""
        move_weights(params, self.weights, delta, scale)
        return flat_difference(plan_predictions(pipe, self.trajectory, self.plan, self.guidance, self.device),
                               self.outputs)

    @torch.no_grad()
    def rescale(self, pipe, params, target: float | None) -> dict[str, float]:
        """Rescale the step just taken so the predictions move by ``target`` RMS (None: keep its
        size), cut at the anchor's budget; return metrics.

        A LoRA's weight change B·A is bilinear in its factors, so the predictions are not linear in
        the scale s: the first guess ρ/RMS(change at s = 1) misses by the second-order term, the
        more so the fewer weights carry the step. The change is therefore measured at one more
        scale m and modelled as s·u + s²·v through both (``quadratic_terms``), and s solves it for
        the target (``quadratic_scale``). m is the first guess, unless the change there would be
        lost in the weights' rounding (fp16: ~0.006 RMS whatever the move): then m is where the
        change is ``PROBE_MARGIN`` times that floor (``rounding_floor``). One probe forward per
        probe step, without a graph; two (at ±m) when the proposal's own change at s = 1 is
        below that margin too, so that neither measured point is rounding. With ``both_sides``
        (``Settings.probe_both_sides``) also whenever the floor pushed m past the first guess: a
        quadratic through m and 1 then reads its slope far from the step, where the change curves
        (bf16 evidence steps on the embedded model landed 0.29–0.46 ρ), while the points ±m
        cancel the s² term (0.85–1.26 ρ); in float32 m is the first guess and nothing changes."""
        after = plan_predictions(pipe, self.trajectory, self.plan, self.guidance, self.device)
        raw = rms_change(self.outputs, after)
        delta = [p.detach() - p0 for p, p0 in zip(params, self.weights)]
        d1 = flat_difference(after, self.outputs)
        u, v = d1, torch.zeros_like(d1)         # the change per s and per s², until measured twice
        if target is None:
            scale = 1.0
        else:
            scale = target / raw if raw > 0 else 0.0     # target 0 (no evidence yet): no step
        metrics = {"step_rms_raw": raw}
        floor = rounding_floor(pipe.unet.dtype, self.device, self.guidance)
        least = PROBE_MARGIN * floor / raw if raw > 0 else 0.0    # the scale whose change clears the floor
        if target is not None and scale > 0:
            probe = max(scale, least)
            # the proposal's own change is lost in rounding, or (``both_sides``) rounding pushed the
            # probe past the first guess: both sides of it, further out, where the LoRA's s² term cancels
            if least > 1 or (self.both_sides and least > scale):
                points = ((probe, self._change(pipe, params, delta, probe)),
                          (-probe, self._change(pipe, params, delta, -probe)))
            elif abs(probe - 1.0) > 0.05:
                points = ((probe, self._change(pipe, params, delta, probe)), (1.0, d1))
            else:
                points = None     # the first guess is the proposal itself, already measured
            if points is not None:
                metrics["step_probe"], metrics["step_rms_probe"] = probe, float(points[0][1].pow(2).mean()) ** 0.5
                u, v = quadratic_terms(*points)
                scale = quadratic_scale(u, v, target, probe)
        probe_a = max(scale, least)              # where the anchors are measured
        if self.base is not None and scale > 0:
            drift = flat_difference(self.outputs, self.base)
            metrics["drift_rms"] = float(drift.pow(2).mean()) ** 0.5
            anchored = anchored_scale(drift, u + scale * v, scale, self.budget)   # linearised where the step lands
            if self.earlier:                      # every earlier winner stays in the ball too
                drifts = [flat_difference(before, a.base) for a, before in zip(self.anchors, self.earlier)]
                metrics["drift_rms_earlier"] = max(float(d.pow(2).mean()) ** 0.5 for d in drifts)
                if anchored > 0:                  # (a step already cut to nothing needs no more probes)
                    move_weights(params, self.weights, delta, probe_a)
                    moved_a = anchor_predictions(pipe, list(self.anchors), self.guidance, self.device)
                    for drift_a, after_a, before_a in zip(drifts, moved_a, self.earlier):
                        anchored = min(anchored, anchored_scale(drift_a, flat_difference(after_a, before_a) / probe_a,
                                                                scale, self.budget))
            metrics["anchor_cut"] = 1.0 - anchored / scale
            scale = anchored
        move_weights(params, self.weights, delta, scale)
        metrics["step_scale"] = scale
        return metrics


# ---------------------------------------------------------------- evidence (Settings.step_evidence)
# Random clicks are symmetric: swapping winner and loser flips a click's gradient, so their
# gradients have mean zero and the unit gradients u_i = g_i/|g_i| of k clicks sum to |Σu|² ≈ k.
# A consistent chooser adds a common direction, and |Σu|² grows as k + k(k−1)·(mean cosine).
# The James–Stein factor max(0, 1 − k/|Σu|²) is then ≈ 0 for random clicks and → 1 as the clicks
# agree: each click's step is the trust region's ρ times this evidence (docs/algorithm.md).
#
# How far |Σu|² strays above k by chance depends on how the clicks' gradients overlap: with signs
# flipped at random (the null), |Σ s_i u_i|² has mean k and variance V = 2·Σ_{i≠j} (u_i·u_j)², large
# when the gradients share few directions. ``Settings.evidence_z`` = z asks for k + z·√V instead of
# k (default 0.5 since the tenth session: step_weight="x0" leaves the gradients fewer directions).
# V needs every pair's u_i·u_j, so each click keeps a count sketch of its unit gradient (SKETCH
# numbers; the sketch's dot products are unbiased, with variance ≈ 1/SKETCH; 4 KB a click in the
# checkpoint).

SKETCH = 2048
_HASHES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def count_sketch(unit: torch.Tensor) -> torch.Tensor:
    """The count sketch of a flat vector: each entry added, with a fixed random sign, into one of
    SKETCH fixed random buckets (the same for every vector of its length, in every process)."""
    d = unit.numel()
    if d not in _HASHES:
        generator = torch.Generator().manual_seed(d)
        if len(_HASHES) >= 8:        # a few LoRA shapes (or evidence parts) per process in practice
            _HASHES.clear()
        _HASHES[d] = (torch.randint(0, SKETCH, (d,), generator=generator),
                      torch.randint(0, 2, (d,), generator=generator).float() * 2 - 1)
    buckets, signs = _HASHES[d]
    return torch.zeros(SKETCH).index_add_(0, buckets, unit.float().reshape(-1) * signs)


@dataclass
class Evidence:
    """The running sum of a session's unit click gradients, how many were added, and their sketches."""
    total: torch.Tensor | None = None      # flat float32, CPU
    count: int = 0
    sketches: torch.Tensor | None = None   # [clicks, SKETCH] float32: count sketches of the unit gradients

    def copy(self) -> "Evidence":
        """An independent copy (the tensors cloned)."""
        return Evidence(self.total.clone() if self.total is not None else None, self.count,
                        self.sketches.clone() if self.sketches is not None else None)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        total = self.total if self.total is not None else torch.zeros(0)
        tensors = {"total": total.contiguous(), "count": torch.tensor([self.count])}
        if self.sketches is not None:       # float16 on disk: 4 KB a click (its dot products move by ~1e-3)
            tensors["sketches"] = self.sketches.half().contiguous()
        return tensors

    def assign(self, other: "Evidence") -> None:
        """Take every field of ``other`` (the evidence after a click that succeeded), in place."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(other, field.name))

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "Evidence":
        count = int(t["count"][0])
        sketches = t.get("sketches")
        return cls(t["total"].float() if count else None, count,
                   sketches.float() if sketches is not None and count else None)


def unit_gradient(params, parts: list[int] | None = None) -> torch.Tensor | None:
    """The LoRA's current gradient as one flat float32 CPU vector, each of its consecutive ``parts``
    (sizes; ``Settings.evidence_parts``; default: the whole vector as one part) scaled to norm 1 on
    its own, a part without gradient left 0; None if the whole gradient is 0."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().reshape(-1).cpu()
                      for p in params])
    pieces = flat.split(parts or [flat.numel()])
    norms = [torch.linalg.vector_norm(piece) for piece in pieces]
    if not any(norm > 0 for norm in norms):
        return None
    return torch.cat([piece / norm if norm > 0 else piece for piece, norm in zip(pieces, norms)])


def add_click(evidence: Evidence, unit: torch.Tensor | None, parts: list[int] | None = None) -> Evidence:
    """The evidence with one more click's unit gradient (unchanged if it had no gradient);
    ``parts`` as ``unit_gradient``'s: each part is sketched on its own, side by side."""
    if unit is None:
        return evidence
    if evidence.total is not None and evidence.total.shape != unit.shape:
        raise ValueError(f"evidence of {evidence.total.numel()} values for a LoRA of {unit.numel()}")
    total = unit.clone() if evidence.total is None else evidence.total + unit
    sketch = torch.cat([count_sketch(piece) for piece in unit.split(parts or [unit.numel()])])[None]
    if evidence.sketches is not None and evidence.sketches.shape[1] != sketch.shape[1]:
        raise ValueError(f"evidence sketched in {evidence.sketches.shape[1] // SKETCH} part(s), "
                         f"this click in {sketch.shape[1] // SKETCH}")
    sketches = sketch if evidence.sketches is None else torch.cat([evidence.sketches, sketch])
    return Evidence(total, evidence.count + 1, sketches)


def split_evidence(evidence: Evidence, parts: list[int]) -> list[Evidence]:
    """The evidence of each part (``unit_gradient``'s ``parts``) on its own: its share of the sum
    and its block of every click's sketch."""
    if evidence.total is None:
        return [Evidence() for _ in parts]
    sketches = (evidence.sketches.split(SKETCH, dim=1) if evidence.sketches is not None
                else [None] * len(parts))
    return [Evidence(total, evidence.count, sketch) for total, sketch in zip(evidence.total.split(parts), sketches)]


def joint_evidence(evidence: Evidence, parts: list[int]) -> Evidence:
    """All ``parts`` as one unit vector a click: its parts' unit vectors side by side, scaled by
    1/√K (K parts), and their sketches' blocks likewise, so that under random winners |Σu|² again has
    mean k and ``null_sd`` its spread (a sign flips a click's every part at once)."""
    if evidence.total is None or len(parts) == 1:
        return evidence
    c = len(parts) ** -0.5
    sketches = evidence.sketches * c if evidence.sketches is not None else None
    return Evidence(evidence.total * c, evidence.count, sketches)


def null_sd(evidence: Evidence) -> float:
    """√V, V = 2·Σ_{i≠j} (u_i·u_j)²: the standard deviation of |Σ s_i u_i|² over random signs s,
    from the clicks' sketches (each squared dot product less the sketch's own variance, 1/its width).
    Clicks from before the sketches were kept (an older checkpoint) count as the sketched ones do."""
    sk = evidence.sketches
    if sk is None or len(sk) < 2:
        return 0.0
    gram = sk @ sk.T
    off = (gram.pow(2) - 1.0 / sk.shape[1]).clamp_min(0.0)     # a sketch W wide of a unit vector: variance 1/W
    m = len(sk)
    pairs_sum = float(off.sum() - off.diagonal().sum())
    scale = evidence.count * (evidence.count - 1) / (m * (m - 1))
    return (2.0 * pairs_sum * scale) ** 0.5


def agreement(evidence: Evidence) -> tuple[float, float]:
    """(|Σu|², √V): how far the clicks agree, and its spread had their winners been random."""
    if evidence.total is None:
        return 0.0, 0.0
    return float(evidence.total.pow(2).sum()), null_sd(evidence)


def evidence_scale(evidence: Evidence, z: float = 0.0, measured: tuple[float, float] | None = None) -> float:
    """James–Stein positive part max(0, 1 − (k + z·√V)/|Σu|²): 0 until the clicks agree more than
    chance (z null standard deviations more; z = 0 is James–Stein's k). ``measured``: the
    evidence's ``agreement``, if already computed."""
    if evidence.total is None or evidence.count < 2:     # one click cannot agree with anything
        return 0.0
    power, spread = measured if measured is not None else agreement(evidence)
    threshold = evidence.count + z * spread
    return max(0.0, 1.0 - threshold / power) if power > 0 else 0.0


def part_evidence_scales(evidence: Evidence, parts: list[int], z: float = 0.0
                         ) -> list[tuple[float, tuple[float, float]]]:
    """Each part's (``evidence_scale``, ``agreement``) on its own (``split_evidence``)."""
    out = []
    for part in split_evidence(evidence, parts):
        measured = agreement(part)
        out.append((evidence_scale(part, z, measured), measured))
    return out


def gate_evidence(evidence: Evidence, parts: list[int], z: float = 0.0, gate: str = "joint"
                  ) -> tuple[float, tuple[float, float], list[float], list[tuple[float, tuple[float, float]]]]:
    """What opens a click's step and how it is shared among the LoRA's ``parts``
    (``Settings.evidence_gate``): (the step's evidence factor, the agreement that set it, each part's
    weight for ``evidence_step``, each part's own ``part_evidence_scales``). "joint" (several parts):
    one test of all parts as one unit vector a click (``joint_evidence``), each part weighted by its
    own James–Stein factor (z = 0) over the largest; "each": each part's own test at z, the part that
    agrees most sizing the step. One part: its own test, either way."""
    joint = gate == "joint" and len(parts) > 1
    per_part = part_evidence_scales(evidence, parts, 0.0 if joint else z)
    if joint:
        agreed = agreement(whole := joint_evidence(evidence, parts))
        scale, top = evidence_scale(whole, z, agreed), max(x for x, _ in per_part)
        return scale, agreed, [x / top if scale > 0 and top > 0 else 0.0 for x, _ in per_part], per_part
    scale, agreed = max(per_part, key=lambda part: part[0])
    return scale, agreed, [x / scale if scale > 0 else 0.0 for x, _ in per_part], per_part


@torch.no_grad()
def evidence_step(params, optimizer, evidence: Evidence, lr: float, parts: list[int] | None = None,
                  weights: list[float] | None = None) -> float:
    """Step the LoRA along −Σu (the clicks' agreed descent direction), each of its ``parts``
    (``unit_gradient``'s) along its own share by ``lr`` × its entry of ``weights`` (default 1; 0:
    that part stays) RMS per weight, for the trust region to resize; the optimizer is not stepped.
    Returns this click's gradient norm (FloatingPointError if it is not finite; the gradients are
    cleared either way)."""
    norm = gradient_norm(params)
    optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(norm):
        raise FloatingPointError(f"non-finite gradient norm ({norm})")
    if lr == 0:
        return norm
    pieces = evidence.total.split(parts or [evidence.total.numel()])
    direction = torch.cat([piece / float(piece.norm()) * lr * w * piece.numel() ** 0.5
                           if w > 0 and piece.norm() > 0 else torch.zeros_like(piece)
                           for piece, w in zip(pieces, weights or [1.0] * len(pieces))])
    start = 0
    for p in params:
        p.sub_(direction[start:start + p.numel()].view_as(p).to(p.device, p.dtype))
        start += p.numel()
    return norm
