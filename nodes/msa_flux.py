"""Masked Shared Attention on Flux (families/flux.py): the joint-attention patches of the
MultiRef Apply MSA node (nodes/msa.py builds the rows and the per-step state, the same as on a
UNet, and calls `patch_references` or `patch_kontext`).

`references` mode: the reference rows ride in the same batched call (one model call per step);
in the patched blocks the image queries of the `full` and `image` rows also read the reference
rows' foreground image tokens, moved to RoPE positions that do not collide with the target's;
text queries, `uncond` rows and the reference rows keep the attention that ran there before.
`kontext` mode: the references are already in the sequence (core ReferenceLatent ->
`ref_latents`): the target's image queries read only their foreground, each reference weighted,
and the references may be kept from reading the target.
The math: techniques.msa.read_references_joint, kernels.joint_attention.kontext_attention.
"""
import torch

from ..families import flux as family
from ..kernels import joint_attention, msa, rope_positions
from ..techniques import msa as technique

REFERENCE_LAYOUT = "below"  # axis 0 stays 0 as base Flux saw it; SynCD stacks images in height
KONTEXT_BLOCKS_DEFAULT = True


def _output_layout(out):
    """(B, H, L, D) -> (B, L, H * D), the layout the host's attention returns to a Flux block."""
    b, h, length, d = out.shape
    return out.transpose(1, 2).reshape(b, length, h * d)


class _Blend:
    """Puts the changed rows' outputs into what ran before at this attention. That runs on every
    row (it is the unpatched result of the rows and tokens we leave alone: uncond and reference
    rows, text queries, exactly), and the reading rows' image part is replaced (strength 1) or
    blended with it."""

    def __init__(self, strength):
        self.strength = strength

    def assemble(self, extra_options, q, k, v, readers, text_len, shared):
        out = extra_options[family.INNER_KEY](q, k, v).clone()
        shared = _output_layout(shared)[:, text_len:].to(out.dtype)
        if self.strength != 1.0:
            shared = msa.blend(out[readers, text_len:], shared, self.strength)
        out[readers, text_len:] = shared
        return out


def _plain(extra_options, q, k, v):
    return extra_options[family.INNER_KEY](q, k, v)


class _ReadReferences(family.SharedAcrossClones, _Blend):
    """The joint-attention patch of references mode (one per block)."""

    def __init__(self, state, strength, tag):
        _Blend.__init__(self, strength)
        self.state, self.tag = state, tag
        self.angles = {}  # (rows, grid, device) -> (R, 1, 1, D / 2) RoPE shifts

    def _angles(self, rows, grid, rope, device):
        key = (rows, grid, str(device))
        if key not in self.angles:
            placements = rope_positions.reference_placements(grid, [grid] * rows,
                                                             REFERENCE_LAYOUT)
            shifts = torch.tensor(placements, dtype=torch.float64)
            self.angles = {key: rope_positions.rope_angles(shifts, *rope)[:, None, None].to(device)}
        return self.angles[key]

    def __call__(self, q, k, v, extra_options):
        call, spans = self.state.call, extra_options.get("multiref_rows", {})
        if call is None or call.key is None or self.tag not in spans \
                or extra_options.get("mask") is not None:
            return _plain(extra_options, q, k, v)
        roles = family.row_roles(extra_options, q.shape[0])
        readers = family.rows_with_role(roles, family.IMAGE_ROLES)
        if not readers:
            return _plain(extra_options, q, k, v)
        text_len = extra_options[family.TEXT_LEN_KEY]
        grid = family.layer_grid(extra_options)
        image = slice(text_len, text_len + grid[0] * grid[1])
        start, end = spans[self.tag]
        index, bias = self.state.foreground(grid[0], grid[1], q.device)
        angles = self._angles(end - start, grid, extra_options[family.ROPE_KEY], q.device)
        shared = technique.read_references_joint(
            q[readers], k[readers], v[readers], text_len, k[start:end, :, image],
            v[start:end, :, image], index, bias, angles)
        return self.assemble(extra_options, q, k, v, readers, text_len, shared)


class KontextCall:
    """What the Kontext patches need of one model call: the references in the sequence, their
    foreground (one bool per reference token) and weights; None when nothing is restricted."""

    def __init__(self, target_len, reference_lens, foreground, weights):
        self.target_len, self.reference_lens = target_len, reference_lens
        self.foreground, self.weights = foreground, weights


class KontextRows(family.SharedAcrossClones):
    """Row provider of kontext mode: adds no rows; reads the call's `ref_latents` and tells the
    patches which reference tokens the target may read this step (foreground of the reference's
    mask; a reference of weight 0 or outside its sigma window: none)."""

    def __init__(self, references, bounds):
        self.references, self.bounds = references, bounds  # [(mask or None, weight, bounds)]
        self.call = None

    def new_run(self):
        self.call = None

    def __call__(self, x, timestep, c, roles):
        self.call = None
        latents = c.get("ref_latents")
        sigma = float(timestep.reshape(-1)[0])
        if not latents or not family.in_sigma_range(sigma, self.bounds):
            return None
        if len(latents) != len(self.references):
            raise ValueError(f"references: kontext mode got {len(self.references)} encoded "
                             f"references for {len(latents)} reference latents in the "
                             "conditioning (ReferenceLatent); give one MultiRef reference (its "
                             "mask, weight and window) per ReferenceLatent image, in order")
        lens, foreground, weights = [], [], []
        for (mask, weight, bounds), latent in zip(self.references, latents):
            rows, cols = -(-latent.shape[-2] // 2), -(-latent.shape[-1] // 2)
            lens.append(rows * cols)
            on = weight > 0 and family.in_sigma_range(sigma, bounds)
            fg = torch.ones(rows * cols, dtype=torch.bool) if mask is None else \
                msa.resize_masks(mask[None], rows, cols)[0]
            foreground.append(fg if on else torch.zeros_like(fg))
            weights.append(float(weight) if on else 1.0)
        grid = (-(-x.shape[-2] // 2), -(-x.shape[-1] // 2))
        self.call = KontextCall(grid[0] * grid[1], lens, torch.cat(foreground), weights)
        return None


class _KontextRestriction(family.SharedAcrossClones, _Blend):
    """The joint-attention patch of kontext mode (one per block)."""

    def __init__(self, rows, strength, block_reference_to_target):
        _Blend.__init__(self, strength)
        self.rows, self.block = rows, block_reference_to_target

    def __call__(self, q, k, v, extra_options):
        call = self.rows.call
        if call is None or extra_options.get("mask") is not None or not joint_attention.restricts(
                call.foreground, call.weights, self.block):
            return _plain(extra_options, q, k, v)
        text_len = extra_options[family.TEXT_LEN_KEY]
        if q.shape[2] != text_len + call.target_len + sum(call.reference_lens):
            return _plain(extra_options, q, k, v)  # rows without the references
        readers = family.rows_with_role(family.row_roles(extra_options, q.shape[0]),
                                        family.IMAGE_ROLES)
        if not readers:
            return _plain(extra_options, q, k, v)
        shared = joint_attention.kontext_attention(
            q[readers], k[readers], v[readers], text_len, call.target_len, call.reference_lens,
            call.foreground.to(q.device), call.weights, self.block)
        return self.assemble(extra_options, q, k, v, readers, text_len, shared)


def patch_references(patched, state, strength, blocks, tag):
    family.set_attention_patch(patched, family.ATTENTION,
                               lambda location, inner: _ReadReferences(state, strength, tag),
                               blocks)


def patch_kontext(patched, rows, strength, blocks, block_reference_to_target):
    family.set_attention_patch(patched, family.ATTENTION, lambda location, inner:
                               _KontextRestriction(rows, strength, block_reference_to_target),
                               blocks)
