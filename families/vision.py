"""What the techniques need from a CLIP vision model (a ComfyUI CLIP_VISION object) beyond
`encode_image`: an adapter's "no image" tokens, by its family's convention."""
import comfy.model_management

from ..kernels.adapter import CLIP_MEAN, CLIP_STD


def unconditional_tokens(adapter, clip_vision):
    """(1, T, C) the adapter's "no image" tokens, by its family's convention
    (LoadedAdapter.uncond_convention). A Plus adapter's pixel input is already normalized, so it
    goes to the CLIP vision model directly: the host's encode_image would resize, round to 8 bits
    and normalize an image, and no 8-bit image is exactly zero after normalization."""
    def encode_pixels(pixel_values):
        comfy.model_management.load_model_gpu(clip_vision.patcher)
        out = clip_vision.model(pixel_values=pixel_values.to(clip_vision.load_device),
                                intermediate_output=-2)
        return {"penultimate_hidden_states": out[1], "image_embeds": out[2]}
    return adapter.uncond_tokens(encode_pixels, getattr(clip_vision, "image_size", 224),
                                 getattr(clip_vision, "image_mean", CLIP_MEAN),
                                 getattr(clip_vision, "image_std", CLIP_STD)).float()
