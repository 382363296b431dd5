"""comfyui-zimage: Z-Image for ComfyUI on a standalone S3-DiT engine (zimage/), with thin node adapters (nodes/)."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
