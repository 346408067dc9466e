"""MultiRef: finetuning-free personalized generation from one or many reference images.

ComfyUI imports this folder as a package (named after the folder) and reads the two mappings.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes import example_inputs

example_inputs.copy_to_input_folder()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
