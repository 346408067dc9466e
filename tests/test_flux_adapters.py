"""The published Flux image adapters (kernels/flux_adapters.py): detected by their keys from
tiny files with the published layouts (tests/tiny_flux_checkpoints.py), loaded into plain torch
modules, their projection and per-block attention against slow formulas written out in float64,
the Dynamic Decoupling switch, and the named refusals."""
import math

import pytest
import torch

import tiny_checkpoints
import tiny_flux_checkpoints as tfc
from multiref.kernels import checkpoints, flux_adapters as fa
from multiref.kernels.adapter import AdapterMismatchError
from multiref.kernels.weights_files import CheckpointError


@pytest.fixture
def instantx(tmp_path):
    path, nested = tfc.write_instantx(str(tmp_path))
    return checkpoints.load_adapter(path), nested


@pytest.fixture
def xlabs(tmp_path):
    path, flat = tfc.write_xlabs(str(tmp_path))
    return checkpoints.load_adapter(path), flat


def _layer_norm(x, weight, bias):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight.double() + bias.double()


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def test_instantx_loads_by_keys_and_projects_as_written_out(instantx):
    adapter, nested = instantx
    assert isinstance(adapter, fa.FluxAdapter) and adapter.kind == fa.INSTANTX
    assert adapter.family == "flux" and "SigLIP so400m" in adapter.image_encoder
    assert len(adapter.layers) == tfc.DOUBLE + tfc.SINGLE and adapter.projection.tokens == 8
    p = nested["image_proj"]
    embeds = torch.randn(3, tfc.EMBED)
    hidden = _gelu(embeds.double() @ p["proj.0.weight"].double().T + p["proj.0.bias"].double())
    flat = hidden @ p["proj.2.weight"].double().T + p["proj.2.bias"].double()
    expected = _layer_norm(flat.reshape(3, 8, tfc.CONTEXT), p["norm.weight"], p["norm.bias"])
    torch.testing.assert_close(adapter.projection(embeds).double(), expected, rtol=1e-5, atol=1e-5)
    for n, layer in enumerate(adapter.layers):
        assert torch.equal(layer.to_k.weight, nested["ip_adapter"][f"{n}.to_k_ip.weight"])
        assert torch.equal(layer.to_v.weight, nested["ip_adapter"][f"{n}.to_v_ip.weight"])


def test_xlabs_loads_by_keys_and_projects_as_written_out(xlabs):
    adapter, flat = xlabs
    assert adapter.kind == fa.XLABS and "CLIP ViT-L/14" in adapter.image_encoder
    assert len(adapter.layers) == tfc.DOUBLE and adapter.projection.tokens == 4
    embeds = torch.randn(2, tfc.EMBED)
    pre = "ip_adapter_proj_model."
    lin = embeds.double() @ flat[pre + "proj.weight"].double().T + flat[pre + "proj.bias"].double()
    expected = _layer_norm(lin.reshape(2, 4, tfc.CONTEXT), flat[pre + "norm.weight"],
                           flat[pre + "norm.bias"])
    torch.testing.assert_close(adapter.projection(embeds).double(), expected, rtol=1e-5, atol=1e-5)


def _slow_block_attention(q, tokens, k_w, v_w, heads, k_b=None, v_b=None, rms=False):
    """Head by head, query by query, in float64."""
    b, h, n, d = q.shape
    k = tokens.double() @ k_w.double().T + (0 if k_b is None else k_b.double())
    v = tokens.double() @ v_w.double().T + (0 if v_b is None else v_b.double())
    out = torch.zeros(b, n, h * d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            kh = k[bi, :, hi * d:(hi + 1) * d]
            vh = v[bi, :, hi * d:(hi + 1) * d]
            if rms:
                kh = kh / torch.sqrt((kh ** 2).mean(-1, keepdim=True) + 1e-5)
                vh = vh / torch.sqrt((vh ** 2).mean(-1, keepdim=True) + 1e-5)
            weights = torch.softmax(q[bi, hi].double() @ kh.T / math.sqrt(d), dim=-1)
            out[bi, :, hi * d:(hi + 1) * d] = weights @ vh
    return out


@pytest.mark.parametrize("kind", ["instantx", "xlabs"])
def test_block_attention_equals_the_written_out_formula(kind, instantx, xlabs):
    adapter, weights = instantx if kind == "instantx" else xlabs
    heads, d = 2, tfc.HIDDEN // 2
    tokens = adapter.projection(torch.randn(2, tfc.EMBED)).detach()
    q = torch.randn(2, heads, 6, d)
    layer = adapter.layers[1]
    keys, values = layer(tokens, heads)
    out = fa.image_attention(q, keys, values)
    if kind == "instantx":
        expected = _slow_block_attention(q, tokens, weights["ip_adapter"]["1.to_k_ip.weight"],
                                         weights["ip_adapter"]["1.to_v_ip.weight"], heads, rms=True)
    else:
        p = "double_blocks.1.processor.ip_adapter_double_stream_"
        expected = _slow_block_attention(q, tokens, weights[p + "k_proj.weight"],
                                         weights[p + "v_proj.weight"], heads,
                                         weights[p + "k_proj.bias"], weights[p + "v_proj.bias"])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_dynamic_decoupling_keeps_image_features_off_the_text_tokens(instantx):
    adapter, _ = instantx
    tokens = adapter.projection(torch.randn(1, tfc.EMBED)).detach()
    keys, values = adapter.layers[-1](tokens, 2)
    text_len = 5
    q = torch.randn(1, 2, text_len + 6, tfc.HIDDEN // 2)
    coupled = fa.sequence_injection(q, keys, values, text_len, decouple_text=False)
    decoupled = fa.sequence_injection(q, keys, values, text_len, decouple_text=True)
    assert coupled[:, :text_len].abs().sum() > 0  # the published InstantX way reaches the text
    assert torch.equal(decoupled[:, :text_len], torch.zeros_like(decoupled[:, :text_len]))
    torch.testing.assert_close(decoupled[:, text_len:], coupled[:, text_len:], rtol=1e-6, atol=1e-6)


def test_layers_split_by_the_model_and_a_model_of_other_sizes_is_refused(instantx, xlabs):
    adapter, _ = instantx
    double, single = adapter.block_layers(tfc.DOUBLE, tfc.SINGLE, tfc.HIDDEN, tfc.CONTEXT)
    assert (len(double), len(single)) == (2, 2) and double[0] is adapter.layers[0]
    with pytest.raises(AdapterMismatchError, match="4 block layers.*19 double \\+ single"):
        adapter.block_layers(19, 0, tfc.HIDDEN, tfc.CONTEXT)
    x_adapter, _ = xlabs
    assert x_adapter.block_layers(2, 2, tfc.HIDDEN, tfc.CONTEXT)[1] == []
    with pytest.raises(AdapterMismatchError, match="width 32 reading 16-wide.*width 3072"):
        x_adapter.block_layers(2, 2, 3072, 4096)
    with pytest.raises(AdapterMismatchError, match="24-wide image embeddings of SigLIP"):
        adapter.check_image_embeds(1024)


def test_an_adapter_of_another_family_is_refused_by_name(tmp_path, instantx, host):
    from multiref.families import tiny_models
    flux_adapter, _ = instantx
    unet = tiny_models.tiny_unet("sd15").model.diffusion_model
    with pytest.raises(AdapterMismatchError, match="InstantX Flux IP-Adapter.*made for FLUX but "
                                                   "the model is SD15"):
        checkpoints.bind_to_unet(flux_adapter, unet)
    path, _ = tiny_checkpoints.write_checkpoint(str(tmp_path), "ip_adapter", "sdxl")
    sdxl_adapter = checkpoints.load_adapter(path)
    with pytest.raises(AdapterMismatchError, match="made for SDXL but the model is FLUX; use a "
                                                   "Flux adapter"):
        fa.check_adapter_for_flux(sdxl_adapter)
    assert fa.check_adapter_for_flux(flux_adapter) is flux_adapter


def test_damaged_flux_adapter_files_are_refused(tmp_path):
    nested = tfc.instantx_nested()
    del nested["ip_adapter"]["2.to_v_ip.weight"]
    path = str(tmp_path / "ip-adapter.bin")
    torch.save(nested, path)
    with pytest.raises(CheckpointError, match="ip-adapter.bin: its per-block image layers"):
        checkpoints.load_adapter(path)
    assert fa.detect_flux_adapter(tfc.xlabs_flat()) == fa.XLABS
    assert fa.detect_flux_adapter(tiny_checkpoints.canonical("ip_adapter", "sdxl")) is None
