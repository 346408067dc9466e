"""Training MM-Diff's CLS text fusion (kernels/cls_text.py) with the adapter (config cls_text):
each row that sees both its caption and its references gets its caption encoded again at every
step, with each reference's class embedding fused into its entity word, through a private copy
of the text encoders (families.cls_text.TrainableText), so the loss reaches the fusion. Rows whose
text or images are dropped keep the cached plain encoding."""
import torch

from ..families import cls_text as host_cls_text
from ..kernels.cls_text import ClsTextFusion
from .dataset import adm_of

FUSION_SEED_OFFSET = 7919  # the fusion's first layers draw from their own seed, not the LoRA's


def new_fusion(clip, image_width, seed):
    """A fresh fusion for this CLIP's text encoders: random first layers (from the run's seed,
    without touching the global random stream), zero last layer (fused == word)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + FUSION_SEED_OFFSET)
        return ClsTextFusion(host_cls_text.text_widths(clip), image_width, "trained")


def image_width_of(groups):
    widths = {g.cls_text["class_embeddings"].shape[-1] for g in groups if g.cls_text is not None}
    if len(widths) != 1:
        raise ValueError(f"cls_text: class embeddings of widths {sorted(widths)} in the encoded "
                         "dataset; delete the output folder's cache/ and start again")
    return widths.pop()


class ClsTextRows:
    """Replaces the context (and SDXL adm) of a batch's augmented rows."""

    def __init__(self, clip, base_model, resolution, device):
        self.text = host_cls_text.TrainableText(clip, device)
        self.base_model, self.resolution = base_model, resolution

    def augment(self, batch, fusion):
        contexts, adms = list(batch["context"].unbind(0)), batch["adm"]
        adms = None if adms is None else list(adms.unbind(0))
        for r, row in enumerate(batch["cls_text"]):
            if row is None:
                continue
            entities = [(n, phrase, cls) for n, (phrase, cls) in enumerate(
                zip(row["phrases"], row["class_embeddings"]), 1)]
            cond, pooled = self.text.encode(row["caption"], entities, fusion)
            contexts[r] = cond[0].to(contexts[r].device, contexts[r].dtype)
            if adms is not None:
                adm = adm_of(self.base_model, pooled, self.resolution)
                adms[r] = adm[0].to(adms[r].device, adms[r].dtype)
        return dict(batch, context=torch.stack(contexts),
                    adm=None if adms is None else torch.stack(adms))
