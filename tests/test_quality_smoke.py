"""Seconds-long smoke version of the quality benchmark (`python -m bench.quality`): the world's
ground truth read back by the detector, the exact pixel latent, one training step of the base
with the host's classes, the adapter's training prompt (one step of MultiRef Train), and a few
samples drawn through the shipped nodes and scored."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bench.quality import adapter, base, detector, evaluate, world


def test_detector_reads_clean_renders():
    rng = np.random.default_rng(123)
    shapes_right = identities_right = total = 0
    for i in range(60):
        s = world.random_scene(rng, 1 + i % 2)
        found = detector.objects(s["image"])
        for shape, identity in zip(s["shapes"], s["identities"]):
            total += 1
            obj = detector.find_shape(found, shape)
            shapes_right += obj is not None
            identities_right += obj is not None and detector.matches(
                obj["histogram"], detector.identity_histogram(identity))
    for i in range(40):  # reference views: rotated and rescaled
        shape, identity = world.SHAPES[i % 4], world.IDENTITIES[(7 * i) % len(world.IDENTITIES)]
        image, mask = world.reference_view(rng, shape, identity)
        found = detector.objects(image)
        total += 1
        shapes_right += bool(found) and found[0]["shape"] == shape
        identities_right += bool(found) and detector.matches(found[0]["histogram"],
                                                             detector.identity_histogram(identity))
    assert shapes_right / total >= 0.95, shapes_right / total
    assert identities_right / total >= 0.95, identities_right / total


def test_identities_without_a_common_colour_do_not_match():
    a, b = detector.identity_histogram((0, 1)), detector.identity_histogram((2, 3))
    assert not detector.matches(a, b) and detector.matches(a, detector.identity_histogram((1, 0)))
    assert not set(world.HELD_OUT) & set(world.TRAIN_IDENTITIES)


def test_nearest_identity_names_clean_renders_and_refuses_ties():
    rng = np.random.default_rng(17)
    for identity in world.HELD_OUT:
        image, mask = world.reference_view(rng, "square", identity)
        assert detector.nearest_identity(detector.histogram(image, mask), world.HELD_OUT) == identity
    # half red, half blue: (red, blue) is nearest; against plain red and plain blue alone, a tie
    red_blue = detector.identity_histogram((0, 4))
    assert detector.nearest_identity(red_blue, [(0, 0), (0, 4), (4, 4)]) == (0, 4)
    assert detector.nearest_identity(red_blue, [(0, 0), (4, 4)]) is None


def test_colour_captions_name_each_objects_colours():
    """The base's training captions with colours: each object's colour words (once for a plain
    object) before its shape; without them, the benchmark's own caption."""
    rng = np.random.default_rng(9)
    for n in (1, 2, 2, 2):
        s = world.random_scene(rng, n)
        named = world.caption(s["shapes"], s["identities"])
        parts = named[len("a "):].split(" and a ")
        assert len(parts) == n
        for part, shape, identity in zip(parts, s["shapes"], s["identities"]):
            *colours, last = part.split(" ")
            assert last == shape and sorted(colours) == sorted({world.COLOUR_NAMES[c] for c in identity})
        plain = [w for w in named.split(" ") if w not in world.COLOUR_NAMES]
        assert " ".join(plain) == s["caption"]


def test_pixel_latent_is_exact_on_world_pictures():
    rng = np.random.default_rng(5)
    picture = world.upscale(world.random_scene(rng, 2)["image"])
    pixels = torch.from_numpy(picture)[None]
    vae = base.PixelLatentVAE()
    latent = vae.encode(pixels)
    assert latent.shape == (1, 4, world.SIZE, world.SIZE)
    assert torch.allclose(vae.decode(latent), pixels, atol=1e-5)


@pytest.fixture
def trained_base(host, tmp_path, one_thread):
    # two steps: the first moves only the zero-initialised output layer (nothing upstream of it
    # has a gradient yet)
    patcher, curve, text_weights = base.train(host, steps=2, batch=2, lr=1e-3, pool_size=4, log_every=2,
                                              text_encoder=True)
    folder = str(tmp_path / "base")
    base.save(patcher, folder, curve, text_weights=text_weights, recipe="two steps")
    return folder, patcher, curve, text_weights


def test_base_steps_train_and_reload(host, trained_base, tmp_path):
    """Two steps move the UNet and the text encoder (trained together, the text encoder from
    the demo's random weights); the loader node gives back both, and the recipe they were
    trained with (the benchmark's cache key)."""
    folder, patcher, curve, text_weights = trained_base
    assert len(curve) == 1 and np.isfinite(curve[0][1])
    out = patcher.model.diffusion_model.out[-1].weight
    assert out.abs().sum() > 0  # the zero-initialised output layer moved
    base.register(host)
    model, clip, vae, clip_vision = base.QualityModels().load(folder)
    reloaded = model.model.diffusion_model.state_dict()
    for key, value in patcher.model.diffusion_model.state_dict().items():
        assert torch.equal(reloaded[key], value), key
    random_clip, _ = base.demo_encoders(host)
    random_weights = random_clip.cond_stage_model.state_dict()
    loaded = clip.cond_stage_model.state_dict()
    moved = [k for k, v in text_weights.items() if not torch.equal(v, random_weights[k].to(v.dtype))]
    assert any("token_embedding" in k for k in moved) and any("layers.0.self_attn" in k for k in moved)
    for key, value in text_weights.items():  # the host keeps the text encoder in its own dtype
        assert torch.equal(loaded[key], value.to(loaded[key].dtype)), key
    caption = world.caption(["circle"])
    trained_cond = clip.encode_from_tokens(clip.tokenize(caption))
    random_cond = random_clip.encode_from_tokens(clip.tokenize(caption))
    assert not torch.equal(trained_cond, random_cond)
    assert base.saved_recipe(folder) == "two steps" and base.saved_recipe(str(tmp_path / "none")) is None


def test_two_object_dataset_is_read_by_the_trainer(tmp_path):
    """The world's two-object scenes in the trainer's multi-object kind: each object's mask, its
    shape as phrase (in the caption), a reference of the same identity; held-out identities
    when asked."""
    from multiref.training import manifest
    path = adapter.write_dataset(str(tmp_path / "pairs"), groups=3, seed=2, objects=2,
                                 identities=world.HELD_OUT)
    groups = manifest.load(path)
    assert len(groups) == 3
    with open(path) as f:
        samples = json.load(f)["samples"]
    for sample in samples:
        assert sample["kind"] == "multi_object" and len(sample["objects"]) == 2
        masks = []
        for obj in sample["objects"]:
            assert obj["phrase"] in sample["caption"].split()
            masks.append(np.asarray(Image.open(tmp_path / "pairs" / obj["mask"])) > 127)
            reference = world.downscale(np.asarray(Image.open(tmp_path / "pairs" / obj["reference"]),
                                                   np.float32) / 255)
            found = detector.objects(reference)
            assert found and found[0]["shape"] == obj["phrase"]
            assert any(detector.matches(found[0]["histogram"], detector.identity_histogram(i))
                       for i in world.HELD_OUT)
        assert masks[0].any() and masks[1].any() and not (masks[0] & masks[1]).any()


def test_adapter_trains_and_samples_through_the_nodes(host, trained_base, tmp_path, output_folder):
    folder = trained_base[0]
    base.register(host)
    evaluate.register(host)
    saved_input = host.folder_paths.get_input_directory()
    host.folder_paths.set_input_directory(str(tmp_path))
    try:
        path, summary, losses = adapter.train(host, folder, str(tmp_path), steps=1, groups=2,
                                              batch_size=1, learning_rate=1e-4)
        assert os.path.isfile(path) and summary["steps"] == 1 and len(losses) >= 1
        rng = np.random.default_rng(0)
        refs = [evaluate.write_reference(host, f"r{j}", rng, shape, identity)
                for j, (shape, identity) in enumerate((("circle", (0, 0)), ("square", (2, 4))))]
        evaluate.RoutingShare.SHARES.clear()
        pictures = evaluate.run(host, evaluate.prompt(
            folder, "a circle and a square", 1, 2, "smoke",
            [(i, m, phrase) for (i, m, _), phrase in zip(refs, ("circle", "square"))], "mask", True,
            steps=2))
    finally:
        host.folder_paths.set_input_directory(saved_input)
    assert len(pictures) == 2
    # the routing weight inside each reference's own half: exactly the halves under `mask`
    # routing with the halves as regions, everywhere under `sum`, in between under `weighted`
    assert evaluate.RoutingShare.SHARES == pytest.approx([1.0, 1.0], abs=1e-5)
    for mode, expected in (("sum", 0.5), ("weighted", None)):
        evaluate.RoutingShare.SHARES.clear()
        host.folder_paths.set_input_directory(str(tmp_path))
        try:
            evaluate.run(host, evaluate.prompt(
                folder, "a circle and a square", 1, 1, "smoke",
                [(i, m, phrase) for (i, m, _), phrase in zip(refs, ("circle", "square"))], mode,
                steps=2))
        finally:
            host.folder_paths.set_input_directory(saved_input)
        (share,) = evaluate.RoutingShare.SHARES
        if expected is None:
            assert 0 < share < 1
        else:
            assert share == pytest.approx(expected, abs=1e-5)
    for p in pictures:
        assert p.shape == (world.SIZE, world.SIZE, 3) and np.isfinite(p).all()
        detector.objects(p)  # the detector reads generated pictures too


def test_weight_average_and_cpu_budget(host, one_thread):
    """The returned base carries the moving average of the weights, checked against its closed
    form over the plain runs' weights (training is unchanged by the average); a CPU-time budget
    stops training and is recorded in the curve."""
    def weights(patcher):
        return {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    w0 = weights(base.build_unet(seed=0))
    w1 = weights(base.train(host, steps=1, batch=2, lr=1e-3, pool_size=4)[0])
    w2 = weights(base.train(host, steps=2, batch=2, lr=1e-3, pool_size=4)[0])
    decay = 0.9
    d1, d2 = min(decay, 2 / 11), min(decay, 3 / 12)
    averaged = weights(base.train(host, steps=2, batch=2, lr=1e-3, pool_size=4, ema=decay)[0])
    for key in w0:
        expected = d1 * d2 * w0[key] + (1 - d1) * d2 * w1[key] + (1 - d2) * w2[key]
        assert torch.allclose(averaged[key], expected, atol=1e-6), key
    assert not torch.equal(averaged["out.2.weight"], w2["out.2.weight"])
    _, curve, _ = base.train(host, None, batch=2, lr=1e-3, pool_size=4, cpu_seconds=0.5, ramp=True,
                             min_snr=5.0, log_every=1000, colour_captions=0.5)
    assert curve[-1][3] >= 0.5 and np.isfinite(curve[-1][1])
