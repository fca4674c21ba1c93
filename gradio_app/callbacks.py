"""Gradio callbacks: thin adapters from widget values to ``Session`` calls and back.

Each tab keeps only its session folder (``gr.State``) and the id of the round on screen; the
open ``Session`` objects live in ``registry.REGISTRY``, owned by the tab's ``session_hash``.
Every error a user can cause (D3POError, out of memory, disk full) becomes a ``gr.Error``
message in the page and one line in the server log (no traceback: those are kept for real
faults); the server keeps running and the session folder stays consistent. What the page says
is composed in views.py; numbers typed in the page are checked by inputs.py.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch

from ..core.errors import Cancelled, ConfigError, D3POError, SessionError
from ..core.storage import SessionFolder
from . import views
from .cancel import CancelFlags, stop_updates, stop_when
from ..core.inputs import parse_count, parse_finite, parse_seed
from .paths import child, export_file_name, new_run_folder, sessions_home
from .registry import REGISTRY, SessionRegistry

log = logging.getLogger("d3po_studio.app")

SEED_MODES = ("new seed", "same seed")
THUMBNAILS = 8


@dataclass
class AppConfig:
    """What the app was launched with; every callback reads it, none changes it."""
    model: str = "embedded"               # anything Session.open loads
    sessions_dir: Path = field(default_factory=sessions_home)
    export_dir: Path | None = None        # extra folder exported LoRAs are also written to
    initial_session: Path | None = None   # --session: opened by the first tab that loads
    registry: SessionRegistry = field(default_factory=lambda: REGISTRY)


def _page_error(message: str) -> gr.Error:
    """A message for the page; the server log gets one line, no traceback."""
    log.warning("%s", message)
    return gr.Error(message, print_exception=False)


def shown_errors(fn):
    """Turn the errors a user can cause into a message in the page (gr.Error); a Cancel
    leaves the page as the Cancel button set it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Cancelled:
            log.info("%s cancelled by the user", fn.__name__)
            return gr.skip()
        except D3POError as e:
            raise _page_error(f"{type(e).__name__}: {e}") from None
        except (torch.OutOfMemoryError, MemoryError) as e:
            raise _page_error("Out of memory: nothing was changed. Use fewer images, a smaller "
                              "resolution or fewer steps.") from None
        except OSError as e:
            raise _page_error(f"Could not read or write a file ({e}); free disk space or check "
                              "permissions, then try again. The session folder is unchanged.") from None
    return wrapper


class Callbacks:
    """The app's event handlers, bound to one AppConfig."""

    def __init__(self, config: AppConfig):
        self.config = config
        self.registry = config.registry
        self.cancels = CancelFlags()

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
        session = self._open(folder, request, _session_settings(lr, beta, rank))
        return self._session_outputs(session, f"New session **{folder.name}** on "
                                              f"{views.model_name(session.meta['model'])}. Press **Sample**.")

    @shown_errors
    def resume_session(self, name, request: gr.Request):
        folder = child(self.config.sessions_dir, name, "session name")
        if not SessionFolder(folder).exists():
            raise ConfigError(f"there is no session {folder.name!r} in {self.config.sessions_dir}")
        return self._session_outputs(self._open(folder, request, {}), _resumed(folder))

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
        return self._session_outputs(session, _resumed(folder))

    def on_unload(self, request: gr.Request):
        """Tab closed: its session closes (after learning the clicks already made)."""
        self.registry.close_owner(request.session_hash)

    # ------------------------------------------------------------- sample
    @shown_errors
    def sample(self, folder, prompt, negative, n, seed_mode, seed, steps, guidance, resolution,
               request: gr.Request, progress=gr.Progress()):
        """folder, round, gallery, seed, status, sessions list, resolution menu."""
        sampling = _sampling(steps, guidance, resolution)          # checked before a session is made
        seed = _round_seed(seed_mode, seed)
        with self.cancels.running(request.session_hash) as flag:
            session, created = self._session_or_new(folder, request)
            menus = self._new_session_menus(session) if created else (gr.skip(), gr.skip())
            try:
                with stop_when(flag, session.pipe.unet):
                    batch = self._sample(session, prompt, negative, n, seed, sampling, progress)
            except Cancelled:              # the tab keeps the session it just got
                return (str(session.folder.root), None, gr.Gallery(value=[]), gr.skip(), gr.skip(), *menus)
        note = (f"Started session **{session.folder.root.name}** on {views.model_name(session.meta['model'])}."
                if created else "")
        return (str(session.folder.root), batch.id, *self._batch_outputs(session, batch, note), *menus)

    @shown_errors
    def prefer(self, folder, round_id, best, prompt, negative, n, seed_mode, seed, steps, guidance,
               resolution, request: gr.Request, progress=gr.Progress()):
        """The click: its update is queued (it runs in the background), the next images are
        sampled at once; ``poll`` reports the update when it is done."""
        session = self.registry.get(folder, request.session_hash)
        if not round_id:
            raise ConfigError("no images are shown: press Sample first")
        sampling = _sampling(steps, guidance, resolution, _native(session))
        seed = _round_seed(seed_mode, seed)
        session.prefer(round_id, best=parse_count(best, "best (the number of the image you prefer, from 0)", 0),
                       wait=False,
                       progress=stop_updates(self.cancels.update_flag(request.session_hash, session)))
        note = f"Click {_clicks(session)} saved; the model learns from it while you look at the next images."
        try:
            with self.cancels.running(request.session_hash) as flag, stop_when(flag, session.pipe.unet):
                batch = self._sample(session, prompt, negative, n, seed, sampling, progress)
        except Cancelled:                  # the update goes on; only the next images were cancelled
            return (None, gr.Gallery(value=[], selected_index=None), gr.skip(),
                    f"{note} The next images were cancelled: press **Sample**.", *self._history_outputs(session),
                    gr.Timer(active=True))
        return (batch.id, *self._batch_outputs(session, batch, note), *self._history_outputs(session),
                gr.Timer(active=True))

    def poll(self, folder, shown_seed, request: gr.Request):
        """Timer tick while updates run: progress line; when all are done, what they taught
        (status and history) and the timer off. Outputs: progress, status, history (3), timer."""
        unchanged = (gr.skip(),) * 4
        try:
            session = self.registry.get(folder, request.session_hash)
        except SessionError:                     # the tab's session was closed: nothing to watch
            return ("", *unchanged, gr.Timer(active=False))
        pending = session.pending()
        try:
            if pending["queued"] or pending["running"]:
                raise TimeoutError
            done = session.wait(timeout=0)
        except TimeoutError:                     # still learning (or a click was queued just now)
            return (views.busy_note(pending, _click_numbers(session)), *unchanged, gr.skip())
        if not done:
            return ("", *unchanged, gr.Timer(active=False))
        status = f"{views.updates_note(done, _click_numbers(session), session.updates)} {views.ask(shown_seed)}"
        return ("", status, *self._history_outputs(session), gr.Timer(active=False))

    @shown_errors
    def skip(self, folder, round_id, prompt, negative, n, seed_mode, seed, steps, guidance, resolution,
             request: gr.Request, progress=gr.Progress()):
        """"None is good": logged in the session, nothing trained, next images."""
        session = self.registry.get(folder, request.session_hash)
        if not round_id:
            raise ConfigError("no images are shown: press Sample first")
        sampling = _sampling(steps, guidance, resolution, _native(session))
        seed = _round_seed(seed_mode, seed)
        session.prefer(round_id, none=True)
        with self.cancels.running(request.session_hash) as flag, stop_when(flag, session.pipe.unet):
            batch = self._sample(session, prompt, negative, n, seed, sampling, progress)
        note = "Skipped: nothing was learned from those images."
        return (batch.id, *self._batch_outputs(session, batch, note), *self._history_outputs(session))

    def cancel(self, request: gr.Request):
        """Cancel: the tab's sample or compare stops at its next step (also while its session is
        still opening); its queued and running updates are cancelled (rolled back; those clicks
        stay in the log as cancelled). Answers at once."""
        action, session = self.cancels.cancel(request.session_hash)
        updates = _pending_updates(session)
        if not action and not updates:
            return "Nothing is running."
        said = ["**Cancelled.**"]
        if action:
            said.append("The running sample or comparison stops within one step; nothing from it is kept.")
        if updates:
            said.append(f"{views.plural(updates, 'click')} still waiting to be learned will not be: "
                        "the model stays as it was before them.")
        return " ".join(said)

    # ------------------------------------------------- history, undo, export
    @shown_errors
    def undo(self, folder, request: gr.Request):
        session = self.registry.get(folder, request.session_hash)
        result = session.undo()
        note = views.undo_note(session.folder.read_round(result["undone_round"]), result["updates"])
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
        note = f"Exported the {fmt} LoRA ({views.plural(session.updates, 'learned click')}): `{path.name}`."
        if self.config.export_dir is not None:
            copy = session.export_lora(child(self.config.export_dir, file_name, "export file name"), format=fmt)
            note += f" Also written to `{copy}`."
        return str(path), note

    @shown_errors
    def compare(self, folder, prompt, negative, seed, scale, steps, guidance, resolution, request: gr.Request):
        """base image, tuned image, caption: the same prompt and noise, LoRA off and on."""
        seed = parse_seed(seed, "Compare seed")          # the user's numbers first: a message whatever the session
        scale = parse_finite(scale, "LoRA strength", 0.0, 2.0)
        session = self.registry.get(folder, request.session_hash)
        sampling = _sampling(steps, guidance, resolution, _native(session))
        with self.cancels.running(request.session_hash) as flag, stop_when(flag, session.pipe.unet):
            base = session.render(prompt or "", seed, scale=0.0, negative_prompt=negative or "", **sampling)[0]
            tuned = session.render(prompt or "", seed, scale=scale, negative_prompt=negative or "", **sampling)[0]
        caption = views.compare_caption(prompt or "", negative or "", seed, scale, base.width, session.updates)
        return views.enlarged(base), views.enlarged(tuned), caption

    # ------------------------------------------------------------ helpers
    def _load(self, folder: Path, settings: dict):
        from ..core.session import Session
        sf = SessionFolder(folder)
        model = sf.read_meta()["model"] if sf.exists() else self.config.model
        return Session.open(folder, model=model, **settings)

    def _open(self, folder: Path, request: gr.Request, settings: dict, new: bool | None = None):
        new = not folder.exists() if new is None else new
        try:
            return self.registry.open(folder, request.session_hash, lambda f: self._load(f, settings))
        except D3POError:
            if new:
                _remove_if_empty(folder)     # a session that never opened leaves no folder behind
            raise

    def _session_or_new(self, folder, request: gr.Request):
        """This tab's session, or a new one with a name no other tab can get: (session, created)."""
        if folder and self.registry.holds(folder, request.session_hash):   # reopened if closed for idleness
            return self.registry.get(folder, request.session_hash), False
        fresh = new_run_folder(self.config.sessions_dir, "session")
        return self._open(fresh, request, {}, new=True), True

    def _sample(self, session, prompt, negative, n, seed, sampling: dict, progress):
        _check_size(sampling, _native(session))
        return session.sample(prompt or "", n=parse_count(n, "images per round", 2, 4), seed=seed,
                              negative_prompt=negative or "", progress=_reporter(progress, "sampling"), **sampling)

    def _batch_outputs(self, session, batch, note: str):
        """gallery (nothing pre-selected), seed, status for a freshly sampled batch."""
        rdir = session.folder.round_dir(batch.id)
        items = [(str(rdir / f"image_{i}.png"), f"#{i + 1}") for i in range(batch.n)]
        status = f"{note} {views.ask(batch.seed)}".strip()
        # before this batch's update runs: does a click at the size just chosen fit the GPU?
        warning = session.memory_warning(batch.n, batch.sampling.get("height"), batch.sampling.get("width"))
        if warning:
            status = f"**GPU memory:** {warning} {status}"
        return (gr.Gallery(value=items, columns=batch.n, selected_index=None), batch.seed, status)

    def _new_session_menus(self, session):
        """sessions list (with this one chosen), resolution menu for this model."""
        return (gr.Dropdown(choices=self.session_names(), value=session.folder.root.name),
                gr.Dropdown(choices=views.resolution_choices(_native(session))))

    def _session_outputs(self, session, note: str):
        """folder, round, gallery, status, sessions list, resolution, steps, guidance, history (3)."""
        s = session.settings
        return (str(session.folder.root), None, gr.Gallery(value=[], selected_index=None), note,
                *self._new_session_menus(session), s.steps, s.guidance, *self._history_outputs(session))

    def _empty_outputs(self, note: str):
        return (None, None, gr.Gallery(value=[]), note, gr.Dropdown(choices=self.session_names()),
                gr.skip(), gr.skip(), gr.skip(), "No session open.", None, [])

    def _history_outputs(self, session):
        """summary, learning-curve figure, thumbnails of the last choices."""
        rounds = session.history()
        clicked = [r for r in rounds if r.get("choice")]
        counts = {st: sum(r["status"] == st for r in clicked) for st in ("applied", "skipped", "undone")}
        rows = views.learning_rows(rounds)
        summary = (f"**{views.plural(len(clicked), 'click')}** — {views.plural(session.updates, 'update')} in the "
                   f"LoRA now; {counts['applied']} applied, {counts['skipped']} skipped, "
                   f"{counts['undone']} undone. {views.leaning_sentence(rows)}")
        return (summary, views.learning_figure(rows),
                views.chosen_images(clicked, session.folder.round_dir, THUMBNAILS))


def _pending_updates(session) -> int:
    """Updates queued or running on ``session`` (0 for None or a closed one)."""
    try:
        pending = session.pending() if session is not None else None
    except SessionError:
        return 0
    return pending["queued"] + (pending["running"] is not None) if pending else 0


def _resumed(folder: Path) -> str:
    return f"Resumed session **{folder.name}**. Press **Sample**."


def _clicks(session) -> int:
    return sum(1 for r in session.history() if r.get("choice"))


def _click_numbers(session) -> dict[str, int]:
    """Round id → click number (1 = the session's first click)."""
    return {r["id"]: k for k, r in enumerate((r for r in session.history() if r.get("choice")), start=1)}


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` if it holds nothing but the core's lock file."""
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= {".lock"}:
        (folder / ".lock").unlink(missing_ok=True)
        folder.rmdir()


def _session_settings(lr, beta, rank) -> dict:
    return dict(lr=parse_finite(lr, "learning rate", 1e-7, 1.0), beta=parse_finite(beta, "β", 1e-4, 100.0),
                lora_rank=parse_count(rank, "LoRA rank", 1, 64))


def _round_seed(seed_mode, seed) -> int | None:
    """The seed of the next round: the typed one in "same seed" mode, else None (a new one)."""
    return parse_seed(seed, "Seed") if seed_mode == "same seed" else None


def _native(session) -> int:
    """The side in px the session's model was trained at."""
    pipe = session.pipe
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def _sampling(steps, guidance, resolution, native: int | None = None) -> dict:
    sampling = {"steps": parse_count(steps, "steps", 1, 1000), "guidance": parse_finite(guidance, "guidance", 1.0, 50.0)}
    if resolution and str(resolution) != "native":
        try:
            size = int(resolution)
        except ValueError as e:
            raise ConfigError(f"resolution {resolution!r}: use 'native' or a multiple of 8 such as 512") from e
        sampling.update(height=size, width=size)
    _check_size(sampling, native)
    return sampling


def _check_size(sampling: dict, native: int | None) -> None:
    """Refuse sizes far beyond what the model was trained at (minutes per image, no better images)."""
    largest = views.largest_size(native)
    size = sampling.get("height")
    if size is not None and largest is not None and size > largest:
        raise ConfigError(f"resolution {size} px is more than twice this model's native {native} px: it would "
                          f"take at least {(size / native) ** 2:.0f}x the time and the model was not trained "
                          f"for it; use {largest} px or less")


def _reporter(progress, desc: str):
    """The core's progress(i, total) fed into a gr.Progress bar."""
    return lambda i, total: progress((i, total), desc=desc)
