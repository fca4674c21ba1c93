"""The one place the nodes touch their host: ComfyUI, or plain Python (tests, scripts).

    from d3po_studio.nodes import host
    h = host.current()          # ComfyHost inside ComfyUI, else the PlainHost installed with use()
    h.loras_dir(); h.progress(20)(i, 20); h.check_interrupt(); h.send("d3po.pick", {...})
    session = host.live(session)   # a session input that ComfyUI's cache kept: the open one
    h.free_models()             # ComfyUI's own models out of the device before a load or an update

ComfyHost imports ComfyUI's modules (folder_paths, server.PromptServer, comfy.utils,
comfy.model_management) only when a method needs them, so importing this module never needs
ComfyUI. PlainHost is a real implementation on real folders: an interrupt is a
threading.Event, "sending" appends to an in-process event list, and `serve()` exposes the
same pick routes over HTTP with the standard library.

The current host is module-level state on purpose: ComfyUI calls node classmethods with no
context to pass a host in. `comfy_entrypoint` installs a ComfyHost; tests install a PlainHost.
"""
from __future__ import annotations

import contextlib
import json
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import D3POError, ModelLoadError

_current = None
_current_lock = threading.Lock()


class Interrupted(D3POError):
    """The run was interrupted, or the pick was cancelled on the page (PlainHost only;
    in ComfyUI the host raises ComfyUI's own interrupt exception)."""


def use(host) -> None:
    """Install ``host`` as the one the nodes use from now on."""
    global _current
    with _current_lock:
        _current = host


def current():
    """The installed host; a PlainHost under ./d3po-nodes if none was installed."""
    global _current
    with _current_lock:
        if _current is None:
            _current = PlainHost(Path("d3po-nodes").resolve())
        return _current


def live(session):
    """The open Session for a ``session`` input.

    ComfyUI's output cache (``--cache-lru N``, ``--cache-none``, or a graph queued with settings
    it has seen before) can hand a node a Session that the node registry has since closed
    because the Load node's settings changed. A closed Session refuses every call, so nothing
    is written twice; this asks the registry for the session on that folder with the arguments
    the closed one was opened with, which closes the other one (after its updates) and reopens
    the folder from disk, exactly as re-running the Load node would.
    """
    if not session.closed:
        return session
    from . import registry
    return registry.open_session(session.folder.root, **session.open_arguments)


@dataclass
class NodeResult:
    """What PlainHost.output returns: the same fields as ComfyUI's io.NodeOutput."""
    result: tuple
    ui: dict | None = None


# ---------------------------------------------------------------------------- plain Python
@dataclass
class PlainHost:
    """Runs the nodes without ComfyUI, on real folders under ``root``."""
    root: Path
    node: str = "1"                                   # the unique id node_id() reports
    events: list = field(default_factory=list)        # (event, data) sent to "the page"
    _interrupt: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.root = Path(self.root)
        for sub in ("checkpoints", "diffusers", "loras", "d3po", "temp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def checkpoint_names(self) -> list[str]:
        d = self.root / "checkpoints"
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.suffix in (".safetensors", ".ckpt"))

    def checkpoint_path(self, name: str) -> Path:
        path = self.root / "checkpoints" / name
        if not path.is_file():
            raise ModelLoadError(f"checkpoint {name!r} is not in {self.root / 'checkpoints'}; pick one it lists")
        return path

    def diffusers_names(self) -> list[str]:
        return _diffusers_names([self.root / "diffusers"])

    def diffusers_path(self, name: str) -> Path:
        return _diffusers_path([self.root / "diffusers"], name)

    def sessions_dir(self) -> Path:
        return self.root / "d3po"

    def loras_dir(self) -> Path:
        return self.root / "loras"

    def temp_dir(self) -> Path:
        return self.root / "temp"

    def node_id(self) -> str:
        return self.node

    def progress(self, total: int, interruptible: bool = True):
        def report(i: int, n: int = total) -> None:
            self.events.append(("progress", {"value": i, "max": n}))
            if interruptible:
                self.check_interrupt()
        return report

    def training(self):
        return training_mode()

    def free_models(self) -> None:
        """No models of a host to free; recorded so tests can see when the nodes asked."""
        self.events.append(("free_models", {}))

    def interrupt(self) -> None:
        """What ComfyUI's Interrupt button does: the running node stops at its next check."""
        self._interrupt.set()

    def check_interrupt(self) -> None:
        if self._interrupt.is_set():
            self._interrupt.clear()
            raise Interrupted("interrupted")

    def stop_run(self, reason: str) -> None:
        raise Interrupted(reason)

    def send(self, event: str, data: dict) -> None:
        self.events.append((event, data))

    def output(self, *values, ui: dict | None = None) -> NodeResult:
        return NodeResult(tuple(values), ui)

    def serve(self, board, port: int = 0):
        """Serve the pick routes of ``board`` on 127.0.0.1; returns the running server
        (``server.server_address``; stop with ``server.shutdown()``)."""
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from .picks import handle_post

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply(200, board.pending()) if self.path == PICK_ROUTE else self._reply(404, {})

            def do_POST(self):
                if self.path != PICK_ROUTE:
                    return self._reply(404, {})
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    payload = json.loads(raw or b"null")
                except json.JSONDecodeError:
                    return self._reply(400, {"error": "the body must be JSON"})
                self._reply(*handle_post(board, payload))

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server


PICK_ROUTE = "/d3po/pick"


def training_mode():
    """A context where tensors take part in autograd. ComfyUI runs nodes under
    torch.inference_mode(): loading a model whose LoRA will be trained, and training it, must
    leave it (inference tensors cannot be saved for backward nor updated in place outside it)."""
    import torch
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.enable_grad())
    return stack


def _diffusers_names(roots) -> list[str]:
    """Sub-folders of ``roots`` that hold a diffusers pipeline (model_index.json)."""
    return sorted({p.parent.name for r in map(Path, roots) if r.is_dir() for p in r.glob("*/model_index.json")})


def _diffusers_path(roots, name: str) -> Path:
    for root in map(Path, roots):
        if (root / name / "model_index.json").is_file():
            return root / name
    raise ModelLoadError(f"no diffusers folder {name!r} with model_index.json in {[str(r) for r in roots]}")


# ---------------------------------------------------------------------------- ComfyUI
class ComfyHost:
    """ComfyUI's folders, progress bar, interrupt and websocket, imported lazily."""

    def checkpoint_names(self) -> list[str]:
        import folder_paths
        return folder_paths.get_filename_list("checkpoints")

    def checkpoint_path(self, name: str) -> Path:
        import folder_paths
        path = folder_paths.get_full_path("checkpoints", name)
        if path is None:
            raise ModelLoadError(f"checkpoint {name!r} is not in models/checkpoints; pick one it lists")
        return Path(path)

    def diffusers_names(self) -> list[str]:
        import folder_paths
        return _diffusers_names(folder_paths.get_folder_paths("diffusers"))

    def diffusers_path(self, name: str) -> Path:
        import folder_paths
        return _diffusers_path(folder_paths.get_folder_paths("diffusers"), name)

    def sessions_dir(self) -> Path:
        import folder_paths
        return Path(folder_paths.models_dir) / "d3po"

    def loras_dir(self) -> Path:
        import folder_paths
        return Path(folder_paths.get_folder_paths("loras")[0])

    def temp_dir(self) -> Path:
        import folder_paths
        return Path(folder_paths.get_temp_directory())

    def node_id(self) -> str:
        from comfy_execution.utils import get_executing_context
        ctx = get_executing_context()
        return str(ctx.node_id) if ctx is not None else uuid.uuid4().hex

    def progress(self, total: int, interruptible: bool = True):
        """A callback(i, total) driving comfy.utils.ProgressBar. Not interruptible: an interrupt
        during the step is kept and raised at the next check instead of in the middle."""
        import comfy.model_management as mm
        import comfy.utils

        bar = comfy.utils.ProgressBar(total)

        def report(i: int, n: int = total) -> None:
            if interruptible:
                bar.update_absolute(i, n)
                return
            try:
                bar.update_absolute(i, n)
            except mm.InterruptProcessingException:
                mm.interrupt_current_processing(True)   # re-arm: honoured after this step
        return report

    def training(self):
        return training_mode()

    def free_models(self) -> None:
        """Unload ComfyUI's cached models from the device through its own model management (as
        its TrainLoraNode makes room with ``load_models_gpu(memory_required=1e20)``), so a session
        loading its pipeline or training does not sit next to ComfyUI's copy of the checkpoint."""
        import comfy.model_management as mm
        mm.unload_all_models()
        mm.soft_empty_cache()

    def interrupt(self) -> None:
        import comfy.model_management as mm
        mm.interrupt_current_processing(True)

    def check_interrupt(self) -> None:
        import comfy.model_management as mm
        mm.throw_exception_if_processing_interrupted()

    def stop_run(self, reason: str) -> None:
        """End the queued run as ComfyUI's Interrupt button does (no error dialog)."""
        import comfy.model_management as mm
        mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    def send(self, event: str, data: dict) -> None:
        from server import PromptServer
        PromptServer.instance.send_sync(event, data)

    def output(self, *values, ui: dict | None = None):
        from comfy_api.latest import io
        return io.NodeOutput(*values, ui=ui)

    def add_routes(self, board) -> None:
        """Register GET/POST /d3po/pick on ComfyUI's aiohttp server (once per process)."""
        from aiohttp import web
        from server import PromptServer

        from .picks import handle_post

        routes = PromptServer.instance.routes

        @routes.get(PICK_ROUTE)
        async def pending(request):
            return web.json_response(board.pending())

        @routes.post(PICK_ROUTE)
        async def answer(request):
            try:
                payload = await request.json()
            except json.JSONDecodeError:
                return web.json_response({"error": "the body must be JSON"}, status=400)
            status, body = handle_post(board, payload)
            return web.json_response(body, status=status)
