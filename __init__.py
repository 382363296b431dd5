"""comfyui-zimage: Z-Image for ComfyUI on a standalone S3-DiT engine (zimage/), with thin node adapters (nodes/)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# the graph editor's part: presets that fill in the widgets they govern (web/zimage.js)
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
