"""MultiRefApplyMSA on the tiny real UNet through the host's sampler: identity when off, uncond
rows untouched, one call per step equal to SynCD's two passes, clear errors."""
import dataclasses
import math

import pytest
import torch

import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.supported_models
from comfy.ldm.modules.attention import optimized_attention
from multiref.kernels import checkpoints, msa
from multiref.kernels.checkpoints import cross_attention_dims, unet_transformer_blocks
from multiref.kernels.references import EncodedReference
from multiref.nodes import guidance as guidance_nodes
from multiref.families import tiny_models
from multiref.families import unet as unet_family
from multiref.nodes.msa import MultiRefApplyMSA, apply_msa
from slow_references import add_image_attention

STEPS = 3
LATENT = (6, 8)  # 48 x 64 px


@pytest.fixture(scope="module")
def parts():
    vae = tiny_models.tiny_vae()
    clips = {family: tiny_models.tiny_text_encoder(family) for family in ("sd15", "sdxl")}
    return vae, clips


def _encoded(vae, count, masks="random", seed=10):
    """`count` references; the second one has two views (two reference rows)."""
    gen = torch.Generator().manual_seed(seed)
    refs = []
    for n in range(count):
        views = 2 if n == 1 else 1
        images = torch.rand(views, 8 * LATENT[0], 8 * LATENT[1], 3, generator=gen)
        if masks == "zero":
            mask = torch.zeros(views, *LATENT)
        else:
            mask = (torch.rand(views, *LATENT, generator=gen) < 0.5).float()
            mask[:, n % LATENT[0]] = 1  # never empty
        refs.append(EncodedReference(
            image_tokens=torch.zeros(1, 4 * views, 16), uncond_tokens=torch.zeros(1, 4 * views, 16),
            latents=vae.encode(images), masks=mask, phrase=f"object {n}", weight=1.0,
            start_percent=0.0, end_percent=1.0, adapter_fingerprint=""))
    return tuple(refs)


def _conds(clips, family):
    clip = clips[family]
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a dog"), return_pooled=True)
    extra = {"pooled_output": pooled, "width": 64, "height": 48} if family == "sdxl" else {}
    return [[cond, extra]], [[torch.zeros_like(cond), dict(extra)]]


def _sample(model, clips, family, batch=1, cfg=5.0, steps=STEPS, scheduler="normal"):
    positive, negative = _conds(clips, family)
    noise = torch.randn(batch, 4, *LATENT, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(model, noise, steps, cfg, "euler", scheduler, positive, negative,
                               torch.zeros(batch, 4, *LATENT), seed=0, disable_pbar=True)


def _msa(model, refs, **kw):
    options = dict(strength=1.0, start_percent=0.0, end_percent=1.0, first_step_unmasked=False,
                   layers="all", mode="references")
    options.update(kw)
    return apply_msa(model, refs, **options)


def _diff(a, b):
    """Largest difference relative to the output's scale (the random tiny UNet's samples reach
    ~100, where float32 rounding alone is ~1e-5 absolute)."""
    return float((a - b).abs().max() / b.abs().max())


def _count_unet_calls(model):
    """Batch size of every UNet forward (a forward pre-hook on the test's own tiny model)."""
    sizes = []
    handle = model.model.diffusion_model.register_forward_pre_hook(
        lambda module, args: sizes.append(args[0].shape[0]))
    return sizes, handle


def test_off_is_bit_identical(parts):
    vae, clips = parts
    model = tiny_models.tiny_unet("sd15")
    plain = _sample(model, clips, "sd15")
    refs = _encoded(vae, 2)
    assert torch.equal(_sample(_msa(model, refs, strength=0.0), clips, "sd15"), plain)
    # A sigma range that excludes every step (only sigma 0, which is never evaluated).
    patched = _msa(model, refs, start_percent=1.0, end_percent=1.0)
    assert "model_function_wrapper" in patched.model_options
    sizes, handle = _count_unet_calls(model)
    try:
        assert torch.equal(_sample(patched, clips, "sd15"), plain)
    finally:
        handle.remove()
    assert sizes == [2] * STEPS  # no reference rows were added
    assert torch.equal(_sample(model, clips, "sd15"), plain)  # the input model is untouched


def test_all_zero_masks_equal_the_unpatched_model(parts):
    vae, clips = parts
    model = tiny_models.tiny_unet("sd15")
    plain = _sample(model, clips, "sd15")
    out = _sample(_msa(model, _encoded(vae, 2, masks="zero")), clips, "sd15")
    assert _diff(out, plain) < 1e-5
    # ...unless the first step reads the whole references.
    out = _sample(_msa(model, _encoded(vae, 2, masks="zero"), first_step_unmasked=True),
                  clips, "sd15")
    assert _diff(out, plain) > 1e-3


class TwoPass:
    """SynCD's form, the slow reference: per step a separate reference pass (with the first full
    row's conditioning) banks every attn1 layer's input, then the target pass projects the
    banked inputs with its own weights (plus
    its LoRA, when given); reading rows attend to [own | every reference token] with a -inf bias
    on the background and log(weight) on a weighted reference's tokens, in float64. The
    reference pass runs without the LoRA. lora_scale multiplies every LoRA delta; a reading row
    gets plain + strength * (shared - plain), plain its attention over its own tokens."""

    def __init__(self, model, refs, lora=None, lora_scale=1.0, strength=1.0):
        self.sampling = model.get_model_object("model_sampling")
        self.latents = model.model.process_latent_in(torch.cat([r.latents for r in refs]))
        self.masks = torch.cat([r.masks for r in refs])
        self.row_weights = torch.cat([torch.full((r.latents.shape[0],), float(r.weight)) for r in refs])
        self.blocks = dict(unet_transformer_blocks(model.model.diffusion_model))
        self.lora = lora  # {location: {projection: LoRAPair}} or None
        self.lora_scale, self.strength = lora_scale, strength
        self.banks = {}  # reading role -> {location: banked attn1 input of the reference rows}
        self.inputs, self.outputs, self.writing = {}, {}, False

    def delta(self, location, name, x):
        """The LoRA update written out: x A^T B^T alpha / rank, in float64."""
        if self.lora is None or self.writing is not False:
            return torch.zeros((), dtype=torch.float64)
        pair = self.lora[location][name]
        down, up = pair.down.weight.double(), pair.up.weight.double()
        return x.double() @ down.T @ up.T * pair.alpha / down.shape[0] * self.lora_scale

    def wrapper(self, apply_model, args):
        x, sigmas, c = args["input"], args["timestep"], args["c"]
        roles = unet_family.roles_from_chunks(args["cond_or_uncond"], unet_family.DEFAULT_BRANCHES,
                                           x.shape[0])
        source = roles.index("full")
        rows = self.latents.shape[0]
        sigma = float(sigmas[0])
        noisy = self.latents + msa.step_noise(self.latents.shape, sigma) * sigma  # EPS model
        c_ref = {k: (v[[source] * rows] if torch.is_tensor(v) and v.shape[0] == x.shape[0] else v)
                 for k, v in c.items()}
        self.banks = {"full": {}}
        self.writing = self.banks["full"]
        apply_model(noisy, sigmas[:1].expand(rows), **c_ref)
        self.writing = False
        self.roles = roles
        return apply_model(x, sigmas, **c)

    @staticmethod
    def location(extra_options):
        return extra_options["block"] + (extra_options["block_index"],)

    def keep_input(self, n, context, value, extra_options):
        self.inputs[self.location(extra_options)] = n
        return n, context, value

    def add_output_delta(self, n, extra_options):
        location = self.location(extra_options)
        if self.writing is not False:
            return n
        return n + self.delta(location, "to_out", self.outputs[location]).float()

    def patch(self, location):
        def attn1(q, k, v, extra_options):
            heads = extra_options["n_heads"]
            n = self.inputs[location]
            if self.writing is not False:
                self.writing[location] = n
                return optimized_attention(q, k, v, heads)
            q, k, v = (x + self.delta(location, name, n).float()
                       for x, name in ((q, "to_q"), (k, "to_k"), (v, "to_v")))
            out = optimized_attention(q, k, v, heads)
            height, width = extra_options["original_shape"][-2:]
            scale = math.sqrt(height * width / q.shape[1])
            h, w = round(height / scale), round(width / scale)
            rows_y = (torch.arange(h) * self.masks.shape[1]) // h
            rows_x = (torch.arange(w) * self.masks.shape[2]) // w
            mask_values = self.masks[:, rows_y][:, :, rows_x].reshape(-1).double()
            fg = mask_values > 0  # soft masks: a token of value m counts e^(m - 1) times
            attn = self.blocks[location].attn1
            d = q.shape[-1] // heads
            for i, role in enumerate(self.roles):
                if role not in self.banks:
                    continue
                n_ref = self.banks[role][location].reshape(-1, n.shape[-1])
                k_ref = attn.to_k(n_ref).double() + self.delta(location, "to_k", n_ref)
                v_ref = attn.to_v(n_ref).double() + self.delta(location, "to_v", n_ref)
                keys = torch.cat([k[i].double(), k_ref])
                values = torch.cat([v[i].double(), v_ref])
                weight = self.row_weights.repeat_interleave(h * w)
                bias = torch.cat([torch.zeros(q.shape[1], dtype=torch.float64),
                                  torch.where(fg, weight.double().log() + mask_values - 1, -math.inf)])
                for hd in range(heads):
                    sl = slice(hd * d, (hd + 1) * d)
                    logits = q[i, :, sl].double() @ keys[:, sl].T / math.sqrt(d) + bias.double()
                    shared = logits.softmax(-1) @ values[:, sl]
                    plain = out[i, :, sl].double()
                    out[i, :, sl] = (plain + self.strength * (shared - plain)).float()
            self.outputs[location] = out
            return out
        return attn1

    def install(self, model):
        patched = model.clone()
        patched.set_model_unet_function_wrapper(self.wrapper)
        patched.set_model_attn1_patch(self.keep_input)
        patched.set_model_attn1_output_patch(self.add_output_delta)
        for location in unet_family.attention_locations(model):
            patched.set_model_attn1_replace(self.patch(location), *location)
        return patched


@pytest.mark.parametrize("family,count", [("sd15", 1), ("sdxl", 3)])
def test_one_call_equals_two_passes(parts, family, count):
    vae, clips = parts
    model = tiny_models.tiny_unet(family)
    refs = _encoded(vae, count)
    sizes, handle = _count_unet_calls(model)
    try:
        one_call = _sample(_msa(model, refs).clone(), clips, family)
        rows = sum(ref.latents.shape[0] for ref in refs)  # views of all references
        assert sizes == [2 + rows] * STEPS  # ONE UNet call per step: target + reference rows
        two_pass = _sample(TwoPass(model, refs).install(model), clips, family)
    finally:
        handle.remove()
    plain = _sample(model, clips, family)
    assert _diff(one_call, plain) > 1e-3  # the references do change the image
    assert _diff(one_call, two_pass) < 1e-5


def test_adapter_lora_on_the_target_pass_only(parts, tmp_path):
    """SynCD with its LoRA (a tiny checkpoint in SynCD's layout): one call equals the two
    passes where the reference pass runs without the LoRA and the target pass with it."""
    import tiny_checkpoints
    vae, clips = parts
    model = tiny_models.tiny_unet("sdxl")
    path = tiny_checkpoints.write_checkpoint(str(tmp_path), "syncd", "sdxl")[0]
    adapter = checkpoints.load_adapter(path)
    assert adapter.has_self_attn_lora
    unet = model.model.diffusion_model
    bound = adapter.bind([loc for loc, _ in unet_transformer_blocks(unet)],
                         cross_attention_dims(unet))
    lora = {loc: bound.layer(loc).self_attn_lora for loc, _ in unet_transformer_blocks(unet)}
    refs = _encoded(vae, 2)
    one_call = _sample(_msa(model, refs, adapter=adapter).clone(), clips, "sdxl")
    assert _diff(one_call, _sample(_msa(model, refs), clips, "sdxl")) > 1e-3  # the LoRA acts
    two_pass = _sample(TwoPass(model, refs, lora).install(model), clips, "sdxl")
    assert _diff(one_call, two_pass) < 1e-5
    with pytest.raises(ValueError, match="adapter: its self-attention LoRA belongs to reference"):
        _msa(model, None, mode="batch", adapter=adapter)


class SynCDTwoPass(TwoPass):
    """SynCD's sampling step written out (syncd method/pipelines/sdxl_pipeline/pipeline.py
    __call__, sample.py, data.py DummyDataset): per guidance branch that reads references, a
    reference pass (LoRA off, IP-Adapter at scale 1.0 on each reference's own image tokens) on
    the text "photo of a {category}" with that text's pooled embedding and the target's size
    conditioning (branch with text), or on the branch's negative text (image-only branch); then
    the target pass, each branch reading its own banked references."""

    def __init__(self, model, refs, lora, ip_layers, clip):
        super().__init__(model, refs, lora)
        self.ip_layers = ip_layers  # {location: (to_k_ip weight, to_v_ip weight)}
        self.tokens = torch.cat([r.image_tokens.reshape(r.latents.shape[0], -1, r.image_tokens.shape[-1])
                                 for r in refs])
        texts, pooled = [], []
        for r in refs:
            cond, pool = clip.encode_from_tokens(clip.tokenize(f"photo of a {r.phrase}"),
                                                 return_pooled=True)
            texts += [cond] * r.latents.shape[0]
            pooled += [pool.reshape(1, -1)] * r.latents.shape[0]
        self.texts, self.pooled = torch.cat(texts), torch.cat(pooled)

    def wrapper(self, apply_model, args):
        x, sigmas, c = args["input"], args["timestep"], args["c"]
        options = c["transformer_options"]
        roles = unet_family.roles_from_chunks(args["cond_or_uncond"], options.get(
            unet_family.BRANCHES_KEY, unet_family.DEFAULT_BRANCHES), x.shape[0])
        rows = self.latents.shape[0]
        sigma = float(sigmas[0])
        noisy = self.latents + msa.step_noise(self.latents.shape, sigma) * sigma  # EPS model
        self.banks = {}
        for role in ("full", "image"):
            if role not in roles:
                continue
            source = roles.index(role)
            c_ref = {k: (v[[source] * rows] if torch.is_tensor(v) and v.shape[0] == x.shape[0] else v)
                     for k, v in c.items()}
            if role == "full":
                c_ref["c_crossattn"] = self.texts
                y = c_ref["y"]
                c_ref["y"] = torch.cat([self.pooled, y[:, self.pooled.shape[1]:]], dim=1)
            # The routing patch of the target pass leaves reference rows alone.
            c_ref["transformer_options"] = dict(options, multiref_roles=("ref",) * rows)
            self.writing = self.banks[role] = {}
            apply_model(noisy, sigmas[:1].expand(rows), **c_ref)
        self.writing = False
        self.roles = roles
        return apply_model(x, sigmas, **c)

    def image_attention(self, location, inner):
        to_k_ip, to_v_ip = (w.double() for w in self.ip_layers[location])

        def attn2(q, k, v, extra_options):
            out = inner(q, k, v, extra_options)
            if self.writing is False:
                return out
            return add_image_attention(out.double(), q, self.tokens.double(), to_k_ip, to_v_ip,
                                       extra_options["n_heads"]).float()
        return attn2

    def install(self, model):
        patched = super().install(model)
        replaces = model.model_options.get("transformer_options", {}).get(
            "patches_replace", {}).get("attn2", {})
        for location in unet_family.attention_locations(model):
            inner = replaces.get(location, lambda q, k, v, o: optimized_attention(q, k, v, o["n_heads"]))
            patched.set_model_attn2_replace(self.image_attention(location, inner), *location)
        return patched


def test_syncd_reference_conditioning_equals_syncd_two_passes(parts, tmp_path):
    """SynCD's checkpoint with its own settings: the target reads one reference's image through
    the adapter at 0.6 (Apply Adapter), MSA conditions the reference rows as SynCD does, with
    the three-branch guider. One sampling step of the one-call form equals SynCD's reference
    passes + target pass written out (float64 attention), to 1e-5."""
    import tiny_checkpoints
    from multiref.nodes.routing import MultiRefApplyAdapter
    vae, clips = parts
    clip = clips["sdxl"]
    model = tiny_models.tiny_unet("sdxl")
    adapter = checkpoints.load_adapter(
        tiny_checkpoints.write_checkpoint(str(tmp_path), "syncd", "sdxl")[0])
    clip_vision = tiny_models.tiny_clip_vision()
    gen = torch.Generator().manual_seed(21)
    refs = []
    for n, phrase in enumerate(("toy", "red backpack")):
        images = torch.rand(n + 1, 8 * LATENT[0], 8 * LATENT[1], 3, generator=gen)
        mask = (torch.rand(n + 1, *LATENT, generator=gen) < 0.5).float()
        mask[:, n] = 1
        tokens = adapter.project(clip_vision.encode_image(images)).float()
        refs.append(EncodedReference(
            image_tokens=tokens.reshape(1, -1, tokens.shape[-1]), uncond_tokens=torch.zeros_like(
                tokens.reshape(1, -1, tokens.shape[-1])), latents=vae.encode(images), masks=mask,
            phrase=phrase, weight=1.0, start_percent=0.0, end_percent=1.0,
            adapter_fingerprint=adapter.fingerprint))
    refs = tuple(refs)
    target = MultiRefApplyAdapter().apply(model, adapter, refs[:1], clip, "weighted", 0.6, 0.0,
                                          1.0)[0]
    unet = model.model.diffusion_model
    locations = [loc for loc, _ in unet_transformer_blocks(unet)]
    bound = adapter.bind(locations, cross_attention_dims(unet))
    lora = {loc: bound.layer(loc).self_attn_lora for loc in locations}
    ip_layers = {loc: (bound.layer(loc).to_k_ip.weight.float(), bound.layer(loc).to_v_ip.weight.float())
                 for loc in locations}
    positive, negative = _conds(clips, "sdxl")

    def one_step(patched):
        guider = guidance_nodes.MultiRefNormalizedCFGGuider().get_guider(
            patched, positive, negative, 7.5, 8.0, 5.0, True, "three-branch")[0]
        sigmas = comfy.samplers.calculate_sigmas(patched.get_model_object("model_sampling"),
                                                 "normal", STEPS)[:2]
        noise = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(0))
        return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"),
                             sigmas, disable_pbar=True, seed=0)

    sizes, handle = _count_unet_calls(model)
    try:
        syncd = one_step(_msa(target, refs, adapter=adapter, clip=clip))  # auto: syncd
    finally:
        handle.remove()
    rows = sum(ref.latents.shape[0] for ref in refs)
    assert sizes == [3 + 2 * rows]  # ONE call: 3 branches + a reference set per reading branch
    two_pass = one_step(SynCDTwoPass(model, refs, lora, ip_layers, clip).install(target))
    assert _diff(syncd, two_pass) < 1e-5
    target_text = one_step(_msa(target, refs, adapter=adapter, clip=clip,
                                reference_conditioning="target_text"))
    assert _diff(syncd, target_text) > 1e-4  # what the reference rows read matters


def test_lora_only_file_from_the_trainer_serves_msa_like_the_full_adapter(parts, tmp_path):
    """The trainer's LoRA file (written by its own writer, no adapter) loads as an adapter
    without image layers; in MSA it gives exactly what the full adapter carrying the same LoRA
    gives; the uses that need image layers refuse it, naming where it belongs."""
    import tiny_checkpoints
    from multiref.kernels.adapter import AdapterMismatchError
    from multiref.nodes.references import MultiRefEncodeReferences, MultiRefReference
    from multiref.nodes.routing import MultiRefApplyAdapter
    from multiref.training import checkpoint as train_checkpoint
    from multiref.training.loop import adapter_training_layers
    vae, clips = parts
    model = tiny_models.tiny_unet("sdxl")
    unet = model.model.diffusion_model
    full = checkpoints.load_adapter(
        tiny_checkpoints.write_checkpoint(str(tmp_path), "syncd", "sdxl")[0])
    locations = [loc for loc, _ in unet_transformer_blocks(unet)]
    bound = full.bind(locations, cross_attention_dims(unet))
    lora_file = train_checkpoint.write_weights(
        str(tmp_path / train_checkpoint.WEIGHTS_NAME),
        {loc: bound.layer(loc).self_attn_lora for loc in locations}, "sdxl")
    lora_only = checkpoints.load_adapter(lora_file)
    assert not lora_only.has_image_layers and lora_only.has_self_attn_lora
    assert "self-attention LoRA only" in lora_only.describe()
    refs = _encoded(vae, 2)
    with_full = _sample(_msa(model, refs, adapter=full), clips, "sdxl")
    with_lora = _sample(_msa(model, refs, adapter=lora_only), clips, "sdxl")
    assert torch.equal(with_lora, with_full)
    assert _diff(with_lora, _sample(_msa(model, refs), clips, "sdxl")) > 1e-3  # the LoRA acts
    image = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(3))
    (ref,) = MultiRefReference().make(image, "dog", 1.0, 0.0, 1.0)
    where = "holds only a self-attention LoRA.*MultiRef Apply MSA"
    with pytest.raises(AdapterMismatchError, match=where):
        MultiRefEncodeReferences().encode(ref, lora_only, tiny_models.tiny_clip_vision(), model, 0)
    with pytest.raises(AdapterMismatchError, match="adapter: .*" + where):
        MultiRefApplyAdapter().apply(model, lora_only, refs, clips["sdxl"], "weighted", 1.0, 0.0, 1.0)
    with pytest.raises(AdapterMismatchError, match="adapter \\(to train\\): .*" + where):
        adapter_training_layers(lora_only, unet)


def test_reference_weights_scale_their_share(parts):
    """A reference of weight w counts each of its foreground tokens w times in the softmax: the
    one-call form equals the two-pass reference with a log(w) bias; weight 0 equals leaving the
    reference out."""
    vae, clips = parts
    model = tiny_models.tiny_unet("sd15")
    refs = _encoded(vae, 2)
    weighted = tuple(dataclasses.replace(r, weight=w) for r, w in zip(refs, (0.5, 2.5)))
    one_call = _sample(_msa(model, weighted), clips, "sd15")
    assert _diff(one_call, _sample(TwoPass(model, weighted).install(model), clips, "sd15")) < 1e-5
    assert _diff(one_call, _sample(_msa(model, refs), clips, "sd15")) > 1e-4
    dropped = (refs[0], dataclasses.replace(refs[1], weight=0.0))
    assert _diff(_sample(_msa(model, dropped), clips, "sd15"),
                 _sample(_msa(model, refs[:1]), clips, "sd15")) < 1e-5


def test_soft_masks_weigh_tokens_by_their_value(parts):
    """Soft reference masks (Encode References, mask_values soft): a token of value m counts
    e^(m - 1) times, value 0 is left out; equals the two-pass reference with that bias."""
    vae, clips = parts
    model = tiny_models.tiny_unet("sd15")
    refs = _encoded(vae, 2)
    gen = torch.Generator().manual_seed(4)
    soft = tuple(dataclasses.replace(r, masks=r.masks * torch.rand(r.masks.shape, generator=gen))
                 for r in refs)
    one_call = _sample(_msa(model, soft), clips, "sd15")
    assert _diff(one_call, _sample(TwoPass(model, soft).install(model), clips, "sd15")) < 1e-5
    assert _diff(one_call, _sample(_msa(model, refs), clips, "sd15")) > 1e-4


@pytest.mark.parametrize("count", [1, 3])
def test_uncond_rows_untouched(parts, count):
    """The sampler follows the uncond prediction only (a cfg function returning it): with MSA
    that trajectory must be the unpatched one, while the cond prediction does change."""
    vae, clips = parts
    model = tiny_models.tiny_unet("sd15")
    seen = {}

    def follow_uncond(name):
        def cfg(args):
            seen.setdefault(name, []).append(args["cond_denoised"])
            return args["uncond"]
        return cfg

    plain = model.clone()
    plain.set_model_sampler_cfg_function(follow_uncond("plain"))
    patched = _msa(model, _encoded(vae, count))
    patched.set_model_sampler_cfg_function(follow_uncond("msa"))
    out_plain = _sample(plain, clips, "sd15")
    out_msa = _sample(patched, clips, "sd15")
    assert _diff(out_msa, out_plain) < 1e-5
    assert _diff(seen["msa"][0], seen["plain"][0]) > 1e-3


def test_layers_and_strength_change_the_result(parts):
    vae, clips = parts
    model = tiny_models.tiny_unet("sd15")
    refs = _encoded(vae, 1)
    full = _sample(_msa(model, refs), clips, "sd15")
    down = _sample(_msa(model, refs, layers="down"), clips, "sd15")
    half = _sample(_msa(model, refs, strength=0.5), clips, "sd15")
    plain = _sample(model, clips, "sd15")
    for out in (down, half):
        assert _diff(out, full) > 1e-4 and _diff(out, plain) > 1e-4
    # A rerun on the same patched model reproduces itself (fresh noise per step, seeded).
    patched = _msa(model, refs, first_step_unmasked=True)
    assert torch.equal(_sample(patched, clips, "sd15"), _sample(patched, clips, "sd15"))


def test_batch_mode_shares_between_images(parts):
    _, clips = parts
    model = tiny_models.tiny_unet("sd15")
    plain = _sample(model, clips, "sd15", batch=2)
    zero = torch.zeros(1, 12, 16)
    out = _sample(_msa(model, None, mode="batch", batch_masks=zero), clips, "sd15", batch=2)
    assert _diff(out, plain) < 1e-5
    shared = _sample(_msa(model, None, mode="batch"), clips, "sd15", batch=2)
    assert _diff(shared, plain) > 1e-3
    # One image alone has nobody to share with.
    single = _sample(model, clips, "sd15")
    assert _diff(_sample(_msa(model, None, mode="batch"), clips, "sd15"), single) < 1e-5


def test_batch_mode_masks_from_a_phrase(parts):
    """No masks, a phrase: step 1 shares whole images, step 2 uses the masks made from step 1's
    cross-attention maps of the phrase, exactly as if they had been given as batch_masks.
    (Two steps of the 'simple' schedule: the second step still runs at sigma ~1.)"""
    _, clips = parts
    model = tiny_models.tiny_unet("sd15")
    sample = lambda m: _sample(m, clips, "sd15", batch=2, steps=2, scheduler="simple")
    patched = _msa(model, None, mode="batch", batch_phrase="dog", clip=clips["sd15"])
    phrase_maps = patched.model_options["model_function_wrapper"].providers[-1].phrase_maps
    seen = []  # the masks each call starts with (the run's state is gone after the run)
    start_call = phrase_maps.start_call
    phrase_maps.start_call = lambda *args: (start_call(*args), seen.append(phrase_maps.masks))
    from_phrase = sample(patched.clone())  # a later node's clone keeps the patches working
    masks = seen[-1]
    assert masks.shape == (2, *LATENT) and set(masks.unique().tolist()) == {0.0, 1.0}
    given = _msa(model, None, mode="batch", batch_masks=masks, first_step_unmasked=True)
    assert torch.equal(from_phrase, sample(given))
    assert _diff(from_phrase, sample(_msa(model, None, mode="batch"))) > 1e-4
    with pytest.raises(ValueError, match="clip: batch_phrase needs the text encoder"):
        _msa(model, None, mode="batch", batch_phrase="dog")


class TinySD3(comfy.supported_models.SD3):
    unet_config = {"in_channels": 16, "depth": 1, "pos_embed_scaling_factor": None,
                   "pos_embed_max_size": 8, "num_patches": 64,
                   "context_embedder_config": {"target": "torch.nn.Linear",
                                               "params": {"in_features": 16, "out_features": 64}}}


def test_bad_inputs_give_clear_errors(parts, host):
    vae, _ = parts
    model = tiny_models.tiny_unet("sd15")
    ref = _encoded(vae, 1)[0]
    no_latents = ref.__class__(**{**ref.__dict__, "latents": None})
    with pytest.raises(ValueError, match="no latents.*VAE"):
        _msa(model, (no_latents,))
    wrong_mask = ref.__class__(**{**ref.__dict__, "masks": torch.ones(1, 3, 3)})
    with pytest.raises(ValueError, match="masks .* do not match its latent grid"):
        _msa(model, (wrong_mask,))
    with pytest.raises(ValueError, match="at least one encoded reference"):
        _msa(model, None)
    sd3 = TinySD3(dict(TinySD3.unet_config)).get_model({})
    sd3 = comfy.model_patcher.ModelPatcher(sd3, load_device=torch.device("cpu"),
                                           offload_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="UNet models .*SD3"):
        _msa(sd3, (ref,))
    assert host.nodes["MultiRefApplyMSA"] is MultiRefApplyMSA


def test_with_the_three_branch_guider_one_call_and_uncond_untouched(parts):
    """With MultiRefNormalizedCFGGuider, the reference rows ride in its single batched call and
    serve both image-conditioned branches (full, image); its uncond branch is untouched."""
    vae, clips = parts
    positive, negative = _conds(clips, "sd15")
    first_call = {}

    def run(model, name):
        def recorder(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            chunks = out.chunk(len(args["cond_or_uncond"]))
            first_call.setdefault(name, dict(zip(args["cond_or_uncond"], chunks)))
            return out

        model = model.clone()
        model.set_model_unet_function_wrapper(recorder)
        if name == "msa":
            model = _msa(model, _encoded(vae, 2))
        guider = guidance_nodes.MultiRefNormalizedCFGGuider().get_guider(
            model, positive, negative, 5.0, 3.0, 0.0, True, "three-branch")[0]
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"),
                                                 "normal", STEPS)
        noise = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(0))
        return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"),
                             sigmas, disable_pbar=True, seed=0)

    model = tiny_models.tiny_unet("sd15")
    sizes, handle = _count_unet_calls(model)
    try:
        run(model, "msa")
    finally:
        handle.remove()
    assert sizes == [3 + 3] * STEPS  # full, image, uncond + 3 reference rows (1 + 2 views)
    run(model, "plain")
    full, image, uncond = 0, 1, 2  # the guider's cond list: [positive, negative, negative]
    assert _diff(first_call["msa"][uncond], first_call["plain"][uncond]) < 1e-5
    for branch in (full, image):
        assert _diff(first_call["msa"][branch], first_call["plain"][branch]) > 1e-3


def test_references_from_the_encoder_node(parts, host, tmp_path):
    """The pack's own reference nodes feed MSA: a 64x64 reference (8x8 latent) with a mask, on a
    6x8 target latent (the reference rows are resized to the target grid); without a VAE the
    encoded reference has no latents and MSA says so."""
    import tiny_checkpoints
    from multiref.kernels import checkpoints
    vae, clips = parts
    model = tiny_models.tiny_unet("sd15")
    adapter = checkpoints.load_adapter(
        tiny_checkpoints.write_checkpoint(str(tmp_path), "ip_adapter_plus", "sd15")[0])
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 8:40] = 1
    refs = host.nodes["MultiRefReference"]().make(image, "dog", 1.0, 0.0, 1.0, mask=mask)[0]
    encode = host.nodes["MultiRefEncodeReferences"]().encode
    clip_vision = tiny_models.tiny_clip_vision()
    encoded = encode(refs, adapter, clip_vision, model, 0, vae=vae)[0]
    patched = host.nodes["MultiRefApplyMSA"]().apply(model, 1.0, 0.0, 1.0, False, "all",
                                                     "references", references=encoded)[0]
    assert _diff(_sample(patched.clone(), clips, "sd15"), _sample(model, clips, "sd15")) > 1e-3
    without_vae = encode(refs, adapter, clip_vision, model, 0)[0]
    with pytest.raises(ValueError, match="no latents.*give a VAE"):
        host.nodes["MultiRefApplyMSA"]().apply(model, 1.0, 0.0, 1.0, False, "all", "references",
                                               references=without_vae)
