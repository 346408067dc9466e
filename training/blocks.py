"""The training-safe path through the host's UNet, installed as object patches on a clone.

Why it exists:
  * the installable host (comfyui==0.0.1) adds the attention residuals in place (`x += n`) inside
    its BasicTransformerBlock, which autograd refuses ("modified by an inplace operation");
  * the host's UNet forward calls each layer of a block directly (`forward_timestep_embed`), so
    wrapping a whole block's forward checkpoints nothing.
The family says which layers run (families.unet.transformer_layers, residual_layers: the
trainer's part of the seam, families/base.py); this module never walks the model itself.
So every SpatialTransformer's `forward` is replaced (on a clone, through the host's own
`add_object_patch`, undone when the clone is unpatched) by `TrainingSpatialTransformer`, which
computes the same layer out of place with the host module's own weights, honours the host's
attention patch protocol (attn1/attn2 patches, attn2 replaces: routing and IP-Adapter patches keep
working), adds the LoRA to the self-attention and runs Masked Shared Attention against the
reference rows. Every ResBlock's `forward` gets a checkpointing wrapper. These are the layers
that run, so checkpointing them is what saves memory (tests measure it).

Masked Shared Attention in training (SynCD): a reference pass (no gradient, LoRA off) records the
self-attention input of every reference row at every layer; in the target pass each target row
attends to [its own tokens | the foreground tokens of its group's references], the reference
keys/values projected with the LoRA on (that LoRA is what trains on them).
"""
import torch
from torch.utils.checkpoint import checkpoint

from ..families import unet as family
from ..kernels import msa
from ..kernels.lora import deltas, new_self_attention_lora
from ..techniques import msa as msa_technique
from ..techniques import relevance
from ..techniques import routing as routing_technique
from . import attention_constraint


class PassState:
    """What the patches of one training run share: the LoRA layers, whether the current UNet call
    is the reference pass or the target pass, and the reference rows recorded for MSA."""

    def __init__(self, lora_layers, checkpointing, adapter_layers=None, ip_scale=1.0,
                 reference_conditioning="syncd"):
        self.lora_layers = lora_layers          # {location: ModuleDict of LoRAPair}
        self.adapter_layers = adapter_layers or {}  # {location: AdapterLayer} (IP, routing gate)
        self.ip_scale = ip_scale
        self.reference_conditioning = reference_conditioning  # kernels.msa.REFERENCE_CONDITIONINGS
        self.checkpointing = checkpointing
        self.mode = "plain"                     # plain | reference | target
        self.recorded = {}                      # location -> (B*K, L, C) detached
        self.ref_masks = None                   # (B, K, h, w) float 0/1 at latent resolution
        self.image = None                       # target pass: ImageCondition or None
        self.ref_tokens = None                  # reference pass: (B*K, T, C) own image tokens
        self.relevance = None                   # quality scoring: (RelevanceMaps, phrases) or None
        self.maps = None                        # target pass: attention_constraint.PassMaps or None

    def begin_reference(self, ref_tokens=None):
        """ref_tokens: each reference row's own image tokens (syncd conditioning), or None."""
        self.mode, self.recorded, self.ref_tokens = "reference", {}, ref_tokens

    def begin_target(self, ref_masks, image=None, maps=None):
        """maps: attention_constraint.PassMaps when the map constraints run, else None."""
        self.mode, self.ref_masks, self.image, self.maps = "target", ref_masks, image, maps

    def begin_relevance(self, maps, phrases):
        """Record into `maps` (techniques.relevance.RelevanceMaps) each phrase's relevance at
        every cross-attention layer; phrases: [(P_i, C_ctx)] embeddings."""
        self.mode, self.relevance = "plain", (maps, phrases)

    def end(self):
        self.mode, self.recorded, self.ref_masks, self.image = "plain", {}, None, None
        self.relevance, self.ref_tokens, self.maps = None, None, None

    def snapshot(self):
        """What a layer call needs of this state, frozen at call time: a checkpointed layer
        recomputes in backward, after the pass has ended."""
        return PassView(self.lora_layers, self.adapter_layers, self.ip_scale, self.mode,
                        self.recorded, self.ref_masks, self.image, self.relevance, self.ref_tokens,
                        self.maps)


class PassView:
    def __init__(self, lora_layers, adapter_layers, ip_scale, mode, recorded, ref_masks, image,
                 relevance, ref_tokens=None, maps=None):
        self.lora_layers, self.adapter_layers, self.ip_scale = lora_layers, adapter_layers, ip_scale
        self.mode, self.recorded, self.ref_masks, self.image = mode, recorded, ref_masks, image
        self.relevance, self.ref_tokens, self.maps = relevance, ref_tokens, maps


class ImageCondition:
    """The adapter's input for the target rows: tokens (B, K, T, C) per reference (uncond
    tokens where the image condition was dropped), weights (B, K) (0 = padding), phrases: per
    row, the (P_i, D) phrase embeddings of its references (routing)."""

    def __init__(self, tokens, weights, phrases):
        self.tokens, self.weights, self.phrases = tokens, weights, phrases


def build_lora_layers(diffusion_model, rank, alpha=None):
    """A fresh self-attention LoRA for every transformer block, in execution order, keyed by the
    block's attention location, the key the adapter files are bound by."""
    return {prefix + (index,): new_self_attention_lora(block.attn1.to_q.in_features,
                                                       block.attn1.to_q.out_features, rank, alpha)
            for _, layer, prefix in family.transformer_layers(diffusion_model)
            for index, block in enumerate(layer.transformer_blocks)}


def attention_paths(diffusion_model):
    """{location: 'diffusion_model.<...>.attn1'}: where each self-attention lives in the model."""
    return {prefix + (index,): f"diffusion_model.{path}.transformer_blocks.{index}.attn1"
            for path, layer, prefix in family.transformer_layers(diffusion_model)
            for index, _ in enumerate(layer.transformer_blocks)}


def install(patcher, state):
    """Object-patch the clone `patcher`: every SpatialTransformer and ResBlock forward, and every
    weight by a frozen Parameter (requires_grad off, so no gradient is computed for the base
    model and its own parameters' flags are never touched). A weight that is an inference
    tensor (ComfyUI runs nodes in inference mode, so models loaded by a node hold such
    tensors, which autograd cannot save for backward) is copied; any other is shared."""
    for name, param in patcher.model.named_parameters():
        data = param.clone() if param.is_inference() else param.detach()
        patcher.add_object_patch(name, torch.nn.Parameter(data, requires_grad=False))
    unet = patcher.model.diffusion_model
    for path, module, prefix in family.transformer_layers(unet):
        patcher.add_object_patch(f"diffusion_model.{path}.forward",
                                 TrainingSpatialTransformer(module, prefix, state))
    for path, module in family.residual_layers(unet):
        patcher.add_object_patch(f"diffusion_model.{path}.forward",
                                 CheckpointedResBlock(module, state))
    return patcher


class CheckpointedResBlock:
    """layer(x, emb) with its activations recomputed in backward when checkpointing is on."""

    def __init__(self, module, state):
        self.module, self.state = module, state

    def __call__(self, x, emb, *args, **kwargs):
        # Extra arguments: newer hosts pass more (e.g. transformer_options); hand them through.
        run = type(self.module).forward
        if self.state.checkpointing and torch.is_grad_enabled():
            return checkpoint(run, self.module, x, emb, *args, use_reentrant=False, **kwargs)
        return run(self.module, x, emb, *args, **kwargs)


class TrainingSpatialTransformer:
    """An out-of-place SpatialTransformer forward using the host module's own weights; its block
    i is at attention location prefix + (i,)."""

    def __init__(self, module, prefix, state):
        self.module, self.prefix, self.state = module, prefix, state

    def __call__(self, x, context=None, transformer_options={}):
        st = self.module
        contexts = context if isinstance(context, list) else [context] * len(st.transformer_blocks)
        # The host mutates transformer_options while it walks the UNet; a recompute in backward
        # must see the values of this call.
        options = dict(transformer_options)
        view = self.state.snapshot()
        if self.state.checkpointing and torch.is_grad_enabled():
            hidden, terms = checkpoint(self._run, x, options, view, *contexts, use_reentrant=False)
        else:
            hidden, terms = self._run(x, options, view, *contexts)
        # The map terms leave as outputs, not through the state: a checkpointed layer's
        # recompute in backward runs _run again and must not record them twice.
        if view.maps is not None:
            view.maps.collected.extend(terms)
        return hidden

    def _run(self, x, options, view, *contexts):
        """(the layer's output, attention_constraint.LayerTerms of its constrained blocks)."""
        st = self.module
        b, c, h, w = x.shape
        hidden = st.norm(x)
        if not st.use_linear:
            hidden = st.proj_in(hidden)
        hidden = hidden.movedim(1, 3).flatten(1, 2)
        if st.use_linear:
            hidden = st.proj_in(hidden)
        terms = []
        for index, block in enumerate(st.transformer_blocks):
            block_options = dict(options, block_index=index)
            hidden = self._block(block, hidden, contexts[index], block_options, (h, w), view, terms)
        if st.use_linear:
            hidden = st.proj_out(hidden)
        hidden = hidden.reshape(b, h, w, hidden.shape[-1]).movedim(3, 1)
        if not st.use_linear:
            hidden = st.proj_out(hidden)
        return hidden + x, terms

    def _block(self, block, x, context, options, hw, view, terms):
        """BasicTransformerBlock.forward of the host, with every residual out of place; a
        constrained layer appends its map terms to `terms`."""
        patches = options.get("patches", {})
        replaces = options.get("patches_replace", {})
        extra = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")}
        extra.update(n_heads=block.n_heads, dim_head=block.d_head,
                     attn_precision=getattr(block, "attn_precision", None))
        location = self.prefix + (options["block_index"],)
        if block.ff_in:
            skip = x
            x = block.ff_in(block.norm_in(x))
            if block.is_res:
                x = x + skip
        n = block.norm1(x)
        for patch in patches.get("attn1_patch", ()):
            n, _, _ = patch(n, n, n, extra)
        n = self._self_attention(block, n, location, hw, extra, view)
        for patch in patches.get("attn1_output_patch", ()):
            n = patch(n, extra)
        x = x + n
        for patch in patches.get("middle_patch", ()):
            x = patch(x, extra)
        if block.attn2 is not None:
            n = block.norm2(x)
            ctx = n if block.switch_temporal_ca_to_sa else context
            value = ctx
            if view.relevance is not None:
                maps, phrases = view.relevance
                maps.record(0.0, location[0], hw, relevance.phrase_relevance(
                    block.attn2.to_q(n), block.attn2.to_k, phrases, block.n_heads))
            for patch in patches.get("attn2_patch", ()):
                n, ctx, value = patch(n, ctx, value, extra)
            if view.maps is not None and location[0] in view.maps.settings.layers:
                terms.append(attention_constraint.layer_terms(
                    view.maps, block.attn2, n, ctx, hw, block.n_heads,
                    view.adapter_layers.get(location), view.image))
            attn2 = replaces.get("attn2", {})
            key = location if location in attn2 else location[:2]
            if view.image is not None and location in view.adapter_layers:
                n = self._routed_cross_attention(block.attn2, n, ctx, value, location, extra, view)
            elif view.ref_tokens is not None and location in view.adapter_layers:
                n = self._reference_cross_attention(block.attn2, n, ctx, value, location, extra,
                                                    view)
            elif key in attn2:
                attn = block.attn2
                n = attn.to_out(attn2[key](attn.to_q(n), attn.to_k(ctx), attn.to_v(value), extra))
            else:
                n = block.attn2(n, context=ctx, value=value)
            for patch in patches.get("attn2_output_patch", ()):
                n = patch(n, extra)
            x = x + n
        skip = x
        x = block.ff(block.norm3(x))
        return x + skip if block.is_res else x

    def _routed_cross_attention(self, attn, n, ctx, value, location, extra, view):
        """Text attention plus the adapter's image attention, routed per reference by its
        phrase (techniques.routing, MIP-Adapter's weighted merge; maps detached); each row reads
        its own group's references."""
        heads, layer, image = extra["n_heads"], view.adapter_layers[location], view.image
        q, k, v = attn.to_q(n), attn.to_k(ctx), attn.to_v(value)
        text_out = msa_technique.plain_attention(q, k, v, heads)
        gate = routing_technique.gate_of(layer)
        rows = []
        for b in range(q.shape[0]):
            ip_k, ip_v = routing_technique.image_keys_values(layer, image.tokens[b].to(q.dtype))
            phrases = relevance.phrase_keys(attn.to_k, image.phrases[b], q.device, q.dtype)
            out, _ = routing_technique.route(
                q[b:b + 1], text_out[b:b + 1], heads, ip_k[None], ip_v[None], image.weights[b],
                view.ip_scale, "weighted", phrases=phrases, gate=gate)
            rows.append(out)
        return attn.to_out(torch.cat(rows))

    def _reference_cross_attention(self, attn, n, ctx, value, location, extra, view):
        """The reference pass's cross-attention with syncd conditioning: text attention plus the
        adapter's image attention at SynCD's reference scale over each row's own tokens."""
        heads, layer = extra["n_heads"], view.adapter_layers[location]
        q, k, v = attn.to_q(n), attn.to_k(ctx), attn.to_v(value)
        text_out = msa_technique.plain_attention(q, k, v, heads)
        ip_k, ip_v = routing_technique.image_keys_values(layer, view.ref_tokens.to(q.dtype))
        return attn.to_out(msa.reference_image_attention(q, text_out, ip_k, ip_v, heads))

    def _self_attention(self, block, n, location, hw, extra, state):
        """Masked Shared Attention (techniques.msa): the target pass with the LoRA, reading the
        recorded reference inputs; the reference pass plain and without it."""
        attn = block.attn1
        pairs = None if state.mode == "reference" else state.lora_layers.get(location)
        lora = None if pairs is None else deltas(pairs)
        if state.mode == "reference":
            state.recorded[location] = n.detach()
        rows, heads = n.shape[0], extra["n_heads"]
        q, k, v = msa_technique.with_lora(attn.to_q(n), attn.to_k(n), attn.to_v(n), n, lora, rows)
        if state.mode == "target" and location in state.recorded:
            out = self._shared(q, k, v, state.recorded[location], state.ref_masks, lora, attn, hw,
                               heads)
        else:
            out = msa_technique.plain_attention(q, k, v, heads)
        return msa_technique.lora_output(attn.to_out(out), out, lora, rows)

    def _shared(self, q, k, v, refs, ref_masks, lora, attn, hw, heads):
        """Each target row reads the foreground of its own group's references; their keys and
        values get the LoRA (that trains) through techniques.msa.read_references."""
        batch = q.shape[0]
        per_group = refs.shape[0] // batch
        kr, vr = attn.to_k(refs), attn.to_v(refs)
        fg = msa.resize_masks(ref_masks.flatten(0, 1), *hw)
        rows = []
        for b in range(batch):
            group = slice(b * per_group, (b + 1) * per_group)
            rows.append(msa_technique.read_references(
                q[b:b + 1], k[b:b + 1], v[b:b + 1], heads, kr[group], vr[group],
                msa.foreground_index(fg[group]), lora=lora, ref_n=refs[group]))
        return torch.cat(rows)
