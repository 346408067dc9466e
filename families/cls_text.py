"""CLS-augmented text (MM-Diff) on a ComfyUI CLIP object: where a reference's phrase sits in the
prompt's tokens, the word embeddings there, and the prompt's tokens with those entries replaced
by fused embeddings (kernels/cls_text.py).

How the fused embeddings reach the text encoder: both hosts' SDClipModel accept a tensor of the
token width in place of a token id in the token list (the textual-inversion path). The installable
host (comfyui==0.0.1) gives such a tensor an id in a temporary embedding table; current ComfyUI
splices it into the embedded sequence at its position. Either way a one-row tensor takes the
place of one token, and everything else in the list is embedded as before."""
import torch


class PhraseNotInPrompt(ValueError):
    """A reference's phrase does not occur in the prompt's tokens."""


def text_encoders(clip):
    """{encoder key ("l", "g"): the host's SDClipModel} of a CLIP object."""
    keys = list(clip.tokenize(""))
    return {key: getattr(clip.cond_stage_model, f"clip_{key}") for key in keys}


def text_widths(clip):
    return {key: encoder.transformer.get_input_embeddings().weight.shape[1]
            for key, encoder in text_encoders(clip).items()}


def word_embeddings(encoder, ids):
    """(len(ids), C) float32 rows of the encoder's token embedding table."""
    table = encoder.transformer.get_input_embeddings().weight
    return table[torch.tensor(ids, device=table.device)].detach().float().cpu()


def phrase_ids(clip, key, phrase):
    """The phrase's token ids for one encoder (between BOS and EOS)."""
    chunk = clip.tokenize(phrase)[key][0]
    end = clip.tokenize("")[key][0][1][0]  # "" tokenizes to [BOS, EOS, padding...]
    ids = [t[0] for t in chunk]
    return ids[1:ids.index(end, 1)]


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


def augmented_tokens(clip, prompt, references, fusion):
    """The prompt's tokens with each reference's entity token replaced by its fused embedding
    (weight kept); references of weight 0 are left out. Returns (tokens, {key: [(chunk,
    position)]}) . A phrase that is not in the prompt raises PhraseNotInPrompt."""
    tokens = clip.tokenize(prompt)
    encoders = text_encoders(clip)
    if sorted(encoders) != sorted(fusion.encoders):
        raise ValueError(f"cls_fusion: made for text encoders {sorted(fusion.encoders)} "
                         f"({fusion.family}) but the CLIP has {sorted(encoders)}; load the fusion "
                         "trained for this model family")
    widths = text_widths(clip)
    if widths != fusion.text_widths:
        raise ValueError(f"cls_fusion: token widths {fusion.text_widths} do not fit this CLIP's "
                         f"{widths}; load the fusion trained with this text encoder")
    replaced = {key: [] for key in tokens}
    for n, ref in enumerate(references, 1):
        if ref.weight == 0:
            continue  # zero means off: the plain words
        cls = class_embedding_of(ref, n, fusion)
        for key, chunks in tokens.items():
            ids = phrase_ids(clip, key, ref.phrase) if ref.phrase else []
            positions = entity_positions(chunks, ids) if ids else []
            if not positions:
                raise PhraseNotInPrompt(
                    f"references: reference {n}'s phrase {ref.phrase!r} is not in the prompt; "
                    "write the object's words in the prompt exactly as in its MultiRef Reference "
                    "(the CLS embedding is fused into that word)")
            with torch.no_grad():
                words = word_embeddings(encoders[key], [chunks[c][p][0] for c, p in positions])
                fused = fusion.fuse(key, words, cls)
            for (c, p), row in zip(positions, fused):
                chunks[c][p] = (row,) + tuple(chunks[c][p][1:])
                replaced[key].append((c, p))
    return tokens, replaced


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
