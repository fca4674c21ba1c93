"""Session settings: one frozen, self-validating dataclass.

Every field has a one-line reason. Settings are fixed when a session is created
(written to ``session.json``); the sampling fields may be overridden per call.
Defaults are calibrated on the embedded model (docs/settings.md says why).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

from .errors import ConfigError

REDUCTIONS = ("sum", "mean")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("auto", "adamw8bit", "adamw")
ATTENTIONS = ("auto", "xformers", "sdpa")
BACKWARDS = ("joint", "split")
OBJECTIVES = ("d3po", "diffusion-dpo")
STEP_WEIGHTS = ("noise", "x0", "none")
GRADIENT_PARTS = ("whole", "choice")
EVIDENCE_GATES = ("joint", "each")


@dataclass(frozen=True)
class Settings:
    # --- sampling -----------------------------------------------------------
    steps: int = 20                 # DDIM steps per image (every one is a kept step)
    guidance: float = 5.0           # classifier-free guidance scale (1 = off)
    eta: float = 1.0                # DDIM stochasticity; D3PO needs eta > 0 to have log-probs
    height: int | None = None       # image height in px; None = the model's native size
    width: int | None = None        # image width in px; None = the model's native size
    # --- the update -----------------------------------------------------------
    objective: str = "d3po"         # "d3po" (per-step, on the trajectory) or "diffusion-dpo" (final images)
    step_weight: str = "x0"         # D3PO per-step log-ratio scale: "x0" (σ²/(|c|√ᾱ_prev)), "noise" (σ²/c²) or "none" (official); docs/algorithm.md
    logprob_pool: int = 1           # D3PO: score each step on r×r average-pooled latents (1 = the full step)
    logprob_grid: int = 1           # D3PO: score each step on its G×G block means, any latent size (0 = off; 1 = channel means)
    step_rms: float | None = 0.02   # trust region: RMS change of the model's predictions per click; None = plain optimizer step
    step_probes: int = 3            # trajectory steps of the click's own images at which the trust region measures (1: the middle step)
    probe_images: int = 1           # the click's images measured at each of those steps, taken in turn (0 = every one at every step)
    probe_both_sides: bool = False  # in fp16/bf16: measure the step's change at ±m when rounding pushes m past the first guess (docs/algorithm.md)
    drift_budget: float | None = 0.07  # anchor: most RMS change of the predictions from the base (LoRA off) on a click's trajectory; None = off
    anchor_clicks: int = 8          # the anchor also bounds the drift on each of the last K trained clicks' winners (0 = the click's own images only)
    anchor_probes: int = 1          # trajectory steps at which each of those winners' drift is measured (1: the middle step)
    anchor_stride: int = 2          # a click checks every G-th of those winners, newest first, so each in turn every G clicks (1 = all)
    step_evidence: bool = True      # step along the clicks' agreed direction, sized by how much they agree (0 for random clicks)
    evidence_z: float = 2.0         # step_evidence: the agreement must pass k + z null sds of |Σu|² (0 = James–Stein's k)
    # step_evidence per part of the LoRA, each part's click gradients a unit vector of their own: "+"-joined
    # lora_targets; None = one part per kind of layer the targets are on (parts_by_kind); () = the whole LoRA one part
    evidence_parts: tuple[str, ...] | None = None
    evidence_gate: str = "joint"    # several parts: "joint" = one test of all parts opens the step; "each" = each its own
    gradient_part: str = "whole"    # "choice": train on only the part of a click's gradient its choice sets, not the pull to the base
    beta: float = 0.1               # inverse temperature of the D3PO loss: where its pull to the base balances the clicks (docs/settings.md)
    lr: float = 1e-2                # learning rate of the LoRA optimizer (the step's size is step_rms's when that is on)
    dpo_beta: float = 5000.0        # β of the diffusion-dpo objective (diffusers' example scale)
    dpo_timesteps: int = 4          # random timesteps per click for the diffusion-dpo objective
    reduction: str = "sum"          # log-prob over latent elements: "sum" (default) or "mean" (official)
    train_fraction: float = 1.0     # share of the kept steps trained per update (1 = all)
    train_window: float = 1.0       # D3PO: train only this first share of the trajectory (its noisiest steps; 1 = all)
    proxy_candidates: int = 0       # extra images per click ranked by a model fitted to the clicks (core/proxy.py); 0 = off
    ratio_clip: float | None = None  # official clamp of exp(log pi - log ref) to [1-c, 1+c]; None = off
    guidance_in_update: bool = True  # recompute log-probs with the guidance used when sampling
    weight_decay: float = 1e-4      # AdamW weight decay
    grad_clip: float = 1.0          # max gradient norm per update (0 = no clipping)
    # --- the LoRA -----------------------------------------------------------
    lora_rank: int = 4              # LoRA rank r
    lora_alpha: float = 4.0         # LoRA alpha; the update is scaled by alpha / r
    # UNet module names (suffixes): the ResNet blocks' two convolutions and the self-attention projections, two
    # evidence parts (docs/settings.md); the convolutions alone were the default of the 22nd to 24th sessions
    lora_targets: tuple[str, ...] = ("conv1", "conv2", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
    # --- runtime choices (each "auto" choice is logged once) -----------------
    dtype: str = "auto"             # frozen weights: auto = fp16 on CUDA/MPS, bf16 on a CPU that has it
    device: str = "auto"            # auto = cuda, then mps, then cpu
    optimizer: str = "auto"         # auto = bitsandbytes AdamW8bit where it runs, else torch AdamW
    attention: str = "auto"         # auto = xformers on CUDA when it runs there, else torch SDPA
    gradient_checkpointing: bool = True  # recompute activations in backward: less memory, more time
    backward: str = "joint"         # "split": winner and loser backpropagated one at a time (less memory)
    seed: int = 0                   # seeds the LoRA init and the choice of trained steps
    keep_checkpoints: int = 20      # how many past updates `undo` can go back

    def __post_init__(self):
        _check(self.steps >= 1, "steps", self.steps, "use 1 or more denoising steps")
        _check(self.guidance >= 1.0, "guidance", self.guidance, "use 1.0 (off) or more")
        _check(0.0 < self.eta <= 1.0, "eta", self.eta,
               "D3PO needs a stochastic sampler: use 0 < eta <= 1 (the paper uses 1.0)")
        for name in ("height", "width"):
            v = getattr(self, name)
            _check(v is None or (v >= 8 and v % 8 == 0), name, v, "use a multiple of 8, or None")
        _check(self.objective in OBJECTIVES, "objective", self.objective, f"use one of {OBJECTIVES}")
        _check(self.step_weight in STEP_WEIGHTS, "step_weight", self.step_weight, f"use one of {STEP_WEIGHTS}")
        _check(self.gradient_part in GRADIENT_PARTS, "gradient_part", self.gradient_part,
               f"use one of {GRADIENT_PARTS}")
        _check(self.evidence_gate in EVIDENCE_GATES, "evidence_gate", self.evidence_gate,
               f"use one of {EVIDENCE_GATES}")
        _check(self.step_rms is None or self.step_rms > 0, "step_rms", self.step_rms,
               "use None (off) or a positive RMS change such as 0.02")
        _check(self.drift_budget is None or self.drift_budget > 0, "drift_budget", self.drift_budget,
               "use None (off) or a positive RMS change from the base such as 0.2")
        _check(math.isfinite(self.evidence_z) and self.evidence_z >= 0, "evidence_z", self.evidence_z,
               "use 0 (James–Stein's threshold) or a number of null standard deviations such as 1")
        _check(self.step_probes >= 1, "step_probes", self.step_probes,
               "use 1 or more (the steps of the click's own trajectory the trust region measures)")
        _check(self.probe_images >= 0, "probe_images", self.probe_images,
               "use 0 (every image of the click at every probe step) or a number of images such as 1")
        _check(self.anchor_stride >= 1, "anchor_stride", self.anchor_stride,
               "use 1 (every earlier winner on every click) or a stride such as 2")
        _check(self.anchor_probes >= 1, "anchor_probes", self.anchor_probes,
               "use 1 or more (the steps of each earlier winner's trajectory the anchor measures)")
        _check(self.anchor_clicks >= 0, "anchor_clicks", self.anchor_clicks,
               "use 0 (the click's own images) or a number of earlier clicks such as 4")
        _check(self.logprob_pool >= 1, "logprob_pool", self.logprob_pool, "use 1 (off) or a pooling factor such as 4")
        _check(self.logprob_grid >= 0, "logprob_grid", self.logprob_grid, "use 0 (off) or a grid such as 1 or 4")
        _check(self.logprob_grid == 0 or self.logprob_pool == 1, "logprob_pool", self.logprob_pool,
               "logprob_pool and logprob_grid choose the same coarse view: set logprob_grid=0 to use "
               "logprob_pool, or logprob_pool=1")
        _check(self.dpo_beta > 0, "dpo_beta", self.dpo_beta, "use a positive number such as 5000")
        _check(self.dpo_timesteps >= 1, "dpo_timesteps", self.dpo_timesteps, "use 1 or more timesteps")
        _check(self.beta > 0, "beta", self.beta, "use a positive number such as 0.1")
        _check(self.lr > 0, "lr", self.lr, "use a positive learning rate such as 3e-3")
        _check(self.reduction in REDUCTIONS, "reduction", self.reduction, f"use one of {REDUCTIONS}")
        _check(0.0 < self.train_fraction <= 1.0, "train_fraction", self.train_fraction,
               "use a share in (0, 1]")
        _check(0.0 < self.train_window <= 1.0, "train_window", self.train_window,
               "use a share in (0, 1], e.g. 0.5 for the first half of the steps")
        _check(self.proxy_candidates == 0 or self.proxy_candidates >= 2, "proxy_candidates", self.proxy_candidates,
               "use 0 (off) or 2 or more extra images per click, such as 4")
        _check(self.ratio_clip is None or 0 < self.ratio_clip < 1, "ratio_clip", self.ratio_clip,
               "use None (off) or a number in (0, 1) such as 0.1")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "use 0 or more")
        _check(self.grad_clip >= 0, "grad_clip", self.grad_clip, "use 0 (off) or a positive norm")
        _check(self.lora_rank >= 1, "lora_rank", self.lora_rank, "use a rank of 1 or more")
        _check(self.lora_alpha > 0, "lora_alpha", self.lora_alpha, "use a positive alpha")
        _check(len(self.lora_targets) > 0, "lora_targets", self.lora_targets, "name at least one module")
        if self.evidence_parts:     # None and () name no targets
            named = [t for part in self.evidence_parts for t in part.split("+")]
            _check(all(named) and sorted(named) == sorted(self.lora_targets), "evidence_parts", self.evidence_parts,
                   "join lora_targets with '+' into parts that name each target once, "
                   "e.g. ('conv1+conv2', 'attn1.to_q+attn1.to_k+attn1.to_v+attn1.to_out.0')")
        _check(self.dtype in DTYPES, "dtype", self.dtype, f"use one of {DTYPES}")
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"use one of {OPTIMIZERS}")
        _check(self.attention in ATTENTIONS, "attention", self.attention, f"use one of {ATTENTIONS}")
        _check(self.backward in BACKWARDS, "backward", self.backward, f"use one of {BACKWARDS}")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "use 1 or more")

    @classmethod
    def stored(cls, data: dict) -> "Settings":
        """The settings of a session.json: a field added after it was written takes the value that
        keeps that session's old behaviour (``ADDED_LATER``), not today's default."""
        return cls.from_dict({**ADDED_LATER, **data})

    @classmethod
    def from_dict(cls, data: dict) -> "Settings":
        """Build from a dict (e.g. session.json), refusing unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown setting(s) {unknown}; valid settings are {sorted(known)}")
        data = dict(data)
        for name in ("lora_targets", "evidence_parts"):
            if data.get(name) is not None:
                data[name] = tuple(data[name])
        return cls(**data)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        d["evidence_parts"] = list(self.evidence_parts) if self.evidence_parts is not None else None
        return d

    @property
    def resolved_parts(self) -> tuple[str, ...]:
        """The evidence parts the update uses: ``evidence_parts``, or for None one part per kind of
        layer of ``lora_targets`` (``parts_by_kind``); () or a single part = the whole LoRA."""
        return parts_by_kind(self.lora_targets) if self.evidence_parts is None else self.evidence_parts

    def replace(self, **changes) -> "Settings":
        return self.from_dict({**self.to_dict(), **changes})


def _kind(target: str) -> str:
    """The kind of layer a LoRA target is on: the ResNet convolutions, self-attention, cross-attention,
    every attention, the feed-forward layers; any other target is a kind of its own."""
    head = target.split(".")[0]
    if target in ("conv1", "conv2", "conv_shortcut"):
        return "conv"
    if head in ("attn1", "attn2", "ff"):
        return head
    return "attn" if head in ("to_q", "to_k", "to_v", "to_out") else target


def parts_by_kind(targets) -> tuple[str, ...]:
    """``evidence_parts=None``: the targets grouped by the kind of layer they are on, in order of
    first appearance, e.g. (conv1, conv2, attn1.to_q, attn1.to_v) → ("conv1+conv2", "attn1.to_q+attn1.to_v")."""
    kinds: dict[str, list[str]] = {}
    for target in targets:
        kinds.setdefault(_kind(target), []).append(target)
    return tuple("+".join(group) for group in kinds.values())


# Fields whose default changed the update when they were added (or later): a session.json without
# them was trained without them, and keeps training so when it is reopened. step_weight and
# evidence_z became "x0" and 0.5 in the tenth session; a session.json written since either existed
# stores its own value. beta and lora_targets (changed in the fifteenth session, with evidence_z to 2;
# lora_targets again in the twenty-second) have been stored in every session.json since the first,
# so they need no entry here. anchor_probes came in the twenty-third session with 3 (every session
# before probed its earlier winners at three steps) and became 1 in the same session. evidence_gate came
# in the twenty-fifth session; evidence_parts before it opened each part on its own ("each"), and its
# default was () (the whole LoRA one part) where it is None (a part per kind of layer) since. step_probes,
# probe_images and anchor_stride came in the twenty-sixth session; every session before measured its
# own images at three steps each and every earlier winner on every click.
ADDED_LATER = {"logprob_grid": 0, "step_evidence": False, "drift_budget": None, "anchor_clicks": 0,
               "step_weight": "noise", "evidence_z": 0.0, "anchor_probes": 3, "evidence_parts": (),
               "evidence_gate": "each", "step_probes": 3,
               "probe_images": 0, "anchor_stride": 1}
# Settings that only change sampling, so a session may change them after its first update.
SAMPLING_FIELDS = ("steps", "guidance", "eta", "height", "width")
# Settings fixed once a LoRA exists (they define its shape or its optimizer).
FIXED_AFTER_FIRST_UPDATE = ("lora_rank", "lora_alpha", "lora_targets", "optimizer", "seed", "evidence_parts")


def _check(ok: bool, name: str, value, fix: str):
    if not ok:
        raise ConfigError(f"setting {name}={value!r} is invalid: {fix}")


__all__ = ["Settings", "SAMPLING_FIELDS", "FIXED_AFTER_FIRST_UPDATE", "ADDED_LATER", "parts_by_kind"]
