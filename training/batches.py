"""What each micro-batch of training holds and its random draws.

Randomness is drawn per group from a generator seeded by (seed, micro-batch, position in the
global batch), never from a global stream: a group gets the same timestep, noise and dropout
whichever process trains it and whether or not the run was resumed in between, so a run split
over N processes or interrupted and resumed computes exactly what one straight run computes.
"""
import torch

from ..kernels.diffusion_objective import condition_dropout
from .attention_constraint import BATCH_KEYS as MAP_KEYS, row_targets


class Sampler:
    """Which groups a micro-batch holds and the random draws of each group (see module doc)."""

    def __init__(self, config, groups, empty_text, sigmas, uncond_tokens=None):
        """uncond_tokens: the adapter's "no image" tokens, or with train_fusion {"tokens",
        "hidden"} (dataset.encode_groups)."""
        self.config, self.groups, self.empty_text, self.sigmas = config, groups, empty_text, sigmas
        self.uncond_hidden = None
        if isinstance(uncond_tokens, dict):
            uncond_tokens, self.uncond_hidden = uncond_tokens["tokens"], uncond_tokens["hidden"]
        self.uncond_tokens = uncond_tokens

    def indices(self, micro):
        size, count = self.config.batch_size, len(self.groups)
        out = []
        for position in range(micro * size, (micro + 1) * size):
            epoch, offset = divmod(position, count)
            order = torch.randperm(count, generator=torch.Generator().manual_seed(
                self.config.seed * 1_000_003 + epoch))
            out.append(int(order[offset]))
        return out

    def batch(self, micro, rows, device, dtype):
        """The micro-batch rows `rows` (positions in the global batch) as tensors on `device`."""
        c, indices = self.config, self.indices(micro)
        picked = [self.groups[indices[r]] for r in rows]
        refs = max(len(g.ref_latents) for g in picked)
        out = {k: [] for k in ("latent", "noise", "sigma", "context", "adm", "ref_latents",
                               "ref_noise", "ref_masks", "ref_tokens", "ref_weights",
                               "ref_context", "ref_adm", "ref_hidden", *MAP_KEYS)}
        phrases, cls_text = [], []
        for r, group in zip(rows, picked):
            gen = torch.Generator().manual_seed((c.seed * 1_000_003 + micro) * 4099 + r)
            out["sigma"].append(self.sigmas[torch.randint(len(self.sigmas), (1,), generator=gen)][0])
            out["noise"].append(torch.randn(group.latent.shape, generator=gen))
            k = len(group.ref_latents)
            ref_noise = torch.randn((refs, *group.latent.shape), generator=gen)
            drop_text, drop_image = condition_dropout(float(torch.rand((), generator=gen)),
                                                      c.text_dropout, c.image_dropout, c.both_dropout)
            full_mask = float(torch.rand((), generator=gen)) < c.full_mask_probability
            masks = torch.ones_like(group.ref_masks) if full_mask else group.ref_masks
            masks = torch.zeros_like(masks) if drop_image else masks
            pad = refs - k  # groups with fewer references: padded rows with an empty mask
            out["ref_latents"].append(torch.cat([group.ref_latents,
                                                 group.ref_latents.new_zeros(pad, *group.latent.shape)]))
            out["ref_masks"].append(torch.cat([masks, masks.new_zeros(pad, *masks.shape[1:])]))
            out["ref_noise"].append(ref_noise)
            if group.ref_tokens is None:
                out["ref_tokens"].append(None)
                out["ref_weights"].append(None)
            else:  # dropped image: every reference reads the uncond tokens
                uncond = self.uncond_tokens.expand(refs, *self.uncond_tokens.shape)
                tokens = uncond if drop_image else torch.cat([group.ref_tokens, uncond[k:]])
                out["ref_tokens"].append(tokens)
                out["ref_weights"].append(torch.tensor([1.0] * k + [0.0] * pad))
                phrases.append(group.phrases + group.phrases[:1] * pad)
            if group.ref_hidden is None:
                out["ref_hidden"].append(None)
            else:  # the fusion's input, dropped and padded as the tokens are
                uncond = self.uncond_hidden.expand(refs, *self.uncond_hidden.shape)
                out["ref_hidden"].append(uncond if drop_image else torch.cat([group.ref_hidden, uncond[k:]]))
            # CLS-augmented text only where the row sees both its text and its images.
            cls_text.append(None if drop_text or drop_image else group.cls_text)
            context, adm = self.empty_text if drop_text else (group.context, group.adm)
            ref_context, ref_adm = self.reference_text(group, refs, context, adm, drop_text)
            for key, value in row_targets(group, refs, drop_text, drop_image).items():
                out[key].append(value)
            out["ref_context"].append(ref_context)
            out["ref_adm"].append(ref_adm)
            out["latent"].append(group.latent)
            out["context"].append(context)
            out["adm"].append(adm)
        lengths = {t.shape[0] for t in out["context"]} | {t.shape[1] for t in out["ref_context"]}
        if len(lengths) > 1:
            raise ValueError(f"captions of one batch encode to different lengths {sorted(lengths)} "
                             "(a caption longer than 75 tokens); shorten the long captions or use "
                             "batch_size 1")
        batch = {k: None if v[0] is None else torch.stack(v).to(device) for k, v in out.items()}
        batch["phrases"] = phrases
        batch["cls_text"] = cls_text if any(g.cls_text is not None for g in picked) else None
        for key in ("latent", "noise", "ref_latents", "ref_noise", "context", "adm", "ref_tokens",
                    "ref_context", "ref_adm"):
            if batch[key] is not None:
                batch[key] = batch[key].to(dtype)
        return batch

    def reference_text(self, group, refs, context, adm, drop_text):
        """(refs, L, D) text and (refs, A) adm (or None) of a group's reference rows: syncd,
        each reference's own prompt (the empty text when the group's text is dropped, as SynCD
        empties every prompt of the group; padding rows too); target_text, the group's text."""
        repeat = lambda t: None if t is None else t[None].expand(refs, *t.shape)
        if self.config.reference_conditioning != "syncd":
            return repeat(context), repeat(adm)
        empty_context, empty_adm = self.empty_text
        ref_context, ref_adm = repeat(empty_context), repeat(empty_adm)
        if not drop_text:
            k = group.ref_context.shape[0]
            ref_context = torch.cat([group.ref_context, ref_context[k:]])
            ref_adm = None if adm is None else torch.cat([group.ref_adm, ref_adm[k:]])
        return ref_context, ref_adm
