"""Object quality score for data selection.

Definition (the pack's own; MIP-Adapter describes selecting data by one but does not publish
its formula): for an object that has a mask in the target image, its score is the fraction of
its relevance mass that falls inside its own mask,
    score = mean over cross-attention layers l of  sum_x R_i^l(x) * M^l(x),
R_i^l the object's relevance map at layer l (docs/ARCHITECTURE.md, Routing and Relevance maps:
softmax over positions of phrase key . query, mean over heads and phrase tokens; it sums to 1 over
positions) and M^l the mask's covered fraction of each cell of that layer's grid. The base model (no
LoRA) sees the target at one mid-noise step (50% of the schedule, seeded noise) with its caption. 1
= the model finds the phrase exactly on the object; a map spread evenly scores the mask's area
fraction; a phrase the model places elsewhere scores near 0. A group scores the minimum over its
objects; groups under the threshold are dropped before training and listed in data_selection.json.
"""
import torch

from ..families.text import phrase_embeddings
from ..techniques import relevance
from . import dataset


def object_masks(group, resolution):
    """[(phrase, pixel mask (H, W))] of a group's objects that have a mask in the target."""
    if group.target.mask is not None:  # one object (kind "object"): the group's phrase
        return [(group.references[0].phrase, dataset.load_mask(group.target.mask, resolution))]
    return [(ref.phrase, dataset.load_mask(ref.target_mask, resolution))
            for ref in group.references if ref.target_mask is not None]


def score_groups(run, groups, clip, resolution, seed=0):
    """{group name: {phrase: score}} for every group with object masks in its target. `run`
    is a loop.Run whose patcher is loaded; its LoRA is still fresh (a no-op)."""
    base = run.patcher.model
    sampling = base.model_sampling
    options = dict(run.patcher.model_options.get("transformer_options", {}))
    sigma = torch.tensor([float(sampling.percent_to_sigma(0.5))], device=run.device)
    scores = {}
    with torch.no_grad():
        for group, encoded in zip(groups, run.encoded):
            objects = object_masks(group, resolution)
            if not objects:
                continue
            maps = relevance.RelevanceMaps()
            phrases = [phrase_embeddings(clip, p, group.name) for p, _ in objects]
            latent = encoded.latent[None].to(run.device, run.model_dtype)
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
            x = sampling.noise_scaling(sigma.view(-1, 1, 1, 1), noise.to(latent), latent)
            extra = {} if encoded.adm is None else {"y": encoded.adm[None].to(latent)}
            run.state.begin_relevance(maps, phrases)
            try:
                base.apply_model(x, sigma, c_crossattn=encoded.context[None].to(latent),
                                 transformer_options=dict(options, sigmas=sigma), **extra)
            finally:
                run.state.end()
            masks = torch.stack([m for _, m in objects]).to(run.device)
            values = maps.mass_inside(masks)
            scores[group.name] = {p: round(float(v), 4) for (p, _), v in zip(objects, values)}
    return scores


def dropped_groups(scores, threshold):
    """{group name: its score (min over its objects)} of the groups under the threshold."""
    return {name: min(s.values()) for name, s in scores.items() if min(s.values()) < threshold}
