"""Weighted-merge object routing on Flux (nodes/flux_routing.py, techniques.routing
.joint_addition): the joint attention's own text keys at the phrase positions route each
reference; checked on constructed queries and keys (weights, precision), and on the tiny Flux
through the real nodes and the host's sampler against a written-out plain adapter injection,
with adapter files in the published layouts (tests/tiny_flux_checkpoints.py)."""
import dataclasses
import math

import pytest
import torch

import tiny_checkpoints
import tiny_flux_checkpoints as tfc
from conftest import HOST
from multiref.kernels import checkpoints, rope_positions, routing
from multiref.kernels.adapter import AdapterMismatchError
from multiref.techniques import routing as technique

ON_CHECKOUT = HOST.kind != "installable comfyui"
needs_flux = pytest.mark.skipif(not ON_CHECKOUT, reason="Flux needs a current ComfyUI (run with "
                                "MULTIREF_TEST_HOST=checkout COMFYUI_PATH=...)")
HEADS, D = 2, 8


def _host_pe(angles):
    """Rotation matrices in the host's `pe` layout (1, 1, L, D/2, 2, 2) from angles (L, D/2)."""
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).reshape(1, 1, *angles.shape, 2, 2).float()


def test_unrotate_host_undoes_the_hosts_rotation():
    angles = torch.rand(7, D // 2, dtype=torch.float64) * 6
    pe = _host_pe(angles)
    x = torch.randn(2, HEADS, 7, D)
    pairs = x.reshape(2, HEADS, 7, D // 2, 1, 2)  # the host's own formula (flux/math.py)
    rotated = (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(x.shape)
    torch.testing.assert_close(rope_positions.unrotate_host(rotated, pe), x, rtol=0, atol=1e-5)


def test_locate_phrase_finds_the_run():
    assert routing.locate_phrase([5, 9, 1131, 3, 547, 1], [1131, 3, 547]) == 2
    assert routing.locate_phrase([5, 9, 1131, 3], [3, 547]) is None


def _two_objects(strength=3.0):
    """Text of 6 tokens (phrase 0 at 1-2, phrase 1 at 4), a 4 x 4 image whose left half is
    object 0 and right half object 1: image queries of each half point along their phrase's
    key direction (plus noise)."""
    gen = torch.Generator().manual_seed(0)
    text_len, grid = 6, (4, 4)
    a, b = torch.zeros(D), torch.zeros(D)
    a[0], b[1] = 1.0, 1.0
    k = 0.3 * torch.randn(1, HEADS, text_len + 16, D, generator=gen)
    k[:, :, [1, 2]] = strength * a
    k[:, :, 4] = strength * b
    q = 0.3 * torch.randn(1, HEADS, text_len + 16, D, generator=gen)
    left = (torch.arange(16) % 4) < 2
    image = q[:, :, text_len:]
    image[:, :, left] += strength * a
    image[:, :, ~left] += strength * b
    return q, k, text_len, grid, left, [[1, 2], [4]]


def _keys_values(refs, tokens, gen):
    return (torch.randn(1, refs, tokens, HEADS * D, generator=gen) for _ in range(2))


def test_weights_sum_to_one_and_two_objects_go_to_their_own_regions():
    q, k, text_len, grid, left, positions = _two_objects()
    ip_k, ip_v = _keys_values(2, 3, torch.Generator().manual_seed(1))
    out, shown = technique.joint_addition(q, k, q, text_len, 16, ip_k, ip_v, torch.ones(2),
                                          "weighted", positions=positions)
    assert out.shape == (1, 16, HEADS * D) and shown.shape == (1, 16, 2)
    torch.testing.assert_close(shown.sum(-1), torch.ones(1, 16), rtol=0, atol=1e-6)
    own = torch.stack([left, ~left], dim=-1).float()
    precision = (shown[0] * own).sum(0) / shown[0].sum(0)  # each reference's mass in its region
    assert bool((precision >= 0.9).all()), precision
    # The merge is the written-out sum of each reference's attention times its weight.
    expected = sum(shown[0, :, i:i + 1] * _slow_attention(q[0, :, text_len:], ip_k[0, i],
                                                          ip_v[0, i]) for i in range(2))
    torch.testing.assert_close(out[0].double(), expected, rtol=1e-5, atol=1e-5)


def _slow_attention(q, keys, values):
    """q (H, N, D) against one reference's keys/values (M, H*D): (N, H*D), float64 loops."""
    heads, n, d = q.shape
    out = torch.zeros(n, heads * d, dtype=torch.float64)
    for h in range(heads):
        kh, vh = keys[:, h * d:(h + 1) * d].double(), values[:, h * d:(h + 1) * d].double()
        for x in range(n):
            scores = [float(q[h, x].double() @ kh[t]) / math.sqrt(d) for t in range(len(kh))]
            top = max(scores)
            e = torch.tensor([math.exp(s - top) for s in scores], dtype=torch.float64)
            out[x, h * d:(h + 1) * d] = (e / e.sum()) @ vh
    return out


def test_text_queries_read_the_references_in_their_share_of_the_image():
    q, k, text_len, _, _, positions = _two_objects()
    ip_k, ip_v = _keys_values(2, 3, torch.Generator().manual_seed(2))
    both, shown = technique.joint_addition(q, k, q, text_len, 16, ip_k, ip_v, torch.ones(2),
                                           "weighted", positions=positions, text_queries=True)
    image_only, _ = technique.joint_addition(q, k, q, text_len, 16, ip_k, ip_v, torch.ones(2),
                                             "weighted", positions=positions)
    assert both.shape == (1, text_len + 16, HEADS * D)
    torch.testing.assert_close(both[:, text_len:], image_only, rtol=0, atol=0)
    share = shown[0].mean(0)
    expected = sum(share[i] * _slow_attention(q[0, :, :text_len], ip_k[0, i], ip_v[0, i])
                   for i in range(2))
    torch.testing.assert_close(both[0, :text_len].double(), expected, rtol=1e-5, atol=1e-5)


# --- the tiny Flux, through the nodes and the host's sampler ----------------------------------

PROMPT = "a dog and a red hat on grass"


@pytest.fixture(scope="module")
def flux_models():
    from multiref.nodes import demo
    return demo.MultiRefTinyDemoModels().build("flux", 0)


def _adapter(tmp_path, kind):
    write = tfc.write_instantx if kind == "instantx" else tfc.write_xlabs
    path, weights = write(str(tmp_path))
    return checkpoints.load_adapter(path), weights


def _encode(flux_models, adapter, phrases=("dog", "red hat"), seeds=(0, 1), vae=None):
    from multiref.nodes import references as nodes
    model, _, _, clip_vision = flux_models
    refs = None
    for phrase, seed in zip(phrases, seeds):
        image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(seed))
        refs = nodes.MultiRefReference().make(image, phrase, 1.0, 0.0, 1.0, previous=refs)[0]
    return nodes.MultiRefEncodeReferences().encode(refs, adapter, clip_vision, model, 0,
                                                   vae=vae)[0]


def _apply(flux_models, adapter, encoded, scale=0.8, mode="weighted", prompt=PROMPT, **kwargs):
    from multiref.nodes import routing as nodes
    model, clip, _, _ = flux_models
    capturing = _capturing(model)
    patched = nodes.MultiRefApplyAdapter().apply(capturing, adapter, encoded, clip, mode, scale,
                                                 0.0, 1.0, prompt=prompt, **kwargs)[0]
    patched.calls = capturing.calls
    return patched


def _capturing(model):
    """A clone whose model calls are recorded row by row: [(cond_or_uncond, output)]."""
    clone = model.clone()
    calls = []

    def wrapper(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        calls.append((tuple(args["cond_or_uncond"]), out.detach().clone()))
        return out
    clone.set_model_unet_function_wrapper(wrapper)
    clone.calls = calls
    return clone


def _run(model, clip, steps=1):
    import comfy.sample
    positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    shape = (1, 16, 8, 12)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    del model.calls[:]
    comfy.sample.sample(model, noise, steps, 2.0, "euler", "simple", positive, negative,
                        torch.zeros(shape), seed=0)
    return list(model.calls)


def _outputs(calls):
    """{0: positive rows, 1: negative rows} of the first model call."""
    order, out = calls[0]
    rows = out.shape[0] // len(order)
    return {index: out[i * rows:(i + 1) * rows] for i, index in enumerate(order)}


@needs_flux
@pytest.mark.parametrize("kind", ["instantx", "xlabs"])
def test_scale_zero_is_bit_identical_to_the_unpatched_model(kind, flux_models, tmp_path,
                                                            one_thread):
    model, clip, _, _ = flux_models
    adapter, _ = _adapter(tmp_path, kind)
    encoded = _encode(flux_models, adapter)
    plain = _outputs(_run(_capturing(model), clip))
    off = _outputs(_run(_apply(flux_models, adapter, encoded, scale=0.0), clip))
    routed = _outputs(_run(_apply(flux_models, adapter, encoded), clip))
    for index in (0, 1):
        assert torch.equal(off[index], plain[index])
        assert not torch.equal(routed[index], plain[index])  # uncond rows read uncond tokens


@needs_flux
def test_uncond_rows_read_only_the_uncond_tokens(flux_models, tmp_path, one_thread):
    """Other reference pictures change the prompt rows, never the uncond rows (both read the
    same black-image tokens there)."""
    _, clip, _, _ = flux_models
    adapter, _ = _adapter(tmp_path, "instantx")
    first = _outputs(_run(_apply(flux_models, adapter, _encode(flux_models, adapter)), clip))
    other = _encode(flux_models, adapter, seeds=(5, 6))
    second = _outputs(_run(_apply(flux_models, adapter, other), clip))
    assert torch.equal(first[1], second[1])
    assert not torch.equal(first[0], second[0])


class _WrittenOutInjection:
    """Plain adapter injection of ONE reference, written out as a test-only `dit` replace and
    attention override: the pre-RoPE queries recomputed by undoing RoPE angle by angle from the
    image's own row/column ids, the adapter keys/values from the file's raw tensors, attention
    head by head in float64, added where the published adapter adds it (InstantX: before the
    output projection, image tokens in double blocks and every token in single blocks; XLabs:
    the image stream after the double block)."""

    def __init__(self, kind, weights, image_tokens, uncond_tokens, scale, grid, axes_dim, theta):
        self.kind, self.weights, self.scale = kind, weights, scale
        self.tokens = {0: image_tokens[0].double(), 1: uncond_tokens[0].double()}
        self.grid, self.axes_dim, self.theta = grid, axes_dim, theta
        self.waiting = None

    def keys_values(self, block, n, tokens):
        if self.kind == "instantx":
            index = n if block == "double_block" else tfc.DOUBLE + n
            w = self.weights["ip_adapter"]
            return tuple(_rms_per_head(tokens @ w[f"{index}.to_{kv}_ip.weight"].double().T)
                         for kv in "kv")
        p = f"double_blocks.{n}.processor.ip_adapter_double_stream_"
        return tuple(tokens @ self.weights[p + f"{kv}_proj.weight"].double().T
                     + self.weights[p + f"{kv}_proj.bias"].double() for kv in "kv")

    def unrotate(self, q, text_len):
        """Undo RoPE on every token: text ids are 0 (no rotation), image token (r, c) of the
        grid has ids (0, r, c); channel pair j of axis a turned by id_a * theta^(-2j/dim_a)."""
        rows, cols = self.grid
        out = q.double().clone()
        for t in range(q.shape[2] - text_len):
            ids = (0, t // cols, t % cols)
            pair = 0
            for axis, dim in enumerate(self.axes_dim):
                for j in range(dim // 2):
                    angle = ids[axis] * self.theta ** (-2 * j / dim)
                    c, s = math.cos(angle), math.sin(angle)
                    x0 = q[:, :, text_len + t, 2 * pair].double()
                    x1 = q[:, :, text_len + t, 2 * pair + 1].double()
                    out[:, :, text_len + t, 2 * pair] = c * x0 + s * x1
                    out[:, :, text_len + t, 2 * pair + 1] = -s * x0 + c * x1
                    pair += 1
        return out

    def injection(self, q_plain, block, n, roles, first):
        adds = []
        for row, role in enumerate(roles):
            keys, values = self.keys_values(block, n, self.tokens[role])
            adds.append(_slow_attention(q_plain[row, :, first:], keys, values))
        return self.scale * torch.stack(adds)

    def install(self, model):
        for block, count in (("double_block", tfc.DOUBLE), ("single_block", tfc.SINGLE)):
            if self.kind == "xlabs" and block == "single_block":
                continue
            for n in range(count):
                model.set_model_patch_replace(self.replace(block, n), "dit", block, n)

    def replace(self, block, n):
        def run(args, extra):
            options = args["transformer_options"]
            roles = [0 if c == 0 else 1 for c in options["cond_or_uncond"]
                     for _ in range(args["img"].shape[0] // len(options["cond_or_uncond"]))]
            image_len = self.grid[0] * self.grid[1]

            def override(func, q, k, v, heads, *rest, **kwargs):
                out = func(q, k, v, heads, *rest, **kwargs)
                text_len = q.shape[2] - image_len
                q_plain = self.unrotate(q, text_len)
                if self.kind == "xlabs":
                    self.waiting = self.injection(q_plain, block, n, roles, text_len)
                    return out
                first = text_len if block == "double_block" else 0
                return torch.cat([out[:, :first], out[:, first:] + self.injection(
                    q_plain, block, n, roles, first).to(out)], dim=1)
            options["optimized_attention_override"] = override
            try:
                out = extra["original_block"](args)
            finally:
                del options["optimized_attention_override"]
            if self.kind == "xlabs":
                out = dict(out, img=out["img"] + self.waiting.to(out["img"]))
            return out
        return run


HEADS_FLUX = 2  # the tiny Flux's heads


def _rms_per_head(x):
    """InstantX's RMSNorm without a learned scale, over each head's channels."""
    heads = x.reshape(len(x), HEADS_FLUX, -1)
    return (heads / torch.sqrt((heads ** 2).mean(-1, keepdim=True) + 1e-5)).reshape(len(x), -1)


@needs_flux
@pytest.mark.parametrize("kind", ["instantx", "xlabs"])
def test_one_reference_weighted_equals_the_written_out_plain_injection(kind, flux_models,
                                                                        tmp_path, one_thread):
    model, clip, _, _ = flux_models
    adapter, weights = _adapter(tmp_path, kind)
    encoded = _encode(flux_models, adapter, phrases=("dog",), seeds=(3,))
    routed = _outputs(_run(_apply(flux_models, adapter, encoded, scale=0.9,
                                  decouple_text=False), clip))
    params = model.model.diffusion_model.params
    reference = _WrittenOutInjection(kind, weights, encoded[0].image_tokens,
                                     encoded[0].uncond_tokens, 0.9, (4, 6), params.axes_dim,
                                     params.theta)
    slow = _capturing(model)
    reference.install(slow)
    expected = _outputs(_run(slow, clip))
    plain = _outputs(_run(_capturing(model), clip))
    for index in (0, 1):
        assert not torch.allclose(expected[index], plain[index], atol=1e-3)
        torch.testing.assert_close(routed[index], expected[index], rtol=1e-4, atol=1e-5)


@needs_flux
def test_a_phrase_not_in_the_prompt_is_refused_by_name(flux_models, tmp_path):
    adapter, _ = _adapter(tmp_path, "instantx")
    encoded = _encode(flux_models, adapter, phrases=("dog", "blue car"))
    with pytest.raises(ValueError, match="phrase of reference 2: phrase 'blue car' is not in the "
                                         "prompt 'a dog and a red hat on grass'; write the "
                                         "phrase exactly as the prompt has it"):
        _apply(flux_models, adapter, encoded)
    with pytest.raises(ValueError, match="prompt: on Flux, weighted routing finds each phrase"):
        _apply(flux_models, adapter, encoded, prompt="")


@needs_flux
def test_reference_options_flux_routing_does_not_apply_are_refused_by_name(flux_models,
                                                                           tmp_path):
    adapter, _ = _adapter(tmp_path, "instantx")
    encoded = _encode(flux_models, adapter)
    masked = dataclasses.replace(encoded[1], attention_mask=torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match=r"references: reference 2 \('red hat'\) has an "
                                         "attention_mask, which routing on Flux does not apply"):
        _apply(flux_models, adapter, (encoded[0], masked))
    per_image = dataclasses.replace(encoded[0], tokens_per_view=encoded[0].image_tokens.shape[1])
    with pytest.raises(ValueError, match=r"reference 1 \('dog'\) has views 'one per batch "
                                         "image'"):
        _apply(flux_models, adapter, (per_image, encoded[1]))


@needs_flux
def test_an_adapter_of_another_family_is_refused_by_name(flux_models, tmp_path):
    from multiref.families import tiny_models
    from multiref.nodes import references as reference_nodes
    from multiref.nodes import routing as nodes
    model, clip, _, clip_vision = flux_models
    path, _ = tiny_checkpoints.write_checkpoint(str(tmp_path), "ip_adapter", "sdxl")
    sdxl_adapter = checkpoints.load_adapter(path)
    refs = reference_nodes.MultiRefReference().make(torch.rand(1, 32, 32, 3), "dog", 1.0, 0.0,
                                                    1.0)[0]
    with pytest.raises(AdapterMismatchError, match="made for SDXL but the model is FLUX"):
        reference_nodes.MultiRefEncodeReferences().encode(refs, sdxl_adapter, clip_vision, model, 0)
    flux_adapter, _ = _adapter(tmp_path, "instantx")
    encoded = _encode(flux_models, flux_adapter)
    sdxl_encoded = tuple(dataclasses.replace(e, adapter_fingerprint=sdxl_adapter.fingerprint)
                         for e in encoded)
    with pytest.raises(AdapterMismatchError, match="made for SDXL but the model is FLUX"):
        nodes.MultiRefApplyAdapter().apply(model, sdxl_adapter, sdxl_encoded, clip, "weighted",
                                           0.8, 0.0, 1.0, prompt=PROMPT)
    sd15 = tiny_models.tiny_unet("sd15")
    with pytest.raises(AdapterMismatchError, match="InstantX Flux IP-Adapter.*made for FLUX but "
                                                   "the model is SD15"):
        nodes.MultiRefApplyAdapter().apply(sd15, flux_adapter, encoded, clip, "weighted", 0.8,
                                           0.0, 1.0)


@needs_flux
def test_two_references_record_maps_that_sum_to_one_and_show(flux_models, tmp_path, one_thread):
    from multiref.nodes import routing as nodes
    _, clip, _, _ = flux_models
    adapter, _ = _adapter(tmp_path, "instantx")
    patched = _apply(flux_models, adapter, _encode(flux_models, adapter))
    _run(patched, clip, steps=2)
    recorder = patched.model_options["transformer_options"][nodes.RECORDER_KEY]
    assert recorder.steps == 2
    maps = recorder.maps(0, ("double_block", "single_block"), (4, 6))
    assert maps.shape == (1, 2, 4, 6)
    torch.testing.assert_close(maps.sum(1), torch.ones(1, 4, 6), rtol=0, atol=1e-5)
    picture = nodes.MultiRefRoutingMaps().show(patched, {"samples": torch.zeros(1, 16, 8, 12)},
                                               0, "all")[0]
    assert picture.shape == (1, 64, 96, 3)


@needs_flux
@pytest.mark.parametrize("kind", ["instantx", "xlabs"])
def test_dynamic_decoupling_changes_only_adapters_that_inject_into_the_text(kind, flux_models,
                                                                             tmp_path, one_thread):
    _, clip, _, _ = flux_models
    adapter, _ = _adapter(tmp_path, kind)
    encoded = _encode(flux_models, adapter)
    on = _outputs(_run(_apply(flux_models, adapter, encoded, decouple_text=True), clip))
    off = _outputs(_run(_apply(flux_models, adapter, encoded, decouple_text=False), clip))
    assert torch.equal(on[0], off[0]) == (kind == "xlabs")  # XLabs never reaches the text


# --- SigLIP's attention-pooling head (InstantX reads SigLIP's pooled output) -----------------

SIGLIP_WIDTH, SIGLIP_HEADS = tfc.EMBED, 2


def _head_tensors(seed=0):
    """A tiny head in the published key layout (vision_model.head.*), random values."""
    gen = torch.Generator().manual_seed(seed)
    c, inner = SIGLIP_WIDTH, 2 * SIGLIP_WIDTH
    r = lambda *shape: torch.randn(shape, generator=gen) / shape[-1] ** 0.5
    parts = {"probe": r(1, 1, c), "attention.in_proj_weight": r(3 * c, c),
             "attention.in_proj_bias": r(3 * c), "attention.out_proj.weight": r(c, c),
             "attention.out_proj.bias": r(c), "layernorm.weight": 1 + r(c),
             "layernorm.bias": r(c), "mlp.fc1.weight": r(inner, c), "mlp.fc1.bias": r(inner),
             "mlp.fc2.weight": r(c, inner), "mlp.fc2.bias": r(c)}
    return {"vision_model.head." + k: v for k, v in parts.items()}


def _published_head(tensors):
    """transformers' own SiglipMultiheadAttentionPoolingHead with the file's head tensors
    (strict: the key layout is the published one)."""
    from transformers.models.siglip import modeling_siglip
    config = modeling_siglip.SiglipVisionConfig(
        hidden_size=SIGLIP_WIDTH, num_attention_heads=SIGLIP_HEADS,
        intermediate_size=2 * SIGLIP_WIDTH, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    head = modeling_siglip.SiglipMultiheadAttentionPoolingHead(config)
    prefix = "vision_model.head."
    head.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()}, strict=True)
    return head.eval()


def test_the_siglip_head_equals_the_published_one(tmp_path):
    from safetensors.torch import save_file
    from multiref.kernels import siglip_pooling
    from multiref.kernels.weights_files import CheckpointError
    tensors = _head_tensors()
    path = str(tmp_path / "siglip.safetensors")
    save_file(dict(tensors, **{"vision_model.post_layernorm.weight": torch.ones(3)}), path)
    head = siglip_pooling.load_head(path, SIGLIP_HEADS)
    hidden = torch.randn(3, 10, SIGLIP_WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(head(hidden), _published_head(tensors)(hidden), rtol=1e-5,
                                   atol=1e-5)
    save_file({"vision_model.post_layernorm.weight": torch.ones(3)}, path)
    with pytest.raises(CheckpointError, match="siglip.safetensors: has no SigLIP attention-pooling "
                                              "head \\(vision_model.head.probe"):
        siglip_pooling.load_head(path, SIGLIP_HEADS)


def _tiny_siglip():
    """The host's ClipVisionModel as a SigLIP (its own class for model_type
    siglip_vision_model), tiny widths."""
    import comfy.clip_vision
    from multiref.families import tiny_models
    config = tiny_models._write_json("siglip.json", {
        "num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "hidden_size": SIGLIP_WIDTH,
        "image_size": 64, "intermediate_size": 2 * SIGLIP_WIDTH,
        "model_type": "siglip_vision_model", "num_attention_heads": SIGLIP_HEADS,
        "num_hidden_layers": 2, "patch_size": 16, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5]})
    vision = comfy.clip_vision.ClipVisionModel(config)
    tiny_models.randomize_(vision.model, 4)
    return vision


@needs_flux
def test_instantx_references_encode_through_the_siglip_head(flux_models, host, tmp_path):
    from safetensors.torch import save_file
    from multiref.nodes import references as nodes
    model = flux_models[0]
    folder = tmp_path / "clip_vision"
    folder.mkdir()
    tensors = _head_tensors()
    save_file(tensors, str(folder / "siglip-so400m.safetensors"))
    host.folder_paths.add_model_folder_path("clip_vision", str(folder))
    if hasattr(host.folder_paths, "invalidate_cache"):
        host.folder_paths.invalidate_cache("clip_vision")
    siglip = _tiny_siglip()
    adapter, _ = _adapter(tmp_path, "instantx")
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    refs = nodes.MultiRefReference().make(image, "dog", 1.0, 0.0, 1.0)[0]
    encode = nodes.MultiRefEncodeReferences()
    assert "siglip-so400m.safetensors" in encode.INPUT_TYPES()["optional"]["siglip_head"][0]
    with pytest.raises(AdapterMismatchError, match="ComfyUI's SigLIP returns its last hidden "
                                                   "states .*pick the SigLIP file"):
        encode.encode(refs, adapter, siglip, model, 0)
    encoded = encode.encode(refs, adapter, siglip, model, 0,
                            siglip_head="siglip-so400m.safetensors")[0][0]
    with torch.no_grad():
        pooled = _published_head(tensors)(siglip.encode_image(image)["image_embeds"].float())
        expected = adapter.projection(pooled)
    torch.testing.assert_close(encoded.image_tokens, expected, rtol=1e-5, atol=1e-5)
    xlabs, _ = _adapter(tmp_path, "xlabs")
    with pytest.raises(ValueError, match="siglip_head: only the InstantX Flux adapter"):
        encode.encode(refs, xlabs, siglip, model, 0, siglip_head="siglip-so400m.safetensors")


@needs_flux
@pytest.mark.parametrize("kind", ["instantx", "xlabs"])
def test_routing_adds_to_what_msa_computes_in_either_order(kind, flux_models, tmp_path,
                                                           one_thread):
    """Apply MSA and Apply Adapter on one Flux model: one model call per step carries the
    reference rows, and the routed adapter acts on top of the shared attention whichever node
    came first (MSA replaces the image tokens' attention output of the rows that read the
    references; routing only adds, so it runs outside it)."""
    from multiref.nodes.msa import apply_msa
    from multiref.nodes import routing as nodes
    model, clip, vae, _ = flux_models
    adapter, _ = _adapter(tmp_path, kind)
    encoded = _encode(flux_models, adapter, vae=vae)
    msa_args = (encoded, 1.0, 0.0, 1.0, False, "all", "references")
    base = _capturing(model)
    msa = apply_msa(base, *msa_args)
    msa.calls = base.calls
    msa_then_routing = nodes.MultiRefApplyAdapter().apply(msa, adapter, encoded, clip,
                                                          "weighted", 0.8, 0.0, 1.0,
                                                          prompt=PROMPT)[0]
    msa_then_routing.calls = base.calls
    routed = _apply(flux_models, adapter, encoded)
    routing_then_msa = apply_msa(routed, *msa_args)
    routing_then_msa.calls = routed.calls
    msa_only = _run(msa, clip)
    first, second = _run(msa_then_routing, clip), _run(routing_then_msa, clip)
    assert len(first) == 1 and first[0][1].shape[0] == msa_only[0][1].shape[0] == 2
    assert not torch.equal(_outputs(first)[0], _outputs(msa_only)[0])
    for index in (0, 1):
        torch.testing.assert_close(_outputs(second)[index], _outputs(first)[index], rtol=1e-5,
                                   atol=1e-6)


@needs_flux
def test_a_reference_of_weight_zero_is_left_out(flux_models, tmp_path, one_thread):
    """Two references, the second of weight 0: what the first alone gives (plain injection),
    with no phrase lookup for a single active reference."""
    _, clip, _, _ = flux_models
    adapter, _ = _adapter(tmp_path, "instantx")
    encoded = _encode(flux_models, adapter)
    off = (encoded[0], dataclasses.replace(encoded[1], weight=0.0))
    both = _outputs(_run(_apply(flux_models, adapter, off), clip))
    alone = _outputs(_run(_apply(flux_models, adapter, encoded[:1]), clip))
    for index in (0, 1):
        torch.testing.assert_close(both[index], alone[index], rtol=1e-6, atol=1e-7)


@needs_flux
def test_mask_mode_routes_by_the_region_masks(flux_models, tmp_path, one_thread):
    from multiref.nodes import routing as nodes
    _, clip, _, _ = flux_models
    adapter, _ = _adapter(tmp_path, "xlabs")
    masks = torch.zeros(2, 64, 96)
    masks[0, :, :48], masks[1, :, 48:] = 1.0, 1.0
    patched = _apply(flux_models, adapter, _encode(flux_models, adapter), mode="mask",
                     prompt="", region_masks=masks)
    _run(patched, clip)
    recorder = patched.model_options["transformer_options"][nodes.RECORDER_KEY]
    maps = recorder.maps(0, ("double_block",), (4, 6))[0]
    torch.testing.assert_close(maps[0, :, :3], torch.ones(4, 3))
    torch.testing.assert_close(maps[1, :, :3], torch.zeros(4, 3))
    torch.testing.assert_close(maps[1, :, 3:], torch.ones(4, 3))
