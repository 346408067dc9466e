"""Weighted-merge object routing on Flux: MultiRef Apply Adapter's patch for a Flux model with a
Flux image adapter (kernels/flux_adapters.py), over the Flux family's joint-attention patch
(families/flux.py).

In every block the adapter covers, the joint attention runs as before, then each reference's
image attention (the image queries before RoPE against its adapter keys and values, as the
published adapters read them) is merged with the routing weights: the joint attention's own
scores of the image queries against its text keys at the phrase's token positions in the
prompt (techniques.routing.joint_addition; one formula with the UNet path, kernels/routing.py).
Where the addition goes is the adapter's own place:
  * InstantX: the attention output before the block's output projection, in the double blocks
    (image tokens) and the single blocks (the whole [text; image] sequence as published, or the
    image tokens only with Dynamic Decoupling);
  * XLabs: the image stream after the double block (after its MLP, without a gate), through a
    block replace around the family's.
Rows as on SDXL: prompt and image rows read the references' image tokens, uncond rows their
uncond tokens (a black image's), all routed by their own text keys at the same positions.
"""
import torch

from ..families import flux as family
from ..kernels import flux_adapters, rope_positions, routing
from ..techniques import routing as technique

ROUTED_ROLES = ("full", "image", "uncond")  # reference rows of MSA get no adapter contribution


def double_and_single_layers(model, adapter):
    """{block location: the adapter's BlockKV there} for this Flux model, after checking the
    adapter is a Flux one made for the model's sizes."""
    flux_adapters.check_adapter_for_flux(adapter)
    flux = family.flux_of(model, "MultiRef Apply Adapter")
    double, single = adapter.block_layers(len(flux.double_blocks), len(flux.single_blocks),
                                          flux.params.hidden_size, flux.params.context_in_dim)
    layers = {("double_block", i): layer for i, layer in enumerate(double)}
    layers.update({("single_block", i): layer for i, layer in enumerate(single)})
    return layers


class FluxRoutedReferences:
    """What every block's patch shares: references, phrase positions, gating, the recorder, and
    (XLabs) the additions waiting for their block to return."""

    def __init__(self, model, adapter, references, positions, masks, mode, scale, bounds,
                 decouple_text, recorder):
        """positions: None, or per reference the indices of its phrase's tokens in the prompt."""
        self.adapter, self.layers = adapter, double_and_single_layers(model, adapter)
        self.mode, self.scale, self.bounds = mode, scale, bounds
        self.positions, self.masks, self.decouple_text = positions, masks, decouple_text
        self.image_tokens, self.counts = routing.pad_tokens([r.image_tokens for r in references])
        self.uncond_tokens, _ = routing.pad_tokens([r.uncond_tokens for r in references])
        self.weights = [r.weight for r in references]
        self.reference_bounds = [family.sigma_range(model, r.start_percent, r.end_percent)
                                 for r in references]
        self.recorder = recorder
        self.waiting = {}  # XLabs: block location -> (rows, addition to the image stream)

    def reference_weights(self, sigma):
        return tuple(w if family.in_sigma_range(sigma, b) else 0.0
                     for w, b in zip(self.weights, self.reference_bounds))

    def after_block(self):
        """Whether the addition goes to the image stream after the block (XLabs)."""
        return self.adapter.kind == flux_adapters.XLABS

    def make_patch(self, location, inner):
        layer = self.layers[location]
        cache = {}

        def keys_values(device, dtype, heads):
            """(2, R, n, H*D) keys and values of the image tokens [0] and uncond tokens [1]."""
            key = (device, dtype, heads)
            if key not in cache:
                tokens = torch.stack([self.image_tokens, self.uncond_tokens]).to(device, dtype)
                with torch.no_grad():
                    k, v = layer(tokens.flatten(0, 1), heads)
                cache[key] = tuple(t.transpose(1, 2).flatten(2).unflatten(0, (2, -1))
                                   for t in (k, v))
            return cache[key]

        def patch(q, k, v, extra_options):
            out = inner(q, k, v, extra_options)
            sigma = family.current_sigma(extra_options)
            if self.scale == 0 or not family.in_sigma_range(sigma, self.bounds):
                return out
            weights = self.reference_weights(sigma)
            roles = family.row_roles(extra_options, q.shape[0])
            rows = family.rows_with_role(roles, ROUTED_ROLES)
            # References gated off at this step are left out (not multiplied by zero).
            active = [i for i, w in enumerate(weights) if w != 0]
            if not rows or not active:
                return out
            heads, text_len = q.shape[1], extra_options[family.TEXT_LEN_KEY]
            grid = family.layer_grid(extra_options)
            image_len = grid[0] * grid[1]
            positions = self.positions
            if positions is not None:
                positions = [positions[i] for i in active] if len(active) > 1 else None
                if positions and max(max(p) for p in positions) >= text_len:
                    raise routing.RoutingInputError(
                        f"prompt: a phrase sits at token {max(max(p) for p in positions)} of the "
                        f"prompt but the model reads {text_len} text tokens; connect the text "
                        "encoder output of the prompt given to MultiRef Apply Adapter")
            ip_k, ip_v = keys_values(q.device, q.dtype, heads)
            image = torch.tensor([roles[i] in family.IMAGE_ROLES for i in rows], device=q.device)
            pick = lambda t: torch.where(image[:, None, None, None], t[0][None], t[1][None])
            counts = [self.counts[i] for i in active]
            ip_k, ip_v = (pick(t)[:, active, :max(counts)] for t in (ip_k, ip_v))
            pe = extra_options[family.PE_KEY]
            q_rows, k_rows = q[rows], k[rows]
            q_plain = rope_positions.unrotate_host(q_rows, pe[rows] if pe.shape[0] > 1 else pe)
            masks = None if self.masks is None else self.masks[active]
            text_queries = location[0] == "single_block" and not self.decouple_text
            addition, shown = technique.joint_addition(
                q_rows, k_rows, q_plain, text_len, image_len, ip_k, ip_v,
                torch.tensor([weights[i] for i in active], device=q.device), self.mode,
                positions=positions, masks=masks, grid=grid, token_counts=counts,
                text_queries=text_queries)
            self.recorder.record_routed(sigma, location[0], grid, [roles[i] for i in rows], shown,
                                        active, len(weights), extra_options.get("sample_sigmas"))
            start = 0 if text_queries else text_len
            addition = self.scale * addition.to(out.dtype)
            if self.after_block():
                self.waiting[location] = (rows, addition)
                return out
            out = out.clone()
            out[rows, start:text_len + image_len] += addition
            return out

        return patch


class AfterBlock(family.SharedAcrossClones):
    """A `dit` double-block replace around what ran there before (the family's): adds the
    routed addition its attention patch left waiting to the block's image stream (XLabs)."""

    def __init__(self, location, previous, state):
        self.location, self.previous, self.state = location, previous, state

    def __call__(self, args, extra):
        out = self.previous(args, extra) if self.previous is not None else \
            extra["original_block"](args)
        waiting = self.state.waiting.pop(self.location, None)
        if waiting is None:
            return out
        rows, addition = waiting
        img = out["img"].clone()
        img[rows, :addition.shape[1]] += addition
        return dict(out, img=img)


def patch_model(model, state):
    """A clone of `model` with the routed references on every block the adapter covers."""
    patched = model.clone()
    blocks = "all" if any(loc[0] == "single_block" for loc in state.layers) else "double"
    family.set_attention_patch(patched, family.ATTENTION, state.make_patch, blocks, adds=True)
    if state.after_block():
        replaces = patched.model_options["transformer_options"]["patches_replace"]["dit"]
        for location in [loc for loc in state.layers if loc[0] == "double_block"]:
            patched.set_model_patch_replace(AfterBlock(location, replaces.get(location), state),
                                            "dit", *location)
    # The packed grid of a call comes from the family's row wrapper, which records the latent
    # shape; with no provider it adds no rows.
    family.add_row_provider(patched, lambda x, timestep, c, roles: None)
    return patched
