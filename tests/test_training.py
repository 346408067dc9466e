"""The trainer on the host's real tiny UNet (CPU): data checks, the training-safe block path,
the objective, loss going down, only the LoRA changing, checkpointing memory, exact resume."""
import os
import sys

import pytest
import torch

from multiref.kernels.diffusion_objective import output_scale_of, parameterization_loss
from multiref.families import tiny_models
from multiref.training import blocks, checkpoint, loop, manifest
from multiref.training.config import TrainConfig, TrainConfigError

sys.path.insert(0, os.path.dirname(__file__))
import training_data  # noqa: E402

from conftest import HOST  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return training_data.write_object_dataset(str(tmp_path_factory.mktemp("data")), groups=2, refs=1)


def tiny_models_sd15():
    return loop.Models(tiny_models.tiny_unet("sd15"), tiny_models.tiny_vae(),
                       tiny_models.tiny_text_encoder("sd15"), "sd15")


def config(data, out, **kw):
    settings = dict(dataset=data, output_dir=str(out), steps=6, batch_size=1, learning_rate=2e-3,
                    lora_rank=4, resolution=64, save_every=3, keep_last=2, seed=3)
    settings.update(kw)
    return TrainConfig(**settings)


# --- data and settings checks --------------------------------------------------------------

def test_manifest_reports_every_problem(tmp_path):
    path = training_data.write_object_dataset(str(tmp_path), groups=3, refs=1)
    os.remove(tmp_path / "g0_v1.png")                                   # missing file
    (tmp_path / "g1_v0.png").write_bytes(b"not a png at all")            # unreadable image
    from PIL import Image
    Image.new("L", (10, 12)).save(tmp_path / "g2_v1_mask.png")           # mask size mismatch
    with pytest.raises(manifest.DatasetError) as err:
        manifest.load(path)
    problems = err.value.problems
    assert any("file not found" in p and "g0_v1.png" in p for p in problems)
    assert any("cannot read image" in p and "g1_v0.png" in p for p in problems)
    assert any("10x12" in p and "64x64" in p for p in problems)
    assert len(problems) == 3 and all(p.split(":")[0] in str(err.value) for p in problems)


def test_multi_object_manifest_parses_and_checks_phrases(tmp_path):
    path = training_data.write_object_dataset(str(tmp_path), groups=1, refs=2)
    import json
    sample = {"kind": "multi_object", "image": "g0_v0.png", "caption": "an apple and a pear",
              "objects": [{"phrase": "apple", "mask": "g0_v0_mask.png", "reference": "g0_v1.png",
                           "reference_mask": "g0_v1_mask.png"},
                          {"phrase": "plum", "mask": "g0_v0_mask.png", "reference": "g0_v2.png"}]}
    with open(path, "w") as f:
        json.dump({"format": "multiref-dataset", "version": 1, "samples": [sample]}, f)
    groups, problems = manifest.parse(path)
    assert problems == ["samples[0].objects[1]: phrase 'plum' does not occur in the caption "
                        "(routing finds objects by their words)"]
    sample["caption"] = "an apple and a plum"
    with open(path, "w") as f:
        json.dump({"format": "multiref-dataset", "version": 1, "samples": [sample]}, f)
    (group,) = manifest.load(path)
    assert [r.phrase for r in group.references] == ["apple", "plum"]
    assert group.references[1].view.mask is None and group.references[0].target_mask.endswith("g0_v0_mask.png")



def test_manifest_lists_empty_reference_lists_of_every_sample(tmp_path):
    import json
    path = tmp_path / "manifest.json"
    samples = [{"kind": "object", "caption": "a pear", "phrase": "pear",
                "target": {"image": "t.png"}, "references": []},
               {"kind": "multi_object", "caption": "a pear", "image": "t.png"}]
    path.write_text(json.dumps({"format": "multiref-dataset", "version": 1, "samples": samples}))
    _, problems = manifest.parse(str(path))
    assert problems == ["samples[0]: `references` must be a non-empty list",
                        "samples[1]: `objects` must be a non-empty list"]


def test_bad_settings_fail_before_any_step(data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(TrainConfigError, match="output_dir .* is not writable"):
        loop.train(config(data, blocker / "run"), None)
    if not torch.cuda.is_available():
        with pytest.raises(TrainConfigError, match="no CUDA GPU"):
            loop.train(config(data, tmp_path / "r1", device="cuda"), None)
        with pytest.raises(TrainConfigError, match="bf16.*needs a CUDA GPU"):
            loop.train(config(data, tmp_path / "r2", mixed_precision="bf16"), None)
    with pytest.raises(TrainConfigError, match="resolution must be a multiple of 64"):
        loop.train(config(data, tmp_path / "r3", resolution=100), None)


# --- the objective ---------------------------------------------------------------------------

def test_loss_is_the_models_own_parameterization():
    import comfy.model_sampling as ms
    torch.manual_seed(0)
    clean, noise, out = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.1, 1.0, 7.0])
    s = sigma.view(-1, 1, 1, 1)
    x = clean + s * noise
    for kind in (ms.EPS, ms.V_PREDICTION):
        sampling = type("Sampling", (kind,), {"sigma_data": 1.0})()
        denoised = sampling.calculate_denoised(sigma, out, x)
        loss = parameterization_loss(denoised, clean, output_scale_of(sampling.calculate_denoised,
                                                                      sigma, clean))
        # The textbook targets: eps = noise; v = alpha * noise - sigma_ddpm * clean, with
        # alpha = 1 / sqrt(1 + sigma^2), sigma_ddpm = sigma / sqrt(1 + sigma^2).
        target = noise if kind is ms.EPS else (noise - s * clean) / (1 + s ** 2).sqrt()
        expected = ((out - target) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# --- the training-safe block path ----------------------------------------------------------

def _call_unet(patcher, x, sigma, context):
    return patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=dict(
        patcher.model_options.get("transformer_options", {})))


def test_training_path_equals_host_forward_and_lets_gradients_flow():
    model = tiny_models.tiny_unet("sd15")
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 3.0])
    context = torch.randn(2, 77, tiny_models.SD15_CONTEXT)
    with torch.no_grad():
        expected = _call_unet(model, x, sigma, context)
    layers = blocks.build_lora_layers(model.model.diffusion_model, rank=2)
    state = blocks.PassState(layers, checkpointing=True)
    patched = blocks.install(model.clone(), state)
    patched.patch_model()
    try:
        out = _call_unet(patched, x, sigma, context)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # a fresh LoRA is a no-op
        out.square().mean().backward()
    finally:
        patched.unpatch_model()
    ups = [pair.up.weight.grad for pairs in layers.values() for pair in pairs.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in ups)
    # Unpatched, the original model's forward is back.
    assert "forward" not in vars(model.model.diffusion_model.input_blocks[1][1]) or \
        vars(model.model.diffusion_model.input_blocks[1][1])["forward"].__func__ is \
        type(model.model.diffusion_model.input_blocks[1][1]).forward


@pytest.mark.skipif(HOST.kind != "installable comfyui", reason="the in-place residual is a trait "
                    "of the installable host (comfyui==0.0.1)")
def test_host_block_alone_breaks_autograd_on_installable_host():
    """The trap the training path exists for: the host's own block adds residuals in place."""
    model = tiny_models.tiny_unet("sd15")
    block = model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0]
    x = torch.randn(1, 16, block.attn1.to_q.in_features, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace"):
        block(x.clone(), context=torch.randn(1, 77, tiny_models.SD15_CONTEXT)).sum().backward()


def test_checkpointing_the_layers_that_run_saves_memory():
    """Bytes kept for backward, counted with a saved-tensors hook (what autograd actually holds
    outside checkpointed regions), with and without checkpointing; gradients stay the same."""
    torch.manual_seed(0)
    x, sigma = torch.randn(1, 4, 16, 16), torch.tensor([2.0])
    context = torch.randn(1, 77, tiny_models.SD15_CONTEXT)
    results = {}
    model = tiny_models.tiny_unet("sd15")
    layers = blocks.build_lora_layers(model.model.diffusion_model, rank=2)
    with torch.no_grad():
        for pairs in layers.values():
            for pair in pairs.values():
                pair.up.weight.normal_(0, 0.1)
    for checkpointing in (False, True):
        patched = blocks.install(model.clone(), blocks.PassState(layers, checkpointing))
        patched.patch_model()
        seen, kept = set(), [0]

        def pack(t):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                kept[0] += t.numel() * t.element_size()
            return t
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = _call_unet(patched, x, sigma, context)
            for pairs in layers.values():
                pairs.zero_grad(set_to_none=True)
            out.square().mean().backward()
        finally:
            patched.unpatch_model()
        grads = [pair.down.weight.grad.clone() for pairs in layers.values()
                 for pair in pairs.values()]
        results[checkpointing] = (kept[0], grads)
    plain, ckpt = results[False][0], results[True][0]
    assert ckpt < 0.35 * plain, (plain, ckpt)
    for a, b in zip(results[False][1], results[True][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --- training ------------------------------------------------------------------------------

def _state_dicts(models):
    return {"unet": {k: v.clone() for k, v in models.patcher.model.state_dict().items()},
            "vae": {k: v.clone() for k, v in models.vae.first_stage_model.state_dict().items()},
            "clip": {k: v.clone() for k, v in models.clip.cond_stage_model.state_dict().items()}}


def test_loss_goes_down_and_only_the_lora_changes(data, tmp_path):
    models = tiny_models_sd15()
    before = _state_dicts(models)
    cfg = config(data, tmp_path / "run", steps=30, save_every=30, learning_rate=3e-2, seed=3)
    base_loss = loop.evaluation_loss(cfg, models, micro_batches=8)
    result = loop.train(cfg, models)
    trained_loss = loop.evaluation_loss(cfg, models, result.lora_layers, micro_batches=8)
    # A random tiny UNet's eps loss is mostly irreducible noise (about 1.0); 30 LoRA steps on
    # the attention take a few percent off it (seeded: the same numbers every run).
    assert trained_loss < 0.98 * base_loss, (base_loss, trained_loss)
    after = _state_dicts(models)
    for part in before:
        assert before[part].keys() == after[part].keys()
        for key in before[part]:
            assert torch.equal(before[part][key], after[part][key]), f"{part}.{key} changed"
    assert all(p.requires_grad for p in models.patcher.model.parameters())  # flags restored
    for pairs in result.lora_layers.values():
        for pair in pairs.values():
            assert pair.up.weight.abs().sum() > 0
    assert os.path.isfile(result.weights)
    assert result.summary["steps"] == 30 and result.summary["steps_per_s"] > 0


def test_resume_gives_the_same_weights_as_a_straight_run(data, tmp_path):
    straight = loop.train(config(data, tmp_path / "straight"), tiny_models_sd15())

    run = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        loop.train(config(data, run, save_every=100), tiny_models_sd15(),
                   check_interrupt=training_data.interrupt_at(3))
    assert checkpoint.saved_steps(str(run)) == [3]   # the interrupt saved a resumable state
    resumed = loop.train(config(data, run), tiny_models_sd15())
    assert resumed.steps == 6 and [s for s, _ in resumed.losses] == [1, 2, 3, 4, 5, 6]
    for loc, pairs in straight.lora_layers.items():
        for name, pair in pairs.items():
            other = resumed.lora_layers[loc][name]
            # Same draws, same optimizer state: equal to float rounding (stated tolerance 1e-6).
            torch.testing.assert_close(pair.up.weight, other.up.weight, rtol=0, atol=1e-6)
            torch.testing.assert_close(pair.down.weight, other.down.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor([l for _, l in straight.losses]),
                               torch.tensor([l for _, l in resumed.losses]), rtol=0, atol=1e-6)
    assert len(checkpoint.saved_steps(str(run))) <= 2  # keep_last


def test_core_lora_file_applied_by_the_host_equals_the_training_path():
    """The kohya-named copy, merged into the weights by the host's own LoRA loader, computes
    what the trainer's separate LoRA deltas compute."""
    import comfy.sd
    model = tiny_models.tiny_unet("sd15")
    layers = blocks.build_lora_layers(model.model.diffusion_model, rank=3, alpha=1.5)
    with torch.no_grad():
        for pairs in layers.values():
            for pair in pairs.values():
                pair.up.weight.normal_(0, 0.2)
    x, sigma = torch.randn(1, 4, 8, 8), torch.tensor([1.5])
    context = torch.randn(1, 77, tiny_models.SD15_CONTEXT)
    patched = blocks.install(model.clone(), blocks.PassState(layers, checkpointing=False))
    tensors = checkpoint.core_lora_tensors(layers, blocks.attention_paths(model.model.diffusion_model))
    merged, _ = comfy.sd.load_lora_for_models(model, None, tensors, 1.0, 0.0)
    assert len(merged.patches) == 4 * len(layers)  # every projection found its weight
    outputs = []
    with torch.no_grad():
        for patcher in (patched, merged, model):
            patcher.patch_model()
            try:
                outputs.append(_call_unet(patcher, x, sigma, context))
            finally:
                patcher.unpatch_model()
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-4)
    assert (outputs[0] - outputs[2]).abs().max() > 1e-3  # the LoRA does something


def test_adapter_training_updates_ip_layers_and_saves_a_loadable_adapter(data, tmp_path):
    """With an adapter, its to_k_ip / to_v_ip / text_to_weight train (routing active) next to
    the LoRA; the saved file is the pack's adapter format, read back by the adapter loader."""
    import tiny_checkpoints
    from multiref.kernels.checkpoints import load_adapter
    path, _ = tiny_checkpoints.write_checkpoint(str(tmp_path), "ip_adapter_plus", "sd15",
                                                file_format="safetensors")
    adapter = load_adapter(path)
    original = {k: v.clone() for k, v in adapter.state_dict().items()}
    models = loop.Models(tiny_models.tiny_unet("sd15"), tiny_models.tiny_vae(),
                         tiny_models.tiny_text_encoder("sd15"), "sd15",
                         tiny_models.tiny_clip_vision(), adapter)
    result = loop.train(config(data, tmp_path / "run", steps=4, save_every=2, learning_rate=1e-2),
                        models)
    for key, value in adapter.state_dict().items():  # the input adapter is untouched
        assert torch.equal(value, original[key]), key
    saved = load_adapter(result.adapter_file)
    assert saved.kind == "multiref" and saved.has_self_attn_lora
    tensors = saved.state_dict()
    changed = [k for k in original if k.startswith("ip_adapter.")
               and not torch.equal(tensors[k].float(), original[k].float())]
    assert len(changed) == len([k for k in original if k.startswith("ip_adapter.")])
    for k in original:
        if k.startswith("image_proj."):  # frozen
            assert torch.equal(tensors[k], original[k]), k
    located = saved.bind(list(result.adapter_layers))
    for location, layer in result.adapter_layers.items():
        assert torch.equal(located.layer(location).to_k_ip.weight, layer.to_k_ip.weight.detach())
    assert os.path.isfile(os.path.join(str(tmp_path / "run"), "checkpoints", "step-000004",
                                       checkpoint.ADAPTER_NAME))


def test_mass_inside_matches_a_slow_sum():
    """The quality score read from the relevance collector (two layers at one grid, one at
    another) against the mean over layers of sum_x R(x) M(x) written out cell by cell."""
    from multiref.techniques.relevance import RelevanceMaps
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(2, h, h, generator=gen) for h in (8, 8, 4)]
    maps = [m / m.sum((1, 2), keepdim=True) for m in maps]
    masks = (torch.rand(2, 32, 32, generator=gen) > 0.5).float()
    collected = RelevanceMaps()
    for m in maps:  # (N, h, w) -> one row of (1, L, N)
        collected.record(0.0, "input", tuple(m.shape[1:]), m.flatten(1).T[None])
    expected = torch.zeros(2)
    for m in maps:
        cell = 32 // m.shape[-1]
        for i in range(2):
            for y in range(m.shape[1]):
                for x in range(m.shape[2]):
                    covered = masks[i, y * cell:(y + 1) * cell, x * cell:(x + 1) * cell].mean()
                    expected[i] += m[i, y, x] * covered / len(maps)
    torch.testing.assert_close(collected.mass_inside(masks), expected)


def test_quality_threshold_drops_low_scoring_groups_and_reports_them(tmp_path):
    import json
    from PIL import Image
    data = training_data.write_object_dataset(str(tmp_path / "d"), groups=3, refs=1)
    Image.new("L", (64, 64), 255).save(tmp_path / "d" / "g0_v0_mask.png")  # object = everything
    cfg = config(data, tmp_path / "run", steps=1, quality_threshold=0.999)
    loop.train(cfg, tiny_models_sd15())
    report = json.loads((tmp_path / "run" / "data_selection.json").read_text())
    scores = {name: s["apple" if name == "samples[0]" else "frog" if name == "samples[1]" else "ball"]
              for name, s in report["scores"].items()}
    assert abs(scores["samples[0]"] - 1.0) < 1e-4  # all relevance mass lies inside a full mask
    assert all(0 < scores[n] < 0.999 for n in ("samples[1]", "samples[2]"))
    assert sorted(report["dropped"]) == ["samples[1]", "samples[2]"]
    plain = training_data.write_object_dataset(str(tmp_path / "d2"), groups=2, refs=1)
    with pytest.raises(manifest.DatasetError, match="every group scored under"):
        loop.train(config(plain, tmp_path / "run2", steps=1, quality_threshold=0.999),
                   tiny_models_sd15())


def test_previews_every_n_steps(data, tmp_path):
    from PIL import Image
    models = tiny_models_sd15()
    loop.train(config(data, tmp_path / "run", steps=4, preview_every=2,
                      preview_prompt="a photo of a frog"), models)
    files = sorted(os.listdir(tmp_path / "run" / "previews"))
    assert files == ["step-000002.png", "step-000004.png"]
    with Image.open(tmp_path / "run" / "previews" / files[0]) as img:
        assert img.size == (64, 64)


def test_preview_euler_equals_the_hosts_euler_sampler():
    from comfy.k_diffusion.sampling import sample_euler
    from multiref.kernels.diffusion_objective import euler_sample
    target = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    denoise = lambda x, s: x / (1 + s.view(-1, 1, 1, 1) ** 2) + target  # any smooth denoiser
    noise = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    sigmas = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.3, 0.0])
    ours = euler_sample(denoise, noise, sigmas)
    host = sample_euler(denoise, noise * sigmas[0], sigmas, disable=True)
    torch.testing.assert_close(ours, host)


def test_encodings_are_cached_once_per_dataset(data, tmp_path, monkeypatch):
    from multiref.training import dataset
    cfg = config(data, tmp_path / "run", steps=2)
    first = loop.train(cfg, tiny_models_sd15())
    assert len(os.listdir(tmp_path / "run" / "cache")) == 1

    def must_not_encode(*args, **kwargs):
        raise AssertionError("encoded again although the cache holds this dataset")
    monkeypatch.setattr(dataset, "encode_groups", must_not_encode)
    cfg.steps, cfg.resume = 2, False
    again = loop.train(cfg, tiny_models_sd15())
    assert [l for _, l in again.losses] == [l for _, l in first.losses]  # same data, same run


def test_reference_pass_is_conditioned_as_sampling_conditions_it(data, tmp_path, monkeypatch):
    """syncd reference conditioning (the default): the training step's reference pass reads
    each reference's own prompt "photo of a {phrase}" and the adapter's image attention at
    scale 1.0 over the reference's own tokens, LoRA off (SynCD's reference pass, as MultiRef
    Apply MSA samples it): the self-attention inputs it banks equal the host's plain forward
    with those conditions and an image attention written here in float64."""
    import tiny_checkpoints
    from comfy.ldm.modules.attention import optimized_attention
    from slow_references import add_image_attention
    from multiref.kernels.checkpoints import load_adapter
    from multiref.training import encoding
    adapter = load_adapter(tiny_checkpoints.write_checkpoint(str(tmp_path), "ip_adapter_plus", "sd15")[0])
    clip = tiny_models.tiny_text_encoder("sd15")
    models = loop.Models(tiny_models.tiny_unet("sd15"), tiny_models.tiny_vae(), clip, "sd15",
                         tiny_models.tiny_clip_vision(), adapter)
    cfg = config(data, tmp_path / "run", text_dropout=0.0, image_dropout=0.0, both_dropout=0.0)
    device, groups = loop.prepare(cfg)
    run = loop.Run(cfg, models, device, encoding.encode(cfg, models, groups))
    batch = run.batch(0, [0])
    banked = {}
    begin_target = run.state.begin_target
    monkeypatch.setattr(run.state, "begin_target",
                        lambda *a: (banked.update(run.state.recorded), begin_target(*a))[1])
    loop._load(run.patcher, device)
    try:
        with torch.no_grad():
            run.step_module(batch)
    finally:
        loop._unload(run.patcher)

    group = groups[run.sampler.indices(0)[0]]
    phrase = group.references[0].phrase
    text = clip.encode_from_tokens(clip.tokenize(f"photo of a {phrase}"))
    tokens = batch["ref_tokens"][0].double()  # (K, T, C): each reference's own
    rows = tokens.shape[0]
    sigma = batch["sigma"].repeat_interleave(rows)
    x = batch["ref_latents"][0] + batch["ref_noise"][0] * sigma.view(-1, 1, 1, 1)  # EPS model
    bound = adapter.bind([loc for loc in run.adapter_layers])
    expected = {}

    def keep(n, context, value, extra):
        expected[extra["block"] + (extra["block_index"],)] = n
        return n, context, value

    def image_attention(location):
        layer = bound.layer(location)
        to_k_ip, to_v_ip = layer.to_k_ip.weight.double(), layer.to_v_ip.weight.double()

        def attn2(q, k, v, extra):
            heads = extra["n_heads"]
            out = optimized_attention(q, k, v, heads).double()
            return add_image_attention(out, q, tokens, to_k_ip, to_v_ip, heads).float()
        return attn2

    options = {"patches": {"attn1_patch": [keep]},
               "patches_replace": {"attn2": {loc: image_attention(loc) for loc in run.adapter_layers}}}
    with torch.no_grad():
        models.patcher.model.apply_model(x, sigma, c_crossattn=text.expand(rows, -1, -1),
                                         transformer_options=options)
    assert set(banked) == set(expected) == set(run.adapter_layers)
    for location, n in expected.items():
        assert float((banked[location] - n).abs().max() / n.abs().max()) < 1e-5, location
    # The last layers do depend on what the reference rows read.
    caption = clip.encode_from_tokens(clip.tokenize(group.caption))
    assert not torch.allclose(batch["ref_context"][0, 0], caption[0].float())
