"""The Flux family: the seam of families/base.py over current ComfyUI's own DiT hooks.

Flux has no attn1/attn2 replaces. One joint attention per block runs over [text | image | the
Kontext reference tokens, if any], and two hooks reach it without touching the model:
  * a `dit` block replace per block, ("double_block", i) and ("single_block", i): ours wraps
    what ran there before (another node's replace, else the block itself, `original_block`)
    and, for the duration of that block only, installs
  * the attention override (transformer_options["optimized_attention_override"]), chained to
    the override already installed (another node's sage/flash attention): q, k, v (B, H, L, D)
    after RoPE in, the output (B, L, H * D) before the output projection back.
The override installed before ours is put back when the block returns (the per-call options
keep only the text length), and nothing of ours is ever in the model (forward_orig and the
blocks are never replaced).

Rows ride in the batch as in the UNet family (families/unet.py: the same UNet function wrapper,
roles, sigma windows); list conditionings (Kontext's `ref_latents`) are extended for the extra
rows too. `layer_grid` is the packed image grid (2 x 2 latent patches per token).

Differences a technique sees (docs/ARCHITECTURE.md, "Adding a family"):
  * `set_attention_patch(model, "joint", ...)`: the one attention of a block; its q/k/v carry
    the text tokens first; extra_options[TEXT_LEN_KEY] says how many, extra_options["n_heads"]
    the heads, extra_options[ROPE_KEY] the (axes_dim, theta) of the model's RoPE,
    extra_options[PE_KEY] the block's own rotations (the host's `pe`), and
    extra_options["mask"] the host's attention mask (None unless a cond carries one);
  * the locations are ("double_block", i) and ("single_block", i), groups all/double/single.
The host's MMDiT (SD3) takes the same `dit` replace ("double_block" only, args "txt"/"img")
and its joint attention also goes through the override, but q, k, v come as (B, L, H * D)
without skip_reshape and without RoPE (positions are added to the tokens before the blocks, so
reference keys cannot be moved by a rotation): a family module for it would differ there.
flux_of refuses it today.
"""
import math

from . import unet as rows
from .unet import (SharedAcrossClones, add_row_provider, current_sigma, in_sigma_range, row_roles,
                   rows_with_role, sigma_range)

OVERRIDE_KEY = "optimized_attention_override"
TEXT_LEN_KEY = "multiref_text_len"
ROPE_KEY = "multiref_rope"
LOCATION_KEY = "multiref_block"
PE_KEY = "multiref_pe"  # the block's rotations (the host's `pe`): undoes RoPE on q
INNER_KEY = "multiref_inner"
GRID_KEY = rows.LATENT_SHAPE_KEY
ATTENTION = "joint"
BLOCK_GROUPS = {"all": ("double_block", "single_block"), "double": ("double_block",),
                "single": ("single_block",)}
ROLES, IMAGE_ROLES = rows.ROLES, rows.IMAGE_ROLES

# The seam's names; the row, role and sigma ones are the UNet family's own (re-exported).
__all__ = ("attention_locations", "BLOCK_GROUPS", "set_attention_patch", "add_row_provider",
           "row_roles", "rows_with_role", "layer_grid", "current_sigma", "sigma_range",
           "in_sigma_range", "on_each_run", "flux_of", "is_flux", "SharedAcrossClones")


def _host_flux_class():
    try:
        from comfy.ldm.flux.model import Flux
    except ImportError:
        return None
    return Flux


def is_flux(model):
    """Whether the model is a Flux, core or not (the host's Flux model base, or a diffusion model
    with double and single blocks): the nodes pick this family for it, and flux_of names a
    non-core one instead of the UNet family refusing it as "not a UNet"."""
    try:
        from comfy.model_base import Flux as FluxBase
    except ImportError:
        FluxBase = None
    diffusion_model = getattr(model.model, "diffusion_model", None)
    return (FluxBase is not None and isinstance(model.model, FluxBase)) or (
        hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks"))


def flux_of(model, technique="MultiRef patches"):
    """The model's diffusion model if it is the host's own Flux class with its block hooks, else
    a named error: another implementation (a quantized wrapper with its own forward, a node
    that replaced forward_orig) may never call the `dit` replaces, so a patch would silently
    do nothing."""
    diffusion_model = getattr(model.model, "diffusion_model", None)
    flux = _host_flux_class()
    name = type(diffusion_model).__name__
    if flux is None:
        raise ValueError(f"model: {technique} on Flux need a current ComfyUI (its Flux model "
                         "class and block hooks); update ComfyUI")
    if not isinstance(diffusion_model, flux):
        raise ValueError(f"model: {technique} on Flux work through ComfyUI's own Flux model "
                         f"(comfy.ldm.flux.model.Flux) and its block hooks; this model's "
                         f"diffusion model is {type(diffusion_model).__module__}.{name}, another "
                         "implementation that may not call them. Load the checkpoint with "
                         "ComfyUI's own loader (Load Diffusion Model or Load Checkpoint) and "
                         "connect that to model")
    for attribute in ("forward_orig", "_forward"):
        if attribute in vars(diffusion_model) or getattr(type(diffusion_model), attribute) \
                is not getattr(flux, attribute):
            raise ValueError(f"model: {technique} on Flux need ComfyUI's own Flux forward, but "
                             f"{attribute} of this model was replaced (by another custom node or "
                             f"a subclass {name}); such a forward may skip the block hooks. "
                             "Connect the model before that node patches it, or load it with "
                             "ComfyUI's own loader")
    return diffusion_model


def attention_locations(model):
    """Every block as its `dit` replace key, in execution order: double blocks, then single."""
    flux = flux_of(model)
    return ([("double_block", i) for i in range(len(flux.double_blocks))]
            + [("single_block", i) for i in range(len(flux.single_blocks))])


def on_each_run(model, begin, end=None):
    """begin() as each sampling run with the clone `model` starts (ON_PRE_RUN), end() when the
    host cleans the run up (ON_CLEANUP): per-run state lives only between the two."""
    from comfy.patcher_extension import CallbacksMP
    model.add_callback(CallbacksMP.ON_PRE_RUN, lambda patcher: begin())
    if end is not None:
        model.add_callback(CallbacksMP.ON_CLEANUP, lambda patcher: end())


def layer_grid(extra_options, tokens=None):
    """The packed image grid (rows, cols) of the target: 2 x 2 latent patches per token."""
    height, width = extra_options[GRID_KEY]
    return math.ceil(height / 2), math.ceil(width / 2)


class _Override:
    """The attention override of one block call: our patch on the joint attention, `inner`
    being the override installed before ours (called as the host calls one), else the host's
    attention function itself."""

    def __init__(self, patch, previous, options):
        self.patch, self.previous, self.options = patch, previous, options

    def __call__(self, func, *args, **kwargs):
        q, k, v, heads = args[:4]
        rest = args[4:]

        def inner(q, k, v):
            if self.previous is not None:
                return self.previous(func, q, k, v, heads, *rest, **kwargs)
            return func(q, k, v, heads, *rest, **kwargs)

        if q.ndim != 4 or not kwargs.get("skip_reshape", False):
            return inner(q, k, v)  # not the joint attention layout: not ours to change
        extra_options = dict(self.options, n_heads=heads, mask=kwargs.get("mask"),
                             **{INNER_KEY: inner})
        return self.patch(q, k, v, extra_options)


class _BlockReplace(SharedAcrossClones):
    """The `dit` replace of one block: records the text length (double blocks see `txt`; the
    single blocks of the same call read it from the options), installs the overrides of this
    block's patches for this block only, and calls what ran here before (another node's
    replace, or the block). Our own patches on one block share one replace: the override of
    the last one installed is the outermost, and its `inner` runs the one installed before."""

    def __init__(self, location, patches, previous, rope):
        self.location, self.patches, self.previous, self.rope = location, patches, previous, rope

    def __call__(self, args, extra):
        options = args["transformer_options"]
        if "txt" in args:
            options[TEXT_LEN_KEY] = args["txt"].shape[1]
        run = extra["original_block"] if self.previous is None else (
            lambda a: self.previous(a, extra))
        if not self.patches:
            return run(args)
        had_override, previous = OVERRIDE_KEY in options, options.get(OVERRIDE_KEY)
        call_options = dict(options, **{LOCATION_KEY: self.location, ROPE_KEY: self.rope,
                                        PE_KEY: args["pe"]})
        override = previous
        for patch in self.patches:
            override = _Override(patch, override, call_options)
        options[OVERRIDE_KEY] = override
        try:
            return run(args)
        finally:
            if had_override:
                options[OVERRIDE_KEY] = previous
            else:
                options.pop(OVERRIDE_KEY, None)


class _Adds:
    """A patch that only adds to the attention output (routing's image attention). Ours run
    outside every patch of ours that replaces part of the output (MSA's shared attention),
    whatever order the nodes were applied in: the replacement would drop an addition made
    inside it."""

    def __init__(self, patch):
        self.patch = patch

    def __call__(self, q, k, v, extra_options):
        return self.patch(q, k, v, extra_options)


def set_attention_patch(model, which, make_patch, blocks="all", adds=False):
    """Patch the joint attention of every block of the group `blocks` of the clone `model`.
    make_patch(location, inner) returns fn(q, k, v, extra_options) -> (B, L, H * D); `inner`
    runs what ran there before (our patch installed earlier, another node's override or the
    host's attention) on the same arguments. adds: the patch only adds to what `inner` returns
    (it goes outside our replacing patches, _Adds). Double blocks outside the group get a
    replace that only records the text length (the single blocks need it), calling through."""
    if which != ATTENTION:
        raise ValueError(f"which: Flux has one joint attention per block ('{ATTENTION}'), not "
                         f"{which!r}: its text keys are in the same sequence as the image's")
    if blocks not in BLOCK_GROUPS:
        raise ValueError(f"blocks: {blocks!r} is unknown on Flux; use one of "
                         f"{tuple(BLOCK_GROUPS)}")
    flux = flux_of(model)
    rope = (tuple(flux.params.axes_dim), flux.params.theta)
    existing = model.model_options.get("transformer_options", {}).get(
        "patches_replace", {}).get("dit", {})
    for location in attention_locations(model):
        previous, patches = existing.get(location), ()
        if isinstance(previous, _BlockReplace):
            previous, patches = previous.previous, previous.patches
        if location[0] in BLOCK_GROUPS[blocks]:
            patch = make_patch(location, call_inner)
            first_adds = next((i for i, p in enumerate(patches) if isinstance(p, _Adds)),
                              len(patches))
            patches = (patches + (_Adds(patch),) if adds else
                       patches[:first_adds] + (patch,) + patches[first_adds:])
        elif location[0] != "double_block" or isinstance(existing.get(location), _BlockReplace):
            continue  # not patched here, or ours already records the text length
        model.set_model_patch_replace(_BlockReplace(location, patches, previous, rope), "dit",
                                      *location)


def call_inner(q, k, v, extra_options):
    """`inner` of every Flux patch: what ran at this attention before ours, on these rows (the
    override installed before ours, else the host's attention), with the host's own arguments."""
    return extra_options[INNER_KEY](q, k, v)
