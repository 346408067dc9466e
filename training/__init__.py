"""The bundled trainer: dataset manifest, training loop, checkpoints, CLI (`python -m training`).

This package is imported by the pack (as `<pack>.training`) and, for the command line, run as
`python -m training` from the pack's folder: this file therefore imports nothing, so that the
top-level import the command line makes cannot clash with ComfyUI's own modules.
"""
