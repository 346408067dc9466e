"""Weighted-merge object routing (MIP-Adapter) as one technique, run by the sampling patch
(nodes/routing.py) and by the trainer (training/blocks.py) alike: the references' image
keys/values through a layer's IP projections, the phrases' keys through its to_k
(techniques.relevance.phrase_keys), and the routed merge with the learned gate. The math is
kernels/routing.py.
"""
import torch

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


def joint_addition(q, k, q_plain, text_len, image_len, ip_keys, ip_values, reference_weights,
                   mode, positions=None, masks=None, grid=None, token_counts=None,
                   text_queries=False):
    """What the references add to one joint [text; image] attention (Flux), before the scale.

    q, k (B, H, L, D): the joint attention's queries and keys as it gets them (after RoPE), the
    text's T = text_len tokens first, then the target's image_len image tokens (tokens after
    them, such as in-context reference latents, get nothing); q_plain: the same queries before
    RoPE (what the adapters' image attention reads); ip_keys, ip_values (B, R, n, H*D);
    positions: per reference, the indices of its phrase's tokens in the text (mode weighted
    with several references). The routing weights are the joint attention's own scores, the
    image queries against its text keys at the phrase positions, through the kernels' weights
    and merge (kernels.routing). Text queries (text_queries: adapters that inject into the text
    stream too) have no place in the picture: each reads the references in the share they take
    of the image (their mean weight over the image).
    Returns (addition: (B, image_len, H*D), or (B, T + image_len, H*D) with text_queries;
    the map to show (B, image_len, R) or None)."""
    heads = q.shape[1]
    image = slice(text_len, text_len + image_len)
    phrases = None
    if positions is not None:
        index = torch.tensor([p for tokens in positions for p in tokens], device=k.device)
        phrases = routing.PhraseKeys(_flat(k.index_select(2, index)),
                                     routing.token_average([len(t) for t in positions], k.device))
    weights, shown = routing.routing_weights(mode, _flat(q[:, :, image]), heads, phrases=phrases,
                                             masks=masks, grid=grid)
    w = reference_weights.to(device=q.device, dtype=torch.float32)
    weights = w if weights is None else weights * w
    out = routing.merged_reference_attention(_flat(q_plain[:, :, image]), ip_keys, ip_values,
                                             heads, weights, token_counts)
    if not text_queries:
        return out, shown
    text_weights = weights.mean(dim=-2, keepdim=True) if weights.ndim > 1 else weights
    text = routing.merged_reference_attention(_flat(q_plain[:, :, :text_len]), ip_keys, ip_values,
                                              heads, text_weights, token_counts)
    return torch.cat([text, out], dim=1), shown


def _flat(x):
    """(B, H, L, D) -> (B, L, H*D)."""
    return x.transpose(1, 2).flatten(2)
