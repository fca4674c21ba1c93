"""The page: layout and event wiring. Logic lives in the core; callbacks.py adapts.

Every event a client may call has a stable ``api_name`` (docs/app.md lists them):
new_session, resume_session, list_sessions, apply_settings, sample, prefer, skip, undo,
history, export, compare, cancel.
"""
from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path

import gradio as gr

from ..core.config import Settings
from .callbacks import SEED_MODES, AppConfig, Callbacks
from .paths import sessions_home
from .views import resolution_choices

log = logging.getLogger("d3po_studio.app")

CSS = """
#images img, #choices img, .pixelated img { image-rendering: pixelated; }
#images .thumbnail-item { cursor: pointer; }
#images .thumbnail-item { max-height: 420px; }
#images .thumbnail-item img, #choices .thumbnail-item img { object-fit: contain; }
#progress { min-height: 2.2em; }
#choices .grid-container { grid-template-columns: repeat(auto-fill, 120px) !important;
                           grid-template-rows: none !important; grid-auto-rows: 120px !important; }
#compare-caption { min-height: 1.5em; }
"""


def _defaults(model: str) -> Settings:
    """Sampling defaults shown before a session is open (the embedded model has its own)."""
    if model == "embedded":
        from ..core.embedded import DEFAULTS
        return Settings(**DEFAULTS)
    return Settings()


def _native_size(model: str) -> int | None:
    """The model's native side in px where it is known before loading (else None)."""
    if model == "embedded":
        from ..core.embedded import DEFAULTS
        return DEFAULTS["height"]
    return None


def build_app(model: str = "embedded", session=None, sessions_dir=None, export_dir=None,
              registry=None) -> gr.Blocks:
    """The D3PO Studio page for ``model``; ``session`` (a folder) is opened by the first tab.
    ``sessions_dir`` defaults to the sessions folder of the user data directory (paths.py)."""
    config = AppConfig(model=str(model), sessions_dir=Path(sessions_dir or sessions_home()).resolve(),
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
                n = gr.Radio([2, 3, 4], value=4, label="Images per round")
                sample_btn = gr.Button("Sample", variant="primary", elem_id="sample")
                none_btn = gr.Button("None is good", elem_id="none")
                undo_btn = gr.Button("Undo last update", elem_id="undo")
                cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
            busy = gr.Markdown(elem_id="progress")       # progress shows here, not over the images or status
            learning = gr.Timer(0.5, active=False)       # ticks while clicks are learned in the background
            images = gr.Gallery(label="Click the better image", columns=2, allow_preview=False, height="auto",
                                object_fit="contain", elem_id="images", interactive=False)
            best = gr.Number(visible=False, precision=0)
            with gr.Accordion("Settings", open=False, elem_id="settings"):
                with gr.Row():
                    steps = gr.Slider(1, 100, value=d.steps, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(1.0, 20.0, value=d.guidance, step=0.5, label="Guidance")
                    resolution = gr.Dropdown(resolution_choices(_native_size(config.model)), value="native",
                                             allow_custom_value=True, label="Resolution (px, square)",
                                             elem_id="resolution",
                                             info="the model's own size is fastest and best; larger sizes cost "
                                                  "at least (size / native)² the time")
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
                cmp_btn = gr.Button("Render base and tuned", variant="primary", elem_id="compare")
                cmp_cancel = gr.Button("Cancel", variant="stop")
            caption = gr.Markdown("The prompt of the Steer tab, rendered from the same noise with the LoRA off "
                                  "and on.", elem_id="compare-caption")
            with gr.Row():
                base_img = gr.Image(label="Base model (LoRA off)", elem_classes="pixelated", elem_id="base",
                                    format="png")
                tuned_img = gr.Image(label="Tuned (LoRA at the strength above)", elem_classes="pixelated",
                                     elem_id="tuned", format="png")
        with gr.Tab("History"):
            summary = gr.Markdown("No session open.", elem_id="summary")
            plot = gr.Plot(label="Learning curve", elem_id="curve")
            choices = gr.Gallery(label="Your last picks (newest first)", columns=8, height=180,
                                 object_fit="contain", allow_preview=False, elem_id="choices", interactive=False)
            with gr.Row():
                refresh_btn = gr.Button("Refresh")
                undo_btn2 = gr.Button("Undo last update")
        with gr.Tab("Sessions"):
            with gr.Row():
                sessions = gr.Dropdown(cb.session_names(), allow_custom_value=True, elem_id="sessions",
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
        session_out = [folder, round_id, images, status, sessions, resolution, steps, guidance, *history]
        sampling = [prompt, negative, n, seed_mode, seed, steps, guidance, resolution]
        controls = [sample_btn, none_btn, undo_btn, undo_btn2, apply_btn, new_btn, resume_btn]
        batch_out = [round_id, images, seed, status]
        private = dict(api_visibility="private", queue=False)

        def lock():
            return [gr.Button(interactive=False)] * len(controls)

        def unlock(shown_seed):
            """Buttons back on; Compare starts from the seed of the images on screen."""
            return *[gr.Button(interactive=True)] * len(controls), shown_seed

        def picked(evt: gr.SelectData):
            return evt.index, *lock()

        sample_btn.click(lock, None, controls, **private).then(
            cb.sample, [folder, *sampling], [folder, *batch_out, sessions, resolution], api_name="sample",
            show_progress_on=busy).then(unlock, seed, [*controls, cmp_seed], **private)
        images.select(picked, None, [best, *controls], **private).then(
            cb.prefer, [folder, round_id, best, *sampling], [*batch_out, *history, learning], api_name="prefer",
            show_progress_on=busy).then(unlock, seed, [*controls, cmp_seed], **private)
        learning.tick(cb.poll, [folder, seed], [busy, status, *history, learning], api_name="progress",
                      show_progress="hidden")
        none_btn.click(lock, None, controls, **private).then(
            cb.skip, [folder, round_id, *sampling], [*batch_out, *history], api_name="skip",
            show_progress_on=busy).then(unlock, seed, [*controls, cmp_seed], **private)
        cancel_btn.click(cb.cancel, None, status, api_name="cancel", queue=False)
        cmp_cancel.click(cb.cancel, None, status, api_visibility="private", queue=False)
        undo_btn.click(cb.undo, [folder], [status, *history], api_name="undo")
        undo_btn2.click(cb.undo, [folder], [status, *history], api_visibility="private")
        refresh_btn.click(cb.history, [folder], history, api_name="history")
        apply_btn.click(cb.apply_settings, [folder, lr, beta, rank], session_out, api_name="apply_settings")
        new_btn.click(cb.new_session, [new_name, lr, beta, rank], session_out, api_name="new_session")
        resume_btn.click(cb.resume_session, [sessions], session_out, api_name="resume_session")
        list_btn.click(cb.list_sessions, None, sessions, api_name="list_sessions")
        export_btn.click(cb.export, [folder, export_name, fmt], [exported, status], api_name="export")
        compare_in = [folder, prompt, negative, cmp_seed, scale, steps, guidance, resolution]
        cmp_btn.click(cb.compare, compare_in, [base_img, tuned_img, caption], api_name="compare")
        scale.release(cb.compare, compare_in, [base_img, tuned_img, caption], api_visibility="private")
        demo.load(cb.on_load, None, session_out, api_visibility="private")
        demo.unload(cb.on_unload)
    demo.d3po_config = config
    return demo


def launch(model: str = "embedded", session=None, host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, sessions_dir=None, export_dir=None, block: bool = True):
    """Build the page and serve it. With ``block=False`` return the running ``gr.Blocks``
    (``.local_url``; stop it with ``.close()``). A host other than a loopback address prints a
    warning that the app and its session folders are open to the network."""
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
    if not _is_loopback(host):
        print(network_warning(host, port, allowed), file=sys.stderr, flush=True)
        log.warning("listening on %s:%s, reachable from the network", host, port)
    try:
        demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(p) for p in allowed],
                    prevent_thread_lock=True, css=CSS, show_error=True, inbrowser=False, quiet=True)
        print(started_message(demo, config, share), flush=True)
        if block:
            demo.block_thread()
    finally:
        if block:
            config.registry.close_all()
    return demo


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False                  # a host name: it may well be reachable from elsewhere


def network_warning(host: str, port: int, folders) -> str:
    """What ``--host`` other than 127.0.0.1 means, said before the server starts."""
    shown = ", ".join(str(f) for f in folders)
    return (f"WARNING: listening on {host}:{port}, so anyone who can reach this machine on port {port} can use "
            f"the app: run the model on your hardware, click in your sessions and read every image in {shown}. "
            "There is no password. Use --host 127.0.0.1 (the default) to keep it to this machine.")


def started_message(demo, config: AppConfig, share: bool) -> str:
    lines = [f"D3PO Studio: open {demo.local_url} (sessions in {config.sessions_dir}; Ctrl+C stops it)."]
    if share:
        lines.append(f"Public link (anyone with it can use the app): {demo.share_url}")
    else:
        lines.append("For a public gradio.live link, start it with --share.")
    return "\n".join(lines)
