"""Encode References' crop 'tiles on their regions' (IPAdapter Tiled's per-tile attention masks):
each tile's tokens act only where that tile lies, the tiled area stretched onto the generated
image; against boxes and the routing formula written out here."""
import pytest
import torch
import torch.nn.functional as F

import tiny_checkpoints as tc
from multiref.families import tiny_models
from multiref.kernels import checkpoints
from multiref.kernels.checkpoints import cross_attention_dims
from multiref.kernels.references import EncodedReference, ReferenceInputError, tile_regions

from test_attention_masks import call_patch, sd15, slow_area  # noqa: F401  (sd15: the fixture)
from test_routing_nodes import TOKENS, apply, encoded


def box(height, width, top, left, size):
    mask = torch.zeros(height, width)
    mask[top:top + size, left:left + size] = 1
    return mask


@pytest.mark.parametrize("height,width,boxes", [
    # Nearly square: 2 x 2 tiles of the centre 60 x 60 square (tiles of 30).
    (60, 70, [(0, 0), (0, 30), (30, 0), (30, 30)]),
    # 1 : 2.5: three tiles of 40 along 100, overlapping evenly (origins 0, 30, 60).
    (40, 100, [(0, 0), (0, 30), (0, 60)]),
    # 1 : 6, tall: the centre 4 squares of 16 (rows 16..80 of 96).
    (96, 16, [(0, 0), (16, 0), (32, 0), (48, 0)]),
])
def test_regions_are_the_tiles_boxes_in_the_tiled_area(height, width, boxes):
    size = 30 if height == 60 else min(height, width)
    area = (60, 60) if height == 60 else (40, 100) if width == 100 else (64, 16)
    exact = tile_regions(height, width, cell=1)
    assert exact.shape == (len(boxes),) + area
    for region, (top, left) in zip(exact, boxes):
        assert torch.equal(region, box(*area, top, left, size))
    coarse = tile_regions(height, width, cell=4)  # whole cells: each the covered fraction
    cells = (area[0] // 4, area[1] // 4)
    for region, (top, left) in zip(coarse, boxes):
        expected = F.adaptive_avg_pool2d(box(*area, top, left, size)[None], cells)[0]
        torch.testing.assert_close(region, expected, atol=1e-6, rtol=0)


def test_each_tile_acts_on_its_region(sd15):
    """Sum mode, a reference of two views with four tiles each, a second reference without
    tiles: row by row, text + scale * (sum_j G_j(x) O_j + w O_other), O_j over tile j's tokens
    of both views together, G_j tile j's region on the 3 x 4 layer grid."""
    model, clip, adapter = sd15
    regions = torch.stack([box(16, 16, t, l, 8) for t, l in ((0, 0), (0, 8), (8, 0), (8, 8))])
    base = encoded(adapter, "dog", 0, views=8)  # 2 views x 4 tiles x TOKENS
    tiled = EncodedReference(**{**base.__dict__, "tile_regions": regions,
                                "tokens_per_tile": TOKENS})
    other = encoded(adapter, "cat", 1, weight=0.5)
    q, out, text = call_patch(apply(model, adapter, (tiled, other), clip, "sum"), 1, seed=8)
    layer = adapter.bind(cross_attention_dims(model.model.diffusion_model)).layer(("input", 1, 0))
    split = lambda t: t.view(1, -1, 4, 8).transpose(1, 2)

    def attention(row, tokens):
        o = F.scaled_dot_product_attention(split(q[row:row + 1]), split(layer.to_k_ip(tokens)),
                                           split(layer.to_v_ip(tokens)))
        return o.transpose(1, 2).reshape(12, 32).double()

    for row, field in ((0, "image_tokens"), (1, "uncond_tokens")):
        tokens = getattr(tiled, field)[0].view(2, 4, TOKENS, -1)  # view, tile, token
        expected = text[row].double() + 0.8 * 0.5 * attention(row, getattr(other, field))
        for j in range(4):
            expected += 0.8 * slow_area(regions[j], (3, 4))[:, None] * attention(
                row, tokens[:, j].reshape(1, 2 * TOKENS, -1))
        torch.testing.assert_close(out[row].double(), expected, atol=1e-5, rtol=1e-5)


def test_encode_node_gives_the_regions(host, tmp_path):
    adapter = checkpoints.load_adapter(tc.write_checkpoint(str(tmp_path), "ip_adapter_plus", "sd15")[0])
    refs = host.nodes["MultiRefReference"]().make(torch.rand(2, 48, 120, 3), "dog", 1.0, 0.0, 1.0)[0]
    encode = host.nodes["MultiRefEncodeReferences"]().encode
    parts = (refs, adapter, tiny_models.tiny_clip_vision(), tiny_models.tiny_unet("sd15"), 0)
    (enc,) = encode(*parts, crop="tiles on their regions")[0]
    (plain,) = encode(*parts, crop="tiles")[0]
    assert torch.equal(enc.image_tokens, plain.image_tokens) and plain.tile_regions is None
    assert torch.equal(enc.tile_regions, tile_regions(48, 120))
    assert enc.tokens_per_tile * 2 * 3 == enc.image_tokens.shape[1]  # 2 views, 3 tiles of 48
    with pytest.raises(ReferenceInputError, match="set combine_views to 'concat'"):
        encode(*parts, combine_views="average", crop="tiles on their regions")
