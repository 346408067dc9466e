"""Reference token positions (kernels/rope_positions.py) against the host's own Flux: the ids
core gives ReferenceLatent references, and the rotation it applies to q and k."""
import pytest
import torch

from conftest import HOST
from multiref.kernels import rope_positions as rp

pytestmark = pytest.mark.skipif(HOST.kind == "installable comfyui", reason=(
    "Flux needs a current ComfyUI (run with MULTIREF_TEST_HOST=checkout COMFYUI_PATH=...)"))


def _host_ids_and_pe(references, method=None):
    """img_ids and pe of one forward of tiny Flux with these reference latents."""
    from multiref.families import tiny_dit_models
    model = tiny_dit_models.tiny_dit("flux", 0)
    flux = model.model.diffusion_model
    seen = {}

    def post_input(args):
        seen["img_ids"] = args["img_ids"]
        return args

    def block(args, extra):
        seen["pe"] = args["pe"]
        return extra["original_block"](args)

    options = {"patches": {"post_input": [post_input]},
               "patches_replace": {"dit": {("double_block", 0): block}}}
    kwargs = {} if method is None else {"ref_latents_method": method}
    with torch.no_grad():
        flux(torch.randn(1, 16, 8, 12), torch.tensor([0.5]), torch.randn(1, 5, 16),
             y=torch.randn(1, 16), guidance=torch.tensor([3.5]), ref_latents=references,
             transformer_options=options, **kwargs)
    return seen["img_ids"][0], seen["pe"], flux.params


@pytest.mark.parametrize("method,layout", [(None, "offset"), ("index", "index")])
def test_reference_ids_are_those_core_gives_reference_latents(method, layout, one_thread):
    latent_sizes = [(8, 12), (4, 4), (12, 4)]
    references = [torch.randn(1, 16, h, w) for h, w in latent_sizes]
    host_ids, _, _ = _host_ids_and_pe(references, method)
    target = (4, 6)  # patch units (patch size 2)
    sizes = [(h // 2, w // 2) for h, w in latent_sizes]
    ours = [rp.grid_ids(*target)] + [rp.grid_ids(r, c, *place) for (r, c), place in
                                     zip(sizes, rp.reference_placements(target, sizes, layout))]
    assert torch.equal(host_ids, torch.cat(ours).to(host_ids.dtype))


def test_rotation_is_the_one_the_host_applies(one_thread):
    from comfy.ldm.flux.math import apply_rope1
    host_ids, pe, params = _host_ids_and_pe([torch.randn(1, 16, 4, 4)])
    text_ids = torch.zeros(5, 3)
    ids = torch.cat([text_ids, host_ids.float()])
    x = torch.randn(1, 2, ids.shape[0], sum(params.axes_dim))
    ours = rp.rotate(x, rp.rope_angles(ids, params.axes_dim, params.theta))
    torch.testing.assert_close(ours, apply_rope1(x, pe), rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[:, :, :5], x[:, :, :5])  # text tokens (ids 0) are not rotated
