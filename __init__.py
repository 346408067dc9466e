"""MultiRef: finetuning-free personalized generation from one or many reference images.

ComfyUI imports this folder as a package (named after the folder) and reads the two mappings.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
