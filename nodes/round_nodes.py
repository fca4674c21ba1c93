"""Nodes of one steering round: Sample -> Pick -> Update.

Each class is a ComfyUI V3 node without its base class (nodes/__init__.py adds
io.ComfyNode), so `execute` can be called directly without ComfyUI. All three re-run on
every queue (fingerprint NaN): every queue is a new round.
"""
from __future__ import annotations

from ..core.errors import ConfigError
from ..core.runtime import measure_memory
from . import host, picks, registry
from .convert import images_to_tensor, report_text, save_previews
from .session_nodes import CATEGORY, _session_input, _session_output, session_lora_name, write_lora

PICK_EVENT = "d3po.pick"        # websocket event that shows a round in the Pick node
DEFAULT_PROMPT = "a red circle on a white background"   # inside the embedded model's vocabulary
PICK_MODES = ("click", "index", "none")


class SampleRound:
    @classmethod
    def define_schema(cls):
        from comfy_api.latest import io
        return io.Schema(
            node_id="D3POSample", display_name="D3PO Sample", category=CATEGORY,
            description="Sample n images of one prompt from one shared starting noise, with the "
                        "session's current LoRA. They differ only by the sampler's fresh noise.",
            inputs=[
                _session_input(io),
                io.String.Input("prompt", multiline=True, default=DEFAULT_PROMPT,
                                tooltip="What to draw. The embedded model knows only the words listed in "
                                        "D3PO Load Session's checkpoint tooltip."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="What to avoid (empty = plain classifier-free guidance)."),
                io.Int.Input("n", default=2, min=2, max=16,
                             tooltip="Images to compare (2 or more). The pick beats each other image, so "
                                     "4 teaches more per click than 2 (docs/settings.md)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Seed of the shared starting noise."),
                io.Int.Input("steps", default=0, min=0, max=200,
                             tooltip="DDIM steps; 0 = the session's setting."),
                io.Float.Input("guidance", default=0.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance scale; 0 = the session's setting."),
                io.Int.Input("width", default=0, min=0, max=4096, step=8,
                             tooltip="Width in px (multiple of 8); 0 = the model's native size."),
                io.Int.Input("height", default=0, min=0, max=4096, step=8,
                             tooltip="Height in px (multiple of 8); 0 = the model's native size."),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="The round's images, to preview or save."),
                     io.Custom("D3PO_ROUND").Output(display_name="round",
                                                    tooltip="The batch waiting for a pick.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")

    @classmethod
    def execute(cls, session, prompt, negative_prompt, n, seed, steps, guidance, width, height):
        h = host.current()
        session = host.live(session)     # ComfyUI's cache may hand back a closed session
        overrides = {k: v for k, v in (("steps", steps), ("guidance", guidance), ("width", width),
                                        ("height", height)) if v}
        total = overrides.get("steps", session.settings.steps)
        h.check_interrupt()
        batch = session.sample(prompt, n=n, seed=seed, negative_prompt=negative_prompt,
                               progress=h.progress(total), **overrides)
        return h.output(images_to_tensor(batch.images), registry.Round(session, batch.id, batch.n))


class PickImage:
    @classmethod
    def define_schema(cls):
        from comfy_api.latest import io
        return io.Schema(
            node_id="D3POPick", display_name="D3PO Pick", category=CATEGORY,
            description="Shows the round's images in this node and waits until you click the one you "
                        "prefer (or None / Cancel). Modes 'index' and 'none' answer without waiting, "
                        "for API-driven graphs.",
            inputs=[
                io.Custom("D3PO_ROUND").Input("round", tooltip="The round from D3PO Sample."),
                io.Combo.Input("mode", options=list(PICK_MODES), default="click",
                               tooltip="click: wait for a click on the page; index: take the index below; "
                                       "none: 'none is better' (logged, nothing trained)."),
                io.Int.Input("index", default=0, min=0, max=15,
                             tooltip="The picked image in mode 'index' (0 = first)."),
                io.Int.Input("timeout_s", default=0, min=0, max=7 * 24 * 3600, optional=True,
                             tooltip="Mode 'click': stop this run with an error after this many seconds "
                                     "without a pick, so the queue moves on (0 = wait without limit)."),
            ],
            outputs=[io.Custom("D3PO_PICK").Output(display_name="pick", tooltip="The answer with its round and "
                                                                             "session: connect to D3PO Update LoRA."),
                     io.Image.Output(display_name="picked", tooltip="The picked image (the first if none)."),
                     io.Int.Output(display_name="index", tooltip="The picked index, -1 for none.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")

    @classmethod
    def execute(cls, round, mode, index, timeout_s=0):
        h = host.current()
        batch = round.session.batch(round.batch_id)
        refs = save_previews(batch.images, h.temp_dir(), f"pick_{round.batch_id}")
        if mode == "click":
            answer = _wait_for_click(h, round, refs, timeout_s)
        elif mode == "index":
            answer = picks.Answer(index=index)
        elif mode == "none":
            answer = picks.Answer(none=True)
        else:
            raise ConfigError(f"mode={mode!r}: use one of {PICK_MODES}")
        if answer.index is not None and not 0 <= answer.index < round.n:
            raise ConfigError(f"index={answer.index} is out of range: the round has {round.n} images (0-{round.n - 1})")
        chosen = batch.images[answer.index if answer.index is not None else 0]
        pick = registry.Pick(round, answer.index, none=answer.none)
        return h.output(pick, images_to_tensor([chosen]), -1 if answer.none else answer.index,
                        ui={"images": refs})


def _wait_for_click(h, round, refs, timeout_s: float = 0) -> picks.Answer:
    node = h.node_id()
    with picks.BOARD.waiting(node, {"round": round.batch_id, "n": round.n, "images": refs}) as result:
        h.send(PICK_EVENT, {"node": node, "round": round.batch_id, "images": refs})   # after registering
        answer = result(h.check_interrupt, timeout_s)
    if answer.cancel:
        h.stop_run("pick cancelled on the page")
    return answer


class UpdateLora:
    @classmethod
    def define_schema(cls):
        from comfy_api.latest import io
        return io.Schema(
            node_id="D3POUpdate", display_name="D3PO Update LoRA", category=CATEGORY, is_output_node=True,
            description="One D3PO update of the session's LoRA from the pick (the picked image beats each "
                        "other one), then writes the session's LoRA: loras/d3po/<session>.safetensors "
                        "(embedded model: loras/d3po-embedded/<session>.embedded.safetensors).",
            inputs=[io.Custom("D3PO_PICK").Input("pick", tooltip="The answer from D3PO Pick; it carries its "
                                                                   "round and session.")],
            outputs=[_session_output(io),
                     io.AnyType.Output(display_name="lora_name",
                                       tooltip="The session's LoRA under models/loras: connect to LoraLoader's "
                                               "lora_name to preview the tuned model."),
                     io.String.Output(display_name="report", tooltip="The update report (JSON): loss, "
                                                                      "accuracy, log-ratios, seconds, updates, and "
                                                                      "this update's peak and added memory.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")

    @classmethod
    def execute(cls, pick):
        h = host.current()
        session = host.live(pick.round.session)
        h.check_interrupt()
        h.free_models()
        with h.training():
            if pick.none:
                report = session.prefer(pick.round.batch_id, none=True)
            else:
                with measure_memory(session.runtime.device) as memory:   # this update's, not the process's
                    report = session.prefer(pick.round.batch_id, best=pick.index,
                                            progress=h.progress(1, interruptible=False))
                report = {**report, **memory()}
        name = write_lora(h, session, session_lora_name(session))
        h.check_interrupt()     # an interrupt during the update is honoured once it is complete
        return h.output(session, name, report_text(report), ui={"text": [report_text(report)]})

