"""Session: the one object front ends use. It owns the pipeline, the LoRA, the optimizer and
the session folder, and turns clicks into D3PO updates.

    from d3po_studio import Session
    s = Session.open("my-session", model="embedded")
    batch = s.sample("a red circle", n=2, seed=0)
    report = s.prefer(batch, best=0)         # or ranking=[1, 0], or none=True
    s.undo()
    s.export_lora("out.safetensors", format="kohya")
"""
from __future__ import annotations

import copy
import datetime
import fcntl
import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import FIXED_AFTER_FIRST_UPDATE, SAMPLING_FIELDS, Settings
from .errors import ConfigError, SessionError, UpdateError
from .lora import add_lora, load_lora_state, lora_scaled, lora_state
from .loss import pairs_from_best, pairs_from_ranking
from .runtime import Runtime, apply_attention, make_optimizer, peak_memory_bytes, resolve_runtime
from .sampling import Trajectory, decode, sample_trajectory
from .storage import SessionFolder, write_tensors, read_tensors
from .update import Timer, train_step

log = logging.getLogger("d3po_studio")


@dataclass
class Batch:
    """Images sampled for one prompt from one shared x_T, waiting for a preference."""
    id: str                               # round id in the session folder
    prompt: str
    negative_prompt: str
    seed: int
    images: list                          # PIL images, index = image number
    trajectory: Trajectory = field(repr=False)
    sampling: dict = field(default_factory=dict)   # steps, guidance, eta, height, width used

    @property
    def n(self) -> int:
        return len(self.images)


class Session:
    """State of one steering session. Use ``Session.open``; all methods are thread-safe."""

    def __init__(self, folder: SessionFolder, pipe, settings: Settings, runtime: Runtime, meta: dict):
        self.folder = folder
        self.pipe = pipe
        self.settings = settings
        self.runtime = runtime
        self.meta = meta
        self._lock = threading.RLock()
        self.params = add_lora(pipe.unet, settings.lora_rank, settings.lora_alpha,
                               settings.lora_targets, settings.seed)
        self.optimizer = make_optimizer(runtime.optimizer, self.params, settings.lr, settings.weight_decay)
        if settings.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        self._fresh = (lora_state(pipe.unet), copy.deepcopy(self.optimizer.state_dict()))
        self.head: str | None = None
        self.updates = 0
        self._restore(folder.head())
        self._repair_rounds()

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, folder, model: str = "embedded", pipeline=None, **settings) -> "Session":
        """Create a session in ``folder``, or resume the one there.

        ``model``: "embedded", a diffusers folder, a .safetensors checkpoint or a hub id.
        ``pipeline``: an already loaded diffusers pipeline to use instead of loading ``model``
        (``model`` then only names it). ``settings``: fields of ``Settings``.
        """
        from .loading import load_pipeline, model_family, model_fingerprint
        sf = SessionFolder(folder)
        sf.root.mkdir(parents=True, exist_ok=True)
        lock = _lock_folder(sf.root)
        try:
            meta = sf.read_meta() if sf.exists() else None
            fingerprint = model_fingerprint(model) if pipeline is None else f"given:{model}"
            if meta is not None:
                _check_same_model(meta, model, fingerprint, sf)
                resolved = _merge_settings(meta, settings, has_updates=sf.head() is not None)
            else:
                resolved = Settings.from_dict({**_model_defaults(model), **settings})
            runtime = resolve_runtime(resolved.device, resolved.dtype, resolved.optimizer, resolved.attention)
            pipe = pipeline if pipeline is not None else load_pipeline(
                model, torch_dtype=runtime.dtype, device=str(runtime.device))
            pipe = prepare_pipeline(pipe, runtime)
            resolved = _fill_native_size(resolved, pipe)
            meta = {**(meta or {"created": _now()}), "model": model, "model_fingerprint": fingerprint,
                    "family": model_family(pipe), "settings": resolved.to_dict()}
            sf.write_meta(meta)
            session = cls(sf, pipe, resolved, runtime, meta)
        except BaseException:
            lock.close()
            raise
        session._lock_file = lock
        return session

    def close(self) -> None:
        """Release the folder lock (the session object must not be used afterwards)."""
        lock = getattr(self, "_lock_file", None)
        if lock is not None:
            lock.close()
            self._lock_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- sample
    def sample(self, prompt: str, n: int = 2, seed: int | None = None, negative_prompt: str = "",
               progress=None, **sampling) -> Batch:
        """Sample n ≥ 2 images of ``prompt`` from one shared x_T; saved before they are returned."""
        if not isinstance(n, int) or n < 2:
            raise ConfigError(f"n={n!r}: a preference needs at least 2 images; use n=2 or more")
        if not isinstance(prompt, str):
            raise ConfigError("prompt must be a string")
        unknown = set(sampling) - set(SAMPLING_FIELDS)
        if unknown:
            raise ConfigError(f"unknown sampling option(s) {sorted(unknown)}; use {list(SAMPLING_FIELDS)}")
        s = self.settings.replace(**sampling)
        seed = secrets.randbelow(2**31) if seed is None else int(seed)
        with self._lock, torch.no_grad():
            traj = sample_trajectory(self.pipe, prompt, negative_prompt, n, seed, steps=s.steps,
                                     guidance=s.guidance, eta=s.eta, height=s.height, width=s.width,
                                     reduction=s.reduction, device=self.runtime.device, progress=progress)
            images = decode(self.pipe, traj.latents[-1].float())
            batch = Batch(self.folder.next_round_id(datetime.datetime.now()), prompt, negative_prompt, seed, images, traj,
                          {k: getattr(s, k) for k in SAMPLING_FIELDS})
            self._save_batch(batch)
        return batch

    def _save_batch(self, batch: Batch) -> None:
        rdir = self.folder.round_dir(batch.id)
        rdir.mkdir(parents=True, exist_ok=False)
        for i, image in enumerate(batch.images):
            image.save(rdir / f"image_{i}.png")
        write_tensors(rdir / "trajectory.safetensors", batch.trajectory.to_tensors())
        self.folder.write_round({"id": batch.id, "prompt": batch.prompt, "negative_prompt": batch.negative_prompt,
                                 "seed": batch.seed, "n": batch.n, "sampling": batch.sampling,
                                 "created": _now(), "status": "shown", "choice": None, "report": None})

    def batch(self, round_id: str) -> Batch:
        """Reload a sampled batch from the session folder by its id."""
        from PIL import Image
        rec = self.folder.read_round(round_id)
        rdir = self.folder.round_dir(round_id)
        images = [Image.open(rdir / f"image_{i}.png").convert("RGB") for i in range(rec["n"])]
        traj = Trajectory.from_tensors(read_tensors(rdir / "trajectory.safetensors"))
        return Batch(rec["id"], rec["prompt"], rec["negative_prompt"], rec["seed"], images, traj, rec["sampling"])

    # ---------------------------------------------------------------- prefer
    def prefer(self, batch, best: int | None = None, ranking: list[int] | None = None,
               none: bool = False, progress=None) -> dict:
        """Record a preference and run one D3PO update. Returns the update report.

        ``best``: the picked image beats each other one. ``ranking``: all images, best first.
        ``none=True``: "none is good" — logged, nothing is trained.
        A NaN/inf loss or gradient, or running out of memory, rolls the LoRA and optimizer
        back, keeps the click in the log, and raises UpdateError.
        """
        with self._lock:
            if isinstance(batch, str):
                batch = self.batch(batch)
            record = self.folder.read_round(batch.id)
            choice, pairs = _choice(batch.n, best, ranking, none)
            if record["status"] not in ("shown",):
                raise SessionError(f"round {batch.id} already has a preference ({record['status']}); "
                                   "sample a new batch")
            record.update(choice=choice, status="pending", chosen=_now())
            self.folder.write_round(record)    # the click is on disk before any training
            if none:
                record.update(status="skipped", report={"skipped": True, "updates": self.updates})
                self.folder.write_round(record)
                return record["report"]
            return self._update(batch, pairs, record, progress)

    def _update(self, batch: Batch, pairs, record: dict, progress) -> dict:
        s = self.settings.replace(**batch.sampling)
        saved = (lora_state(self.pipe.unet), copy.deepcopy(self.optimizer.state_dict()))
        device = self.runtime.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with Timer() as timer:
                metrics, grad_norm = self._train_step(batch.trajectory, pairs, s, progress)
        except (FloatingPointError, torch.OutOfMemoryError, RuntimeError) as e:
            self._rollback(saved)
            if isinstance(e, RuntimeError) and not _is_oom(e):
                self._mark(record, "interrupted", e)
                raise
            self._mark(record, "rolled_back", e)
            raise UpdateError(f"update rolled back, nothing changed: {e}. The click is kept in the log; "
                              "try a lower learning rate, fewer images or a smaller size") from e
        except BaseException as e:     # an interrupt (e.g. from the progress callback): undo, re-raise
            self._rollback(saved)
            self._mark(record, "interrupted", e)
            raise
        report = {**metrics, "grad_norm": grad_norm, "seconds": timer.seconds, "pairs": len(pairs),
                  "peak_memory_bytes": peak_memory_bytes(device), "updates": self.updates + 1}
        self._commit(record, report)
        return report

    def _train_step(self, traj: Trajectory, pairs, s: Settings, progress):
        return train_step(self.pipe, traj, pairs, s, self.params, self.optimizer,
                          device=self.runtime.device, update_index=self.updates, progress=progress)

    def _mark(self, record: dict, status: str, error: BaseException) -> None:
        record.update(status=status, error=f"{type(error).__name__}: {error}")
        self.folder.write_round(record)

    def _rollback(self, saved) -> None:
        lora, opt = saved
        self.optimizer.zero_grad(set_to_none=True)
        load_lora_state(self.pipe.unet, lora)
        self.optimizer.load_state_dict(opt)

    def _commit(self, record: dict, report: dict) -> None:
        name = self.folder.write_checkpoint(
            lora_state(self.pipe.unet), self.optimizer.state_dict(),
            {"updates": self.updates + 1, "round": record["id"], "parent": self.head})
        self.folder.set_head(name)       # the update is now complete on disk
        self.head, self.updates = name, self.updates + 1
        record.update(status="applied", report=report, checkpoint=name)
        self.folder.write_round(record)
        self.folder.prune_checkpoints(self._kept_checkpoints())

    def _kept_checkpoints(self) -> set[str]:
        keep, name = set(), self.head
        while name is not None and len(keep) < self.settings.keep_checkpoints:
            keep.add(name)
            name = self.folder.checkpoint_meta(name).get("parent")
        return keep

    # ------------------------------------------------------------------ undo
    def undo(self) -> dict:
        """Go back to the LoRA and optimizer state before the last update (bit-exact)."""
        with self._lock:
            if self.head is None:
                raise SessionError("nothing to undo: no update has been applied in this session")
            meta = self.folder.checkpoint_meta(self.head)
            parent = meta.get("parent")
            if parent is not None and not (self.folder.root / "checkpoints" / parent).exists():
                raise SessionError(f"cannot undo further than {self.settings.keep_checkpoints} updates "
                                   "(keep_checkpoints)")
            self.folder.set_head(parent)
            self._restore(parent)
            record = self.folder.read_round(meta["round"])
            record.update(status="undone", undone=_now())
            self.folder.write_round(record)
            return {"updates": self.updates, "undone_round": meta["round"]}

    def _restore(self, name: str | None) -> None:
        """Load checkpoint ``name`` (None = the fresh LoRA) into the UNet and optimizer."""
        if name is None:
            lora, opt, updates = self._fresh[0], copy.deepcopy(self._fresh[1]), 0
        else:
            lora, opt, meta = self.folder.read_checkpoint(name)
            updates = meta["updates"]
        self.optimizer.zero_grad(set_to_none=True)
        load_lora_state(self.pipe.unet, lora)
        self.optimizer.load_state_dict(opt)
        self.head, self.updates = name, updates

    def _repair_rounds(self) -> None:
        """A process killed mid-update leaves its round 'pending': settle it from HEAD."""
        for rid in self.folder.round_ids():
            rec = self.folder.read_round(rid)
            if rec["status"] != "pending":
                continue
            applied = self.head is not None and self.folder.checkpoint_meta(self.head).get("round") == rid
            rec["status"] = "applied" if applied else "interrupted"
            self.folder.write_round(rec)

    # ---------------------------------------------------------------- render
    @torch.no_grad()
    def render(self, prompt: str, seed: int, scale: float = 1.0, negative_prompt: str = "",
               n: int = 1, **sampling) -> list:
        """Images for ``prompt`` and ``seed`` with the LoRA at ``scale`` (0 = base model).

        The same seed gives the same noise at any scale, so base and tuned compare side by side.
        Nothing is saved.
        """
        s = self.settings.replace(**sampling)
        with self._lock, lora_scaled(self.pipe.unet, scale):
            traj = sample_trajectory(self.pipe, prompt, negative_prompt, n, int(seed), steps=s.steps,
                                     guidance=s.guidance, eta=s.eta, height=s.height, width=s.width,
                                     device=self.runtime.device)
            return decode(self.pipe, traj.latents[-1].float())

    # ------------------------------------------------------------ history etc.
    def history(self) -> list[dict]:
        """Every round of this session, oldest first (prompt, seed, choice, status, report)."""
        return [self.folder.read_round(r) for r in self.folder.round_ids()]

    def export_lora(self, path, format: str = "kohya") -> Path:
        """Write the current LoRA as .safetensors in ``format`` ("kohya" or "diffusers")."""
        from .export import export_lora
        with self._lock:
            meta = {"base_model": str(self.meta["model"]), "base_model_hash": self.meta["model_fingerprint"],
                    "num_preferences": self.updates, "settings": self.settings.to_dict()}
            return export_lora(lora_state(self.pipe.unet), path, format, rank=self.settings.lora_rank,
                               alpha=self.settings.lora_alpha, family=self.meta["family"], metadata=meta)

    def info(self) -> dict:
        return {"folder": str(self.folder.root), "model": self.meta["model"], "family": self.meta["family"],
                "updates": self.updates, "settings": self.settings.to_dict(), "runtime": self.runtime.describe(),
                "trainable_parameters": sum(p.numel() for p in self.params)}


# ---------------------------------------------------------------- helpers
def _choice(n: int, best, ranking, none: bool):
    given = sum(x is not None and x is not False for x in (best, ranking, none or None))
    if given != 1:
        raise ConfigError("give exactly one of best=<index>, ranking=[indices, best first] or none=True")
    try:
        if none:
            return {"none": True}, []
        if best is not None:
            if isinstance(best, bool) or not isinstance(best, int):
                raise ValueError(f"best={best!r} must be an image index")
            return {"best": best}, pairs_from_best(n, best)
        ranking = [int(i) for i in ranking]
        return {"ranking": ranking}, pairs_from_ranking(n, ranking)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _lock_folder(root: Path):
    f = open(root / ".lock", "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise SessionError(f"session {root} is open in another process or tab; close it there first")
    return f


def _check_same_model(meta: dict, model: str, fingerprint: str, sf: SessionFolder) -> None:
    if meta["model_fingerprint"] != fingerprint:
        raise SessionError(f"session {sf.root} was made with model {meta['model']!r}; "
                           f"open it with that model, or use a new folder for {model!r}")


def _merge_settings(meta: dict, given: dict, has_updates: bool) -> Settings:
    stored = Settings.from_dict(meta["settings"])
    if has_updates:
        changed = [k for k in FIXED_AFTER_FIRST_UPDATE if k in given and
                   Settings.from_dict({**stored.to_dict(), k: given[k]}).to_dict()[k] != stored.to_dict()[k]]
        if changed:
            raise ConfigError(f"settings {changed} are fixed after the first update of this session; "
                              "start a new session to change them")
    return stored.replace(**given)


def prepare_pipeline(pipe, runtime: Runtime):
    """Move to the device, cast frozen weights to the runtime dtype, set attention."""
    pipe.to(runtime.device)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None and module.dtype != runtime.dtype:
            module.to(dtype=runtime.dtype)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(dtype=torch.float32)  # decode in fp32: SDXL's VAE overflows in fp16
    pipe.set_progress_bar_config(disable=True)
    apply_attention(pipe, runtime.attention)
    return pipe


def _model_defaults(model: str) -> dict:
    """The embedded model brings its own sampling defaults (steps, guidance, size)."""
    if model != "embedded":
        return {}
    from .embedded import DEFAULTS
    return {k: v for k, v in DEFAULTS.items() if k in SAMPLING_FIELDS}


def _fill_native_size(s: Settings, pipe) -> Settings:
    if s.height is not None and s.width is not None:
        return s
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return s.replace(height=s.height or size, width=s.width or size)


def _is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower()


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")
