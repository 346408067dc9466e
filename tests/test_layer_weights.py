"""Per-layer weights (weight_type, block_weights) and embeds scaling of MultiRef Apply Adapter:
the table equals IPAdapter_plus's definitions written out here, and the layer patch applies the
factor and the scaling as the formulas below say."""
import pytest
import torch
import torch.nn.functional as F

from multiref.kernels import layer_weights
from multiref.kernels.checkpoints import cross_attention_dims
from multiref.families import tiny_models
from multiref.families import unet as unet_family
from test_adapters import published_locations
from test_routing_nodes import apply, encoded, tiny_adapter

# The spatial transformers of the real UNets in the host's execution order (input, middle,
# output), written from their block layouts: IPAdapter_plus's layer numbers index this list.
SDXL_BLOCKS = [("input", 4), ("input", 5), ("input", 7), ("input", 8), ("middle", 0)] + \
    [("output", i) for i in range(6)]
SD15_BLOCKS = [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("middle", 0)] + \
    [("output", i) for i in range(3, 12)]
# IPAdapter_plus's tables {layer number: weight} at weight 1 (IPAdapterPlus.py ipadapter_execute).
TABLES = {
    ("style transfer", "sdxl"): {6: 1},
    ("style transfer", "sd15"): {0: 1, 1: 1, 2: 1, 3: 1, 9: 1, 10: 1, 11: 1, 12: 1, 13: 1, 14: 1, 15: 1},
    ("composition", "sdxl"): {3: 1},
    ("composition", "sd15"): {4: 0.25, 5: 1},
    ("strong style transfer", "sdxl"): {0: 1, 1: 1, 2: 1, 4: 1, 5: 1, 6: 1, 7: 1, 8: 1, 9: 1, 10: 1},
    ("strong style transfer", "sd15"): {0: 1, 1: 1, 2: 1, 3: 1, 6: 1, 7: 1, 8: 1, 9: 1, 10: 1,
                                        11: 1, 12: 1, 13: 1, 14: 1, 15: 1},
    ("style and composition", "sdxl"): {3: 1, 6: 1},
    ("style and composition", "sd15"): {0: 1, 1: 1, 2: 1, 3: 1, 4: 0.25, 5: 1, 9: 1, 10: 1, 11: 1,
                                        12: 1, 13: 1, 14: 1, 15: 1},
    # The precise types with their boost at its default (the weight itself).
    ("style transfer precise", "sdxl"): {3: 1, 6: 1},
    ("style transfer precise", "sd15"): {0: 1, 1: 1, 2: 1, 3: 1, 4: 0.25, 5: 1, 9: 1, 10: 1,
                                         11: 1, 12: 1, 13: 1, 14: 1, 15: 1},
    ("composition precise", "sdxl"): {0: .1, 1: .1, 2: .1, 3: 1, 4: .1, 5: .1, 6: 1, 7: .1, 8: .1,
                                      9: .1, 10: .1},
    ("composition precise", "sd15"): {0: 1, 1: 1, 2: 1, 3: 1, 4: 0.25, 5: 1, 6: .1, 7: .1, 8: .1,
                                      9: 1, 10: 1, 11: 1, 12: 1, 13: 1, 14: 1, 15: 1},
}
# Where the precise types put the reference's image on the unconditional side and zero tokens
# on the conditional one (IPAdapter_plus's ipadapter_attention): {(type, family): layer numbers}.
REVERSED = {
    ("style transfer precise", "sdxl"): {3},
    ("style transfer precise", "sd15"): {4, 5},
    ("composition precise", "sdxl"): set(range(11)) - {3},
    ("composition precise", "sd15"): set(range(16)) - {4, 5},
}


@pytest.mark.parametrize("family,blocks", [("sdxl", SDXL_BLOCKS), ("sd15", SD15_BLOCKS)])
def test_layer_numbers_of_the_real_unets(family, blocks):
    locations = published_locations(family)
    indices = layer_weights.transformer_indices(locations)
    assert {loc: blocks.index(loc[:2]) for loc in locations} == indices


@pytest.mark.parametrize("weight_type,family", sorted(TABLES))
def test_block_tables(weight_type, family):
    locations = published_locations(family)
    blocks = SDXL_BLOCKS if family == "sdxl" else SD15_BLOCKS
    factors = layer_weights.layer_factors(locations, weight_type, family)
    table = TABLES[(weight_type, family)]
    assert factors == {loc: table.get(blocks.index(loc[:2]), 0.0) for loc in locations}


@pytest.mark.parametrize("weight_type,family", sorted(REVERSED))
def test_precise_types_reverse_the_reference_on_their_layers(weight_type, family):
    locations = published_locations(family)
    blocks = SDXL_BLOCKS if family == "sdxl" else SD15_BLOCKS
    reversed_layers = layer_weights.reversed_layers(locations, weight_type, family)
    assert reversed_layers == {loc for loc in locations
                               if blocks.index(loc[:2]) in REVERSED[(weight_type, family)]}
    assert layer_weights.reversed_layers(locations, "style and composition", family) == set()


CURVES = {  # IPAdapter_plus's ipadapter_attention, t = layer number, n = 11 (SDXL) or 16
    "ease in": lambda t, n: 0.05 + 0.95 * (1 - t / n),
    "ease out": lambda t, n: 0.05 + 0.95 * (t / n),
    "ease in-out": lambda t, n: 0.05 + 0.95 * (1 - abs(t - n / 2) / (n / 2)),
    "reverse in-out": lambda t, n: 0.05 + 0.95 * (abs(t - n / 2) / (n / 2)),
    "linear": lambda t, n: 1.0,
}
WEAK = {"weak input": {"input"}, "weak output": {"output"}, "weak middle": {"middle"},
        "strong middle": {"input", "output"}}


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_curves_and_weak_sections(family):
    locations = published_locations(family)
    blocks = SDXL_BLOCKS if family == "sdxl" else SD15_BLOCKS
    for name, curve in CURVES.items():
        factors = layer_weights.layer_factors(locations, name, family)
        for loc in locations:
            assert factors[loc] == pytest.approx(curve(blocks.index(loc[:2]), len(blocks)), abs=1e-12)
    for name, sections in WEAK.items():
        factors = layer_weights.layer_factors(locations, name, family)
        assert factors == {loc: 0.2 if loc[0] in sections else 1.0 for loc in locations}


def test_block_weights_replace_the_type():
    locations = published_locations("sdxl")
    factors = layer_weights.layer_factors(locations, "ease in", "sdxl", "3: 0.5,\n6:1.25")
    assert factors == {loc: {3: 0.5, 6: 1.25}.get(SDXL_BLOCKS.index(loc[:2]), 0.0) for loc in locations}
    with pytest.raises(ValueError, match="'6=1' is not 'index:weight'"):
        layer_weights.layer_factors(locations, "linear", "sdxl", "3:1, 6=1")
    with pytest.raises(ValueError, match=r"index \[11\] is not a spatial transformer .* 0-10"):
        layer_weights.layer_factors(locations, "linear", "sdxl", "11:1")
    with pytest.raises(ValueError, match="weight_type"):
        layer_weights.layer_factors(locations, "stronger", "sdxl")


@pytest.fixture(scope="module")
def sd15():
    model = tiny_models.tiny_unet("sd15")
    clip = tiny_models.tiny_text_encoder("sd15")
    adapter = tiny_adapter(model)
    return model, clip, adapter, (encoded(adapter, "dog", 0),)


HEADS, WIDTH = 4, 32  # the tiny SD1.5 UNet's first cross-attention (layer number 0)


def layer_output(patched, seed=1):
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    g = torch.Generator().manual_seed(seed)
    roles = ("full", "uncond")
    q, k, v = (torch.randn(2, 12, WIDTH, generator=g) for _ in range(3))
    options = {"n_heads": HEADS, "original_shape": [2, 4, 3, 4], "block": ("input", 1),
               "sigmas": torch.ones(2), unet_family.ROLES_KEY: roles}
    return q, patch(q, k, v, options), unet_family.host_attention_call(q, k, v, options)


def expected(sd15, q, text, scale_out, transform):
    """text + scale_out * SDPA(q, K', V') per row, K', V' = transform(K, V) of the row's tokens."""
    model, _, adapter, refs = sd15
    layer = adapter.bind(cross_attention_dims(model.model.diffusion_model)).layer(("input", 1, 0))
    split = lambda t: t.reshape(1, -1, HEADS, WIDTH // HEADS).transpose(1, 2)
    out = []
    for row, tokens in enumerate((refs[0].image_tokens, refs[0].uncond_tokens)):
        ik, iv = transform(layer.to_k_ip(tokens).double(), layer.to_v_ip(tokens).double())
        o = F.scaled_dot_product_attention(split(q[row:row + 1].double()), split(ik), split(iv))
        out.append(text[row].double() + scale_out * o.transpose(1, 2).reshape(12, WIDTH))
    return torch.stack(out)


def test_layer_factor_scales_the_patch(sd15):
    model, clip, adapter, refs = sd15
    q, default, text = layer_output(apply(model, adapter, refs, clip, "sum"))
    q, linear, _ = layer_output(apply(model, adapter, refs, clip, "sum", weight_type="linear",
                                      embeds_scaling="V only"))
    assert torch.equal(default, linear)  # the defaults are the earlier behaviour
    _, half, _ = layer_output(apply(model, adapter, refs, clip, "sum", block_weights="0:0.5"))
    assert (half.double() - expected(sd15, q, text, 0.4, lambda k, v: (k, v))).abs().max() < 1e-5
    _, off, _ = layer_output(apply(model, adapter, refs, clip, "sum", block_weights="1:1"))
    assert torch.equal(off, text)  # a layer without weight gets exactly no image attention
    _, eased, _ = layer_output(apply(model, adapter, refs, clip, "sum", weight_type="ease out"))
    # Layer 0 of the tiny UNet's 7 spatial transformers: 0.05 + 0.95 * 0 / 7.
    assert (eased.double() - expected(sd15, q, text, 0.8 * 0.05, lambda k, v: (k, v))).abs().max() < 1e-5


@pytest.mark.parametrize("how", ["K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"])
def test_embeds_scaling(sd15, how):
    model, clip, adapter, refs = sd15
    q, out, text = layer_output(apply(model, adapter, refs, clip, "sum", embeds_scaling=how))
    w = 0.8 * (WIDTH / 1280 if "penalty" in how else 1)
    if how.startswith("K+mean"):
        def transform(k, v):
            mean = v.mean(-2, keepdim=True)  # over the reference's tokens
            return k * w, v - mean + mean * w
    else:
        transform = lambda k, v: (k * w, v * w)
    assert (out.double() - expected(sd15, q, text, 1.0, transform)).abs().max() < 1e-5


def test_mean_of_values_leaves_out_the_padding():
    """References of 4 and 8 tokens padded to 8: each mean is over its own real tokens, and the
    padding stays zero."""
    from multiref.kernels.embeds import scale_keys_values
    g = torch.Generator().manual_seed(0)
    short, long = torch.randn(4, 6, generator=g), torch.randn(8, 6, generator=g)
    values = torch.zeros(2, 8, 6)
    values[0, :4], values[1] = short, long
    _, scaled, rest = scale_keys_values(values.clone(), values, 0.5, "K+mean(V) w/ C penalty", [4, 8])
    w = 0.5 * 6 / 1280
    for i, real in enumerate((short, long)):
        mean = real.mean(0, keepdim=True)
        torch.testing.assert_close(scaled[i, :len(real)], real - mean + mean * w)
    assert torch.equal(scaled[0, 4:], torch.zeros(4, 6)) and rest == 1.0


def test_mean_of_values_per_group():
    """Groups of tokens that act apart (views, tiles): each token's value keeps its deviation
    from its own group's mean, as when each group is scaled on its own."""
    from multiref.kernels.embeds import scale_keys_values
    g = torch.Generator().manual_seed(1)
    values = torch.randn(2, 6, 5, generator=g)
    groups = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1]])
    _, scaled, _ = scale_keys_values(values.clone(), values, 0.5, "K+mean(V) w/ C penalty",
                                     [6, 5], groups)
    w = 0.5 * 5 / 1280
    for i, count in enumerate((6, 5)):
        for group in groups[i, :count].unique():
            members = [t for t in range(count) if groups[i, t] == group]
            _, alone, _ = scale_keys_values(values[i:i + 1, members], values[i:i + 1, members],
                                            0.5, "K+mean(V) w/ C penalty")
            torch.testing.assert_close(scaled[i, members], alone[0])
    assert torch.equal(scaled[1, 5], torch.zeros(5))  # padding


def test_a_reversed_layer_routes_only_the_uncond_rows_with_the_image(sd15):
    """Layer 0 of the tiny SD1.5 UNet is a style layer: composition precise reverses the
    reference there (the prompt row gets exactly no image attention, the uncond row the image
    tokens' attention at factor 1); style transfer precise leaves it as plain IP-Adapter."""
    model, clip, adapter, refs = sd15
    q, out, text = layer_output(apply(model, adapter, refs, clip, "sum",
                                      weight_type="composition precise"))
    layer = adapter.bind(cross_attention_dims(model.model.diffusion_model)).layer(("input", 1, 0))
    split = lambda t: t.reshape(1, -1, HEADS, WIDTH // HEADS).transpose(1, 2)
    tokens = refs[0].image_tokens
    o = F.scaled_dot_product_attention(split(q[1:2].double()), split(layer.to_k_ip(tokens).double()),
                                       split(layer.to_v_ip(tokens).double()))
    assert torch.equal(out[0], text[0])
    assert (out[1].double() - (text[1].double() + 0.8 * o.transpose(1, 2).reshape(12, WIDTH))).abs().max() < 1e-5
    _, style, _ = layer_output(apply(model, adapter, refs, clip, "sum",
                                     weight_type="style transfer precise"))
    _, plain, _ = layer_output(apply(model, adapter, refs, clip, "sum"))
    assert torch.equal(style, plain)
