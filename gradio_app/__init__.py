"""The click-to-prefer web app (Gradio). Start it with ``d3po-studio app`` or

    from d3po_studio.gradio_app import launch
    launch()          # embedded model, http://127.0.0.1:7860, sessions in ~/.local/share/d3po-studio/sessions

docs/app.md describes the page, the flags, where sessions live and the safety rules.
"""
__all__ = ["launch", "build_app"]


def launch(model="embedded", session=None, host="127.0.0.1", port=7860, share=False,
           sessions_dir=None, export_dir=None, block=True):
    """Serve the app; see ``app.launch``."""
    from .app import launch as _launch
    return _launch(model=model, session=session, host=host, port=port, share=share,
                   sessions_dir=sessions_dir, export_dir=export_dir, block=block)


def build_app(*args, **kwargs):
    """The ``gr.Blocks`` page; see ``app.build_app``."""
    from .app import build_app as _build_app
    return _build_app(*args, **kwargs)
