"""D3PO Studio's ComfyUI nodes: Load Session -> Sample -> Pick -> Update LoRA, plus Undo and Save LoRA.

The node classes here have no ComfyUI base class, so their ``execute`` runs without ComfyUI
(tests call it directly with a PlainHost, see host.py). ``comfy_extension()`` turns them into
V3 ``io.ComfyNode`` classes and installs the ComfyUI host and the /d3po/pick routes; the
package's ``comfy_entrypoint`` calls it.
"""
from .round_nodes import PickImage, SampleRound, UpdateLora
from .session_nodes import ExportLora, LoadSession, UndoUpdate

NODES = (LoadSession, SampleRound, PickImage, UpdateLora, ExportLora, UndoUpdate)


def comfy_extension():
    """The ComfyExtension listing our nodes as io.ComfyNode classes (needs ComfyUI)."""
    from comfy_api.latest import ComfyExtension, io

    from . import host, picks

    comfy = host.ComfyHost()
    host.use(comfy)                 # before any define_schema: it lists ComfyUI's checkpoints
    comfy.add_routes(picks.BOARD)
    nodes = [type(cls.__name__, (cls, io.ComfyNode), {"__module__": cls.__module__}) for cls in NODES]

    class D3POExtension(ComfyExtension):
        async def get_node_list(self) -> list[type[io.ComfyNode]]:
            return nodes

    return D3POExtension()


__all__ = ["NODES", "comfy_extension", *(cls.__name__ for cls in NODES)]
