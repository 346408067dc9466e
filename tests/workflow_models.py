"""Swap the downloadable models a workflow names for tiny ones of the same kind, leaving the
graph unchanged:
  * checkpoint and CLIP vision loaders keep their input (the file name) but become test-only
    loader nodes with the same outputs that build the tiny host models (the host cannot detect
    a tiny checkpoint's architecture from a file);
  * adapter files are written, under the exact names the workflow uses, as tiny checkpoints with
    the published key layout of that file (tests/tiny_checkpoints.py; the Flux adapters:
    tests/tiny_flux_checkpoints.py, shaped for the tiny Flux), and loaded by the real
    MultiRefAdapterLoader;
  * a CLS text fusion file is written, under the name the workflow uses, for the tiny text
    encoders of the workflow's checkpoint family, every weight random (a trained-like fusion);
  * a training node gets a tiny generated dataset (two objects per image when it constrains
    attention maps) and a temporary run folder.
Pictures are left alone: Load Image reads the shipped example pictures that the pack copied
into the host's input folder when it loaded, as on a user's machine.
Sizes and step counts shrink so a CPU runs every workflow in seconds."""
import copy
import os

import torch

import tiny_checkpoints
import tiny_flux_checkpoints
import training_data
from multiref.families import tiny_models
from multiref.kernels import cls_text

SMALL = {"width": 64, "height": 64, "steps": 2, "resolution": 64}


def _family(name):
    return "sdxl" if "xl" in name.lower() else "sd15"


class TinyCheckpointLoaderForTests:
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": ("STRING", {})}}

    def load(self, ckpt_name):
        family = _family(ckpt_name)
        return (tiny_models.tiny_unet(family), tiny_models.tiny_text_encoder(family),
                tiny_models.tiny_vae())


class TinyCLIPVisionLoaderForTests:
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": ("STRING", {})}}

    def load(self, clip_name):
        return (tiny_models.tiny_clip_vision(),)


TEST_NODES = {"CheckpointLoaderSimple": TinyCheckpointLoaderForTests,
              "CLIPVisionLoader": TinyCLIPVisionLoaderForTests}


# The Flux adapter files by their published names, written for the tiny Flux of the demo models.
FLUX_ADAPTER_FILES = {"ip-adapter.bin": tiny_flux_checkpoints.write_instantx,
                      "ip_adapter.safetensors": tiny_flux_checkpoints.write_xlabs}


def _adapter_file(folder, name):
    if name in FLUX_ADAPTER_FILES:
        FLUX_ADAPTER_FILES[name](folder, name)
        return
    stem, ext = os.path.splitext(name)
    if stem in tiny_checkpoints.FUSION_NAMES:  # a file the trainer writes with train_fusion
        tiny_checkpoints.write_fusion_checkpoint(folder, tiny_checkpoints.FUSION_NAMES[stem], name)
        return
    for (layout, family), published in tiny_checkpoints.PUBLISHED_NAMES.items():
        if published == stem:
            tiny_checkpoints.write_checkpoint(folder, layout, family, file_format=ext[1:], name=name)
            return
    raise KeyError(f"no tiny layout for adapter file {name}")


def _cls_fusion_file(folder, name, family):
    widths = {"sd15": {"l": tiny_models.TEXT_L_WIDTH},
              "sdxl": {"l": tiny_models.TEXT_L_WIDTH, "g": tiny_models.TEXT_G_WIDTH}}[family]
    fusion = cls_text.ClsTextFusion(widths, tiny_models.CLIP_VISION_PROJECTION)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in fusion.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    cls_text.save(fusion, os.path.join(folder, name))


def swap_in_tiny_models(prompt, host, tmp_path):
    prompt = copy.deepcopy(prompt)
    adapters = tmp_path / "multiref"
    adapters.mkdir(exist_ok=True)
    host.folder_paths.add_model_folder_path("multiref", str(adapters))
    for name, cls in TEST_NODES.items():
        host.nodes[f"{name}ForTests"] = cls
    for node in prompt.values():
        kind, args = node["class_type"], node["inputs"]
        if kind in TEST_NODES:
            node["class_type"] = f"{kind}ForTests"
        elif kind == "MultiRefAdapterLoader":
            _adapter_file(str(adapters), args["adapter_name"])
        elif kind == "MultiRefClsFusionLoader":
            checkpoint = next(n["inputs"]["ckpt_name"] for n in prompt.values()
                              if n["class_type"] in ("CheckpointLoaderSimple",
                                                     "CheckpointLoaderSimpleForTests"))
            _cls_fusion_file(str(adapters), args["fusion_name"], _family(checkpoint))
        elif kind == "MultiRefTrain":
            constrained = args.get("text_map_weight") or args.get("image_map_weight")
            args["dataset"] = training_data.write_two_object_dataset(
                str(tmp_path / "dataset"), groups=2) if constrained else \
                training_data.write_object_dataset(str(tmp_path / "dataset"), groups=2, refs=1)
            # Inside the host's output folder (the node refuses any other place), one per test.
            args["output_dir"] = f"workflow_tests/{tmp_path.name}/run"
            args["save_every"] = 2
        for key in SMALL:
            if key in args and not isinstance(args[key], list):
                args[key] = SMALL[key]
        if kind == "MultiRefRoutingMaps":
            args["step"] = 1
    if hasattr(host.folder_paths, "invalidate_cache"):
        host.folder_paths.invalidate_cache("multiref")
    return prompt
