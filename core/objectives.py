"""The registry of training objectives (``Settings.objective``): one interface, pure math behind it.

An objective accumulates the gradients of its loss for one click into the LoRA parameters and
returns its metrics; it never steps the optimizer (``core.update.train_step`` does):

    objective(pipe, trajectory, pairs, settings, *, device, generator, progress=None, weight=1.0,
              seen=None) -> metrics (gradients of weight × loss are added to the LoRA's .grad)

``seen``: a dict in which an objective may leave the predictions its passes computed for the pairs'
images at the trajectory steps ``seen["steps"]``, as ``seen["policy"][k]`` and ``seen["base"][k]``
(LoRA off), guided as the trust region measures them; the trust region then reuses them instead
of running them again.

    d3po           per-step DPO on the sampled trajectory (core/update.py, core/split.py)
    diffusion-dpo  DPO on the final images' denoising errors (core/diffusion_dpo.py)
"""
from __future__ import annotations

from .diffusion_dpo import accumulate_diffusion_dpo_gradients
from .errors import ConfigError, SessionError
from .logprob import grid_pool
from .sampling import make_scheduler
from .split import gradient_function
from .update import steps_to_train


def d3po(pipe, trajectory, pairs, s, *, device, generator, progress=None, weight: float = 1.0,
         seen: dict | None = None) -> dict[str, float]:
    """D3PO (Yang et al. 2024): every kept step of the trajectory, each step's log-ratio weighted.
    Its passes are the trust region's predictions only with the guidance it samples with."""
    scheduler = make_scheduler(pipe, len(trajectory.timesteps))
    steps = steps_to_train(trajectory, scheduler, s.eta, s.train_fraction, generator, s.train_window)
    if not steps:
        raise SessionError("this batch has no stochastic step to train (eta = 0?)")
    return gradient_function(s.backward)(
        pipe, trajectory, pairs, steps=steps, beta=s.beta,
        guidance=s.guidance if s.guidance_in_update else 1.0, eta=s.eta, reduction=s.reduction,
        ratio_clip=s.ratio_clip, device=device, progress=progress, weighting=s.step_weight, weight=weight,
        part=s.gradient_part, seen=seen if s.guidance_in_update else None,
        pool=grid_pool(*trajectory.latents.shape[-2:], s.logprob_grid) if s.logprob_grid else s.logprob_pool)


def diffusion_dpo(pipe, trajectory, pairs, s, *, device, generator, progress=None,
                  weight: float = 1.0, seen: dict | None = None) -> dict[str, float]:
    """Diffusion-DPO (Wallace et al. 2023) on the final latents of the batch (its passes are at
    other noise than the trajectory's, so it leaves ``seen`` as it is)."""
    return accumulate_diffusion_dpo_gradients(pipe, trajectory, pairs, timesteps=s.dpo_timesteps,
                                              beta=s.dpo_beta, device=device, generator=generator,
                                              progress=progress, weight=weight, part=s.gradient_part)


OBJECTIVES = {"d3po": d3po, "diffusion-dpo": diffusion_dpo}


def get_objective(name: str):
    """The objective registered as ``name``; ConfigError listing the valid names otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ConfigError(f"objective={name!r} is unknown: use one of {sorted(OBJECTIVES)}") from None
