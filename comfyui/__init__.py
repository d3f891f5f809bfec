"""OSEDiff nodes for ComfyUI: copy or symlink this folder into ComfyUI's `custom_nodes/` (under any name but
`osediff`), with `osediff` installed in ComfyUI's Python. Nodes: `OSEDiffLoader`, `OSEDiffUpscale`.
See the README section "ComfyUI"."""

from .models import register_folder
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

register_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
