"""Node registration: every family module exports its own two mappings; they are merged here."""
import logging

from . import demo, guidance, loaders, msa, references, routing, training
from . import reference_files, reference_latents, unified_loader

log = logging.getLogger("multiref")

FAMILIES = (demo, guidance, loaders, msa, references, routing, training, reference_files,
            reference_latents, unified_loader)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _family in FAMILIES:
    NODE_CLASS_MAPPINGS.update(_family.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_family.NODE_DISPLAY_NAME_MAPPINGS)

loaders.note_missing_example_files()
