"""Weighted-merge object routing (MIP-Adapter), plain torch.

In one cross-attention layer, with latent queries Q (B, L, heads*d) and references i = 1..N:
  T      = the layer's text attention output (computed by the caller)
  R_i(x) = mean over heads h and phrase tokens p of softmax_x(K_p . Q_x / sqrt(d))
           (the softmax runs over the L spatial positions, not over tokens)
  W_i(x) = R_i(x) / sum_j R_j(x)                                  mode "weighted"
           (times sigmoid(T u)(x) / mean_x sigmoid(T u) when the adapter has text_to_weight u)
  W_i(x) = reference i's region mask resized to the layer grid    mode "mask"
  W_i(x) = 1                                                      mode "sum"
  O_i    = softmax(Q K_ip,i^T / sqrt(d)) V_ip,i over reference i's own tokens only
  M_i(x) = reference i's attention mask resized to the layer grid (1 without one), any mode
  O_i    = sum_j G_ij(x) O_ij when reference i's tokens come in groups j (tiles) that each act
           on their own region G_ij of the image (IPAdapter Tiled), O_ij over group j's tokens
  out    = T + scale * sum_i w_i M_i(x) W_i(x) O_i
           (w_i: per-reference weight, 0 when gated off; the attention mask multiplies after the
           normalization of mode weighted, as w_i does: where it is 0 the others keep their share)
Shapes follow the real layer grid (H, W), never a square root of the token count.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("weighted", "mask", "sum")


class RoutingInputError(ValueError):
    """Routing inputs that cannot work together; the message names the input and the fix."""


@dataclass(frozen=True)
class PhraseKeys:
    """The phrase tokens of every reference, projected by one layer's to_k.

    keys: (P, heads*d) all references' phrase tokens, reference after reference; or
        (B, P, heads*d), one set per row of q (same token counts: MIP-Adapter's uncond rows
        read the empty prompt's tokens at the phrases' positions).
    average: (P, N) column i holds 1/P_i on reference i's tokens, 0 elsewhere (the token mean).
    """
    keys: torch.Tensor
    average: torch.Tensor

    def select(self, references):
        """The phrase keys of the given references only (indices in order): an inactive
        reference is left out of the normalization rather than weighted by zero."""
        columns = self.average[:, list(references)]
        tokens = columns.sum(dim=1).nonzero().flatten()
        keys = self.keys[..., tokens.to(self.keys.device), :]
        return PhraseKeys(keys, columns[tokens])


def phrase_keys(per_reference_keys):
    """Stack the projected phrase tokens of each reference ((P_i, heads*d) each, P_i >= 1)."""
    counts = [k.shape[0] for k in per_reference_keys]
    if min(counts) < 1:
        raise RoutingInputError("phrase: a reference has no phrase tokens; give every reference "
                                "a phrase that names its object")
    keys = torch.cat(list(per_reference_keys), dim=0)
    return PhraseKeys(keys, token_average(counts, keys.device))


def token_average(counts, device=None):
    """(sum(counts), N): column i holds 1/counts[i] on reference i's tokens, 0 elsewhere."""
    average = torch.zeros(sum(counts), len(counts), dtype=torch.float32, device=device)
    start = 0
    for i, count in enumerate(counts):
        average[start:start + count, i] = 1.0 / count
        start += count
    return average


def locate_phrase(prompt_ids, phrase_ids):
    """The first index where the token ids phrase_ids occur in prompt_ids as a run, or None."""
    n = len(phrase_ids)
    for start in range(len(prompt_ids) - n + 1):
        if list(prompt_ids[start:start + n]) == list(phrase_ids):
            return start
    return None


def pad_tokens(token_list):
    """(1, n_i, C) tokens per reference -> (N, n_max, C) zero-padded, and the counts n_i."""
    counts = [t.shape[1] for t in token_list]
    padded = token_list[0].new_zeros(len(counts), max(counts), token_list[0].shape[2])
    for i, tokens in enumerate(token_list):
        padded[i, :counts[i]] = tokens[0]
    return padded, counts


def split_heads(x, heads):
    """(B, L, heads*d) -> (B, heads, L, d)."""
    b, length, width = x.shape
    return x.view(b, length, heads, width // heads).transpose(1, 2)


def relevance_maps(q, phrases, heads):
    """R (B, L, N) float32: each reference's relevance at each position (sums to 1 over L)."""
    qh = split_heads(q, heads)
    keys = phrases.keys.to(q)
    # (heads, P, d) shared by every row, or (B, heads, P, d) per row.
    kh = split_heads(keys, heads) if keys.ndim == 3 else split_heads(keys[None], heads)[0]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * (1.0 / math.sqrt(qh.shape[-1]))
    spatial = torch.softmax(scores, dim=2, dtype=torch.float32)  # over positions: (B, heads, L, P)
    return torch.matmul(spatial.mean(dim=1), phrases.average.to(spatial.device))


def normalize_across_references(relevance):
    """W_i(x) = R_i(x) / sum_j R_j(x)."""
    # A position where every map underflowed gets no reference instead of 0/0.
    total = relevance.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(relevance.dtype).tiny)
    return relevance / total


def text_modulation(text_out, text_to_weight):
    """MIP's learned gate: sigmoid(T u) divided by its mean over positions, (B, L, 1).
    text_to_weight: the (1, heads*d) weight of the layer's text_to_weight projection."""
    gate = torch.sigmoid(F.linear(text_out, text_to_weight.to(text_out)))
    return gate / gate.mean(dim=1, keepdim=True)


def layer_grid(latent_hw, tokens):
    """The (H, W) grid of a layer with `tokens` positions inside a latent of size latent_hw:
    each UNet level halves both sides, rounding up (stride-2 convolution with padding 1)."""
    height, width = latent_hw
    while height * width > tokens:
        height, width = (height + 1) // 2, (width + 1) // 2
    if height * width != tokens:
        raise RoutingInputError(f"latent {tuple(latent_hw)}: no UNet level has {tokens} positions; "
                                "the latent size is not one the model's downsampling produces")
    return height, width


def region_weights(masks, grid):
    """The user's region masks (N, h, w) resized to the layer grid: (L, N), 0 = off, 1 = full.
    Area resizing: a cell gets the covered fraction, so all-zero and all-one masks stay exact."""
    resized = F.interpolate(masks[:, None].float(), size=grid, mode="area")
    return resized[:, 0].flatten(1).transpose(0, 1)


def attention_mask_weights(masks, grid, frames):
    """M (B, L) of one reference: its attention masks (F, h, w) over the output image, resized to
    the layer grid as region_weights does (the mask's frame stretched onto the image's), for
    rows showing images `frames` (index into the F masks; one mask serves every image)."""
    resized = region_weights(masks, grid).transpose(0, 1)
    return resized[[0 if masks.shape[0] == 1 else f for f in frames]]


def merged_reference_attention(q, ip_keys, ip_values, heads, position_weights, token_counts=None):
    """sum_i position_weights[..., i] * softmax(Q K_i^T / sqrt(d)) V_i, in one pass over all
    references: scores of every reference's tokens in one matmul, a softmax inside each
    reference's own tokens, the weights folded in before the single value matmul.

    q: (B, L, heads*d); ip_keys, ip_values: (B, N, n, heads*d), reference i's real tokens first
    (token_counts[i] of them, the rest padding; None = all n are real); position_weights:
    broadcastable to (B, L, N), or None (= all ones). Returns (B, L, heads*d)."""
    b, n_refs, n_tokens, width = ip_keys.shape
    qh = split_heads(q, heads)
    kh = split_heads(ip_keys.reshape(b, n_refs * n_tokens, width), heads)
    vh = split_heads(ip_values.reshape(b, n_refs * n_tokens, width), heads)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * (1.0 / math.sqrt(qh.shape[-1]))
    scores = scores.view(b, heads, q.shape[1], n_refs, n_tokens)
    if token_counts is not None and min(token_counts) < n_tokens:
        padding = torch.arange(n_tokens, device=q.device)[None] >= torch.tensor(
            token_counts, device=q.device)[:, None]
        scores = scores.masked_fill(padding, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if position_weights is not None:
        weights = position_weights.to(probs.dtype)
        weights = weights.reshape((1,) * (3 - weights.ndim) + tuple(weights.shape))
        probs = probs * weights[:, None, :, :, None]
    out = torch.matmul(probs.view(b, heads, q.shape[1], n_refs * n_tokens), vh)
    return out.transpose(1, 2).reshape(b, q.shape[1], width)


def routing_weights(mode, q, heads, text_out=None, phrases=None, masks=None, grid=None,
                    text_to_weight=None, keep_grad=False):
    """W broadcastable to (B, L, N) (None = all ones) before the per-reference weights, and the
    map to show a user (what each reference gets at each position, without the learned gate)."""
    if mode == "sum":
        return None, None
    if mode == "mask":
        weights = region_weights(masks.to(q.device), grid)
        return weights, weights
    if mode != "weighted":
        raise RoutingInputError(f"mode: unknown routing mode {mode!r}; use one of {MODES}")
    if phrases is None:
        # One reference: normalized across references, its weight is 1 at every position.
        weights = torch.ones(1, 1, 1, device=q.device)
    else:
        with torch.set_grad_enabled(keep_grad and torch.is_grad_enabled()):
            weights = normalize_across_references(relevance_maps(q, phrases, heads))
        if not keep_grad:
            weights = weights.detach()
    shown = weights
    if text_to_weight is not None:
        weights = weights * text_modulation(text_out, text_to_weight).float()
    return weights, shown


def routed_cross_attention(q, text_out, heads, ip_keys, ip_values, reference_weights, scale,
                           mode, phrases=None, masks=None, grid=None, text_to_weight=None,
                           token_counts=None, keep_grad=False, attention_masks=None,
                           groups=None, group_masks=None):
    """out = T + scale * sum_i w_i M_i(x) W_i(x) O_i for every row of q; returns (out, shown map).

    reference_weights: (N,) per-reference weights w_i (0 = reference off at this step).
    phrases: PhraseKeys (mode weighted; None only with one reference); masks: (N, h, w) region masks (mode mask); grid: the
    layer's (H, W) (mode mask); text_to_weight: (1, heads*d) or None; keep_grad: let gradients
    flow through the relevance maps (training asks; they are detached otherwise);
    attention_masks: M, broadcastable to (B, L, N) (attention_mask_weights), or None (all ones);
    groups: None, or the reference (0..N-1) of each of the N' token groups that ip_keys and
    ip_values (B, N', n, C) and token_counts then hold, group_masks (L, N') their regions G."""
    if mode == "weighted" and phrases is None and ip_keys.shape[1] > 1:
        raise RoutingInputError("phrases: mode 'weighted' with several references needs a phrase "
                                "for every reference")
    weights, shown = routing_weights(mode, q, heads, text_out, phrases, masks, grid,
                                     text_to_weight, keep_grad)
    w = reference_weights.to(device=q.device, dtype=torch.float32)
    weights = w if weights is None else weights * w
    if attention_masks is not None:
        attention_masks = attention_masks.to(device=q.device, dtype=torch.float32)
        weights = weights * attention_masks
        shown = attention_masks if shown is None else shown * attention_masks
    if groups is not None:
        weights = weights[..., list(groups)] * group_masks.to(device=q.device, dtype=torch.float32)
    merged = merged_reference_attention(q, ip_keys, ip_values, heads, weights, token_counts)
    return text_out + scale * merged, shown
