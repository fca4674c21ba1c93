"""Replay training: learn a fresh LoRA from a session's preference log (the official offline mode).

    d3po-studio train SESSION_FOLDER --epochs 2 --batch 4 --out tuned.safetensors
    accelerate launch --cpu --num_processes 2 -m d3po_studio.cli train SESSION_FOLDER ...

Data-parallel over preferences: in each optimizer step of ``batch`` preferences, process r
takes preferences r, r+W, r+2W, ...; local gradients are summed across processes before
clipping and the (identical) optimizer step, so W processes match one process with the same
effective batch. The session's own checkpoints are not touched. Each preference's gradients come
from the session's objective (core/objectives.py); the optimizer's step is taken as it is (the
trust region of ``step_rms`` measures one click's trajectory, and a replay step spans a batch).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import Settings
from .errors import SessionError
from .lora import add_lora, lora_state
from .loss import pairs_from_best, pairs_from_ranking
from .runtime import make_optimizer, resolve_runtime
from .objectives import get_objective
from .sampling import Trajectory
from .storage import SessionFolder, read_tensors
from .update import apply_gradients

log = logging.getLogger("d3po_studio")


def preferences(folder: SessionFolder) -> list[tuple[str, list[tuple[int, int]]]]:
    """(round id, pairs) of every round with a preference that was not undone, oldest first."""
    out = []
    for rid in folder.round_ids():
        rec = folder.read_round(rid)
        choice = rec.get("choice") or {}
        if rec["status"] == "undone" or not ({"best", "ranking"} & set(choice)):
            continue
        pairs = (pairs_from_best(rec["n"], choice["best"]) if "best" in choice
                 else pairs_from_ranking(rec["n"], choice["ranking"]))
        out.append((rid, pairs))
    return out


def replay_train(session_folder, *, epochs: int = 1, batch: int = 1, model: str | None = None,
                 pipeline=None, accelerator=None, progress=None, **overrides) -> dict:
    """Train a fresh LoRA on the session's preferences. Returns {lora, settings, family, steps, losses}.

    ``model`` defaults to the session's model; ``pipeline`` skips loading. ``overrides``
    replace session settings (e.g. lr). ``accelerator``: an ``accelerate.Accelerator`` for
    data-parallel runs (None = a single process).
    """
    from .loading import load_pipeline, model_family
    from .session import prepare_pipeline
    folder = SessionFolder(session_folder)
    if not folder.exists():
        raise SessionError(f"{folder.root} is not a session folder (no session.json)")
    meta = folder.read_meta()
    settings = Settings.stored(meta["settings"]).replace(**overrides)
    prefs = preferences(folder)
    if not prefs:
        raise SessionError(f"session {folder.root} has no preference to train on")
    if epochs < 1 or batch < 1:
        raise SessionError("use --epochs 1 or more and --batch 1 or more")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    runtime = resolve_runtime("cpu" if accelerator and accelerator.device.type == "cpu" else settings.device,
                              settings.dtype, settings.optimizer, settings.attention)
    pipe = pipeline or load_pipeline(model or meta["model"], torch_dtype=runtime.dtype, device=str(runtime.device))
    pipe = prepare_pipeline(pipe, runtime)
    params = add_lora(pipe.unet, settings.lora_rank, settings.lora_alpha, settings.lora_targets, settings.seed)
    if settings.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    optimizer = make_optimizer(runtime.optimizer, params, settings.lr, settings.weight_decay)
    order_gen = torch.Generator().manual_seed(settings.seed)
    losses, step = [], 0
    for epoch in range(epochs):
        order = torch.randperm(len(prefs), generator=order_gen).tolist()
        for start in range(0, len(order), batch):
            chunk = [prefs[i] for i in order[start:start + batch]]
            metrics = _local_gradients(pipe, folder, chunk[rank::world], settings, len(chunk), runtime.device, step)
            _sum_gradients_across(params, accelerator)
            loss = _sum_scalar(metrics.get("loss", 0.0), accelerator)
            apply_gradients(params, optimizer, settings.grad_clip)
            losses.append(loss)
            step += 1
            if progress:
                progress(step, epochs * -(-len(prefs) // batch))
    return {"lora": lora_state(pipe.unet), "settings": settings, "family": model_family(pipe),
            "steps": step, "losses": losses, "preferences": len(prefs), "meta": meta}


def _local_gradients(pipe, folder, chunk, settings: Settings, batch_size: int, device, step: int) -> dict:
    """Accumulate this process's share of a batch; each preference weighs 1/batch_size."""
    totals = {"loss": 0.0}
    for rid, pairs in chunk:
        rec = folder.read_round(rid)
        s = settings.replace(**rec["sampling"])
        traj = Trajectory.from_tensors(read_tensors(folder.round_dir(rid) / "trajectory.safetensors"))
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        m = get_objective(s.objective)(pipe, traj, pairs, s, device=device, generator=gen, weight=1.0 / batch_size)
        totals["loss"] += m["loss"] / batch_size
    return totals


def _sum_gradients_across(params, accelerator) -> None:
    if accelerator is None or accelerator.num_processes == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.copy_(accelerator.reduce(p.grad, reduction="sum"))


def _sum_scalar(value: float, accelerator) -> float:
    if accelerator is None or accelerator.num_processes == 1:
        return value
    return float(accelerator.reduce(torch.tensor([value], device=accelerator.device), reduction="sum"))


def write_replay_lora(result: dict, out, format: str = "kohya") -> Path:
    """Export the LoRA of a replay run, with the session's provenance in the header."""
    from .export import export_lora
    s: Settings = result["settings"]
    meta = {"base_model": str(result["meta"]["model"]), "base_model_hash": result["meta"]["model_fingerprint"],
            "num_preferences": result["preferences"], "settings": s.to_dict(), "mode": "replay"}
    return export_lora(result["lora"], out, format, rank=s.lora_rank, alpha=s.lora_alpha,
                       family=result["family"], metadata=meta)
