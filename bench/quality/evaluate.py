"""The figures, measured on samples the shipped nodes draw through the host's executor and
sampler (API prompts: MultiRef Reference / Encode References / Apply Adapter / Apply MSA /
MultiRef Sampler, or the core KSampler without references), read back from the PNGs SaveImage
wrote, and scored by the detector. Every scene and seed is fixed."""
import os
import sys

import numpy as np
import torch
from PIL import Image

from . import adapter, detector, world

STEPS = 20
TEXT_SCALE = 4.0
IMAGE_SCALE = 2.0
EMPTY_LATENT_SIDE = 8 * world.SIZE  # EmptyLatentImage divides by 8: this gives the 32x32 latent


class Halves:
    """Test-bench node: the world's layout regions as a MASK batch (left half, right half), the
    true region masks of two-object prompts for `mask` routing."""
    RETURN_TYPES = ("MASK",)
    FUNCTION = "masks"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"side": ("INT", {"default": 256})}}

    def masks(self, side):
        m = torch.zeros(2, side, side)
        m[0, :, : side // 2] = 1
        m[1, :, side // 2:] = 1
        return (m,)


class RoutingShare:
    """Test-bench output node: after a sampling run with two references, each generated
    picture's routing weight of reference j inside half j, as a share of reference j's weight
    over the picture (mean over the references, the recorded steps and layers: 0.5 = the halves
    get equal weight, as `sum` gives; 1 = each reference only in its own half, as `mask` with
    the halves gives). Appends one number per picture to SHARES."""
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "measure"
    CATEGORY = "testing"
    SHARES = []
    RECORDER_KEY = None  # set by register, from the pack's routing module

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "samples": ("LATENT",)}}

    def measure(self, model, samples):
        recorder = model.model_options["transformer_options"][self.RECORDER_KEY]
        halves = Halves().masks(world.SIZE)[0]
        for row in range(samples["samples"].shape[0]):
            inside = recorder.mass_inside(halves, row)
            everywhere = recorder.mass_inside(torch.ones_like(halves), row)
            self.SHARES.append(float((inside / everywhere).mean()))
        return {}


def register(host):
    host.nodes["MultiRefQualityHalves"] = Halves
    host.nodes["MultiRefQualityRoutingShare"] = RoutingShare
    routing_module = sys.modules[host.nodes["MultiRefRoutingMaps"].__module__]
    RoutingShare.RECORDER_KEY = routing_module.RECORDER_KEY


class Graph:
    """An API prompt under construction (numbered nodes)."""

    def __init__(self):
        self.nodes = {}

    def add(self, class_type, **inputs):
        key = str(len(self.nodes) + 1)
        self.nodes[key] = {"class_type": class_type, "inputs": inputs}
        return key


def prompt(base_folder, text, seed, batch, prefix, references=(), mode="sum", msa=False,
           normalize=True, text_scale=TEXT_SCALE, image_scale=IMAGE_SCALE, steps=STEPS):
    """references: [(image file, mask file, phrase)] in the host's input folder."""
    g = Graph()
    models = g.add("MultiRefQualityModels", folder=base_folder)
    positive = g.add("CLIPTextEncode", text=text, clip=[models, 1])
    negative = g.add("CLIPTextEncode", text="", clip=[models, 1])
    latent = g.add("EmptyLatentImage", width=EMPTY_LATENT_SIDE, height=EMPTY_LATENT_SIDE, batch_size=batch)
    if not references:
        samples = g.add("KSampler", seed=seed, steps=steps, cfg=text_scale, sampler_name="euler",
                        scheduler="normal", denoise=1.0, model=[models, 0], positive=[positive, 0],
                        negative=[negative, 0], latent_image=[latent, 0])
    else:
        previous = None
        for image, mask, phrase in references:
            inputs = dict(phrase=phrase, weight=1.0, start_percent=0.0, end_percent=1.0,
                          image=[g.add("LoadImage", image=image), 0],
                          mask=[g.add("LoadImageMask", image=mask, channel="red"), 0])
            if previous:
                inputs["previous"] = [previous, 0]
            previous = g.add("MultiRefReference", **inputs)
        loaded = g.add("MultiRefAdapterLoader", adapter_name=adapter.ADAPTER_NAME)
        encoded = g.add("MultiRefEncodeReferences", mask_dilation=0, references=[previous, 0],
                        adapter=[loaded, 0], clip_vision=[models, 3], model=[models, 0], vae=[models, 2])
        routing = dict(mode=mode, scale=1.0, start_percent=0.0, end_percent=1.0, phrases="",
                       model=[models, 0], adapter=[loaded, 0], references=[encoded, 0], clip=[models, 1])
        if mode == "mask":
            routing["region_masks"] = [g.add("MultiRefQualityHalves", side=world.UPSCALE * world.SIZE), 0]
        model = g.add("MultiRefApplyAdapter", **routing)
        if msa:
            model = g.add("MultiRefApplyMSA", strength=1.0, start_percent=0.0, end_percent=1.0,
                          first_step_unmasked=False, layers="all", mode="references", batch_phrase="",
                          model=[model, 0], references=[encoded, 0], adapter=[loaded, 0], clip=[models, 1])
        samples = g.add("MultiRefSampler", seed=seed, steps=steps, sampler_name="euler",
                        scheduler="normal", positive=[positive, 0], negative=[negative, 0],
                        latent_image=[latent, 0], text_scale=text_scale, image_scale=image_scale,
                        image_scale_ramp=0.0, normalize=normalize, mode="three-branch", denoise=1.0,
                        model=[model, 0])
    if len(references) == 2:  # the two-object scenes: reference j's object is in half j
        g.add("MultiRefQualityRoutingShare", model=[model, 0], samples=[samples, 0])
    decoded = g.add("VAEDecode", samples=[samples, 0], vae=[models, 2])
    g.add("SaveImage", images=[decoded, 0], filename_prefix=prefix)
    return g.nodes


def run(host, nodes):
    """Execute; returns the saved pictures as 32x32x3 arrays in 0..1 (block means of the 256x256 picture)."""
    outputs = host.execute(nodes)
    pictures = []
    for ui in outputs.values():
        for item in (ui or {}).get("images", []):
            path = os.path.join(host.folder_paths.get_output_directory(), item.get("subfolder", ""),
                                item["filename"])
            pictures.append(world.downscale(np.asarray(Image.open(path).convert("RGB"), np.float32) / 255))
            os.remove(path)
    return pictures


def write_reference(host, name, rng, shape, identity):
    """A reference view of (shape, identity) and its mask into the host's input folder."""
    image, mask = world.reference_view(rng, shape, identity)
    folder = host.folder_paths.get_input_directory()
    adapter.save_png(os.path.join(folder, f"{name}.png"), world.upscale(image))
    adapter.save_mask(os.path.join(folder, f"{name}_mask.png"), mask)
    return f"{name}.png", f"{name}_mask.png", image


def clipped_share(picture):
    """Share of pixels with a channel at the ends of the range (the world never draws those)."""
    return float(((picture <= 2 / 255) | (picture >= 253 / 255)).any(axis=2).mean())


# ---- the figures -------------------------------------------------------------------------

def base_shapes(host, base_folder, per_prompt, steps=STEPS):
    """Single-object prompts: share drawing the prompted shape; two-object prompts: share with
    both shapes, each in its half (no references: the base alone)."""
    single, pairs, examples = [], [], []
    for k, shape in enumerate(world.SHAPES):
        pics = run(host, prompt(base_folder, world.caption([shape]), 100 + k, per_prompt, "q_base1",
                                steps=steps))
        single += [detector.find_shape(detector.objects(p), shape) is not None for p in pics]
        examples += pics[:4]
    for k, (a, b) in enumerate([(a, b) for a in world.SHAPES for b in world.SHAPES if a != b]):
        pics = run(host, prompt(base_folder, world.caption([a, b]), 200 + k, max(per_prompt // 4, 1),
                                "q_base2", steps=steps))
        for p in pics:
            found = detector.objects(p)
            pairs.append(detector.find_shape(found, a, (0, world.SIZE / 2)) is not None and
                         detector.find_shape(found, b, (world.SIZE / 2, world.SIZE)) is not None)
    return {"single_shape": single, "two_shapes": pairs}, examples


def identity_fidelity(host, base_folder, scenes, per_scene, steps=STEPS):
    """Held-out identities, one reference each: share of samples whose largest object matches the
    reference's identity, with the reference (adapter, `sum`) and without (the base alone, same
    prompt and seed: the chance level)."""
    rng = np.random.default_rng(7)
    with_ref, without, shape_ok, grid = [], [], [], []
    similarity = {True: [], False: []}  # with / without the reference
    nearest = {True: [], False: []}
    for k in range(scenes):
        shape, identity = world.SHAPES[k % 4], world.HELD_OUT[k % len(world.HELD_OUT)]
        image, mask, ref = write_reference(host, f"q_fid{k}", rng, shape, identity)
        want = detector.identity_histogram(identity)
        for refs, out in (([(image, mask, shape)], with_ref), ((), without)):
            pics = run(host, prompt(base_folder, world.caption([shape]), 300 + k, per_scene, "q_fid",
                                    refs, steps=steps))
            for p in pics:
                found = detector.objects(p)
                out.append(bool(found) and detector.matches(found[0]["histogram"], want))
                similarity[bool(refs)].append(detector.similarity(found[0]["histogram"], want) if found else 0.0)
                nearest[bool(refs)].append(bool(found) and detector.nearest_identity(
                    found[0]["histogram"], world.HELD_OUT) == identity)
                if refs:
                    shape_ok.append(detector.find_shape(found, shape) is not None)
            if refs and k < 6:
                grid.append([ref] + pics[:3])
    return {"with_reference": with_ref, "without_reference": without, "shape_with_reference": shape_ok,
            "similarity_with": similarity[True], "similarity_without": similarity[False],
            "nearest_with": nearest[True], "nearest_without": nearest[False]}, grid


SETTINGS = [(mode, msa) for mode in ("sum", "weighted", "mask") for msa in (False, True)]


def confusion(host, base_folder, scenes, per_scene, steps=STEPS):
    """Two objects, two references (phrases = their shapes; identities share no colour). Per
    setting: share of scenes (samples) where an object carries the OTHER reference's identity
    (matches it, and better than its own), share where both carry their own, and the softer
    per-object figure: share of drawn objects whose colours are closer to the other reference's
    identity than to their own (strictly, by histogram intersection; the same share with the
    roles swapped is `closer_own`)."""
    rng = np.random.default_rng(11)
    specs = []
    for k in range(scenes):
        s = world.random_scene(rng, 2, world.IDENTITIES)
        refs = [write_reference(host, f"q_conf{k}_{j}", rng, s["shapes"][j], s["identities"][j])
                for j in range(2)]
        specs.append((s, refs))
    results, grids = {}, {}
    for mode, msa in SETTINGS:
        swapped, both_own, closer_other, closer_own = [], [], [], []
        RoutingShare.SHARES.clear()
        for k, (s, refs) in enumerate(specs):
            pics = run(host, prompt(base_folder, s["caption"], 400 + k, per_scene, "q_conf",
                                    [(i, m, ph) for (i, m, _), ph in zip(refs, s["shapes"])],
                                    mode, msa, steps=steps))
            hists = [detector.identity_histogram(i) for i in s["identities"]]
            for p in pics:
                found = detector.objects(p)
                carries = []
                for j, region in enumerate(((0, world.SIZE / 2), (world.SIZE / 2, world.SIZE))):
                    inside = [o for o in found if region[0] <= o["centroid"][0] < region[1]]
                    if not inside:
                        carries.append(None)
                        continue
                    own = detector.similarity(inside[0]["histogram"], hists[j])
                    other = detector.similarity(inside[0]["histogram"], hists[1 - j])
                    carries.append(_carries(own, other))
                    closer_other.append(other > own)
                    closer_own.append(own > other)
                swapped.append("other" in carries)
                both_own.append(carries == ["own", "own"])
            if k < 4:
                grids.setdefault((mode, msa), []).append([r[2] for r in refs] + pics[:2])
        results[(mode, msa)] = {"swapped": swapped, "both_own": both_own,
                                "closer_other": closer_other, "closer_own": closer_own,
                                "routing_in_own_half": list(RoutingShare.SHARES)}
    return results, grids


def _carries(s_own, s_other):
    """From an object's similarity to its own and to the other reference's identity."""
    if s_other >= detector.MATCH and s_other > s_own:
        return "other"
    return "own" if s_own >= detector.MATCH else "neither"


GUIDANCE_SCALES = (1.0, 3.0, 6.0, 12.0)


def guidance(host, base_folder, scenes, per_scene, steps=STEPS):
    """One reference (held-out identity), image scale swept, plain vs normalized three-branch
    guidance: clipped-pixel share (saturation), prompted shape drawn, identity matched."""
    rng = np.random.default_rng(13)
    specs = []
    for k in range(scenes):
        shape, identity = world.SHAPES[k % 4], world.HELD_OUT[(k * 3) % len(world.HELD_OUT)]
        specs.append((shape, identity, write_reference(host, f"q_gui{k}", rng, shape, identity)))
    results, grid = {}, []
    for normalize in (False, True):
        for scale in GUIDANCE_SCALES:
            clipped, shape_ok, ident_ok = [], [], []
            for k, (shape, identity, (image, mask, _)) in enumerate(specs):
                pics = run(host, prompt(base_folder, world.caption([shape]), 500 + k, per_scene, "q_gui",
                                        [(image, mask, shape)], "sum", False, normalize,
                                        image_scale=scale, steps=steps))
                for p in pics:
                    found = detector.objects(p)
                    clipped.append(clipped_share(p))
                    shape_ok.append(detector.find_shape(found, shape) is not None)
                    ident_ok.append(bool(found) and detector.matches(
                        found[0]["histogram"], detector.identity_histogram(identity)))
                if k == 0:
                    grid.append(pics[:2])
            results[(normalize, scale)] = {"clipped": clipped, "shape": shape_ok, "identity": ident_ok}
    return results, grid
