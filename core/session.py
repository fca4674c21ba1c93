"""Session: the one object front ends use, a façade over the session folder (storage.py), its
LoRA and optimizer (trainstate.py), the update queue (worker.py) and the shared pipeline
(pool.py); it turns clicks into D3PO updates.

    from d3po_studio import Session
    s = Session.open("my-session", model="embedded")
    batch = s.sample("a red circle", n=2, seed=0)
    report = s.prefer(batch, best=0)         # or ranking=[1, 0], or none=True
    s.prefer(s.sample("a red circle"), best=1, wait=False)   # queued; s.pending(), s.wait()
    s.undo()
    s.export_lora("out.safetensors", format="kohya")
    s.close()                                # after the queued updates; close(cancel=True) drops them
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import SAMPLING_FIELDS, Settings
from .errors import Cancelled, ConfigError, SessionError, UpdateError
from .lora import activate, add_lora, lora_scaled, lora_state
from .loss import pairs_from_best, pairs_from_ranking
from .opening import open_folder, prepare_pipeline  # noqa: F401  (prepare_pipeline: replay imports it here)
from .pool import POOL, SharedPipeline
from .recovery import open_head, settle_rounds
from .runtime import Runtime, make_optimizer, measure_memory, say_once
from .sampling import Trajectory, decode, sample_trajectory
from .storage import SessionFolder, read_tensors, write_tensors
from .trainstate import State, TrainState
from .update import Timer, train_step
from .worker import UpdateWorker

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
    """State of one steering session. Use ``Session.open``; all methods are thread-safe.

    Lifecycle: open → closing → closed (``close``). Clicks are trained by the session's update
    worker (core/worker.py), one at a time in click order; the pipeline may be shared with other
    sessions on the same model (core/pool.py), each session being its own LoRA adapter on it.
    """

    def __init__(self, folder: SessionFolder, shared: SharedPipeline, adapter: str, settings: Settings,
                 runtime: Runtime, meta: dict):
        self.folder, self._shared, self.adapter = folder, shared, adapter
        self.settings, self.runtime, self.meta = settings, runtime, meta
        self._lock = threading.RLock()          # session state and folder writes (short)
        self._close_lock = threading.Lock()
        self._state = "open"
        self._worker = UpdateWorker(name=f"d3po-updates-{folder.root.name}")
        self.notes: list[str] = []              # what reopening a damaged folder did, in words
        self._proxy_features: dict = {}         # round id -> image features (proxy_candidates)
        self._anchors: dict = {}                # (round id, guidance) -> its winner's Anchor (anchor_clicks)
        with shared.lock:
            self.params = add_lora(shared.pipe.unet, settings.lora_rank, settings.lora_alpha,
                                   settings.lora_targets, settings.seed, adapter=adapter)
            self.optimizer = make_optimizer(runtime.optimizer, self.params, settings.lr, settings.weight_decay)
            self._train = TrainState(folder, shared.pipe.unet, adapter, self.params, self.optimizer, settings)
            self.head, self.updates = None, 0
            name, state, notes, damaged = open_head(folder, self._train.read)
            self._load_state(state)
            self.head, self.updates = name, state.updates
            if notes and folder.head_state() != (name, None):
                folder.set_head(name)
        for note in notes + settle_rounds(folder, self.head, damaged):
            self._note(note)

    @property
    def pipe(self):
        """The diffusers pipeline (shared with the other sessions on the same model)."""
        return self._shared.pipe

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, folder, model: str | None = None, pipeline=None, **settings) -> "Session":
        """Create a session in ``folder``, or resume the one there.

        ``model``: "embedded", a diffusers folder, a .safetensors checkpoint or a hub id; None =
        the folder's model when resuming, "embedded" for a new folder. ``pipeline``: an already
        loaded diffusers pipeline to use instead of loading ``model`` (``model`` then only names
        it). ``settings``: fields of ``Settings``.
        """
        opened = open_folder(folder, model, pipeline, settings)
        try:
            session = cls(opened.folder, opened.shared, opened.adapter, opened.settings, opened.runtime, opened.meta)
        except BaseException:
            opened.close()
            raise
        session._lock_file = opened.lock
        session.open_arguments = {"model": opened.meta["model"], "pipeline": pipeline, **settings}
        for note in opened.notes:
            session._note(note)
        warning = session.memory_warning()
        if warning:
            session._note(warning)
        return session

    def memory_warning(self, n: int = 2, height: int | None = None, width: int | None = None) -> str | None:
        """What to change when a click of ``n`` images at this session's size (or ``height`` ×
        ``width``, a size chosen for one batch) is estimated not to fit the free memory of its GPU
        (core/memory.py, measured figures); None when it fits, on a CPU, and for the embedded model
        (whose family's figures are a full-size model's)."""
        from .memory import device_free_bytes, fit_warning
        if self.meta["model"] == "embedded":
            return None
        s = self.settings
        return fit_warning(self.meta["family"], height or s.height, width or s.width,
                           device_free_bytes(self.runtime.device), n=n,
                           backward=s.backward, gradient_checkpointing=s.gradient_checkpointing)

    def close(self, cancel: bool = False) -> list[dict]:
        """Finish the queued and running updates (``cancel=True``: cancel them, rolling back the
        running one), free this session's LoRA and release the folder lock. Returns what ``wait``
        would have: the reports of updates queued with ``wait=False`` not yet returned. Every
        later call on this object raises SessionError; calling ``close`` again returns []."""
        with self._close_lock:
            with self._lock:
                if self._state == "closed":
                    return []
                self._state = "closing"          # no new click is queued from here on
            try:
                return self._worker.stop(cancel=cancel)
            finally:
                with self._shared.lock:          # a call already past _check_open sees "closed" here
                    self._state = "closed"
                    POOL.release(self._shared, self.adapter)
                self._lock_file.close()

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self) -> None:
        if self._state != "open":
            raise SessionError(f"this Session of {self.folder.root} is {self._state}: open the folder again "
                               "with Session.open(folder)")

    @contextlib.contextmanager
    def _use_pipe(self):
        """Hold the shared pipeline with this session's LoRA the only active one."""
        with self._shared.lock:
            if self._state == "closed":
                self._check_open()
            unet = self.pipe.unet
            activate(unet, self.adapter, self.params)
            if self.settings.gradient_checkpointing != unet.is_gradient_checkpointing:
                (unet.enable_gradient_checkpointing if self.settings.gradient_checkpointing
                 else unet.disable_gradient_checkpointing)()
            yield self.pipe

    # ---------------------------------------------------------------- sample
    def sample(self, prompt: str, n: int = 2, seed: int | None = None, negative_prompt: str = "",
               progress=None, **sampling) -> Batch:
        """Sample n ≥ 2 images of ``prompt`` from one shared x_T; saved before they are returned.

        Runs before any update queued with ``prefer(wait=False)`` that has not started yet."""
        self._check_open()
        if not isinstance(n, int) or n < 2:
            raise ConfigError(f"n={n!r}: a preference needs at least 2 images; use n=2 or more")
        if not isinstance(prompt, str):
            raise ConfigError("prompt must be a string")
        unknown = set(sampling) - set(SAMPLING_FIELDS)
        if unknown:
            raise ConfigError(f"unknown sampling option(s) {sorted(unknown)}; use {list(SAMPLING_FIELDS)}")
        s = self.settings.replace(**sampling)
        seed = secrets.randbelow(2**31) if seed is None else int(seed)
        with self._worker.sampling(), self._use_pipe() as pipe, torch.no_grad():
            traj = sample_trajectory(pipe, prompt, negative_prompt, n, seed, steps=s.steps,
                                     guidance=s.guidance, eta=s.eta, height=s.height, width=s.width,
                                     reduction=s.reduction, device=self.runtime.device, progress=progress)
            with self._room_to_decode(s, n):
                images = decode(pipe, traj.latents[-1].float())
            with self._lock:
                batch = Batch(self.folder.next_round_id(datetime.datetime.now()), prompt, negative_prompt, seed,
                              images, traj, {k: getattr(s, k) for k in SAMPLING_FIELDS})
                self._save_batch(batch)
        return batch

    def _room_to_decode(self, s: Settings, n: int):
        """The VAE decode, the sampling's peak (docs/benchmarks.md): the text encoders wait on the
        host meanwhile when sampling ``n`` images at this size is estimated not to fit the GPU's
        free memory with them on it (core/memory.py); else nothing moves."""
        from .memory import MEASURED, TEXT_ENCODERS, device_free_bytes, estimate_bytes, offloaded
        family = self.meta["family"]
        free = device_free_bytes(self.runtime.device)
        if free is None or self.meta["model"] == "embedded" or family not in MEASURED or \
                estimate_bytes(family, s.height, s.width, n=n)["sampling"] <= free:
            return contextlib.nullcontext()
        say_once(f"{family} at {s.width}×{s.height} px, {n} images: the text encoders go to the host during "
                 "the VAE decode (the sampling is estimated not to fit the GPU's free memory otherwise)")
        return offloaded(self.pipe, self.runtime.device, TEXT_ENCODERS)

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
        self._check_open()
        return self._load_batch(round_id)

    def _load_images(self, round_id: str, n: int) -> list:
        from PIL import Image
        rdir = self.folder.round_dir(round_id)
        return [Image.open(rdir / f"image_{i}.png").convert("RGB") for i in range(n)]

    def _load_batch(self, round_id: str) -> Batch:
        rec = self.folder.read_round(round_id)
        images = self._load_images(round_id, rec["n"])
        rdir = self.folder.round_dir(round_id)
        traj = Trajectory.from_tensors(read_tensors(rdir / "trajectory.safetensors"))
        return Batch(rec["id"], rec["prompt"], rec["negative_prompt"], rec["seed"], images, traj, rec["sampling"])

    # ---------------------------------------------------------------- prefer
    def prefer(self, batch, best: int | None = None, ranking: list[int] | None = None,
               none: bool = False, progress=None, wait: bool = True) -> dict:
        """Record a preference and train one D3PO update on it. Returns the update report.

        ``best``: the picked image beats each other one. ``ranking``: all images, best first.
        ``none=True``: "none is good" — logged, nothing is trained.
        The click is on disk before this returns. ``wait=False``: the update is queued behind
        earlier ones and this returns at once ``{"queued": True, "round": id, "position": k}``
        (see ``pending``, ``wait``). A NaN/inf loss or gradient, or running out of memory, rolls
        the LoRA and optimizer back, keeps the click in the log, and raises UpdateError (with
        ``wait=False``: reported by ``wait``).
        """
        self._check_open()
        with self._lock:
            self._check_open()
            rid = batch if isinstance(batch, str) else batch.id
            record = self.folder.read_round(rid)
            choice, pairs = _choice(record["n"], best, ranking, none)
            if record["status"] not in ("shown",):
                raise SessionError(f"round {rid} already has a preference ({record['status']}); "
                                   "sample a new batch")
            record.update(choice=choice, status="pending", chosen=_now())
            self.folder.write_round(record)    # the click is on disk before any training
            if none:
                record.update(status="skipped", report={"skipped": True, "updates": self.updates})
                self.folder.write_round(record)
                return record["report"]
            job, position = self._worker.submit(
                rid, lambda p: self._run_update(batch, pairs, rid, _chained(p, progress)),
                grace=not wait, direct=wait, on_cancel=self._cancelled)
        if not wait:
            return {"queued": True, "round": rid, "position": position}
        return job.result()

    def pending(self) -> dict:
        """``{"queued", "running", "step", "total", "updates"}``: updates waiting, the round being
        trained (or None), its progress, and the updates applied so far. Cheap; never blocks on
        an update."""
        self._check_open()
        return {**self._worker.pending(), "updates": self.updates}

    def wait(self, timeout: float | None = None) -> list[dict]:
        """Block until no update is queued or running; the reports of the updates queued with
        ``wait=False`` that finished since the previous ``wait`` (``{"round", …report}``, or
        ``{"round", "error"}`` for one that failed). TimeoutError after ``timeout`` seconds."""
        self._check_open()
        return self._worker.wait(timeout)

    def _run_update(self, batch, pairs, rid: str, progress) -> dict:
        """The worker's job for one click: train it under the pipeline lock, commit it."""
        with self._use_pipe():
            if isinstance(batch, str):
                batch = self._load_batch(batch)
            traj = Trajectory.from_tensors({k: v.clone() for k, v in batch.trajectory.to_tensors().items()})
            extra, proxy = [], None
            if self.settings.proxy_candidates:
                extra, proxy = self._proxy_pairs(batch, self.settings.replace(**batch.sampling))
            return self._update(batch.sampling, traj, pairs, self.folder.read_round(rid), progress, extra, proxy,
                                before=batch.id)

    def _update(self, sampling: dict, traj: Trajectory, pairs, record: dict, progress, extra=(),
                proxy: dict | None = None, before: str | None = None) -> dict:
        """``before``: the click's round, whose earlier clicks ``anchor_clicks`` bounds (None: none)."""
        s = self.settings.replace(**sampling)
        saved = self._train.snapshot(self.updates)
        device = self.runtime.device
        try:
            with measure_memory(device) as memory, Timer() as timer:   # this update's, not the process's
                anchors = self._anchor_clicks(before, s.guidance) if before is not None else []
                metrics, grad_norm = self._train_step(traj, pairs, s, progress, extra, anchors)
        except (FloatingPointError, torch.OutOfMemoryError, RuntimeError) as e:
            self._load_state(saved)
            if isinstance(e, RuntimeError) and not _is_oom(e):
                self._mark(record, "interrupted", e)
                raise
            self._mark(record, "rolled_back", e)
            raise UpdateError(f"update rolled back, nothing changed: {e}. The click is kept in the log; "
                              "try a lower learning rate, fewer images or a smaller size") from e
        except BaseException as e:     # an interrupt or a cancel (from the progress callback): undo
            self._load_state(saved)
            self._mark(record, "cancelled" if isinstance(e, Cancelled) else "interrupted", e)
            raise
        report = {**metrics, "grad_norm": grad_norm, "seconds": timer.seconds, "pairs": len(pairs),
                  **memory(), "updates": self.updates + 1}
        if proxy is not None:
            report["proxy"] = proxy
        self._commit(record, report)
        return report

    def _train_step(self, traj: Trajectory, pairs, s: Settings, progress, extra=(), anchors=()):
        return train_step(self.pipe, traj, pairs, s, self.params, self.optimizer,
                          device=self.runtime.device, update_index=self.updates, progress=progress, extra=extra,
                          evidence=self._train.evidence, anchors=anchors)

    def _anchor_clicks(self, before: str, guidance: float) -> list:
        """``anchor_clicks``: the ``Anchor``s of the last K clicks before round ``before`` whose
        update is applied (not undone, skipped or rolled back), newest first; a round whose files
        cannot be read is passed over. Each is measured once (its base predictions never change)
        and kept while it is among the last K."""
        from .trust_region import Anchor
        k = self.settings.anchor_clicks if self.settings.drift_budget is not None else 0
        if k == 0:           # off: no listing of the rounds on every click
            return []
        found: dict = {}
        for rid in reversed(self.folder.round_ids()):
            if len(found) >= k:
                break
            if rid >= before:
                continue
            try:
                record = self.folder.read_round(rid)
                choice = record.get("choice") or {}
                if record.get("status") != "applied" or not ({"best", "ranking"} & set(choice)):
                    continue
                key = (rid, guidance, self.settings.anchor_probes)
                if key not in self._anchors:
                    winner = choice["best"] if "best" in choice else choice["ranking"][0]
                    tensors = read_tensors(self.folder.round_dir(rid) / "trajectory.safetensors")
                    self._anchors[key] = Anchor.measure(self.pipe, Trajectory.from_tensors(tensors), [int(winner)],
                                                        guidance, self.runtime.device, self.settings.anchor_probes)
                found[key] = self._anchors[key]
            except (OSError, ValueError, KeyError, SessionError):      # a damaged round: pass it over
                continue
        self._anchors = found           # older ones are no longer needed
        return list(found.values())

    # ------------------------------------------------------- proxy pairs
    def _proxy_pairs(self, batch: Batch, s: Settings) -> tuple[list, dict]:
        """``proxy_candidates``: when the model of the clicks so far predicts them (core/proxy.py),
        sample that many more images of this click's prompt with the LoRA as it is and return
        their (best, worst) by that model as one more pair to train; else nothing (and no sampling).
        Returns ``([(trajectory, pairs)] or [], what the gate said)``."""
        from . import proxy
        clicks = self._proxy_clicks(batch)
        said = proxy.gate(clicks)
        report = {"open": said["open"], "hits": said["hits"], "predicted": said["predicted"], "p": said["p"],
                  "pairs": 0}
        if not said["open"]:
            return [], report
        fitted = proxy.model(clicks)
        k = s.proxy_candidates
        seed = (batch.seed * 1_000_003 + self.updates + 1) % 2**31    # reproducible, never the click's x_T
        with torch.no_grad():
            traj = sample_trajectory(self.pipe, batch.prompt, batch.negative_prompt, k, seed, steps=s.steps,
                                     guidance=s.guidance, eta=s.eta, height=s.height, width=s.width,
                                     reduction=s.reduction, device=self.runtime.device)
            with self._room_to_decode(s, k):
                images = decode(self.pipe, traj.latents[-1].float())
        best, worst = proxy.extreme_pair(proxy.scores(proxy.image_features(images), fitted))
        if best == worst:                 # all candidates scored alike: nothing to learn from them
            return [], report
        report["pairs"] = 1
        return [(traj, [(best, worst)])], report

    def _proxy_clicks(self, batch: Batch) -> list:
        """The clicks up to and including ``batch``'s, oldest first, as ``core.proxy.Click``s:
        every round with a best or a ranking that was not undone (one whose update was rolled
        back still says what the user prefers). Features are computed once per round and kept."""
        from . import proxy
        cache = self._proxy_features
        clicks = []
        for rid in self.folder.round_ids():
            if rid > batch.id:
                break
            try:
                record = self.folder.read_round(rid)
                choice = record.get("choice") or {}
                if record.get("status") == "undone" or not ({"best", "ranking"} & set(choice)):
                    continue
                if rid not in cache:
                    images = batch.images if rid == batch.id else self._load_images(rid, record["n"])
                    cache[rid] = proxy.image_features(images)
            except (SessionError, OSError):
                continue                  # a damaged round teaches nothing (reopening notes it)
            _, pairs = _choice(record["n"], choice.get("best"), choice.get("ranking"), False)
            clicks.append(proxy.Click(cache[rid], tuple(pairs)))
        return clicks

    def _mark(self, record: dict, status: str, error: BaseException) -> None:
        record.update(status=status, error=f"{type(error).__name__}: {error}")
        with self._lock:
            self.folder.write_round(record)

    def _cancelled(self, job) -> None:
        with self._lock:
            self._mark(self.folder.read_round(job.round), "cancelled", job.error)

    def _commit(self, record: dict, report: dict) -> None:
        with self._lock:
            name = self._train.commit(record["id"], self.head, self.updates + 1)
            self.folder.set_head(name)       # the update is now complete on disk
            self.head, self.updates = name, self.updates + 1
            record.update(status="applied", report=report, checkpoint=name)
            self.folder.write_round(record)
            self._train.prune(self.head)

    # ------------------------------------------------------------------ undo
    def undo(self) -> dict:
        """Go back to the LoRA and optimizer state before the last update (bit-exact).

        Waits for queued updates first (undo takes back the last click). The parent checkpoint
        is read and loaded before HEAD moves: if it is damaged, nothing changes."""
        self._check_open()
        self._worker.join()
        with self._use_pipe(), self._lock:
            if self.head is None:
                raise SessionError("nothing to undo: no update has been applied in this session")
            meta = self.folder.checkpoint_meta(self.head)
            parent = meta.get("parent")
            if parent is not None and parent not in self.folder.checkpoint_names():
                raise SessionError(f"cannot undo further than {self.settings.keep_checkpoints} updates "
                                   "(keep_checkpoints)")
            try:
                state = self._train.read(parent)
            except SessionError as e:
                raise SessionError(f"cannot undo: {e}. Nothing changed: the session stays at update "
                                   f"{self.updates}") from e
            saved = self._train.snapshot(self.updates)
            self._load_state(state)
            try:
                self.folder.set_head(parent)     # last: HEAD moves only to a loaded state
            except BaseException:
                self._load_state(saved)
                raise
            self.head, self.updates = parent, state.updates
            self._mark_undone(meta["round"])
            return {"updates": self.updates, "undone_round": meta["round"]}

    def _mark_undone(self, round_id: str) -> None:
        try:
            record = self.folder.read_round(round_id)
        except SessionError as e:
            self._note(f"round {round_id} was undone, but its record is unreadable ({e})")
            return
        self.folder.write_round({**record, "status": "undone", "undone": _now()})

    def _load_state(self, state: State) -> None:
        self._train.load(state)
        if state.note:
            self._note(state.note)

    def _note(self, text: str) -> None:
        log.warning("session %s: %s", self.folder.root, text)
        self.notes.append(text)

    # ---------------------------------------------------------------- render
    def render(self, prompt: str, seed: int, scale: float = 1.0, negative_prompt: str = "",
               n: int = 1, **sampling) -> list:
        """Images for ``prompt`` and ``seed`` with the LoRA at ``scale`` (0 = base model).

        The same seed gives the same noise at any scale, so base and tuned compare side by side.
        Nothing is saved.
        """
        self._check_open()
        s = self.settings.replace(**sampling)
        with self._worker.sampling(), self._use_pipe() as pipe, torch.no_grad(), \
                lora_scaled(pipe.unet, scale, self.adapter):
            traj = sample_trajectory(pipe, prompt, negative_prompt, n, int(seed), steps=s.steps,
                                     guidance=s.guidance, eta=s.eta, height=s.height, width=s.width,
                                     device=self.runtime.device)
            with self._room_to_decode(s, n):
                return decode(pipe, traj.latents[-1].float())

    # ------------------------------------------------------------ history etc.
    def history(self) -> list[dict]:
        """Every round of this session, oldest first (prompt, seed, choice, status, report).
        A round record that cannot be read is listed as ``{"id", "status": "damaged", "error"}``."""
        self._check_open()
        out = []
        for rid in self.folder.round_ids():
            try:
                out.append(self.folder.read_round(rid))
            except SessionError as e:
                out.append({"id": rid, "status": "damaged", "error": str(e), "choice": None, "report": None})
        return out

    def export_lora(self, path, format: str = "kohya") -> Path:
        """Write the current LoRA as .safetensors in ``format`` ("kohya" or "diffusers")."""
        from .export import export_lora
        self._check_open()
        with self._use_pipe() as pipe:
            meta = {"base_model": str(self.meta["model"]), "base_model_hash": self.meta["model_fingerprint"],
                    "num_preferences": self.updates, "settings": self.settings.to_dict()}
            return export_lora(lora_state(pipe.unet, self.adapter), path, format, rank=self.settings.lora_rank,
                               alpha=self.settings.lora_alpha, family=self.meta["family"], metadata=meta)

    def info(self) -> dict:
        self._check_open()
        return {"folder": str(self.folder.root), "model": self.meta["model"], "family": self.meta["family"],
                "updates": self.updates, "settings": self.settings.to_dict(), "runtime": self.runtime.describe(),
                "trainable_parameters": sum(p.numel() for p in self.params), "notes": list(self.notes)}


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


def _chained(first, second):
    """One progress callback calling ``first`` then ``second`` (if given)."""
    if second is None:
        return first

    def progress(i: int, total: int) -> None:
        first(i, total)
        second(i, total)
    return progress


def _is_oom(e: BaseException) -> bool:
    return "out of memory" in str(e).lower()


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")
