"""The page: layout and event wiring. Logic lives in the core; callbacks.py adapts.

Every event a client may call has a stable ``api_name`` (docs/app.md lists them):
new_session, resume_session, list_sessions, apply_settings, sample, prefer, skip, undo,
history, export, compare.
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..core.config import Settings
from .callbacks import RESOLUTIONS, SEED_MODES, AppConfig, Callbacks

CSS = """
#images img, #choices img, .pixelated img { image-rendering: pixelated; }
#images .thumbnail-item { cursor: pointer; }
#images .thumbnail-item { max-height: 420px; }
#images .thumbnail-item img, #choices .thumbnail-item img { object-fit: contain; }
"""


def _defaults(model: str) -> Settings:
    """Sampling defaults shown before a session is open (the embedded model has its own)."""
    if model == "embedded":
        from ..core.embedded import DEFAULTS
        return Settings(**DEFAULTS)
    return Settings()


def build_app(model: str = "embedded", session=None, sessions_dir=None, export_dir=None,
              registry=None) -> gr.Blocks:
    """The D3PO Studio page for ``model``; ``session`` (a folder) is opened by the first tab."""
    config = AppConfig(model=str(model), sessions_dir=Path(sessions_dir or "d3po-sessions").resolve(),
                       export_dir=Path(export_dir).resolve() if export_dir else None,
                       initial_session=Path(session).resolve() if session else None)
    if registry is not None:
        config.registry = registry
    cb = Callbacks(config)
    d = _defaults(config.model)
    with gr.Blocks(title="D3PO Studio") as demo:
        folder, round_id = gr.State(None), gr.State(None)
        gr.Markdown("# D3PO Studio\nClick the image you prefer; the model learns your taste (D3PO on a LoRA).")
        status = gr.Markdown(elem_id="status")
        with gr.Tab("Steer"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value="a red circle", scale=3, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", scale=2)
            with gr.Row():
                n = gr.Radio([2, 3, 4], value=2, label="Images per round")
                sample_btn = gr.Button("Sample", variant="primary", elem_id="sample")
                none_btn = gr.Button("None is good", elem_id="none")
                undo_btn = gr.Button("Undo last update", elem_id="undo")
            images = gr.Gallery(label="Click the better image", columns=2, allow_preview=False, height="auto",
                                object_fit="contain", elem_id="images", interactive=False)
            best = gr.Number(visible=False, precision=0)
            with gr.Accordion("Settings", open=False, elem_id="settings"):
                with gr.Row():
                    steps = gr.Slider(1, 100, value=d.steps, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(1.0, 20.0, value=d.guidance, step=0.5, label="Guidance")
                    resolution = gr.Dropdown(list(RESOLUTIONS), value="native", allow_custom_value=True,
                                             label="Resolution (px, square)")
                with gr.Row():
                    seed_mode = gr.Radio(list(SEED_MODES), value="new seed", label="Seed for the next round")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                gr.Markdown("Learning rate, β and LoRA rank are session settings: they apply to **New "
                            "session**, or to this session with **Apply** (rank is fixed after the first click).")
                with gr.Row():
                    lr = gr.Number(value=Settings().lr, label="Learning rate")
                    beta = gr.Number(value=Settings().beta, label="β")
                    rank = gr.Slider(1, 64, value=Settings().lora_rank, step=1, label="LoRA rank")
                    apply_btn = gr.Button("Apply to this session")
        with gr.Tab("Compare"):
            with gr.Row():
                cmp_seed = gr.Number(value=0, precision=0, label="Seed")
                scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA strength")
                cmp_btn = gr.Button("Render base and tuned", variant="primary")
            with gr.Row():
                base_img = gr.Image(label="Base (LoRA off)", elem_classes="pixelated", height=320)
                tuned_img = gr.Image(label="Tuned (LoRA at strength)", elem_classes="pixelated", height=320)
        with gr.Tab("History"):
            summary = gr.Markdown("No session open.")
            plot = gr.LinePlot(x="click", y="value", color="metric", title="Update reports",
                               x_title="click", y_title="value")
            choices = gr.Gallery(label="Last choices", columns=8, height=160, allow_preview=False,
                                 elem_id="choices", interactive=False)
            with gr.Row():
                refresh_btn = gr.Button("Refresh")
                undo_btn2 = gr.Button("Undo last update")
        with gr.Tab("Sessions"):
            with gr.Row():
                sessions = gr.Dropdown(cb.session_names(), allow_custom_value=True,
                                       label=f"Sessions in {config.sessions_dir}")
                list_btn = gr.Button("Refresh list")
                resume_btn = gr.Button("Resume", variant="primary")
            with gr.Row():
                new_name = gr.Textbox(label="New session name", placeholder="letters, digits, . _ -")
                new_btn = gr.Button("New session", variant="primary")
        with gr.Tab("Export"):
            with gr.Row():
                export_name = gr.Textbox(value="d3po-lora", label="File name")
                fmt = gr.Radio(["kohya", "diffusers"], value="kohya", label="Format")
                export_btn = gr.Button("Export", variant="primary")
            gr.Markdown("kohya: for ComfyUI, A1111/Forge and diffusers. " + (
                f"Also written to `{config.export_dir}`." if config.export_dir else ""))
            exported = gr.File(label="Download", interactive=False)

        history = [summary, plot, choices]
        session_out = [folder, round_id, images, status, sessions, steps, guidance, *history]
        sampling = [prompt, negative, n, seed_mode, seed, steps, guidance, resolution]
        controls = [sample_btn, none_btn, undo_btn, undo_btn2, apply_btn, new_btn, resume_btn]
        batch_out = [round_id, images, seed, status]

        def lock():
            return [gr.Button(interactive=False)] * len(controls)

        def unlock(shown_seed):
            """Buttons back on; Compare starts from the seed of the images on screen."""
            return *[gr.Button(interactive=True)] * len(controls), shown_seed

        def picked(evt: gr.SelectData):
            return evt.index, *lock()

        sample_btn.click(lock, None, controls, api_visibility="private", queue=False).then(
            cb.sample, [folder, *sampling], [folder, *batch_out], api_name="sample").then(
            unlock, seed, [*controls, cmp_seed], api_visibility="private", queue=False)
        images.select(picked, None, [best, *controls], api_visibility="private", queue=False).then(
            cb.prefer, [folder, round_id, best, *sampling], [*batch_out, *history], api_name="prefer").then(
            unlock, seed, [*controls, cmp_seed], api_visibility="private", queue=False)
        none_btn.click(lock, None, controls, api_visibility="private", queue=False).then(
            cb.skip, [folder, round_id, *sampling], [*batch_out, *history], api_name="skip").then(
            unlock, seed, [*controls, cmp_seed], api_visibility="private", queue=False)
        undo_btn.click(cb.undo, [folder], [status, *history], api_name="undo")
        undo_btn2.click(cb.undo, [folder], [status, *history], api_visibility="private")
        refresh_btn.click(cb.history, [folder], history, api_name="history")
        apply_btn.click(cb.apply_settings, [folder, lr, beta, rank], session_out, api_name="apply_settings")
        new_btn.click(cb.new_session, [new_name, lr, beta, rank], session_out, api_name="new_session")
        resume_btn.click(cb.resume_session, [sessions], session_out, api_name="resume_session")
        list_btn.click(cb.list_sessions, None, sessions, api_name="list_sessions")
        export_btn.click(cb.export, [folder, export_name, fmt], [exported, status], api_name="export")
        cmp_btn.click(cb.compare, [folder, prompt, negative, cmp_seed, scale, steps, guidance, resolution],
                      [base_img, tuned_img], api_name="compare")
        scale.release(cb.compare, [folder, prompt, negative, cmp_seed, scale, steps, guidance, resolution],
                      [base_img, tuned_img], api_visibility="private")
        demo.load(cb.on_load, None, session_out, api_visibility="private")
        demo.unload(cb.on_unload)
    demo.d3po_config = config
    return demo


def launch(model: str = "embedded", session=None, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, sessions_dir=None, export_dir=None, block: bool = True):
    """Build the page and serve it. With ``block=False`` return the running ``gr.Blocks``
    (``.local_url``; stop it with ``.close()``)."""
    demo = build_app(model=model, session=session, sessions_dir=sessions_dir, export_dir=export_dir)
    config = demo.d3po_config
    config.sessions_dir.mkdir(parents=True, exist_ok=True)
    allowed = [config.sessions_dir]
    if config.export_dir is not None:
        config.export_dir.mkdir(parents=True, exist_ok=True)
        allowed.append(config.export_dir)
    if config.initial_session is not None:
        allowed.append(config.initial_session)
    demo.queue(default_concurrency_limit=4)
    try:
        demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(p) for p in allowed],
                    prevent_thread_lock=not block, css=CSS, show_error=True, inbrowser=False)
    finally:
        if block:
            config.registry.close_all()
    return demo
