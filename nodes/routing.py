"""Weighted-merge object routing nodes (MIP-Adapter): several references, each on its own object.

MultiRefApplyAdapter patches every cross-attention of a model clone; the math is in
kernels/routing.py. Phrases are encoded on their own, as MIP-Adapter does: each phrase goes
through the text encoder alone and its tokens after BOS up to EOS are projected by each layer's
own to_k (the phrase is not looked up inside the prompt). Every routed row (prompt, image and
negative rows alike) is routed with the same phrase keys and its own queries; negative rows merge
the references' uncond tokens, as plain IP-Adapter gives them. MultiRefRoutingMaps shows, after
a sampler ran, where each reference went.
"""
import logging
import math
import weakref

import torch

from ..families import flux as flux_family
from ..families import unet as family
from ..families.text import empty_phrase_embeddings, phrase_embeddings, phrase_positions
from ..kernels import embeds, flux_adapters, layer_weights, routing, token_groups
from ..kernels.checkpoints import bind_to_unet, cross_attention_dims, unet_transformer_blocks
from ..kernels.references import check_finite
from ..techniques import relevance
from ..techniques import routing as technique
from . import flux_routing

log = logging.getLogger("multiref")

RECORDER_KEY = "multiref_routing_recorder"
ROUTED_ROLES = ("full", "image", "uncond")  # reference rows of MSA get no adapter contribution
PALETTE = ((0.95, 0.25, 0.2), (0.2, 0.75, 0.3), (0.25, 0.45, 0.95), (0.95, 0.8, 0.15),
           (0.8, 0.3, 0.85), (0.15, 0.8, 0.85), (0.95, 0.55, 0.15), (0.6, 0.6, 0.6))


class RoutingRecorder(family.SharedAcrossClones, relevance.RelevanceMaps):
    """The routing maps of the prompt (`full`) rows of the last sampling run
    (techniques.relevance.RelevanceMaps). Shared by every later clone, so the sampler's model
    writes where MultiRefRoutingMaps reads; they outlive the run, on the CPU."""


class _RoutedReferences:
    """What every layer's patch shares: references, phrases, gating, the recorder."""

    def __init__(self, model, adapter, references, embeddings, masks, mode, scale, bounds,
                 layer_factors=None, embeds_scaling="V only", reversed_layers=frozenset()):
        """embeddings: None, or (phrase embeddings, empty-prompt embeddings) per reference.
        layer_factors: {location: factor of `scale` there} (None: 1 everywhere).
        reversed_layers: locations where only the uncond rows are routed, with the image tokens
        (layer_weights.reversed_layers)."""
        self.adapter = adapter
        self.reversed_layers = reversed_layers
        self.layer_factors, self.embeds_scaling = layer_factors or {}, embeds_scaling
        self.mode, self.scale, self.bounds = mode, scale, bounds
        self.image_tokens, self.counts = routing.pad_tokens([r.image_tokens for r in references])
        self.uncond_tokens, _ = routing.pad_tokens([r.uncond_tokens for r in references])
        self.embeddings = embeddings
        self.masks = masks
        # A reference whose attention mask is all zeros is off, exactly as weight 0 is; an
        # all-ones mask is no mask at all.
        self.attention_masks = [None if m is None or bool((m == 1).all()) else m.float()
                                for m in (r.attention_mask for r in references)]
        self.weights = [0.0 if m is not None and not bool(m.any()) else r.weight
                        for r, m in zip(references, self.attention_masks)]
        self.attention_cache = {}  # (grid, active, frames, device) -> (rows, L, N) M
        self.tokens_per_view = [r.tokens_per_view for r in references]
        self.tiles = [None if r.tile_regions is None else (r.tile_regions.float(), r.tokens_per_tile)
                      for r in references]
        self.tile_cache = {}  # (grid, active, counts) -> token_groups.tile_groups
        self.mean_groups = token_groups.mean_groups(
            self.counts, self.tokens_per_view,
            [None if r.tile_regions is None else (r.tile_regions.shape[0], r.tokens_per_tile)
             for r in references])
        self.reference_bounds = [family.sigma_range(model, r.start_percent, r.end_percent)
                                 for r in references]
        self.recorder = RoutingRecorder()
        self.device_copies = {}  # location -> that layer's tensors on the run's device

    def new_run(self):
        """A run starts: the last run's maps and device copies are dropped."""
        self.recorder.new_run()
        self.device_copies = {}

    def end_run(self):
        """A run ended: its device copies are dropped, its maps kept on the CPU for the Routing
        Maps node."""
        self.device_copies = {}
        self.recorder.to_cpu()

    def reference_weights(self, sigma):
        return tuple(w if family.in_sigma_range(sigma, b) else 0.0
                     for w, b in zip(self.weights, self.reference_bounds))

    def per_image(self, active):
        """Whether any of the active references depends on the batch image a row shows."""
        return any(self.attention_masks[i] is not None or self.tokens_per_view[i] is not None
                   for i in active)

    def position_masks(self, active, grid, frames, device):
        """M (rows, L, active references) of the routed rows' attention masks, each row reading
        the mask of the batch image it shows (frames); None when no active reference has one."""
        masks = [self.attention_masks[i] for i in active]
        if all(m is None for m in masks):
            return None
        key = (grid, active, frames, str(device))
        if key not in self.attention_cache:
            columns = []
            for i, mask in zip(active, masks):
                if mask is None:
                    columns.append(torch.ones(len(frames), grid[0] * grid[1]))
                    continue
                if mask.shape[0] > 1 and max(frames) >= mask.shape[0]:
                    raise ValueError(f"attention_mask of reference {i + 1}: {mask.shape[0]} masks "
                                     f"for a batch with image {max(frames) + 1}; give one mask, "
                                     "or one per batch image")
                columns.append(routing.attention_mask_weights(mask, grid, frames))
            self.attention_cache[key] = torch.stack(columns, dim=-1).to(device)
        return self.attention_cache[key]

    def tile_groups(self, active, counts, grid):
        """kernels.token_groups.tile_groups of the active references (cached per grid), or None
        when none of them has tiles on their own regions."""
        if all(self.tiles[i] is None for i in active):
            return None
        key = (grid, active, tuple(counts))
        if key not in self.tile_cache:
            self.tile_cache[key] = token_groups.tile_groups(counts, [self.tiles[i] for i in active],
                                                            grid)
        return self.tile_cache[key]

    def layer_scale(self, location):
        """(scale of the attention output, K/V transform) at one layer: the node's scale times
        the layer's factor, on the output or on the image keys and values (embeds_scaling)."""
        weight = self.scale * self.layer_factors.get(location, 1.0)
        return (embeds.output_scale(weight, self.embeds_scaling),
                lambda k, v: embeds.scale_keys_values(k, v, weight, self.embeds_scaling, self.counts,
                                                      self.mean_groups)[:2])

    def make_patch(self, location, inner, to_k):
        layer = self.adapter.layer(location)
        scale, scale_keys_values = self.layer_scale(location)
        reverse = location in self.reversed_layers
        routed_roles = ("uncond",) if reverse else ROUTED_ROLES
        reads_image = lambda role: reverse or role in family.IMAGE_ROLES

        def tensors(device, dtype):
            cache = self.device_copies.setdefault(location, {})
            key = (device, dtype)
            if key not in cache:
                tokens = torch.stack([self.image_tokens, self.uncond_tokens]).to(device, dtype)
                ip_k, ip_v = scale_keys_values(*technique.image_keys_values(layer, tokens))
                gate = technique.gate_of(layer)
                cache[key] = {"k": ip_k, "v": ip_v, "rows": {}, "weights": {},
                              "gate": None if gate is None else gate.to(device, dtype)}
            return cache[key]

        def phrase_keys(device, dtype, row_roles):
            """Image-conditioned rows read the phrases' keys, uncond rows the empty prompt's."""
            # Cached per layer, valid while to_k holds the same weight tensor: a LoRA patch puts
            # a new tensor there (a weak reference, so the cache never keeps a weight alive).
            key = ("phrases", device, dtype)
            cache = self.device_copies.setdefault(location, {})
            entry = cache.get(key)
            if entry is None or entry[0]() is not to_k.weight:
                phrases, empty = (relevance.phrase_keys(to_k, group, device, dtype)
                                  for group in self.embeddings)
                entry = cache[key] = (weakref.ref(to_k.weight), phrases, empty, {})
            _, phrases, empty, per_rows = entry
            image = [r in family.IMAGE_ROLES for r in row_roles]
            if all(image):
                return phrases
            if tuple(image) not in per_rows:
                pick = torch.tensor(image, device=device)[:, None, None]
                per_rows[tuple(image)] = routing.PhraseKeys(
                    torch.where(pick, phrases.keys[None], empty.keys[None]), phrases.average)
            return per_rows[tuple(image)]

        def patch(q, k, v, extra_options):
            text_out = inner(q, k, v, extra_options)
            sigma = family.current_sigma(extra_options)
            if scale == 0 or not family.in_sigma_range(sigma, self.bounds):
                return text_out
            weights = self.reference_weights(sigma)
            roles = family.row_roles(extra_options, q.shape[0])
            rows = family.rows_with_role(roles, routed_roles)
            # References gated off at this step are left out of the computation (not multiplied
            # by zero), so they contribute exactly nothing on any CPU or GPU.
            active = tuple(i for i, w in enumerate(weights) if w != 0)
            if not rows or not active:
                return text_out
            cached = tensors(q.device, q.dtype)
            row_roles = tuple(roles[i] for i in rows)
            if row_roles not in cached["rows"]:
                # Image-conditioned rows read the image tokens, uncond rows the uncond tokens
                # (on a reversed layer only uncond rows are routed, and they read the image).
                image = torch.tensor([reads_image(r) for r in row_roles], device=q.device)
                pick = lambda t: torch.where(image[:, None, None, None], t[0][None], t[1][None])
                cached["rows"][row_roles] = (pick(cached["k"]), pick(cached["v"]))
            if weights not in cached["weights"]:
                cached["weights"][weights] = torch.tensor([weights[i] for i in active],
                                                          device=q.device)
            ip_k, ip_v = cached["rows"][row_roles]
            phrases = phrase_keys(q.device, q.dtype, row_roles) if self.embeddings else None
            masks, counts = self.masks, self.counts
            if len(active) < len(weights):
                counts = [counts[i] for i in active]
                # Padding only as long as the active references need: the shapes, and so the
                # summation order, are those of a node holding the active references alone.
                ip_k, ip_v = (t[:, list(active), :max(counts)] for t in (ip_k, ip_v))
                # One reference left: plain IP-Adapter, as a one-reference node would compute.
                phrases = phrases.select(active) if phrases is not None and len(active) > 1 else None
                masks = None if masks is None else masks[list(active)]
            subset = len(rows) < q.shape[0]
            q_rows = q[rows] if subset else q
            text_rows = text_out[rows] if subset else text_out
            grid = family.layer_grid(extra_options, q.shape[1])
            attention = None
            if self.per_image(active):
                items = family.row_items(extra_options, q.shape[0])
                frames = tuple(items[r] for r in rows)
                attention = self.position_masks(active, grid, frames, q.device)
                ip_k, ip_v, counts = token_groups.view_of_each_image(
                    ip_k, ip_v, counts, [self.tokens_per_view[i] for i in active], frames,
                    [i + 1 for i in active])
            groups = group_masks = None
            tiled = self.tile_groups(active, counts, grid)
            if tiled is not None:
                groups, positions, group_masks, counts = tiled
                ip_k, ip_v = (token_groups.take_groups(t, groups, positions) for t in (ip_k, ip_v))
            out, shown = technique.route(
                q_rows, text_rows, extra_options["n_heads"], ip_k, ip_v,
                cached["weights"][weights], scale, self.mode, phrases=phrases,
                masks=masks, grid=grid, gate=cached["gate"], token_counts=counts,
                attention_masks=attention, groups=groups, group_masks=group_masks)
            full = [i for i, r in enumerate(row_roles) if r == "full"]
            self.recorder.record_routed(sigma, location[0], grid, row_roles, shown, active,
                                        len(weights), extra_options.get("sample_sigmas"),
                                        _window_images(extra_options, q.shape[0], rows, full),
                                        q.device)
            if not subset:
                return out
            merged = text_out.clone()
            merged[rows] = out
            return merged

        return patch


class MultiRefApplyAdapter:
    DESCRIPTION = ("Applies an IP-Adapter (or MIP-Adapter) with several references, each routed "
                   "to its own object: in every cross-attention layer each reference's phrase "
                   "finds where its object is, and the references' image attention is merged "
                   "with those weights instead of blended everywhere. Returns a patched copy of "
                   "the model; the input model is unchanged.")
    CATEGORY = "MultiRef"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("the model with the references applied (connect it to a sampler)",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "SD1.5 or SDXL model to patch (other patches and LoRAs "
                                           "applied before or after are kept)."}),
            "adapter": ("MULTIREF_ADAPTER", {"tooltip": "From MultiRef Adapter Loader; must be the "
                                                        "adapter the references were encoded with."}),
            "references": ("MULTIREF_ENCODED", {"tooltip": "From MultiRef Encode References: one "
                                                           "entry per object."}),
            "clip": ("CLIP", {"tooltip": "The model's text encoder: encodes each reference's "
                                         "phrase on its own to find its object."}),
            "mode": (list(routing.MODES), {"default": "weighted", "tooltip":
                     "weighted: each reference goes where its phrase is (MIP-Adapter); mask: "
                     "each reference goes where its region mask is; sum: every reference "
                     "everywhere (plain IP-Adapter with the references added). weighted is "
                     "only as sharp as the model's phrase maps: if MultiRef Routing Maps shows "
                     "a reference over both subjects, use mask."}),
            "scale": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 3.0, "step": 0.05, "tooltip":
                      "Strength of the image attention (IP-Adapter weight); 0.6-0.8 is typical."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "Sampling progress where the references start acting."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                            "tooltip": "Sampling progress where the references stop acting."}),
        }, "optional": {
            "phrases": ("STRING", {"default": "", "tooltip":
                        "Optional comma-separated phrases, one per reference in order, replacing "
                        "the references' own phrases (e.g. 'dog, red hat'). Empty: use theirs."}),
            "region_masks": ("MASK", {"tooltip": "Mode mask: one mask per reference (batch in "
                                                 "reference order) over the output image; 0 = "
                                                 "off, 1 = full strength."}),
            "weight_type": (list(layer_weights.WEIGHT_TYPES), {"default": "linear", "tooltip":
                            "How the strength varies over the layers (IPAdapter's weight types): "
                            "linear = the same everywhere; style transfer / composition = only "
                            "the layers that carry style / layout (SDXL: InstantStyle's blocks); "
                            "the precise types also turn the reference around (image on the "
                            "negative side) on the other kind of layer, so less of it bleeds; "
                            "for a style image and a composition image, chain two Apply Adapter "
                            "nodes, one per image."}),
            "block_weights": ("STRING", {"default": "", "tooltip":
                              "Advanced: 'index:weight, ...' per spatial transformer (SDXL 0-10, "
                              "SD1.5 0-15, in input-middle-output order), e.g. '3:1, 6:0.8'; "
                              "replaces weight_type, unlisted layers get no image attention."}),
            "embeds_scaling": (list(embeds.SCALINGS), {"default": "V only", "tooltip":
                               "Where the strength acts: V only = on the image attention's output; "
                               "K+V = on the image keys and values; w/ C penalty = times layer "
                               "width / 1280; K+mean(V) = on the keys and the values' mean."}),
            "prompt": ("STRING", {"default": "", "multiline": True, "tooltip":
                       "Flux only: the prompt given to the text encoder, word for word. On Flux "
                       "each phrase is found inside the prompt's T5 tokens and routed by the "
                       "joint attention's own text keys there (SD1.5/SDXL encode phrases on "
                       "their own and ignore this)."}),
            "decouple_text": ("BOOLEAN", {"default": True, "tooltip":
                              "Flux, adapters that inject into the text tokens too (InstantX, in "
                              "its single blocks): on = Dynamic Decoupling (DynaIP), image "
                              "features go to the image tokens only; off = as published, the "
                              "text tokens read the references too."}),
        }}

    def apply(self, model, adapter, references, clip, mode, scale, start_percent, end_percent,
              phrases="", region_masks=None, weight_type="linear", block_weights="",
              embeds_scaling="V only", prompt="", decouple_text=True):
        adapter.require_image_layers("adapter")
        references = tuple(references)
        if not references:
            raise ValueError("references: no encoded references; connect MultiRef Encode "
                             "References with at least one reference")
        for i, ref in enumerate(references):
            if ref.adapter_fingerprint != adapter.fingerprint:
                raise ValueError(f"references: reference {i + 1} was encoded with another adapter "
                                 f"than {adapter.describe()}; encode the references with the same "
                                 "adapter that is applied")
        if mode not in routing.MODES:
            raise ValueError(f"mode: {mode!r} is not one of {routing.MODES}")
        if not math.isfinite(scale):
            raise ValueError(f"scale: {scale} is not a number; give 0.6-0.8 typically")
        texts = _phrases(references, phrases)
        if flux_family.is_flux(model):
            return (self.apply_flux(model, adapter, references, clip, mode, scale,
                                    start_percent, end_percent, texts, region_masks, weight_type,
                                    block_weights, embeds_scaling, prompt, decouple_text),)
        unet = model.model.diffusion_model
        if getattr(adapter, "family", None) == flux_adapters.FAMILY:
            bind_to_unet(adapter, unet)  # raises: an adapter made for Flux, named
        blocks = dict(unet_transformer_blocks(unet))
        adapter = adapter.bind(list(blocks), cross_attention_dims(unet))
        embeddings = None
        if mode == "weighted" and len(references) > 1:
            named = [phrase_embeddings(clip, text, f"phrase of reference {i + 1}")
                     for i, text in enumerate(texts)]
            context = adapter.context_dim
            if named[0].shape[-1] != context:
                raise ValueError(f"clip: the text encoder gives width {named[0].shape[-1]} "
                                 f"but the model's cross-attention reads width {context}; "
                                 "connect the text encoder of this model's checkpoint")
            embeddings = (named, empty_phrase_embeddings(clip, [e.shape[0] for e in named]))
        masks = _region_masks(region_masks, len(references)) if mode == "mask" else None
        if embeds_scaling not in embeds.SCALINGS:
            raise ValueError(f"embeds_scaling: {embeds_scaling!r} is not one of {embeds.SCALINGS}")
        factors = layer_weights.layer_factors(adapter.locations, weight_type, adapter.family,
                                              block_weights)
        reversed_layers = layer_weights.reversed_layers(adapter.locations, weight_type,
                                                        adapter.family)
        state = _RoutedReferences(model, adapter, references, embeddings, masks, mode, scale,
                                  family.sigma_range(model, start_percent, end_percent),
                                  factors, embeds_scaling, reversed_layers)
        patched = model.clone()
        family.set_attention_patch(
            patched, "attn2", lambda loc, inner: state.make_patch(loc, inner, blocks[loc].attn2.to_k))
        patched.model_options.setdefault("transformer_options", {})[RECORDER_KEY] = state.recorder
        family.on_each_run(patched, state.new_run, state.end_run)
        log.info("MultiRefApplyAdapter: %d references, mode %s, scale %.2f", len(references),
                 mode, scale)
        return (patched,)

    def apply_flux(self, model, adapter, references, clip, mode, scale, start_percent,
                   end_percent, texts, region_masks, weight_type, block_weights, embeds_scaling,
                   prompt, decouple_text):
        """The Flux path (nodes/flux_routing.py): phrases located in the prompt's T5 tokens."""
        if (weight_type, block_weights.strip(), embeds_scaling) != ("linear", "", "V only"):
            raise ValueError("weight_type / block_weights / embeds_scaling: per-layer weights are "
                             "not available on Flux yet; leave them at linear, empty and V only")
        for n, ref in enumerate(references, 1):
            unapplied = [what for what, value in (
                ("an attention_mask", ref.attention_mask), ("views 'one per batch image'",
                                                            ref.tokens_per_view),
                ("crop 'tiles on their regions'", ref.tile_regions)) if value is not None]
            if unapplied:
                raise ValueError(
                    f"references: reference {n} ('{ref.phrase}') has {' and '.join(unapplied)}, "
                    "which routing on Flux does not apply yet; take it off (MultiRef Reference, "
                    "MultiRef Encode References) or use an SD1.5 / SDXL model")
        positions = None
        if mode == "weighted" and len(references) > 1:
            if not prompt.strip():
                raise ValueError("prompt: on Flux, weighted routing finds each phrase inside the "
                                 "prompt; type the prompt given to the text encoder here (or "
                                 "choose mode 'mask' or 'sum')")
            positions = [phrase_positions(clip, prompt, text, f"phrase of reference {i + 1}")
                         for i, text in enumerate(texts)]
        masks = _region_masks(region_masks, len(references)) if mode == "mask" else None
        recorder = RoutingRecorder()
        state = flux_routing.FluxRoutedReferences(
            model, adapter, references, positions, masks, mode, scale,
            flux_family.sigma_range(model, start_percent, end_percent), decouple_text, recorder)
        patched = flux_routing.patch_model(model, state)
        patched.model_options.setdefault("transformer_options", {})[RECORDER_KEY] = recorder
        flux_family.on_each_run(patched, recorder.new_run)
        log.info("MultiRefApplyAdapter (Flux, %s): %d references, mode %s, scale %.2f",
                 adapter.describe(), len(references), mode, scale)
        return patched


def _window_images(extra_options, batch, rows, full):
    """The batch images of the recorded rows when a context window holds them, else None."""
    chunks = len(extra_options.get("cond_or_uncond") or (0,))
    if family.window_indices(extra_options, batch // chunks) is None:
        return None
    items = family.row_items(extra_options, batch)
    return [items[rows[i]] for i in full]


def _phrases(references, phrases):
    given = [p.strip() for p in phrases.split(",")] if phrases.strip() else []
    if len(given) > len(references):
        raise ValueError(f"phrases: {len(given)} phrases for {len(references)} references; give "
                         "at most one phrase per reference (comma-separated) or connect more "
                         "references")
    return given + [r.phrase for r in references[len(given):]]


def _region_masks(region_masks, count):
    if region_masks is None:
        raise ValueError("region_masks: mode 'mask' needs one mask per reference; connect a MASK "
                         "batch or choose mode 'weighted'")
    if region_masks.ndim not in (2, 3):
        raise ValueError(f"region_masks: expected a MASK batch (references, height, width), got "
                         f"shape {tuple(region_masks.shape)}")
    masks = region_masks if region_masks.ndim == 3 else region_masks[None]
    check_finite(masks, "region_masks", "re-load or redraw the masks (0 = reference off, "
                 "1 = full)")
    if masks.shape[0] != count:
        raise ValueError(f"region_masks: {masks.shape[0]} masks for {count} references; give one "
                         "mask per reference, in reference order")
    return masks.float().clamp(0, 1)


class MultiRefRoutingMaps:
    DESCRIPTION = ("Shows where each reference went: the routing weights of one sampling step and "
                   "layer group, one colour per reference, over the output. Connect the MODEL from "
                   "MultiRef Apply Adapter and the LATENT its sampler produced.")
    CATEGORY = "MultiRef"
    FUNCTION = "show"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("one picture per generated image: reference i's share in colour i",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model from MultiRef Apply Adapter that the sampler "
                                           "used."}),
            "samples": ("LATENT", {"tooltip": "The sampler's output (makes this run after it and "
                                              "gives the picture size)."}),
            "step": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip":
                     "Sampling step to show (0 = first); past the last step shows the last."}),
            "layers": (list(family.BLOCK_GROUPS), {"default": "all", "tooltip":
                       "Which cross-attention layers to average: all, down (input blocks), "
                       "middle, or up (output blocks)."}),
        }, "optional": {
            "image": ("IMAGE", {"tooltip": "Optional decoded output to draw the colours over."}),
        }}

    def show(self, model, samples, step, layers, image=None):
        recorder = model.model_options.get("transformer_options", {}).get(RECORDER_KEY)
        if recorder is None:
            raise ValueError("model: carries no routing; connect the MODEL output of MultiRef "
                             "Apply Adapter (the one the sampler used)")
        if not recorder.steps:
            raise ValueError("samples: no routing was recorded; run a sampler with this model "
                             "and connect its LATENT output here")
        if step >= recorder.steps:
            log.warning("MultiRefRoutingMaps: step %d not recorded, showing the last step (%d)",
                        step, recorder.steps - 1)
            step = recorder.steps - 1
        latent = samples["samples"]
        size = tuple(image.shape[1:3]) if image is not None else (latent.shape[-2] * 8,
                                                                 latent.shape[-1] * 8)
        groups = (flux_family if flux_family.is_flux(model) else family).BLOCK_GROUPS
        if layers not in groups:
            raise ValueError(f"layers: a Flux model has no '{layers}' blocks; choose 'all'")
        maps = recorder.maps(step, groups[layers], size)
        if maps is None:
            raise ValueError(f"layers: no routed layer in group '{layers}'; choose 'all'")
        colours = torch.tensor([PALETTE[i % len(PALETTE)] for i in range(maps.shape[1])])
        picture = torch.einsum("bnhw,nc->bhwc", maps, colours)
        picture = picture / maps.sum(1)[..., None].clamp_min(1.0)
        if image is not None:
            picture = 0.5 * image[:, :, :, :3].float().cpu() + 0.5 * picture[:image.shape[0]]
        return (picture.clamp(0, 1),)


NODE_CLASS_MAPPINGS = {"MultiRefApplyAdapter": MultiRefApplyAdapter,
                       "MultiRefRoutingMaps": MultiRefRoutingMaps}
NODE_DISPLAY_NAME_MAPPINGS = {"MultiRefApplyAdapter": "MultiRef Apply Adapter (routing)",
                              "MultiRefRoutingMaps": "MultiRef Routing Maps"}
