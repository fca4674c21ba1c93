"""Nodes that open a session and manage its LoRA: Load, Undo, Export.

Each class is a ComfyUI V3 node without its base class (nodes/__init__.py adds
io.ComfyNode), so `execute` can be called directly without ComfyUI.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..core.config import DTYPES, OPTIMIZERS, Settings
from ..core.embedded import vocabulary_text
from ..core.errors import ConfigError
from . import host, registry

CATEGORY = "D3PO Studio"
DIFFUSERS_PREFIX = "diffusers:"
_SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# LoRAs of the embedded model fit no real checkpoint: their own folder and name in LoraLoader's list.
LORA_FOLDER, EMBEDDED_LORA_FOLDER, EMBEDDED_LORA_SUFFIX = "d3po", "d3po-embedded", ".embedded"
SESSION_TOOLTIP = "The D3PO session (model, LoRA, optimizer, rounds); connect it to the next D3PO node."


def model_choices(h) -> list[str]:
    """What the Load node offers: the embedded model, checkpoint files, diffusers folders."""
    return ["embedded", *h.checkpoint_names(), *(DIFFUSERS_PREFIX + n for n in h.diffusers_names())]


def resolve_model(h, choice: str) -> str:
    if choice == "embedded":
        return choice
    if choice.startswith(DIFFUSERS_PREFIX):
        return str(h.diffusers_path(choice[len(DIFFUSERS_PREFIX):]))
    return str(h.checkpoint_path(choice))


def session_lora_name(session, tag: str = "") -> str:
    """The file (relative to the loras folder) named after the session: its current LoRA, or
    with ``tag`` another file of it. Embedded-model sessions get their own folder and suffix."""
    stem = session.folder.root.name + tag
    if session.meta["model"] == "embedded":
        return f"{EMBEDDED_LORA_FOLDER}/{stem}{EMBEDDED_LORA_SUFFIX}.safetensors"
    return f"{LORA_FOLDER}/{stem}.safetensors"


def export_name(session, file_name: str) -> str:
    """Save LoRA's file: ``file_name`` under models/loras, or by default named after the session."""
    if not file_name.strip():
        return session_lora_name(session, tag="-saved")
    return f"{Path(file_name).as_posix().removesuffix('.safetensors')}.safetensors"


def write_lora(h, session, name: str, format: str = "kohya") -> str:
    """Export the session's LoRA as loras/<name>; returns ``name`` as LoraLoader lists it."""
    loras = h.loras_dir().resolve()
    path = (loras / name).resolve()
    if loras not in path.parents or path.suffix != ".safetensors":
        raise ConfigError(f"LoRA file name {name!r} must end in .safetensors and stay inside {loras}")
    path.parent.mkdir(parents=True, exist_ok=True)
    session.export_lora(path, format=format)
    return path.relative_to(loras).as_posix()


def _info(session) -> str:
    info = session.info()
    return json.dumps({k: info[k] for k in ("folder", "model", "family", "updates", "notes")})


def _session_input(io):
    return io.Custom("D3PO_SESSION").Input("session", tooltip="A D3PO session from D3PO Load Session.")


def _session_output(io):
    return io.Custom("D3PO_SESSION").Output(display_name="session", tooltip=SESSION_TOOLTIP)


class LoadSession:
    @classmethod
    def define_schema(cls):
        from comfy_api.latest import io
        return io.Schema(
            node_id="D3POLoadSession", display_name="D3PO Load Session", category=CATEGORY,
            description="Open (or resume from disk) a D3PO steering session on a base model. The session "
                        "stays open across queue runs; its folder is models/d3po/<session_name>.",
            inputs=[
                io.Combo.Input("checkpoint", options=model_choices(host.current()), default="embedded",
                               tooltip="Base model: the small embedded model, a file from models/checkpoints, "
                                       "or a diffusers folder from models/diffusers. The embedded model draws "
                                       "one flat shape on a flat background and knows only these words: "
                                       + vocabulary_text()),
                io.String.Input("session_name", default="my-session",
                                tooltip="Folder name under models/d3po. The same name resumes the session; "
                                        "the LoRA is written to loras/d3po/<session_name>.safetensors "
                                        "(embedded model: loras/d3po-embedded/<session_name>.embedded"
                                        ".safetensors, apart from the LoRAs of real checkpoints)."),
                io.Float.Input("lr", default=Settings().lr, min=1e-6, max=1.0, step=1e-4,
                               tooltip="Learning rate of the LoRA optimizer. With the default update it does not "
                                       "set how far a click moves the model: the trust region and the "
                                       "clicks' agreement do (docs/settings.md)."),
                io.Float.Input("beta", default=Settings().beta, min=1e-4, max=100.0, step=0.01,
                               tooltip="Inverse temperature of the preference loss. It sets how far the clicks can "
                                       "pull the model from the base: lower steers further, higher (e.g. 0.3) keeps "
                                       "the prompts' colours closer (docs/settings.md)."),
                io.Int.Input("lora_rank", default=4, min=1, max=128,
                             tooltip="LoRA rank (fixed after the first update)."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto",
                               tooltip="Precision of the frozen weights (auto = fp16 on GPU, bf16 on CPU)."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="auto",
                               tooltip="auto = 8-bit AdamW where bitsandbytes runs, else AdamW "
                                       "(fixed after the first update)."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in the update: less memory, more time."),
            ],
            outputs=[_session_output(io),
                     io.String.Output(display_name="info", tooltip="Folder, model, family, updates.")],
        )

    @classmethod
    def execute(cls, checkpoint, session_name, lr, beta, lora_rank, dtype, optimizer, gradient_checkpointing):
        h = host.current()
        if not _SESSION_NAME.match(session_name or ""):
            raise ConfigError(f"session_name {session_name!r}: use letters, digits, '-', '_' or '.', "
                              "starting with a letter or digit (it names a folder)")
        with h.training():   # the LoRA and optimizer state must be ordinary (autograd) tensors
            h.free_models()
            session = registry.open_session(
                h.sessions_dir() / session_name, model=resolve_model(h, checkpoint), lr=lr, beta=beta,
                lora_rank=lora_rank, lora_alpha=float(lora_rank), dtype=dtype, optimizer=optimizer,
                gradient_checkpointing=gradient_checkpointing)
        return h.output(session, _info(session))


class UndoUpdate:
    @classmethod
    def define_schema(cls):
        from comfy_api.latest import io
        return io.Schema(
            node_id="D3POUndo", display_name="D3PO Undo", category=CATEGORY, is_output_node=True,
            description="Take back the last D3PO update (bit-exact); runs on every queue. Shows what was "
                        "undone in the node.",
            inputs=[_session_input(io)],
            outputs=[_session_output(io),
                     io.AnyType.Output(display_name="lora_name",
                                       tooltip="The session's LoRA file, rewritten after the undo."),
                     io.String.Output(display_name="info", tooltip="What was undone and the updates left (JSON).")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")

    @classmethod
    def execute(cls, session):
        h = host.current()
        session = host.live(session)     # ComfyUI's cache may hand back a closed session
        with h.training():
            result = session.undo()
        name = write_lora(h, session, session_lora_name(session))
        return h.output(session, name, json.dumps(result), ui={"text": [undo_text(session, result)]})


def undo_text(session, result: dict) -> str:
    """What the Undo node shows: the prompt of the undone round and what is left."""
    prompt = session.folder.read_round(result["undone_round"]).get("prompt", "")
    left = result["updates"]
    return (f"Undid the update from the pick on {prompt!r}. The LoRA is back to "
            f"{left} update{'s' if left != 1 else ''}.")


class ExportLora:
    @classmethod
    def define_schema(cls):
        from comfy_api.latest import io
        return io.Schema(
            node_id="D3POExportLora", display_name="D3PO Save LoRA", category=CATEGORY, is_output_node=True,
            description="Write the session's LoRA into models/loras (kohya format loads in the stock "
                        "LoraLoader, A1111 and Forge).",
            inputs=[
                _session_input(io),
                io.String.Input("file_name", default="",
                                tooltip="Path under models/loras, without .safetensors. Empty = named after the "
                                        "session: d3po/<session>-saved (embedded model: "
                                        "d3po-embedded/<session>-saved.embedded)."),
                io.Combo.Input("format", options=["kohya", "diffusers"], default="kohya",
                               tooltip="kohya: lora_unet_* keys with alpha (ComfyUI, A1111, Forge, diffusers); "
                                       "diffusers: keys for diffusers' load_lora_weights."),
            ],
            outputs=[io.AnyType.Output(display_name="lora_name",
                                       tooltip="The written file as LoraLoader lists it.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")

    @classmethod
    def execute(cls, session, file_name, format):
        h = host.current()
        session = host.live(session)     # ComfyUI's cache may hand back a closed session
        name = write_lora(h, session, export_name(session, file_name), format)
        return h.output(name, ui={"text": [name]})
