"""Gradio callbacks: thin adapters from widget values to ``Session`` calls and back.

Each tab keeps only its session folder (``gr.State``) and the id of the round on screen; the
open ``Session`` objects live in ``registry.REGISTRY``, owned by the tab's ``session_hash``.
Every error a user can cause (D3POError, out of memory, disk full) becomes a ``gr.Error``
message in the page; the server keeps running and the session folder stays consistent.
"""
from __future__ import annotations

import datetime
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pandas as pd
import torch

from ..core.errors import ConfigError, D3POError
from ..core.storage import SessionFolder
from .paths import child, export_file_name
from .registry import REGISTRY, SessionRegistry

log = logging.getLogger("d3po_studio.app")

SEED_MODES = ("new seed", "same seed")
RESOLUTIONS = ("native", "64", "128", "256", "512", "768", "1024")
THUMBNAILS = 8


@dataclass
class AppConfig:
    """What the app was launched with; every callback reads it, none changes it."""
    model: str = "embedded"               # anything Session.open loads
    sessions_dir: Path = Path("d3po-sessions")
    export_dir: Path | None = None        # extra folder exported LoRAs are also written to
    initial_session: Path | None = None   # --session: opened by the first tab that loads
    registry: SessionRegistry = field(default_factory=lambda: REGISTRY)


def shown_errors(fn):
    """Turn the errors a user can cause into a message in the page (gr.Error)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except D3POError as e:
            log.warning("%s: %s", type(e).__name__, e)
            raise gr.Error(f"{type(e).__name__}: {e}") from e
        except (torch.OutOfMemoryError, MemoryError) as e:
            log.warning("out of memory: %s", e)
            raise gr.Error("Out of memory: nothing was changed. Use fewer images, a smaller "
                           "resolution or fewer steps.") from e
        except OSError as e:
            log.warning("OS error: %s", e)
            raise gr.Error(f"Could not read or write a file ({e}); free disk space or check "
                           "permissions, then try again. The session folder is unchanged.") from e
    return wrapper


class Callbacks:
    """The app's event handlers, bound to one AppConfig."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.registry = config.registry

    # ----------------------------------------------------------- sessions
    def session_names(self) -> list[str]:
        root = self.config.sessions_dir
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and SessionFolder(p).exists())

    @shown_errors
    def list_sessions(self):
        return gr.Dropdown(choices=self.session_names())

    @shown_errors
    def new_session(self, name, lr, beta, rank, request: gr.Request):
        folder = child(self.config.sessions_dir, name, "session name")
        if SessionFolder(folder).exists():
            raise ConfigError(f"session {folder.name!r} exists already: resume it, or pick another name")
        settings = _session_settings(lr, beta, rank)
        session = self._open(folder, request, settings)
        return self._session_outputs(session, f"Created session **{folder.name}**.")

    @shown_errors
    def resume_session(self, name, request: gr.Request):
        folder = child(self.config.sessions_dir, name, "session name")
        if not SessionFolder(folder).exists():
            raise ConfigError(f"there is no session {folder.name!r} in {self.config.sessions_dir}")
        session = self._open(folder, request, {})
        return self._session_outputs(session, f"Resumed session **{folder.name}**.")

    @shown_errors
    def apply_settings(self, folder, lr, beta, rank, request: gr.Request):
        """Reopen this tab's session with new lr / beta / rank (rank is refused after a click)."""
        settings = _session_settings(lr, beta, rank)
        session = self.registry.reopen(folder, request.session_hash,
                                       lambda f: self._load(f, settings), lambda f: self._load(f, {}))
        return self._session_outputs(session, "Applied learning rate, β and rank to this session.")

    def on_load(self, request: gr.Request):
        """Page load: open the --session folder for the first tab that asks for it."""
        folder = self.config.initial_session
        hint = "Type a prompt and press **Sample** (a new session is created), or resume one under **Sessions**."
        if folder is None:
            return self._empty_outputs(hint)
        if self.registry.is_open(folder):
            return self._empty_outputs(f"Session **{folder.name}** is open in another browser tab. {hint}")
        try:
            session = self._open(folder, request, {})
        except D3POError as e:
            return self._empty_outputs(f"**Could not open {folder}:** {e}")
        return self._session_outputs(session, f"Resumed session **{folder.name}**.")

    def on_unload(self, request: gr.Request):
        self.registry.close_owner(request.session_hash)

    # ------------------------------------------------------------- sample
    @shown_errors
    def sample(self, folder, prompt, negative, n, seed_mode, seed, steps, guidance, resolution,
               request: gr.Request, progress=gr.Progress()):
        session, note = self._session_or_new(folder, request)
        batch = self._sample(session, prompt, negative, n, seed_mode, seed, steps, guidance, resolution, progress)
        return (str(session.folder.root), batch.id, *self._batch_outputs(session, batch, note))

    @shown_errors
    def prefer(self, folder, round_id, best, prompt, negative, n, seed_mode, seed, steps, guidance,
               resolution, request: gr.Request, progress=gr.Progress()):
        """The click: one D3PO update on the shown round, then the next images."""
        session = self.registry.get(folder, request.session_hash)
        if not round_id:
            raise ConfigError("no images are shown: press Sample first")
        report = session.prefer(round_id, best=int(best), progress=_reporter(progress, "updating the LoRA"))
        note = (f"Update {report['updates']}: loss {report['loss']:.3f}, implicit accuracy "
                f"{report['accuracy']:.2f}, {report['seconds']:.1f} s.")
        batch = self._sample(session, prompt, negative, n, seed_mode, seed, steps, guidance, resolution, progress)
        return (batch.id, *self._batch_outputs(session, batch, note), *self._history_outputs(session))

    @shown_errors
    def skip(self, folder, round_id, prompt, negative, n, seed_mode, seed, steps, guidance, resolution,
             request: gr.Request, progress=gr.Progress()):
        """"None is good": logged in the session, nothing trained, next images."""
        session = self.registry.get(folder, request.session_hash)
        if not round_id:
            raise ConfigError("no images are shown: press Sample first")
        session.prefer(round_id, none=True)
        batch = self._sample(session, prompt, negative, n, seed_mode, seed, steps, guidance, resolution, progress)
        note = "Skipped (none is good); nothing was trained."
        return (batch.id, *self._batch_outputs(session, batch, note), *self._history_outputs(session))

    # ------------------------------------------------- history, undo, export
    @shown_errors
    def undo(self, folder, request: gr.Request):
        session = self.registry.get(folder, request.session_hash)
        result = session.undo()
        note = f"Undid round {result['undone_round']}; the LoRA is back at update {result['updates']}."
        return (note, *self._history_outputs(session))

    @shown_errors
    def history(self, folder, request: gr.Request):
        return self._history_outputs(self.registry.get(folder, request.session_hash))

    @shown_errors
    def export(self, folder, name, fmt, request: gr.Request):
        session = self.registry.get(folder, request.session_hash)
        file_name = export_file_name(name, fmt)
        target = child(session.folder.root / "exports", file_name, "export file name")
        path = session.export_lora(target, format=fmt)
        note = f"Exported {fmt} LoRA after {session.updates} updates: `{path.name}`."
        if self.config.export_dir is not None:
            copy = session.export_lora(child(self.config.export_dir, file_name, "export file name"), format=fmt)
            note += f" Also written to `{copy}`."
        return str(path), note

    @shown_errors
    def compare(self, folder, prompt, negative, seed, scale, steps, guidance, resolution, request: gr.Request):
        session = self.registry.get(folder, request.session_hash)
        sampling = _sampling(steps, guidance, resolution)
        base = session.render(prompt, int(seed), scale=0.0, negative_prompt=negative, **sampling)[0]
        tuned = session.render(prompt, int(seed), scale=float(scale), negative_prompt=negative, **sampling)[0]
        return base, tuned

    # ------------------------------------------------------------ helpers
    def _load(self, folder: Path, settings: dict):
        from ..core.session import Session
        sf = SessionFolder(folder)
        model = sf.read_meta()["model"] if sf.exists() else self.config.model
        return Session.open(folder, model=model, **settings)

    def _open(self, folder: Path, request: gr.Request, settings: dict):
        existed = folder.exists()
        try:
            return self.registry.open(folder, request.session_hash, lambda f: self._load(f, settings))
        except D3POError:
            if not existed:
                _remove_if_empty(folder)     # a session that never opened leaves no folder behind
            raise

    def _session_or_new(self, folder, request: gr.Request):
        if folder and self.registry.is_open(folder):
            return self.registry.get(folder, request.session_hash), ""
        name = "session-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        session = self._open(child(self.config.sessions_dir, name, "session name"), request, {})
        return session, f"Created session **{name}**. "

    def _sample(self, session, prompt, negative, n, seed_mode, seed, steps, guidance, resolution, progress):
        seed = int(seed) if seed_mode == "same seed" and seed is not None else None
        return session.sample(prompt or "", n=int(n), seed=seed, negative_prompt=negative or "",
                              progress=_reporter(progress, "sampling"), **_sampling(steps, guidance, resolution))

    def _batch_outputs(self, session, batch, note: str):
        """gallery, seed, status for a freshly sampled batch."""
        rdir = session.folder.round_dir(batch.id)
        items = [(str(rdir / f"image_{i}.png"), f"#{i + 1}") for i in range(batch.n)]
        status = f"{note} {_describe(session)} — seed {batch.seed}. **Click the better image.**"
        return gr.Gallery(value=items, columns=batch.n), batch.seed, status.strip()

    def _session_outputs(self, session, note: str):
        """folder, round, gallery, status, sessions list, steps, guidance, history (3)."""
        s = session.settings
        return (str(session.folder.root), None, gr.Gallery(value=[]), f"{note} {_describe(session)}",
                gr.Dropdown(choices=self.session_names(), value=session.folder.root.name), s.steps, s.guidance,
                *self._history_outputs(session))

    def _empty_outputs(self, note: str):
        return (None, None, gr.Gallery(value=[]), note, gr.Dropdown(choices=self.session_names()),
                gr.skip(), gr.skip(), "No session open.", None, [])

    def _history_outputs(self, session):
        """clicks summary, metrics plot data, thumbnails of the last choices."""
        rounds = session.history()
        clicked = [r for r in rounds if r.get("choice")]
        counts = {st: sum(r["status"] == st for r in clicked) for st in ("applied", "skipped", "undone")}
        summary = (f"**{_plural(len(clicked), 'click')}** — {_plural(session.updates, 'update')} in the "
                   f"LoRA now; {counts['applied']} applied, {counts['skipped']} skipped, "
                   f"{counts['undone']} undone.")
        return summary, _metrics_frame(clicked), _thumbnails(session, clicked)


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` if it holds nothing but the core's lock file."""
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {".lock"}:
        (folder / ".lock").unlink(missing_ok=True)
        folder.rmdir()


def _metrics_frame(clicked: list[dict]) -> pd.DataFrame:
    rows = []
    for click, r in enumerate(clicked, start=1):
        if r["status"] == "applied" and r.get("report"):
            rows.append({"click": click, "metric": "implicit accuracy", "value": r["report"]["accuracy"]})
            rows.append({"click": click, "metric": "loss", "value": r["report"]["loss"]})
    return pd.DataFrame(rows, columns=["click", "metric", "value"])


def _thumbnails(session, clicked: list[dict]) -> list:
    items = []
    for r in reversed(clicked):
        choice = r["choice"]
        best = choice.get("best", (choice.get("ranking") or [None])[0])
        if best is None or r["status"] not in ("applied", "undone"):
            continue
        items.append((str(session.folder.round_dir(r["id"]) / f"image_{best}.png"),
                      f"{r['prompt'][:30]} ({r['status']})"))
        if len(items) == THUMBNAILS:
            break
    return items


def _session_settings(lr, beta, rank) -> dict:
    if lr is None or beta is None or rank is None:
        raise ConfigError("learning rate, β and LoRA rank need a value (Settings)")
    return dict(lr=float(lr), beta=float(beta), lora_rank=int(rank))


def _sampling(steps, guidance, resolution) -> dict:
    if steps is None or guidance is None:
        raise ConfigError("steps and guidance need a value (Settings)")
    sampling = {"steps": int(steps), "guidance": float(guidance)}
    if resolution and str(resolution) != "native":
        try:
            size = int(resolution)
        except ValueError as e:
            raise ConfigError(f"resolution {resolution!r}: use 'native' or a multiple of 8 such as 512") from e
        sampling.update(height=size, width=size)
    return sampling


def _reporter(progress, desc: str):
    """The core's progress(i, total) fed into a gr.Progress bar."""
    return lambda i, total: progress((i, total), desc=desc)


def _describe(session) -> str:
    return (f"Session **{session.folder.root.name}** on `{Path(str(session.meta['model'])).name}`, "
            f"{_plural(session.updates, 'update')}.")


def _plural(k: int, word: str) -> str:
    return f"{k} {word}" if k == 1 else f"{k} {word}s"
