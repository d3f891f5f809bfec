"""OSEDiff nodes for ComfyUI: `osediff comfyui install COMFYUI_DIR` installs osediff into ComfyUI's Python and
links this folder into its `custom_nodes/` (under any name but `osediff`). Nodes: `OSEDiffLoader`,
`OSEDiffUpscale`; their models are ComfyUI ModelPatchers (memory.py). See the README section "ComfyUI". Tried with ComfyUI 0.3.64 (commit a125cd8, frontend 1.27.10).

Node API: the classic one (NODE_CLASS_MAPPINGS, INPUT_TYPES/RETURN_TYPES classes), not the newer
`comfy_api` io schema. Every ComfyUI release loads classic nodes, and 0.3.64 still defines most of its own
nodes that way. The pack imports nothing from ComfyUI at import time except `folder_paths`, so tests can stub
it. The io schema has to import `comfy_api.latest` at import time and be registered through an async
`comfy_entrypoint`, and its `latest` module still changes from release to release. A node's id and its inputs
are the same in both APIs, so the pack can move to the io schema later without breaking workflows.
"""

from .models import register_folder
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

register_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
