"""Per-run state is born and dies with a sampling run: after a run, no tensor made during it is
still referenced by the patches' state (the routing maps excepted: the Routing Maps node reads
them after the run, and they are kept on the CPU), and a second run with other sigmas starts
clean. Where the host has lifecycle callbacks (current ComfyUI) this holds under its KSampler and
the pack's guider; the installable host has none, and there it holds under the pack's guider."""
import gc
import types
import weakref

import pytest
import torch

import comfy.sample
import comfy.samplers
import tiny_checkpoints
from multiref.families import tiny_models
from multiref.kernels import checkpoints
from multiref.kernels.references import EncodedReference
from multiref.nodes import guidance as guidance_nodes
from multiref.nodes.msa import apply_msa
from multiref.nodes.routing import RECORDER_KEY, MultiRefApplyAdapter

LATENT = (6, 8)
STEPS = 3


def tensors_held(root):
    """Every tensor reachable from `root` through containers, object attributes, closures and
    bound methods; modules (the model's and the adapter's weights) are not entered: they are
    shared and never made per run."""
    found, seen, stack = {}, set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if torch.is_tensor(obj):
            found[id(obj)] = obj
        elif isinstance(obj, (torch.nn.Module, type, types.ModuleType, weakref.ref, str, bytes)):
            continue
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, types.FunctionType):
            stack.extend(cell.cell_contents for cell in obj.__closure__ or ()
                         if cell.cell_contents is not None)
        elif isinstance(obj, types.MethodType):
            stack.append(obj.__self__)
        elif hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    return found


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """make() patches the tiny SDXL model anew with routing (two references) and MSA with
    SynCD's adapter (its LoRA, and its image layers on the reference rows): every kind of
    per-run copy the pack makes; and the conditionings."""
    model = tiny_models.tiny_unet("sdxl")
    clip = tiny_models.tiny_text_encoder("sdxl")
    vae = tiny_models.tiny_vae()
    folder = str(tmp_path_factory.mktemp("syncd"))
    adapter = checkpoints.load_adapter(tiny_checkpoints.write_checkpoint(folder, "syncd", "sdxl")[0])
    gen = torch.Generator().manual_seed(3)
    refs = []
    for n, phrase in enumerate(("dog", "hat")):
        images = torch.rand(1, 8 * LATENT[0], 8 * LATENT[1], 3, generator=gen)
        tokens = torch.randn(1, 4, adapter.context_dim, generator=gen)
        mask = (torch.rand(1, *LATENT, generator=gen) < 0.5).float()
        mask[:, n] = 1
        refs.append(EncodedReference(
            image_tokens=tokens, uncond_tokens=torch.zeros_like(tokens), latents=vae.encode(images),
            masks=mask, phrase=phrase, weight=1.0, start_percent=0.0, end_percent=1.0,
            adapter_fingerprint=adapter.fingerprint))

    def make():
        routed = MultiRefApplyAdapter().apply(model, adapter, tuple(refs), clip, "weighted", 0.6,
                                              0.0, 1.0)[0]
        return apply_msa(routed, tuple(refs), 1.0, 0.0, 1.0, True, "all", "references",
                         clip=clip, adapter=adapter)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a dog in a hat"), return_pooled=True)
    extra = {"pooled_output": pooled, "width": 8 * LATENT[1], "height": 8 * LATENT[0]}
    conds = [[cond, extra]], [[torch.zeros_like(cond), dict(extra)]]
    return make, conds


def _ksampler(model, conds, callback=None, steps=STEPS, start_step=None):
    noise = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", *conds,
                               torch.zeros_like(noise), start_step=start_step, seed=0,
                               callback=callback, disable_pbar=True)


def _guider(model, conds, callback=None, steps=STEPS, start_step=None):
    guider = guidance_nodes.MultiRefGuider(model, 5.0, 2.0, 0.0, True, "three-branch")
    guider.set_conds(*conds)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal",
                                             steps)[start_step or 0:]
    noise = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(0))
    return guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"),
                         sigmas, callback=callback, disable_pbar=True, seed=0)


def _run_hooks_of(sampler, model):
    if sampler is _ksampler and not hasattr(model, "add_callback"):
        pytest.skip("the installable host's KSampler has no run hook: a run start is told from "
                    "the sigmas and nothing marks its end (the pack's guider does)")


@pytest.mark.parametrize("sampler", [_ksampler, _guider], ids=["ksampler", "guider"])
def test_nothing_made_during_a_run_stays_referenced(parts, sampler):
    make, conds = parts
    model = make()
    _run_hooks_of(sampler, model)
    before = tensors_held(model.model_options)
    during = {}

    def look(*_):  # the sampler's per-step callback, after the step's model call
        for key, tensor in tensors_held(model.model_options).items():
            if key not in before:
                during.setdefault(key, weakref.ref(tensor))

    sampler(model, conds, callback=look)
    gc.collect()
    recorder = model.model_options["transformer_options"][RECORDER_KEY]
    kept_maps = tensors_held(recorder.sums)
    assert kept_maps and all(t.device.type == "cpu" for t in kept_maps.values())
    assert len(during) > 20  # the run did make device copies, foreground indices, step state
    alive = [key for key, ref in during.items() if ref() is not None and key not in kept_maps]
    assert not alive
    after = tensors_held(model.model_options)
    assert set(after) - set(before) - set(kept_maps) == set()


@pytest.mark.parametrize("sampler", [_ksampler, _guider], ids=["ksampler", "guider"])
def test_a_second_run_with_other_sigmas_starts_clean(parts, sampler):
    """The second run starts below the sigma where the first ended (the last step of a longer
    schedule), which the sigmas alone take for a continuation: it must give what the same run
    gives on a model that never ran (MSA reads every reference token on a run's first step)."""
    make, conds = parts
    model = make()
    _run_hooks_of(sampler, model)
    fresh = sampler(make(), conds, steps=5, start_step=4)
    sampler(model, conds)
    assert torch.equal(sampler(model, conds, steps=5, start_step=4), fresh)
    assert model.model_options["transformer_options"][RECORDER_KEY].steps == 1
