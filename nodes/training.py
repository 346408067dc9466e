"""MultiRefTrain: the bundled trainer as a node (docs/ARCHITECTURE.md, Training). It reads a dataset
manifest, trains the self-attention LoRA with Masked Shared Attention on the model it is given, and
returns that model with the LoRA applied, the weights file and the loss curve.

Training needs autograd, which ComfyUI switches off around every node (inference mode): the
node turns it back on for its own work. Progress goes to ComfyUI's progress bar every step (also
over the HTTP API), and cancelling the prompt stops the run after the current step with a
resumable state saved (queue the same prompt again to resume).
"""
import logging

import torch

import comfy.model_management
import comfy.sd
import comfy.utils

from ..training import checkpoint, loop, plots
from ..training.blocks import attention_paths
from ..training.config import TrainConfig, TrainConfigError
from ..training.cli import family_of
from .output_folder import inside_output

log = logging.getLogger("multiref")


class MultiRefTrain:
    DESCRIPTION = ("Fine-tunes a LoRA on the model's self-attention from a dataset manifest (one "
                   "target + reference images per object, masks, captions), with Masked Shared "
                   "Attention to the references as in SynCD. Saves checkpoints every N steps and "
                   "resumes from its output folder. Needs a CUDA GPU for real models; the tiny "
                   "demo models train on a CPU.")
    CATEGORY = "MultiRef"
    FUNCTION = "train"
    RETURN_TYPES = ("MODEL", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "weights_path", "loss_curve")
    OUTPUT_TOOLTIPS = ("the input model with the trained LoRA applied",
                       "path of the trained weights: multiref_adapter.safetensors with an "
                       "adapter, else multiref_lora.safetensors (a core-LoRA copy "
                       "multiref_lora_core.safetensors lies beside it)",
                       "the training loss per step")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model to train the LoRA on (SD1.5 or SDXL)."}),
            "clip": ("CLIP", {"tooltip": "Its text encoder: captions are encoded once, up front."}),
            "vae": ("VAE", {"tooltip": "Its VAE: images are encoded once, up front."}),
            "dataset": ("STRING", {"default": "", "tooltip":
                        "Path of the dataset manifest JSON (format: training/manifest.py). Every "
                        "missing or broken file is reported before training starts."}),
            "output_dir": ("STRING", {"default": "multiref_training/run1", "tooltip":
                           "Run folder for checkpoints, weights and the loss curve, inside "
                           "ComfyUI's output folder (a relative path, no '..'). An existing run "
                           "resumes."}),
            "steps": ("INT", {"default": 1000, "min": 1, "max": 1_000_000, "tooltip":
                      "Optimizer steps to train in total (a resumed run continues up to it)."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip":
                           "Groups (target + its references) per micro-batch."}),
            "grad_accumulation": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip":
                                  "Micro-batches per optimizer step (larger effective batch "
                                  "without more memory)."}),
            "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5,
                              "tooltip": "AdamW learning rate."}),
            "lora_rank": ("INT", {"default": 16, "min": 1, "max": 512, "tooltip":
                          "LoRA rank on q, k, v and out of every self-attention (SynCD: 128)."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 64, "tooltip":
                           "Training images are center-cropped to this square size."}),
            "save_every": ("INT", {"default": 250, "min": 1, "max": 1_000_000, "tooltip":
                           "Save a resumable checkpoint every N steps."}),
            "keep_last": ("INT", {"default": 3, "min": 1, "max": 1000, "tooltip":
                          "How many of the newest checkpoints to keep."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip":
                     "Seed of the data order, timesteps, noise and dropout."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip":
                                       "Recompute activations in backward: much less memory, "
                                       "about a third more time."}),
            "resume": ("BOOLEAN", {"default": True, "tooltip":
                       "Continue from the newest checkpoint in output_dir if there is one (with "
                       "the same settings). Off: a fresh run; an earlier run there is moved to "
                       "output_dir/replaced/."}),
        }, "optional": {
            "preview_every": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip":
                              "Save a preview image (the LoRA as trained so far, no reference) "
                              "in output_dir/previews every N steps; 0 = none."}),
            "preview_prompt": ("STRING", {"default": "", "tooltip":
                               "Prompt of the previews; empty = the dataset's first caption."}),
            "quality_threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Data selection: drop groups whose object quality "
                                  "score (share of the phrase's attention inside the object's "
                                  "mask in the target) is below this; 0 = keep all. The scores "
                                  "and what was dropped go to data_selection.json."}),
            "adapter": ("MULTIREF_ADAPTER", {"tooltip":
                        "An adapter to fine-tune too: its per-layer image key/value projections "
                        "(and MIP routing gate) train with routing active; its image projection "
                        "stays frozen. Saved as multiref_adapter.safetensors."}),
            "clip_vision": ("CLIP_VISION", {"tooltip":
                            "The CLIP vision model the adapter reads (needed with an adapter)."}),
            "train_fusion": ("BOOLEAN", {"default": False, "tooltip":
                             "With a Plus adapter: also train a feature fusion of three CLIP "
                             "layers (fine detail, mid, coarse likeness), started from the "
                             "adapter's image projection so that it first gives the adapter's own "
                             "tokens; saved in multiref_adapter.safetensors, its mix set by "
                             "MultiRef Encode References' granularity."}),
            "cls_text": ("BOOLEAN", {"default": False, "tooltip":
                         "Also train MM-Diff's CLS text fusion (a reference's CLIP class "
                         "embedding fused into its word in the caption; needs an adapter and "
                         "clip_vision). Saved as multiref_cls_text.safetensors in the output "
                         "folder, for MultiRef CLS Fusion Loader (copy it to models/multiref)."}),
            "text_map_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                "tooltip": "Cross-attention map constraint (MM-Diff): weight of "
                                "the loss pulling each object's phrase-token attention into the "
                                "object's mask in the target, so subjects separate without a "
                                "layout at inference. Needs multi-object samples with masks; "
                                "0 = off; start around 0.02-0.05 (larger ones cost denoising "
                                "quality, README)."}),
            "image_map_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                 "tooltip": "The same for each reference's image tokens in the "
                                 "adapter's image attention (needs an adapter); 0 = off."}),
            "map_layers": ("STRING", {"default": "input,middle,output", "tooltip":
                           "Layer groups whose maps are constrained, comma-separated, out of "
                           "input, middle, output."}),
        }}

    def train(self, model, clip, vae, dataset, output_dir, steps, batch_size, grad_accumulation,
              learning_rate, lora_rank, resolution, save_every, keep_last, seed,
              gradient_checkpointing, resume, preview_every=0, preview_prompt="",
              quality_threshold=0.0, adapter=None, clip_vision=None, train_fusion=False,
              cls_text=False, text_map_weight=0.0, image_map_weight=0.0,
              map_layers="input,middle,output"):
        folder = inside_output(output_dir, "output_dir", TrainConfigError, "multiref_training/run1")
        config = TrainConfig(dataset=dataset, output_dir=folder, steps=steps,
                             batch_size=batch_size, grad_accumulation=grad_accumulation,
                             learning_rate=learning_rate, lora_rank=lora_rank,
                             resolution=resolution, save_every=save_every, keep_last=keep_last,
                             seed=seed, gradient_checkpointing=gradient_checkpointing,
                             resume=resume, quality_threshold=quality_threshold,
                             preview_every=preview_every, preview_prompt=preview_prompt,
                             train_fusion=bool(train_fusion), cls_text=bool(cls_text),
                             text_map_weight=text_map_weight, image_map_weight=image_map_weight,
                             map_layers=[g.strip() for g in map_layers.split(",") if g.strip()])
        bar = comfy.utils.ProgressBar(steps)
        # The trainer patches and moves the model itself: nothing the host holds loaded (the
        # same weights with another clone's patches merged in) may stay patched under it.
        comfy.model_management.unload_all_models()
        with torch.inference_mode(False):
            models = loop.Models(model, vae, clip, family_of(model), clip_vision, adapter)
            result = loop.train(config, models,
                                on_step=lambda step, total, loss: bar.update_absolute(step, total),
                                check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
            core = checkpoint.core_lora_tensors(result.lora_layers,
                                                attention_paths(model.model.diffusion_model))
        trained, _ = comfy.sd.load_lora_for_models(model, None, core, 1.0, 0.0)
        return (trained, result.adapter_file or result.weights,
                plots.as_comfy_image(plots.loss_curve(result.losses)))


NODE_CLASS_MAPPINGS = {"MultiRefTrain": MultiRefTrain}
NODE_DISPLAY_NAME_MAPPINGS = {"MultiRefTrain": "MultiRef Train (LoRA + MSA)"}
