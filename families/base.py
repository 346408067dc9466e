"""What a model family must provide to the techniques: the seam, in one place.

The techniques (techniques/) work on one attention layer's q, k, v and the rows of one model
call; they never name a model's blocks. A family module (families/unet.py for SD1.5 and SDXL,
families/flux.py for Flux) gives them the model in those terms. A new family
(docs/ARCHITECTURE.md, "Adding a family") provides every name in SEAM with these meanings:

  attention_locations(model)
      where the attention layers are: a list of hashable locations in execution order (the UNet
      gives ComfyUI's replace keys (block_name, block_id, transformer_index)); a model of another
      architecture is refused with an error naming the input.
  BLOCK_GROUPS
      {name: location prefixes}: the layer groups a user may pick ("all" always present).
  set_attention_patch(model, which, make_patch, blocks="all")
      how to get q, k, v and hand back the output: make_patch(location, inner) returns
      fn(q, k, v, extra_options) -> attention output before the output projection; `inner` is
      what ran there before (another node's patch or the host's attention); which is "attn1"
      (self-attention) or "attn2" (cross-attention, text keys) on a UNet, "joint" (the one
      attention of a block, text tokens first in the sequence) on Flux.
  add_row_provider(model, provider), row_roles(extra_options, batch), rows_with_role(roles, r)
      how extra rows ride in the batch: a provider appends reference rows to a model call (they
      are sliced off its output) and every layer call can tell each row's role: full, image,
      uncond or ref (docs/ARCHITECTURE.md, "Contracts").
  layer_grid(extra_options, tokens)
      the latent grid (H, W) of the layer being called.
  current_sigma(extra_options), sigma_range(model, start_percent, end_percent), in_sigma_range
      where sampling stands, and a start/end percent window in the model's sigmas.
  on_each_run(model, begin)
      per-run state: call begin() as each sampling run starts, through the host's own lifecycle
      hook where it has one.
"""

SEAM = ("attention_locations", "BLOCK_GROUPS", "set_attention_patch",
        "add_row_provider", "row_roles", "rows_with_role", "layer_grid", "current_sigma",
        "sigma_range", "in_sigma_range", "on_each_run")
