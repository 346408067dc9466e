"""The adapter: an IP-Adapter Plus file for the world's base, fine-tuned by the pack's trainer
(the MultiRef Train node, executed through the host) on single-object data.

Starting file (h94 Plus layout, flat safetensors): a Resampler with random weights (64-wide heads
as every published one; the trainer keeps it frozen, like the CLIP vision model it reads, and
trains copies of it as the feature fusion's experts: TRAIN_SETTINGS) and,
per cross-attention layer, to_k_ip / to_v_ip copied from that layer's own text to_k / to_v
(IP-Adapter's initialisation), in the published order: down blocks, up blocks, middle.
Training data: one object per group; the target is a scene of the object, the reference another
view of the same instance (world.reference_view) with its mask; caption "a <shape>", phrase
"<shape>"; identities from the training set only (the held-out ones are for evaluation)."""
import json
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from . import world

RESAMPLER = {"dim": 128, "depth": 2, "queries": 16, "ff_mult": 4}
CLIP_VISION_HIDDEN = 32  # the demo CLIP vision model's width (penultimate hidden states)
ADAPTER_NAME = "quality_adapter.safetensors"
# MultiRef Train settings beyond the scale's steps, groups, batch and learning rate. train_fusion:
# the trainer keeps the adapter's own projection frozen, so the Resampler over the random CLIP
# vision features trains only as the fusion's experts (on the base with a colour path, identity
# reaches the samples with it: bench/RESULTS.md).
TRAIN_SETTINGS = {"train_fusion": True}


def cross_attention_layers(unet_state):
    """Key prefixes of every transformer block with cross-attention, in the published order."""
    order = {"input_blocks": 0, "output_blocks": 1, "middle_block": 2}
    return sorted({k.split(".attn2.")[0] for k in unet_state if ".attn2.to_k." in k},
                  key=lambda p: (order[p.split(".")[0]], [int(x) for x in p.split(".") if x.isdigit()]))


def initial_adapter(unet_state, context_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(shape, generator=gen) / shape[-1] ** 0.5

    d, q, m = RESAMPLER["dim"], RESAMPLER["queries"], RESAMPLER["ff_mult"]
    sd = {"image_proj.latents": rand(1, q, d), "image_proj.proj_in.weight": rand(d, CLIP_VISION_HIDDEN),
          "image_proj.proj_in.bias": torch.zeros(d), "image_proj.proj_out.weight": rand(context_dim, d),
          "image_proj.proj_out.bias": torch.zeros(context_dim),
          "image_proj.norm_out.weight": torch.ones(context_dim),
          "image_proj.norm_out.bias": torch.zeros(context_dim)}
    for i in range(RESAMPLER["depth"]):
        p = f"image_proj.layers.{i}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            sd[f"{p}{norm}.weight"], sd[f"{p}{norm}.bias"] = torch.ones(d), torch.zeros(d)
        sd[f"{p}0.to_q.weight"] = rand(d, d)
        sd[f"{p}0.to_kv.weight"] = rand(2 * d, d)
        sd[f"{p}0.to_out.weight"] = rand(d, d)
        sd[f"{p}1.1.weight"] = rand(d * m, d)
        sd[f"{p}1.3.weight"] = rand(d, d * m)
    for i, prefix in enumerate(cross_attention_layers(unet_state)):
        sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = unet_state[f"{prefix}.attn2.to_k.weight"].clone()
        sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = unet_state[f"{prefix}.attn2.to_v.weight"].clone()
    return {k: v.float().contiguous() for k, v in sd.items()}


def write_initial(unet_state, folder, context_dim=16):
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "quality_adapter_initial.safetensors")
    save_file(initial_adapter(unet_state, context_dim), path)
    return path


def save_png(path, pixels):
    Image.fromarray(np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)).save(path)


def save_mask(path, mask):
    pixels = world.upscale(mask[..., None].astype(np.float32))[..., 0]
    Image.fromarray((pixels * 255).astype(np.uint8)).save(path)


def write_dataset(folder, groups, seed=1, objects=1, identities=world.TRAIN_IDENTITIES):
    """PNG files (256x256) + a manifest of `groups` groups; returns its path. objects=1: the
    adapter's training data (a target scene and one reference); objects=2: two-object scenes
    (the trainer's multi-object kind: each object's mask in the target, its shape as its phrase,
    a reference view of it with its mask)."""
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    samples = []
    for g in range(groups):
        s = world.random_scene(rng, objects, identities)
        save_png(os.path.join(folder, f"{g}_t.png"), world.upscale(s["image"]))
        views = []
        for k, (shape, identity, mask) in enumerate(zip(s["shapes"], s["identities"], s["masks"])):
            ref_image, ref_mask = world.reference_view(rng, shape, identity)
            files = {"mask": f"{g}_t{k}_mask.png", "reference": f"{g}_r{k}.png",
                     "reference_mask": f"{g}_r{k}_mask.png"}
            save_mask(os.path.join(folder, files["mask"]), mask)
            save_png(os.path.join(folder, files["reference"]), world.upscale(ref_image))
            save_mask(os.path.join(folder, files["reference_mask"]), ref_mask)
            views.append(dict(files, phrase=shape))
        if objects == 1:
            v = views[0]
            samples.append({"kind": "object", "caption": s["caption"], "phrase": v["phrase"],
                            "target": {"image": f"{g}_t.png", "mask": v["mask"]},
                            "references": [{"image": v["reference"], "mask": v["reference_mask"]}]})
        else:
            samples.append({"kind": "multi_object", "caption": s["caption"], "image": f"{g}_t.png",
                            "objects": views})
    path = os.path.join(folder, "manifest.json")
    with open(path, "w") as f:
        json.dump({"format": "multiref-dataset", "version": 1, "samples": samples}, f)
    return path


def training_prompt(base_folder, dataset, output_dir, steps, batch_size, learning_rate, seed=0,
                    lora_rank=8):
    """The API prompt that trains the adapter with the MultiRef Train node."""
    return {
        "1": {"class_type": "MultiRefQualityModels", "inputs": {"folder": base_folder}},
        "2": {"class_type": "MultiRefAdapterLoader",
              "inputs": {"adapter_name": "quality_adapter_initial.safetensors"}},
        "3": {"class_type": "MultiRefTrain", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "dataset": dataset,
            "output_dir": output_dir, "steps": steps, "batch_size": batch_size,
            "grad_accumulation": 1, "learning_rate": learning_rate, "lora_rank": lora_rank,
            "resolution": world.SIZE * world.UPSCALE, "save_every": max(steps // 2, 1),
            "keep_last": 1, "seed": seed,
            "gradient_checkpointing": False, "resume": True, **TRAIN_SETTINGS,
            "adapter": ["2", 0], "clip_vision": ["1", 3]}},
        "4": {"class_type": "SaveImage",
              "inputs": {"images": ["3", 2], "filename_prefix": "quality_adapter_loss"}},
    }


def saved_recipe(models):
    """The settings the cached adapter in `models` was trained with (None when there is none)."""
    path = os.path.join(models, ADAPTER_NAME + ".recipe.json")
    if not os.path.isfile(os.path.join(models, ADAPTER_NAME)) or not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read()


def train(host, base_folder, work, steps, groups, batch_size, learning_rate, recipe=""):
    """Train through the host; returns the trained adapter's path (in the `multiref` folder),
    with `recipe` written beside it (saved_recipe)."""
    from . import base as base_mod
    models = os.path.join(work, "multiref")
    unet = base_mod.load(base_folder)[0].model.diffusion_model.state_dict()
    write_initial(unet, models)
    host.folder_paths.add_model_folder_path("multiref", models)
    if hasattr(host.folder_paths, "invalidate_cache"):
        host.folder_paths.invalidate_cache("multiref")
    dataset = write_dataset(os.path.join(work, "adapter_data"), groups)
    run = "quality_adapter_run"
    # a cached run of other settings is not resumed: the trainer starts from the initial file
    shutil.rmtree(os.path.join(host.folder_paths.get_output_directory(), run), ignore_errors=True)
    host.execute(training_prompt(base_folder, dataset, run, steps, batch_size, learning_rate))
    trained = os.path.join(host.folder_paths.get_output_directory(), run, "multiref_adapter.safetensors")
    shutil.copyfile(trained, os.path.join(models, ADAPTER_NAME))
    with open(os.path.join(models, ADAPTER_NAME + ".recipe.json"), "w") as f:
        f.write(recipe)
    with open(os.path.join(host.folder_paths.get_output_directory(), run, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(host.folder_paths.get_output_directory(), run, "loss.json")) as f:
        losses = json.load(f)
    return os.path.join(models, ADAPTER_NAME), summary, losses
