"""What the techniques need from a CLIP vision model (a ComfyUI CLIP_VISION object) beyond
`encode_image`: an adapter's "no image" tokens, by its family's convention, and the hidden states
of several encoder layers for an adapter's feature fusion (kernels/feature_fusion.py)."""
from contextlib import contextmanager

import comfy.model_management

from ..kernels.adapter import CLIP_MEAN, CLIP_STD, HIDDEN_STATES, AdapterMismatchError


def encoder_layers(clip_vision):
    """The CLIP vision encoder's layers (a ModuleList, the same path on both hosts)."""
    return clip_vision.model.vision_model.encoder.layers


@contextmanager
def captured_hidden_states(clip_vision, numbers):
    """{number: hidden state} filled by every forward of the encoder inside the block. Hidden
    state k is the input of layer k, taken by a pre-hook (the hosts' encoders take no list of
    layers to return); cloned because each layer adds to its input in place."""
    layers, captured = encoder_layers(clip_vision), {}

    def hook(number):
        def store(_module, args):
            captured[number] = args[0].clone()
        return store
    handles = [layers[k].register_forward_pre_hook(hook(k)) for k in numbers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def check_fusion_fits(adapter, clip_vision):
    depth = len(encoder_layers(clip_vision))
    if max(adapter.fusion.layers) >= depth:
        raise AdapterMismatchError(
            f"{adapter.describe()} reads CLIP hidden states {list(adapter.fusion.layers)} but the "
            f"CLIP vision model has {depth} layers; load the CLIP vision model the adapter was "
            "trained with")


def with_hidden_states(adapter, clip_vision, encode):
    """encode() (a CLIP vision call returning the host's output mapping) with HIDDEN_STATES
    added when the adapter has a feature fusion; plain encode() otherwise."""
    if adapter.fusion is None:
        return encode()
    check_fusion_fits(adapter, clip_vision)
    return with_levels(clip_vision, adapter.fusion.layers, encode)


def with_levels(clip_vision, numbers, encode):
    """encode() with HIDDEN_STATES {number: hidden state} of the given hidden-state numbers."""
    with captured_hidden_states(clip_vision, numbers) as captured:
        output = encode()
    output[HIDDEN_STATES] = dict(captured)
    return output


def encode_image(adapter, clip_vision, images):
    """The host's encode_image of `images`, with what the adapter's feature fusion reads."""
    return with_hidden_states(adapter, clip_vision, lambda: clip_vision.encode_image(images))


def unconditional_tokens(adapter, clip_vision, fusion_weights=None):
    """(1, T, C) the adapter's "no image" tokens, by its family's convention
    (LoadedAdapter.uncond_convention). A Plus adapter's pixel input is already normalized, so it
    goes to the CLIP vision model directly: the host's encode_image would resize, round to 8 bits
    and normalize an image, and no 8-bit image is exactly zero after normalization."""
    def encode_pixels(pixel_values):
        comfy.model_management.load_model_gpu(clip_vision.patcher)

        def encode():
            out = clip_vision.model(pixel_values=pixel_values.to(clip_vision.load_device),
                                    intermediate_output=-2)
            return {"penultimate_hidden_states": out[1], "image_embeds": out[2]}
        return with_hidden_states(adapter, clip_vision, encode)
    return adapter.uncond_tokens(encode_pixels, getattr(clip_vision, "image_size", 224),
                                 getattr(clip_vision, "image_mean", CLIP_MEAN),
                                 getattr(clip_vision, "image_std", CLIP_STD),
                                 fusion_weights).float()
