"""CLS-augmented text (MM-Diff) on a ComfyUI CLIP object: where a reference's phrase sits in the
prompt's tokens, the word embeddings there, and the prompt's tokens with those entries replaced
by fused embeddings (kernels/cls_text.py).

How the fused embeddings reach the text encoder: both hosts' SDClipModel accept a tensor of the
token width in place of a token id in the token list (the textual-inversion path). The installable
host (comfyui==0.0.1) gives such a tensor an id in a temporary embedding table; current ComfyUI
splices it into the embedded sequence at its position. Either way a one-row tensor takes the
place of one token, and everything else in the list is embedded as before. The trainer needs a
gradient through the encoder, which that path cannot give on the installable host (it writes the
tensor into a table in place): TrainableText below."""
import copy

import torch

from .text import phrase_ids


class PhraseNotInPrompt(ValueError):
    """A reference's phrase does not occur in the prompt's tokens."""


def text_encoders(clip):
    """{encoder key ("l", "g"): the host's SDClipModel} of a CLIP object."""
    keys = sorted(clip.tokenize(""))
    if keys not in (["l"], ["g", "l"]):
        raise ValueError(f"clip: text encoders {keys}; CLS-augmented text runs on SD1.5 (CLIP-L) "
                         "and SDXL (CLIP-L and CLIP-G) text encoders: connect the CLIP of an "
                         "SD1.5 or SDXL checkpoint")
    return {key: getattr(clip.cond_stage_model, f"clip_{key}") for key in keys}


def text_widths(clip):
    return {key: encoder.transformer.get_input_embeddings().weight.shape[1]
            for key, encoder in text_encoders(clip).items()}


def entity_positions(chunks, ids):
    """[(chunk, position)] of the LAST token of every occurrence of `ids` in the prompt's token
    chunks: the entity word MM-Diff augments (the word it marks with <|subj|>, the end of the
    noun phrase)."""
    found = []
    for c, chunk in enumerate(chunks):
        row = [t[0] if isinstance(t[0], int) else None for t in chunk]
        for start in range(len(row) - len(ids) + 1):
            if row[start:start + len(ids)] == ids:
                found.append((c, start + len(ids) - 1))
    return found


def located(clip, key, chunks, phrase, whose):
    """entity_positions of a phrase, or PhraseNotInPrompt naming `whose` phrase it is."""
    ids = phrase_ids(clip, key, phrase) if phrase else []
    positions = entity_positions(chunks, ids) if ids else []
    if not positions:
        raise PhraseNotInPrompt(
            f"{whose} phrase {phrase!r} is not in the prompt; write the object's words in the "
            "prompt exactly as in its reference (the CLS embedding is fused into that word)")
    return positions


def check_entities(clip, caption, phrases, whose):
    """Raise PhraseNotInPrompt unless every phrase occurs in the caption (before training)."""
    tokens = clip.tokenize(caption)
    for phrase in phrases:
        for key, chunks in tokens.items():
            located(clip, key, chunks, phrase, whose)


def augmented_tokens(clip, prompt, references, fusion):
    """The prompt's tokens with each reference's entity token replaced by its fused embedding
    (weight kept); references of weight 0 are left out. Returns (tokens, {key: [(chunk,
    position)]}). A phrase that is not in the prompt raises PhraseNotInPrompt."""
    tokens = clip.tokenize(prompt)
    entities = [(n, ref.phrase, class_embedding_of(ref, n, fusion))
                for n, ref in enumerate(references, 1) if ref.weight != 0]  # zero means off
    tables = {key: encoder.transformer.get_input_embeddings().weight
              for key, encoder in text_encoders(clip).items()}
    with torch.no_grad():
        fused = fused_entities(clip, tokens, entities, fusion, tables)
    for key, rows in fused.items():
        for (c, p), row in rows:
            tokens[key][c][p] = (row.cpu(),) + tuple(tokens[key][c][p][1:])
    return tokens, {key: [place for place, _ in rows] for key, rows in fused.items()}


def fused_entities(clip, tokens, entities, fusion, tables):
    """{encoder key: [((chunk, position), fused row (C,))]} for entities [(n, phrase, class
    embedding (D,))] in the token chunks; tables: {key: the encoder's token embedding weight}.
    Differentiable in the fusion's weights (the trainer's path runs it with gradient)."""
    widths = {key: table.shape[1] for key, table in tables.items()}
    if sorted(widths) != sorted(fusion.encoders):
        raise ValueError(f"cls_fusion: made for text encoders {sorted(fusion.encoders)} "
                         f"({fusion.family}) but the CLIP has {sorted(widths)}; load the fusion "
                         "trained for this model family")
    if widths != fusion.text_widths:
        raise ValueError(f"cls_fusion: token widths {fusion.text_widths} do not fit this CLIP's "
                         f"{widths}; load the fusion trained with this text encoder")
    phrases = [phrase for _, phrase, _ in entities]
    shared = sorted({p for p in phrases if phrases.count(p) > 1})
    if shared:
        raise ValueError(f"references: several references have the phrase(s) {shared}; one "
                         "entity word takes one class embedding: give each reference its own "
                         "words in the prompt (or set the others' weight to 0)")
    out = {key: [] for key in tokens}
    for n, phrase, cls in entities:
        for key, chunks in tokens.items():
            positions = located(clip, key, chunks, phrase, f"references: reference {n}'s")
            table, device = tables[key], next(fusion.parameters()).device
            ids = torch.tensor([chunks[c][p][0] for c, p in positions], device=table.device)
            words = table.detach()[ids].float().to(device)
            rows = fusion.fuse(key, words, cls.to(device))
            out[key] += list(zip(positions, rows))
    return out


def class_embedding_of(ref, n, fusion):
    """A reference's class embedding (the mean over its views, D)."""
    embeds = getattr(ref, "class_embedding", None)
    if embeds is None:
        raise ValueError(f"references: reference {n} ('{ref.phrase}') has no CLIP class "
                         "embedding; encode it again with MultiRef Encode References (files "
                         "saved before this input existed lack it)")
    if embeds.shape[-1] != fusion.image_width:
        raise ValueError(f"cls_fusion: it reads {fusion.image_width}-wide CLIP class embeddings "
                         f"but reference {n} ('{ref.phrase}') has {embeds.shape[-1]}-wide ones; "
                         "encode the references with the CLIP vision model the fusion was "
                         "trained with")
    return embeds.float().mean(dim=0)


def encode(clip, tokens):
    """(cond (1, L, C), pooled or None): the host's encoding of a token list."""
    return clip.encode_from_tokens(tokens, return_pooled=True)


class TrainableText:
    """The CLIP's text encoders for training the fusion: a private frozen copy (weights cloned
    out of inference mode, which ComfyUI's loaders leave them in and autograd cannot read back)
    whose token embedding tables take the fused rows out of place and whose layers add their
    residuals out of place (the hosts' CLIP layers add them in place, which autograd refuses),
    so the loss reaches the fusion through the text encoder. The host's own encode runs on it (the token-list path of
    the nodes writes into a table in place, which autograd refuses on the installable host)."""

    def __init__(self, clip, device):
        self.clip = clip
        with torch.inference_mode(False):
            self.model = copy.deepcopy(clip.cond_stage_model)
            for module in self.model.modules():
                for name, param in list(module.named_parameters(recurse=False)):
                    module._parameters[name] = torch.nn.Parameter(param.detach().clone(),
                                                                  requires_grad=False)
        for module in self.model.modules():
            if all(hasattr(module, n) for n in ("layer_norm1", "self_attn", "layer_norm2", "mlp")):
                module.forward = _OutOfPlaceLayer(module)
        self.model.to(device)
        self.tables = {}
        for key in text_encoders(clip):
            transformer = getattr(self.model, f"clip_{key}").transformer
            table = _Substituting(transformer.get_input_embeddings())
            transformer.set_input_embeddings(table)
            self.tables[key] = table

    def encode(self, caption, entities, fusion):
        """(cond (1, L, C), pooled or None) of the caption with entities [(n, phrase, class
        embedding)] fused, with gradient to the fusion."""
        tokens = self.clip.tokenize(caption)
        fused = fused_entities(self.clip, tokens, entities, fusion,
                               {key: table.base.weight for key, table in self.tables.items()})
        for key, table in self.tables.items():
            table.rows = fused[key]
        self.model.reset_clip_options()
        if self.clip.layer_idx is not None:  # as the host's encode_from_tokens
            self.model.set_clip_options({"layer": self.clip.layer_idx})
        try:
            return self.model.encode_token_weights(tokens)[:2]
        finally:
            for table in self.tables.values():
                table.rows = []


class _Substituting(torch.nn.Module):
    """A token embedding table whose lookup puts `rows` [((chunk, position), row)] in place of
    the looked-up embeddings there (chunk = the row of the host's token batch)."""

    def __init__(self, base):
        super().__init__()
        self.base, self.rows = base, []

    @property
    def weight(self):  # the hosts read the table's device and width from it
        return self.base.weight

    def forward(self, ids, *args, **kwargs):
        out = self.base(ids, *args, **kwargs)
        if not self.rows:
            return out
        chunks = torch.tensor([c for (c, _), _ in self.rows], device=out.device)
        positions = torch.tensor([p for (_, p), _ in self.rows], device=out.device)
        values = torch.stack([row for _, row in self.rows]).to(out.device, out.dtype)
        return out.index_put((chunks, positions), values)


class _OutOfPlaceLayer:
    """A host CLIP layer's forward (pre-norm attention, then pre-norm MLP, each added to the
    stream) with new tensors for the residual sums."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x, mask=None, optimized_attention=None):
        layer = self.layer
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
