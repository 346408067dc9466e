"""MultiRefApplyMSA: Masked Shared Attention (SynCD; docs/ARCHITECTURE.md, Masked Shared
Attention) as a model patch.

`references` mode, one batched UNet call per step: a row provider on the pack's UNet wrapper
re-noises the clean reference latents to the step's sigma and appends them as `ref` rows; at
every patched self-attention layer the `full` and `image` rows read [own | foreground keys/values
of the ref rows of that same layer call]; `uncond` and `ref` rows attend only to themselves. The
references never attend to the target, so this equals SynCD's reference pass + target pass.
An adapter carrying a self-attention LoRA (SynCD) applies it to the target rows and to the
reference keys/values they read, not to the reference rows' own attention (SynCD's passes).
`batch` mode: the images of one batch share their foreground with each other; the masks are
given, or come from the cross-attention map of a phrase (the last step's map, Otsu-thresholded).
On Flux (families/flux.py) the same rows and state serve the joint-attention patches of
nodes/msa_flux.py, and `kontext` mode restricts the references ReferenceLatent put in the
sequence instead of adding rows.
The math lives in kernels/msa.py; this module only routes rows and keeps per-step bookkeeping.
"""
import logging

import torch

from ..families import flux
from ..families import unet as family
from ..families.text import phrase_embeddings
from ..kernels import msa
from ..kernels.checkpoints import cross_attention_dims, unet_transformer_blocks
from ..kernels.references import EncodedReference, check_finite
from ..kernels.routing import layer_grid
from ..techniques import msa as technique
from ..techniques import relevance
from ..techniques import routing as routing_technique
from . import msa_flux

log = logging.getLogger("multiref")

TAG = "msa"  # the reference rows the full rows read (and the image rows, unless IMAGE_TAG)
IMAGE_TAG = "msa_image"  # syncd conditioning: the image rows' own reference rows
MODES = ("references", "batch", "kontext")
CONDITIONINGS = ("auto",) + msa.REFERENCE_CONDITIONINGS
# Adapters trained with SynCD's reference pass: "auto" conditions their reference rows so.
SYNCD_TRAINED_KINDS = ("syncd", "multiref")
LAYERS = ("all", "down", "up", "double", "single")  # down/up: UNet; double/single: Flux
UNET_LAYERS = ("all", "down", "up")
REFERENCE_NOISE = ("noised", "clean")


class _Call:
    """What the attention patches need to know about the current UNet call: the latent grid,
    which reference rows (or batch masks) give foreground, and whether the mask is off."""

    def __init__(self, grid, key, masks, unmasked, weights=None, tokens=None):
        self.grid, self.key, self.masks, self.unmasked = grid, key, masks, unmasked
        self.weights = weights  # (rows,) weight of the reference each reference row belongs to
        self.tokens = tokens  # (rows, T, C) each reference row's own image tokens, or None


class _StepState(family.SharedAcrossClones):
    """Shared by the row provider and the attention patches of one patched model.
    The host reuses the model options from run to run: a run starts when sigma goes up
    (techniques.relevance.StepClock)."""

    def __init__(self):
        self.clock = relevance.StepClock()
        self.call = None
        self.foreground_cache = {}  # (grid, key, unmasked, h, w, device) -> (index, bias)

    def is_first_step(self, sigma):
        return self.clock.start(sigma)[0] == 0

    def new_run(self):
        """The host said a new run starts: its first step is the next one."""
        self.clock, self.call = relevance.StepClock(), None

    def foreground(self, h, w, device):
        """(flat indices of the foreground tokens of the call's reference rows at an h x w
        layer, their log-weight bias or None); cached: the masks only change when the set of
        active references does."""
        call = self.call
        cache_key = (call.grid, call.key, call.unmasked, h, w, str(device))
        found = self.foreground_cache.get(cache_key)
        if found is None:
            values = msa.resize_mask_values(call.masks, h, w)
            if call.unmasked:
                values = torch.ones_like(values)
            index = msa.foreground_index(values > 0)
            bias = msa.reference_bias(call.weights, h * w, index, values.flatten())
            found = (index.to(device), None if bias is None else bias.to(device))
            self.foreground_cache[cache_key] = found
        return found

    def batch_foreground(self, rows, h, w, device):
        """(rows, h*w) bool foreground of the batch images (batch mode)."""
        call = self.call
        if call.masks is None or call.unmasked:
            return torch.ones(rows, h * w, dtype=torch.bool, device=device)
        if call.masks.shape[0] not in (1, rows):
            raise ValueError(f"batch_masks: {call.masks.shape[0]} masks for a batch of {rows} "
                             "images; give one mask per image or a single mask for all")
        return msa.resize_masks(call.masks, h, w).to(device).expand(rows, -1)


class _Reference:
    """One reference's rows, ready to re-noise: latents after the model's process_latent_in.
    syncd conditioning: text (1, L, C) and pooled (1, P) of its reference prompt, and tokens
    (V, T, C) its views' own image tokens (None without an adapter's image layers)."""

    def __init__(self, latents, masks, bounds, weight, text=None, pooled=None, tokens=None):
        self.latents, self.masks, self.bounds, self.weight = latents, masks, bounds, weight
        self.text, self.pooled, self.tokens = text, pooled, tokens


class _ReferenceRows(family.SharedAcrossClones):
    """Row provider (families/unet.py): appends the references re-noised to the step's sigma with
    fresh noise. target_text conditioning: one set of rows with the text/adm of the first full
    row (else image row). syncd: one set per reading branch, as SynCD's reference pass runs
    per branch: the full rows' set reads each reference's own prompt (its pooled text in the
    adm, the full row's size part), the image rows' set the image row's negative text."""

    def __init__(self, references, bounds, sampling, state, first_step_unmasked, syncd,
                 clean=False):
        self.references, self.bounds, self.sampling = references, bounds, sampling
        self.state, self.first_step_unmasked, self.syncd = state, first_step_unmasked, syncd
        self.clean = clean  # the clean latents at the step's timestep (as Kontext, SynCD-Flux)

    def __call__(self, x, timestep, c, roles):
        sigma = float(timestep.reshape(-1)[0])
        first = self.state.is_first_step(sigma)
        self.state.call = None
        if not family.in_sigma_range(sigma, self.bounds):
            return None
        height, width = x.shape[-2:]
        source = family.rows_with_role(roles, "full") or family.rows_with_role(roles, "image")
        # A reference of weight 0 is left out: no rows, no tokens.
        active = tuple(i for i, ref in enumerate(self.references)
                       if ref.weight > 0 and family.in_sigma_range(sigma, ref.bounds))
        if not source or not active:
            # No reference rows in this call; an adapter's LoRA still applies to the target.
            self.state.call = _Call((height, width), None, None, False)
            return None
        latents, masks, weights, views = [], [], [], []
        for i in active:
            ref = self.references[i]
            lat, mask = msa.fit_to_grid(ref.latents, ref.masks, height, width)
            latents.append(lat)
            masks.append(torch.ones(lat.shape[0], height, width) if mask is None else mask)
            weights += [float(ref.weight)] * lat.shape[0]
            views += [ref] * lat.shape[0]
        latents = torch.cat(latents).to(x.device, torch.float32)
        if self.clean:
            rows = latents
        else:
            noise = msa.step_noise(latents.shape, sigma).to(x.device)
            sigmas = torch.full((latents.shape[0], 1, 1, 1), sigma, device=x.device)
            rows = self.sampling.noise_scaling(sigmas, noise, latents)
        has_tokens = self.syncd and views[0].tokens is not None
        tokens = torch.cat([self.references[i].tokens for i in active]) if has_tokens else None
        self.state.call = _Call((height, width), active, torch.cat(masks),
                                first and self.first_step_unmasked, torch.tensor(weights), tokens)
        count = rows.shape[0]
        if not self.syncd:
            return rows, [source[0]] * count, TAG
        sets = []
        full = family.rows_with_role(roles, "full")
        if full:
            text = torch.cat([ref.text for ref in views])
            overrides = {"c_crossattn": lambda copied: msa.repeat_to_length(text, copied.shape[1])}
            if views[0].pooled is not None:
                pooled = torch.cat([ref.pooled for ref in views])
                overrides["y"] = lambda copied: msa.with_pooled(copied, pooled)
            sets.append((rows, [full[0]] * count, TAG, overrides))
        image = family.rows_with_role(roles, "image")
        if image:
            sets.append((rows, [image[0]] * count, IMAGE_TAG if full else TAG))
        return sets


class _PhraseMaps(family.SharedAcrossClones):
    """Batch mode without masks but with a phrase: the phrase's relevance maps of the full rows
    (techniques.relevance), averaged over the layers of one step, give the next step's masks
    (Otsu + dilation, as SynCD's data generation); before the first maps exist the whole
    images are shared."""

    def __init__(self, embeddings):
        self.embeddings = embeddings
        self.collected = relevance.RelevanceMaps()
        self.masks = None

    def start_call(self, sigma, latent_grid):
        """Called once per UNet call: the last step's maps, on the latent grid, become masks."""
        step = self.collected.start(sigma)
        last = None
        if step:
            last = self.collected.maps(step - 1, family.BLOCK_GROUPS["all"], latent_grid)
        self.masks = None if last is None else msa.phrase_masks(last[:, 0])

    def make_patch(self, location, inner, to_k):
        def attn2(q, k, v, extra_options):
            roles = family.row_roles(extra_options, q.shape[0])
            full = family.rows_with_role(roles, "full")
            if full:
                maps = relevance.phrase_relevance(_take(q, full), to_k, [self.embeddings],
                                                  extra_options["n_heads"])
                self.collected.record(family.current_sigma(extra_options), location[0],
                                      family.layer_grid(extra_options, q.shape[1]), maps)
            return inner(q, k, v, extra_options)
        return attn2


class _BatchCall(family.SharedAcrossClones):
    """Row provider for batch mode: adds no rows, only tells the patches whether this call is in
    the sigma range, whether it is the first (unmasked) step, and which masks hold."""

    def __init__(self, masks, bounds, state, first_step_unmasked, phrase_maps=None):
        self.masks, self.bounds, self.phrase_maps = masks, bounds, phrase_maps
        self.state, self.first_step_unmasked = state, first_step_unmasked

    def __call__(self, x, timestep, c, roles):
        sigma = float(timestep.reshape(-1)[0])
        first = self.state.is_first_step(sigma)
        masks = self.masks
        if self.phrase_maps is not None:
            self.phrase_maps.start_call(sigma, tuple(x.shape[-2:]))
            masks = self.phrase_maps.masks
        active = family.in_sigma_range(sigma, self.bounds)
        self.state.call = _Call(tuple(x.shape[-2:]), (), masks,
                                first and self.first_step_unmasked) if active else None
        return None


def _take(x, rows):
    """Rows of x: a view when they are contiguous (the usual case: the host batches each branch
    as one chunk), saving a copy of q, k and v per layer."""
    if rows == list(range(rows[0], rows[0] + len(rows))):
        return x[rows[0]:rows[0] + len(rows)]
    return x[rows]


INPUT_KEY = "multiref_attn1_input"
OUTPUT_KEY = "multiref_attn1_lora_output"


class _StashInput(family.SharedAcrossClones):
    """attn1_patch: keeps the self-attention input n (what to_q/to_k/to_v read) for the replace,
    which needs it for the LoRA deltas; the block passes the same extra_options to both."""

    def __call__(self, n, context, value, extra_options):
        extra_options[INPUT_KEY] = n
        return n, context, value


class _LoRAOutput(family.SharedAcrossClones):
    """attn1_output_patch: adds the to_out LoRA delta of the target rows after the host's to_out
    (the replace leaves the pre-to_out output it needs in extra_options)."""

    def __call__(self, n, extra_options):
        stash = extra_options.pop(OUTPUT_KEY, None)
        if stash is None:
            return n
        rows, attention_out, lora = stash
        return technique.lora_output(n, attention_out, lora, rows)


class _LoRAWeights:
    """One projection's LoRAPair with its weights on the activations' device and dtype, copied
    once (the adapter's own modules are never moved or cast: other nodes share them)."""

    def __init__(self, pair, device, dtype):
        self.pair = pair
        self.weights = {name: w.detach().to(device, dtype) for name, w in pair.state_dict().items()}

    def __call__(self, x):
        return torch.func.functional_call(self.pair, self.weights, (x,))


class _SharedSelfAttention(family.SharedAcrossClones):
    """attn1 replace: reading rows get shared attention, every other row goes to `inner` (what
    ran there before: the host's attention or another node's replace). With an adapter's
    self-attention LoRA, the target rows' q, k, v (and to_out) get its deltas and the reference
    rows do not, while the keys/values the target reads from the references do (SynCD: the
    reference pass runs without the LoRA, the target pass projects its cached inputs with it).
    Shared across clones: the LoRA weights are not copied by every later node."""

    def __init__(self, inner, state, strength, mode, lora=None, shares=True):
        self.inner, self.state, self.strength, self.mode = inner, state, strength, mode
        self.lora, self.shares = lora, shares
        self.lora_on = {}  # (device, dtype) -> {projection: _LoRAWeights}

    def _lora(self, device, dtype):
        if (device, dtype) not in self.lora_on:
            self.lora_on[(device, dtype)] = {name: _LoRAWeights(pair, device, dtype)
                                             for name, pair in self.lora.items()}
        return self.lora_on[(device, dtype)]

    def __call__(self, q, k, v, extra_options):
        call = self.state.call
        if call is None:
            return self.inner(q, k, v, extra_options)
        roles = family.row_roles(extra_options, q.shape[0])
        spans = {}
        if self.mode == "references":
            spans = {tag: span for tag, span in extra_options.get("multiref_rows", {}).items()
                     if tag in (TAG, IMAGE_TAG)}
        sharing = self.shares and (bool(spans) or self.mode == "batch")
        readers = family.rows_with_role(roles, family.IMAGE_ROLES) if sharing else []
        # Reference rows come last.
        targets = min(start for start, _ in spans.values()) if spans else q.shape[0]
        lora = None if self.lora is None else self._lora(q.device, q.dtype)
        if lora is not None:
            q, k, v = technique.with_lora(q, k, v, extra_options[INPUT_KEY], lora, targets)
        if not readers:
            out = self.inner(q, k, v, extra_options)
        else:
            out = self._shared(q, k, v, extra_options, roles, readers, call, spans, lora)
        if lora is not None:
            extra_options[OUTPUT_KEY] = (targets, out, lora)
        return out

    def _shared(self, q, k, v, extra_options, roles, readers, call, spans, lora):
        heads = extra_options["n_heads"]
        h, w = layer_grid(call.grid, q.shape[1])
        shared = q.new_empty((len(readers),) + q.shape[1:])
        if self.mode == "references":
            index, bias = self.state.foreground(h, w, q.device)
            # Each reading row reads its branch's set of reference rows (one set unless syncd).
            by_set = {}
            for i in readers:
                tag = IMAGE_TAG if roles[i] == "image" and IMAGE_TAG in spans else TAG
                by_set.setdefault(tag, []).append(i)
            for tag, group in by_set.items():
                start, end = spans[tag]
                ref_n = None if lora is None else extra_options[INPUT_KEY][start:end]
                at = [readers.index(i) for i in group]
                shared[at] = technique.read_references(
                    _take(q, group), _take(k, group), _take(v, group), heads, k[start:end],
                    v[start:end], index, bias, lora, ref_n)
        else:
            for role in family.IMAGE_ROLES:
                group = family.rows_with_role(roles, role)
                if group:
                    fg = self.state.batch_foreground(len(group), h, w, q.device)
                    at = [readers.index(i) for i in group]
                    shared[at] = msa.batch_shared_attention(_take(q, group), _take(k, group),
                                                            _take(v, group), fg, heads)
        plain_rows = [i for i in range(q.shape[0]) if i not in readers or self.strength != 1.0]
        out = torch.empty_like(q)
        if plain_rows:
            plain = self._inner_on_rows(q, k, v, extra_options, roles, plain_rows)
            out[plain_rows] = plain
        out[readers] = shared if self.strength == 1.0 else msa.blend(out[readers], shared,
                                                                      self.strength)
        return out

    def _inner_on_rows(self, q, k, v, extra_options, roles, rows):
        if len(rows) == q.shape[0]:
            return self.inner(q, k, v, extra_options)
        # The inner patch sees a consistent batch: its rows' roles, and no reference-row spans.
        options = dict(extra_options, **{family.ROLES_KEY: tuple(roles[i] for i in rows),
                                         "multiref_rows": {}})
        return self.inner(_take(q, rows), _take(k, rows), _take(v, rows), options)


class _ReferenceImageAttention(family.SharedAcrossClones):
    """attn2 replace (syncd conditioning with an adapter's image layers): the reference rows get
    the adapter's image attention at SynCD's reference-pass scale over their own tokens; every
    other row is what `inner` gives (the host's attention, or the routing node's patch)."""

    def __init__(self, inner, state, layer):
        self.inner, self.state, self.layer = inner, state, layer
        self.projected = {}  # (active references, device, dtype) -> (keys, values)

    def __call__(self, q, k, v, extra_options):
        out = self.inner(q, k, v, extra_options)
        call = self.state.call
        spans = [span for tag, span in extra_options.get("multiref_rows", {}).items()
                 if tag in (TAG, IMAGE_TAG)]
        if call is None or call.tokens is None or not spans:
            return out
        key = (call.key, q.device, q.dtype)
        if key not in self.projected:
            self.projected = {key: routing_technique.image_keys_values(
                self.layer, call.tokens.to(q.device, q.dtype))}
        ip_k, ip_v = self.projected[key]
        out = out.clone()
        for start, end in spans:
            out[start:end] = msa.reference_image_attention(q[start:end], out[start:end], ip_k,
                                                           ip_v, extra_options["n_heads"])
        return out


def _prepare_references(model, latent_channels, references, syncd=None):
    """syncd: None (target_text conditioning), or (clip, adapter with image layers or None)."""
    if not references:
        raise ValueError("references: mode 'references' needs at least one encoded reference; "
                         "connect MultiRefEncodeReferences (or use mode 'batch')")
    prepared = []
    for n, ref in enumerate(references, 1):
        if not isinstance(ref, EncodedReference):
            raise ValueError(f"references: item {n} is a {type(ref).__name__}, not an encoded "
                             "reference; connect the output of MultiRefEncodeReferences")
        if ref.latents is None:
            raise ValueError(f"references: reference {n} ('{ref.phrase}') has no latents; "
                             "Masked Shared Attention needs them: give a VAE to "
                             "MultiRefEncodeReferences")
        latents = ref.latents
        if latents.ndim != 4 or latents.shape[1] != latent_channels:
            raise ValueError(f"references: reference {n} latents {tuple(latents.shape)} do not fit "
                             f"this model ({latent_channels} latent channels); encode the "
                             "references with this model's VAE")
        masks, grid = ref.masks, (latents.shape[0],) + tuple(latents.shape[2:])
        if masks is not None and tuple(masks.shape) != grid:
            raise ValueError(f"references: reference {n} masks {tuple(masks.shape)} do not match "
                             f"its latent grid {grid} "
                             "(views, h, w); re-encode the reference so mask and latents agree")
        bounds = family.sigma_range(model, ref.start_percent, ref.end_percent)
        with torch.no_grad():
            latents = model.model.process_latent_in(latents.detach().float()).cpu()
        prepared.append(_Reference(latents, None if masks is None else masks.float().cpu(), bounds,
                                   ref.weight, *(_syncd_inputs(n, ref, *syncd) if syncd else ())))
    return prepared


def _syncd_inputs(n, ref, clip, adapter):
    """(text, pooled, tokens) of one reference for SynCD's reference-pass conditioning."""
    if not ref.phrase:
        raise ValueError(f"references: reference {n} has no phrase; reference_conditioning "
                         f"'syncd' conditions it on '{msa.reference_prompt('{phrase}')}': give "
                         "the reference its object's words (MultiRef Reference's phrase)")
    tokens = None
    if adapter is not None:
        if ref.adapter_fingerprint != adapter.fingerprint:
            raise ValueError(f"references: reference {n} was encoded with another adapter than "
                             f"{adapter.describe()}; encode the references with the adapter "
                             "connected here (its image layers condition the reference rows)")
        views = ref.latents.shape[0]
        tokens = ref.image_tokens.detach().float().cpu().reshape(views, -1, ref.image_tokens.shape[-1])
    with torch.no_grad():
        text, pooled = clip.encode_from_tokens(clip.tokenize(msa.reference_prompt(ref.phrase)),
                                               return_pooled=True)
    pooled = None if pooled is None else pooled.detach().float().cpu().reshape(1, -1)
    return text.detach().float().cpu(), pooled, tokens


def reference_conditioning_of(choice, adapter, clip):
    """The conditioning an "auto" choice means: SynCD's for the adapters trained with SynCD's
    reference pass (it needs the text encoder: without one, the prompt's text and a warning),
    else target_text; any other choice is itself."""
    if choice not in CONDITIONINGS:
        raise ValueError(f"reference_conditioning: {choice!r} is unknown; use one of "
                         f"{CONDITIONINGS}")
    if choice != "auto":
        return choice
    if adapter is None or adapter.kind not in SYNCD_TRAINED_KINDS:
        return "target_text"
    if clip is None:
        log.warning("MultiRefApplyMSA: %s was trained with SynCD's reference conditioning, which "
                    "needs the text encoder; connect clip to condition the references as it was "
                    "trained (using the prompt's text meanwhile)", adapter.describe())
        return "target_text"
    return "syncd"


def _image_layers(adapter, unet):
    """{location: AdapterLayer} of an adapter with image layers bound to this UNet, or None."""
    if adapter is None or not adapter.has_image_layers:
        return None
    blocks = dict(unet_transformer_blocks(unet))
    bound = adapter.bind(list(blocks), cross_attention_dims(unet))
    return {location: bound.layer(location) for location in blocks}


def _self_attention_lora(adapter, unet, mode):
    """{location: LoRA pairs} of an adapter bound to this UNet, or None without a LoRA."""
    if adapter is None:
        return None
    if not adapter.has_self_attn_lora:
        log.info("MultiRefApplyMSA: %s has no self-attention LoRA; nothing of it is applied",
                 adapter.describe())
        return None
    if mode != "references":
        raise ValueError("adapter: its self-attention LoRA belongs to reference mode (SynCD); "
                         "disconnect the adapter in 'batch' mode")
    blocks = dict(unet_transformer_blocks(unet))
    bound = adapter.bind(list(blocks), cross_attention_dims(unet))
    return {location: bound.layer(location).self_attn_lora for location in blocks}


def apply_msa(model, references, strength, start_percent, end_percent, first_step_unmasked,
              layers, mode, batch_masks=None, batch_phrase="", clip=None, adapter=None,
              reference_conditioning="auto", reference_noise="noised",
              block_ref_to_target=msa_flux.KONTEXT_BLOCKS_DEFAULT):
    """A patched clone of `model` (the original is left untouched)."""
    conditioning = reference_conditioning_of(reference_conditioning, adapter, clip)
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is unknown; use one of {MODES}")
    if layers not in LAYERS:
        raise ValueError(f"layers: {layers!r} is unknown; use one of {LAYERS}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength: {strength} is outside 0..1")
    if reference_noise not in REFERENCE_NOISE:
        raise ValueError(f"reference_noise: {reference_noise!r} is unknown; use one of "
                         f"{REFERENCE_NOISE}")
    if flux.is_flux(model):
        return _apply_flux(model, references, strength, start_percent, end_percent,
                           first_step_unmasked, layers, mode, adapter, conditioning,
                           reference_noise, block_ref_to_target)
    unet = family.unet_of(model, "Masked Shared Attention")
    if layers not in UNET_LAYERS:
        raise ValueError(f"layers: {layers!r} names Flux blocks; on an SD1.5 / SDXL model use "
                         f"one of {UNET_LAYERS}")
    if mode == "kontext":
        raise ValueError("mode: 'kontext' restricts the reference tokens a Flux Kontext model "
                         "carries in its sequence; on an SD1.5 / SDXL model use 'references'")
    bounds = family.sigma_range(model, start_percent, end_percent)
    patched = model.clone()
    if strength == 0.0:
        log.info("MultiRefApplyMSA: strength 0, the model is returned unpatched")
        return patched
    state = _StepState()
    family.on_each_run(patched, state.new_run)
    image_layers = None
    if mode == "references":
        syncd = None
        if conditioning == "syncd":
            if clip is None:
                raise ValueError("clip: reference_conditioning 'syncd' encodes each reference's "
                                 f"'{msa.reference_prompt('{phrase}')}'; connect the CLIP that "
                                 "encoded the prompt (or choose 'target_text')")
            image_layers = _image_layers(adapter, unet)
            syncd = (clip, adapter if image_layers else None)
        refs = _prepare_references(model, unet.in_channels, references, syncd)
        sampling = model.get_model_object("model_sampling")
        provider = _ReferenceRows(refs, bounds, sampling, state, first_step_unmasked,
                                  syncd is not None, reference_noise == "clean")
    else:
        if references:
            log.warning("MultiRefApplyMSA: mode 'batch' shares between the batch images; the "
                        "connected references are not used")
        if batch_masks is not None and batch_masks.ndim != 3:
            raise ValueError(f"batch_masks: expected a MASK batch (images, height, width), got "
                             f"{tuple(batch_masks.shape)}")
        if batch_masks is not None:  # NaN would spread through every shared attention
            check_finite(batch_masks, "batch_masks", "re-load or redraw the masks")
        masks = None if batch_masks is None else batch_masks.detach().float().cpu()
        phrase_maps = None
        if batch_phrase.strip() and masks is None:
            if clip is None:
                raise ValueError("clip: batch_phrase needs the text encoder to find the phrase's "
                                 "attention; connect the CLIP that encoded the prompt")
            phrase_maps = _PhraseMaps(phrase_embeddings(clip, batch_phrase.strip(), "batch_phrase"))
            family.on_each_run(patched, phrase_maps.collected.new_run)
            blocks = dict(unet_transformer_blocks(unet))
            family.set_attention_patch(
                patched, "attn2",
                lambda location, inner: phrase_maps.make_patch(location, inner,
                                                               blocks[location].attn2.to_k))
        provider = _BatchCall(masks, bounds, state, first_step_unmasked, phrase_maps)
    family.add_row_provider(patched, provider)
    lora = _self_attention_lora(adapter, unet, mode)
    sharing = family.BLOCK_GROUPS[layers]
    make_patch = lambda location, inner: _SharedSelfAttention(
        inner, state, strength, mode, None if lora is None else lora[location],
        location[0] in sharing)
    # With a LoRA every layer is patched (the LoRA covers all); `layers` picks where to share.
    family.set_attention_patch(patched, "attn1", make_patch,
                                 blocks="all" if lora is not None else layers)
    if lora is not None:
        patched.set_model_attn1_patch(_StashInput())
        patched.set_model_attn1_output_patch(_LoRAOutput())
    if image_layers:
        family.set_attention_patch(patched, "attn2", lambda location, inner: _ReferenceImageAttention(
            inner, state, image_layers[location]))
    log.info("MultiRefApplyMSA: mode %s, reference conditioning %s", mode,
             conditioning if mode == "references" else "-")
    return patched


def _apply_flux(model, references, strength, start_percent, end_percent, first_step_unmasked,
                layers, mode, adapter, conditioning, reference_noise, block_reference_to_target):
    """Masked Shared Attention on Flux (nodes/msa_flux.py): references mode over reference rows
    in the same call, kontext mode over the reference tokens ReferenceLatent put in the
    sequence."""
    diffusion_model = flux.flux_of(model, "Masked Shared Attention")
    if mode == "batch":
        raise ValueError("mode: 'batch' is not available on Flux; use 'references' (reference "
                         "rows) or 'kontext' (ReferenceLatent's references)")
    if layers in ("down", "up"):
        raise ValueError(f"layers: {layers!r} names UNet blocks; on Flux use all, double or "
                         "single")
    if adapter is not None or conditioning == "syncd":
        raise ValueError("adapter: SynCD's self-attention LoRA and reference conditioning are "
                         "UNet checkpoints; disconnect adapter (and leave reference_conditioning "
                         "at auto or target_text) on Flux")
    bounds = family.sigma_range(model, start_percent, end_percent)
    patched = model.clone()
    if strength == 0.0:
        log.info("MultiRefApplyMSA: strength 0, the model is returned unpatched")
        return patched
    if mode == "kontext":
        rows = msa_flux.KontextRows(_kontext_references(model, references), bounds)
        flux.on_each_run(patched, rows.new_run, rows.new_run)
        family.add_row_provider(patched, rows)
        msa_flux.patch_kontext(patched, rows, strength, layers, block_reference_to_target)
        return patched
    state = _StepState()
    flux.on_each_run(patched, state.new_run, state.new_run)
    refs = _prepare_references(model, diffusion_model.params.in_channels, references)
    provider = _ReferenceRows(refs, bounds, model.get_model_object("model_sampling"), state,
                              first_step_unmasked, False, reference_noise == "clean")
    family.add_row_provider(patched, provider)
    msa_flux.patch_references(patched, state, strength, layers, TAG)
    log.info("MultiRefApplyMSA: Flux, mode references, %s reference rows", reference_noise)
    return patched


def _kontext_references(model, references):
    """[(mask or None, weight, sigma bounds)] of the encoded references, one per ReferenceLatent
    image of the conditioning, in order (their latents are not used: the conditioning has
    them)."""
    if not references:
        raise ValueError("references: mode 'kontext' needs one encoded reference per "
                         "ReferenceLatent image (its mask, weight and window); connect "
                         "MultiRefEncodeReferences")
    described = []
    for n, ref in enumerate(references, 1):
        if not isinstance(ref, EncodedReference):
            raise ValueError(f"references: item {n} is a {type(ref).__name__}, not an encoded "
                             "reference; connect the output of MultiRefEncodeReferences")
        mask = None if ref.masks is None else ref.masks[0].detach().float().cpu()
        if mask is not None:
            check_finite(mask, f"references: reference {n} mask", "redraw the mask")
        described.append((mask, float(ref.weight),
                          family.sigma_range(model, ref.start_percent, ref.end_percent)))
    return described


class MultiRefApplyMSA:
    DESCRIPTION = ("Masked Shared Attention (SynCD): while sampling, the generated image's "
                   "self-attention also reads the foreground of the reference images (re-noised "
                   "to each step), so the object keeps its identity and details. Costs one "
                   "larger batch per step, not a second pass. 'batch' mode makes the images of "
                   "one batch share their foreground (consistent image sets).")
    CATEGORY = "MultiRef"
    FUNCTION = "apply"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("the model with Masked Shared Attention patched in (a clone; the input "
                       "model is unchanged)",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "SD1.5, SDXL or Flux model to patch (Flux: "
                                "ComfyUI's own Flux model)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                         "Blend between plain self-attention (0, exactly the unpatched model) and "
                         "full shared attention (1, SynCD)."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                              "tooltip": "Part of sampling where sharing starts (0 = first "
                                         "step)."}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                            "tooltip": "Part of sampling where sharing ends (1 = last step)."}),
            "first_step_unmasked": ("BOOLEAN", {"default": False, "tooltip":
                                    "On the first step read every reference token, not only the "
                                    "foreground (SynCD's data generation does this)."}),
            "layers": (list(LAYERS), {"default": "all", "tooltip":
                       "Which self-attention layers share: all, down (input blocks) or up "
                       "(output blocks) on a UNet; all, double or single blocks on Flux."}),
            "mode": (list(MODES), {"default": "references", "tooltip":
                     "references: the image reads the references' foreground. batch: the images "
                     "of one batch read each other's foreground (consistent sets). kontext "
                     "(Flux): the references ReferenceLatent put in the conditioning are read "
                     "only through their foreground, with each reference's weight and window "
                     "(connect one encoded reference per ReferenceLatent image, in order)."}),
        }, "optional": {
            "references": ("MULTIREF_ENCODED", {"tooltip":
                           "Encoded references with latents (encode them with a VAE); their masks "
                           "select the foreground. Needed in 'references' mode."}),
            "batch_masks": ("MASK", {"tooltip":
                            "batch mode: foreground mask per batch image (or one for all), any "
                            "size; without it (and without a phrase) whole images are shared."}),
            "batch_phrase": ("STRING", {"default": "", "tooltip":
                             "batch mode without masks: the object's words (e.g. 'dog'); its "
                             "cross-attention map at each step gives the next step's masks."}),
            "clip": ("CLIP", {"tooltip": "The text encoder of the prompt: encodes batch mode's "
                              "phrase, and the references' 'photo of a {phrase}' for syncd "
                              "reference conditioning."}),
            "adapter": ("MULTIREF_ADAPTER", {"tooltip":
                        "references mode: an adapter carrying a self-attention LoRA (SynCD's "
                        "checkpoint, or a multiref_adapter / multiref_lora file the pack trained) "
                        "applies it here: on the generated "
                        "image, not on the references' own pass, as SynCD trains it."}),
            "reference_conditioning": (list(CONDITIONINGS), {"default": "auto", "tooltip":
                                       "What the references' own rows are conditioned on. "
                                       "syncd (as SynCD samples and the trainer trains): text "
                                       "'photo of a {phrase}' (the negative prompt in the "
                                       "image-only branch) and the adapter's image attention at "
                                       "scale 1 on each reference's own image; needs clip. "
                                       "target_text: the prompt's text, no image attention. "
                                       "auto: syncd with a SynCD or MultiRef-trained adapter, "
                                       "else target_text."}),
            "reference_noise": (list(REFERENCE_NOISE), {"default": "noised", "tooltip":
                                "references mode: the reference rows are the references noised "
                                "to each step's sigma (SynCD's SDXL sampling), or clean latents "
                                "at the step's timestep (as Flux Kontext and SynCD's Flux "
                                "canvas)."}),
            "block_ref_to_target": ("BOOLEAN", {
                "default": msa_flux.KONTEXT_BLOCKS_DEFAULT, "tooltip":
                "kontext mode: keep the reference tokens from reading the generated image (they "
                "stay the references' own features)."}),
        }}

    def apply(self, model, strength, start_percent, end_percent, first_step_unmasked, layers,
              mode, references=None, batch_masks=None, batch_phrase="", clip=None,
              adapter=None, reference_conditioning="auto", reference_noise="noised",
              block_ref_to_target=msa_flux.KONTEXT_BLOCKS_DEFAULT):
        return (apply_msa(model, references, strength, start_percent, end_percent,
                          first_step_unmasked, layers, mode, batch_masks, batch_phrase, clip,
                          adapter, reference_conditioning, reference_noise,
                          block_ref_to_target),)


NODE_CLASS_MAPPINGS = {"MultiRefApplyMSA": MultiRefApplyMSA}
NODE_DISPLAY_NAME_MAPPINGS = {"MultiRefApplyMSA": "MultiRef Apply Masked Shared Attention"}
