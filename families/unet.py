"""The SD1.5 / SDXL UNet family: the seam of families/base.py over ComfyUI's classic hooks.

  * where the attention layers are (`attention_locations`: every transformer block, walked) and
    how to put a replace on every one of them without dropping a replace another node already
    put there (`set_attention_patch`, over the attn1/attn2 replaces: q, k, v in, the pre-to_out
    output back);
  * which batch row serves which guidance branch (`row_roles`): full (prompt + image condition),
    image (negative text + image condition), uncond (no image condition), ref (reference rows);
    and which image of the whole latent batch each row is (`row_items`), also when a context
    window node calls the model on a window of the batch;
  * how to add rows to a UNet call and slice them off afterwards (`add_row_provider`, over the
    UNet function wrapper), so the references of Masked Shared Attention ride in the same
    batched call as the target;
  * the latent grid of a layer (`layer_grid`).
Everything goes through a `model.clone()` and ComfyUI's classic ModelPatcher hooks.
"""
import torch

import comfy.ldm.modules.attention as host_attention

from . import runs
from ..kernels import routing
from ..kernels.checkpoints import unet_transformer_blocks

BRANCHES_KEY = "multiref_branches"
ROLES_KEY = "multiref_roles"
LATENT_SHAPE_KEY = "multiref_latent_shape"  # (H, W) of the call's latent: a DiT's packed grid
# The host's own CFG runs [positive, negative]: index 0 is the full branch, 1 the uncond one.
DEFAULT_BRANCHES = ("full", "uncond")
IMAGE_ROLES = frozenset({"full", "image"})
ROLES = ("full", "image", "uncond", "ref")
BLOCK_GROUPS = {"all": ("input", "middle", "output"), "down": ("input",), "up": ("output",),
                "middle": ("middle",)}


class SharedAcrossClones:
    """Base of per-run state that patches, row providers and later nodes must see as ONE object.
    Both hosts deep-copy model options on clone(); never copying this state keeps one object per
    patched model across every later clone (the Routing Maps node reads what the sampler's clone
    wrote; closures holding it included) and keeps large state (reference latents) from being
    copied by every later node's clone. A run starts and ends where the host says so
    (on_each_run); without a hook, a start is told from the sigmas (StepClock)."""

    def __deepcopy__(self, memo):
        return self


def unet_of(model, technique="MultiRef patches"):
    """The model's UNet (diffusion_model), or a named error for any other architecture."""
    unet = getattr(model.model, "diffusion_model", None)
    if not all(hasattr(unet, name) for name in ("input_blocks", "middle_block", "output_blocks")):
        raise ValueError(f"model: {technique} work on UNet models (SD1.5, SDXL families); this "
                         f"model is {type(model.model).__name__}. Connect an SD1.5 or SDXL "
                         "checkpoint")
    return unet


def on_each_run(model, begin, end=None):
    """Call begin() as each sampling run with the clone `model` starts and end() when it is over
    (families.runs: the host's callbacks, or the pack's guider on the installable host; there,
    under the host's own sampler, the state tells a new run from the sigmas, StepClock)."""
    runs.on_each_run(model, begin, end)


def attention_locations(model):
    """Every transformer block of the UNet as ComfyUI's replace key
    (block_name, block_id, index inside its SpatialTransformer), in execution order."""
    locations = [loc for loc, _ in unet_transformer_blocks(unet_of(model))]
    if not locations:
        raise ValueError("model: no transformer blocks found; MultiRef patches need a UNet with "
                         "cross-attention (SD1.5 or SDXL family)")
    return locations


def host_attention_call(q, k, v, extra_options):
    """Exactly what an unpatched attention layer computes with the host's attention kernel."""
    return host_attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                              attn_precision=extra_options.get("attn_precision"))


def set_attention_patch(model, which, make_patch, blocks="all"):
    """Put a replace on every `which` ("attn1" self-attention, "attn2" cross-attention) layer of
    the clone `model`. make_patch(location, inner) returns fn(q, k, v, extra_options); `inner`
    is what ran there before (another node's replace, or the host's attention), so patches
    compose instead of overwriting each other."""
    if which not in ("attn1", "attn2"):
        raise ValueError(f"which must be 'attn1' or 'attn2', got {which!r}")
    setter = {"attn1": model.set_model_attn1_replace, "attn2": model.set_model_attn2_replace}[which]
    existing = model.model_options.get("transformer_options", {}).get(
        "patches_replace", {}).get(which, {})
    for location in attention_locations(model):
        block_name, block_id, index = location
        if block_name not in BLOCK_GROUPS[blocks]:
            continue
        # The host falls back from (name, id, index) to (name, id): honour both kinds of key.
        inner = existing.get(location) or existing.get((block_name, block_id)) or host_attention_call
        setter(make_patch(location, inner), block_name, block_id, index)


def row_roles(extra_options, batch_size):
    """One role per batch row of the current UNet call."""
    roles = extra_options.get(ROLES_KEY)
    if roles is None:
        roles = roles_from_chunks(extra_options.get("cond_or_uncond"),
                                  extra_options.get(BRANCHES_KEY, DEFAULT_BRANCHES), batch_size)
    if len(roles) != batch_size:
        raise RuntimeError(f"row roles ({len(roles)}) do not match the batch ({batch_size}); "
                           "another node changed the batch inside the UNet call")
    return roles


def row_items(extra_options, batch_size):
    """The image of the whole latent batch (its index there) that every row of the current call
    denoises; None for reference rows. The host batches each cond as one chunk of the call's
    images; a context window node (AnimateDiff-Evolved, current ComfyUI's context windows)
    calls the model on a window of the batch and says which images it holds."""
    roles = row_roles(extra_options, batch_size)
    images = [i for i, role in enumerate(roles) if role != "ref"]
    chunks = len(extra_options.get("cond_or_uncond") or (0,))
    per_chunk = len(images) // chunks
    window = window_indices(extra_options, per_chunk) or range(per_chunk)
    items = [None] * batch_size
    for n, row in enumerate(images):
        items[row] = window[n % per_chunk]
    return tuple(items)


def window_indices(options, images):
    """The batch indices of the `images` images a call holds, as a context window node says them:
    AnimateDiff-Evolved's ad_params["sub_idxs"], or current ComfyUI's context_window (its
    index_list along the batch dimension); None without a window (or with one of another
    length: not this call's), i.e. the call holds the whole batch."""
    ad_params = options.get("ad_params")
    indices = ad_params.get("sub_idxs") if isinstance(ad_params, dict) else None
    window = options.get("context_window")
    if indices is None and window is not None and getattr(window, "dim", 0) == 0:
        indices = getattr(window, "index_list", None)
    if indices is None or len(indices) != images:
        return None
    return tuple(int(i) for i in indices)


def roles_from_chunks(cond_or_uncond, branches, batch_size):
    """The host batches conds in chunks of equal size; cond_or_uncond holds each chunk's index
    in the guider's cond list, and `branches` maps that index to a role."""
    if not cond_or_uncond:
        return ("full",) * batch_size
    rows_per_chunk = batch_size // len(cond_or_uncond)
    roles = []
    for index in cond_or_uncond:
        role = branches[index] if index < len(branches) else "uncond"
        roles.extend([role] * rows_per_chunk)
    return tuple(roles)


def rows_with_role(roles, wanted):
    """Indices of the rows whose role is in `wanted` (a set or a single role)."""
    wanted = {wanted} if isinstance(wanted, str) else wanted
    return [i for i, role in enumerate(roles) if role in wanted]


def layer_grid(extra_options, tokens):
    """The (H, W) grid of the attention layer being called, which has `tokens` positions."""
    return routing.layer_grid(tuple(extra_options["original_shape"][-2:]), tokens)


def current_sigma(extra_options):
    """The sigma of the current step (the host passes per-row sigmas as 'sigmas')."""
    sigmas = extra_options.get("sigmas")
    return None if sigmas is None else float(sigmas.reshape(-1)[0])


def sigma_range(model, start_percent, end_percent):
    """Sigma bounds of a start/end percent window (0 = first step, 1 = last)."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) and end_percent ({end_percent}) must "
                         "satisfy 0 <= start <= end <= 1")
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_percent)), float(sampling.percent_to_sigma(end_percent))


def in_sigma_range(sigma, bounds):
    high, low = bounds
    return sigma is None or low <= sigma <= high


class ReferenceRowWrapper:
    """A UNet function wrapper that tags every row with its role and lets row providers append
    extra rows (reference rows) to the same call; the extra rows are sliced off the output.

    A provider is provider(x, timestep, c, roles) -> None, one (x_extra, source_rows, tag[,
    overrides]) or a list of them: x_extra (R, C, H, W) rows to add, source_rows the existing
    rows whose conditioning (text context, adm vector, ...) each extra row reuses, tag a name
    stored in transformer_options under 'multiref_rows' as {tag: (first_row,
    last_row_exclusive)} so patches can find them, and overrides an optional {conditioning key:
    fn(copied rows) -> rows} that replaces what the extra rows reuse (their own text)."""

    def __init__(self, providers=(), previous=None):
        self.providers = tuple(providers)
        self.previous = previous

    def with_provider(self, provider):
        return ReferenceRowWrapper(self.providers + (provider,), self.previous)

    def __call__(self, apply_model, args):
        if self.previous is None:
            return self._run(apply_model, args)
        return self.previous(lambda input, timestep, **c: self._run(
            apply_model, {"input": input, "timestep": timestep, "c": c,
                          "cond_or_uncond": args["cond_or_uncond"]}), args)

    def _run(self, apply_model, args):
        x, timestep, c = args["input"], args["timestep"], dict(args["c"])
        options = dict(c.get("transformer_options", {}))
        batch = x.shape[0]
        roles = roles_from_chunks(args["cond_or_uncond"],
                                  options.get(BRANCHES_KEY, DEFAULT_BRANCHES), batch)
        row_spans = {}
        for provider in self.providers:
            extra = provider(x, timestep, c, roles)
            for x_extra, source_rows, tag, *overrides in ([extra] if isinstance(extra, tuple)
                                                          else extra or ()):
                start = x.shape[0]
                x = torch.cat([x, x_extra.to(x)], dim=0)
                timestep = torch.cat([timestep, timestep[:1].expand(len(source_rows))], dim=0)
                c = _extend_conditioning(c, source_rows, start, *overrides)
                roles = roles + ("ref",) * len(source_rows)
                row_spans[tag] = (start, x.shape[0])
        options[ROLES_KEY] = roles
        options["multiref_rows"] = row_spans
        options[LATENT_SHAPE_KEY] = tuple(x.shape[-2:])
        c["transformer_options"] = options
        return apply_model(x, timestep, **c)[:batch]


def _extend_conditioning(c, source_rows, batch, overrides=None):
    """Append, to every per-row conditioning tensor (and every per-row tensor of a list
    conditioning: Kontext's `ref_latents`), copies of the source rows (or what an override makes
    of them). ControlNet residuals get zero rows: the extra rows are references, not the
    picture being controlled."""
    index = torch.tensor(source_rows, dtype=torch.long)
    extended = {}
    for key, value in c.items():
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
            rows = value[index.to(value.device)]
            if overrides and key in overrides:
                rows = overrides[key](rows).to(value)
            extended[key] = torch.cat([value, rows], dim=0)
        elif isinstance(value, list) and value and all(
                torch.is_tensor(t) and t.ndim > 0 and t.shape[0] == batch for t in value):
            extended[key] = [torch.cat([t, t[index.to(t.device)]], dim=0) for t in value]
        elif key == "control" and isinstance(value, dict):
            extended[key] = {part: [_zero_rows(t, len(source_rows), batch) for t in residuals]
                             for part, residuals in value.items()}
        else:
            extended[key] = value
    return extended


def _zero_rows(residual, rows, batch):
    if not torch.is_tensor(residual) or residual.shape[0] != batch:
        return residual
    return torch.cat([residual, residual.new_zeros((rows,) + residual.shape[1:])], dim=0)


def add_row_provider(model, provider):
    """Install (or extend) the pack's UNet wrapper on the clone `model`, keeping any wrapper
    another node installed before."""
    current = model.model_options.get("model_function_wrapper")
    if isinstance(current, ReferenceRowWrapper):
        wrapper = current.with_provider(provider)
    else:
        wrapper = ReferenceRowWrapper((provider,), previous=current)
    model.set_model_unet_function_wrapper(wrapper)


# For the trainer (families/base.py, TRAINER_SEAM): the modules its training-safe path calls in
# place of the host's, found where the UNet keeps them.
UNET_SECTIONS = (("input", "input_blocks"), ("middle", "middle_block"), ("output", "output_blocks"))


def transformer_layers(diffusion_model):
    """[(object path, module, (block_name, block_id))] of every module holding transformer
    blocks (SpatialTransformer), in execution order; its block i is at attention location
    (block_name, block_id, i)."""
    found = []
    for block_name, attribute in UNET_SECTIONS:
        blocks = getattr(diffusion_model, attribute)
        for block_id, block in enumerate([blocks] if block_name == "middle" else blocks):
            prefix = attribute if block_name == "middle" else f"{attribute}.{block_id}"
            for index, layer in enumerate(block):
                if hasattr(layer, "transformer_blocks"):
                    found.append((f"{prefix}.{index}", layer, (block_name, block_id)))
    return found


def residual_layers(diffusion_model):
    """[(object path, module)] of the other layers that run, each called as layer(x, emb)
    (ResBlocks)."""
    return [(path, module) for path, module in diffusion_model.named_modules()
            if hasattr(module, "in_layers") and hasattr(module, "emb_layers")]
