"""Model families and host glue: what the techniques need from a model architecture and from
ComfyUI's model objects (attention layers, batch rows, text and image encoders), one module per
family. docs/ARCHITECTURE.md describes the seam."""
