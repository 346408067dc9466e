"""Weighted-merge object routing (MIP-Adapter) as one technique, run by the sampling patch
(nodes/routing.py) and by the trainer (training/blocks.py) alike: the references' image
keys/values through a layer's IP projections, the phrases' keys through its to_k
(techniques.relevance.phrase_keys), and the routed merge with the learned gate. The math is
kernels/routing.py.
"""
from ..kernels import routing


def image_keys_values(layer, tokens):
    """(keys, values): image tokens (..., T, C_ctx) through one adapter layer's to_k_ip and
    to_v_ip, in the tokens' device and dtype (gradients reach the projections when training)."""
    return tuple(tokens @ w.weight.to(tokens.device, tokens.dtype).T
                 for w in (layer.to_k_ip, layer.to_v_ip))


def gate_of(layer):
    """MIP-Adapter's learned gate of one adapter layer: its text_to_weight weight, or None."""
    return None if layer.text_to_weight is None else layer.text_to_weight.weight


def route(q, text_out, heads, ip_keys, ip_values, reference_weights, scale, mode, phrases=None,
          masks=None, grid=None, gate=None, token_counts=None, keep_grad=False,
          attention_masks=None, groups=None, group_masks=None):
    """text_out + scale * sum_i w_i M_i(x) W_i(x) O_i for the rows of q, and the map to show (see
    kernels.routing.routed_cross_attention; gate: gate_of(layer) or a copy of it)."""
    return routing.routed_cross_attention(
        q, text_out, heads, ip_keys, ip_values, reference_weights, scale, mode, phrases=phrases,
        masks=masks, grid=grid, text_to_weight=gate, token_counts=token_counts,
        keep_grad=keep_grad, attention_masks=attention_masks, groups=groups,
        group_masks=group_masks)
