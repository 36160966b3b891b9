"""ComfyUI entry point: registers this pack's nodes. Must be imported by ComfyUI as a package (relative imports)."""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
