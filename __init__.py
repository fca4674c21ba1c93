"""D3PO Studio: steer a text-to-image diffusion model by clicking the image you prefer.

This folder is both the Python package ``d3po_studio`` and a ComfyUI node pack:

    from d3po_studio import Session
    s = Session.open("my-session", model="embedded")

Importing it needs no ComfyUI; ComfyUI finds its nodes through ``comfy_entrypoint``.
"""
__version__ = "0.1.0"
__all__ = ["Session", "Settings", "__version__"]


def __getattr__(name):
    # Lazy, so `d3po-studio --help` and ComfyUI's scan do not import torch and diffusers.
    if name == "Session":
        from .core.session import Session
        return Session
    if name == "Settings":
        from .core.config import Settings
        return Settings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- ComfyUI node pack
# ComfyUI serves this folder's web/ to the page and calls comfy_entrypoint (V3 node API).
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import comfy_extension
    return comfy_extension()
