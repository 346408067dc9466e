"""What the techniques need from a model's text encoder (a ComfyUI CLIP object): a phrase
encoded on its own, as MIP-Adapter encodes each object's words, or where a phrase sits in a
prompt's tokens (the joint attention of Flux reads its own text keys there)."""
from ..kernels import routing


def phrase_embeddings(clip, phrase, what):
    """The text encoder's output for the phrase alone, tokens after BOS up to EOS: (P, C_ctx)."""
    tokens = clip.tokenize(phrase)
    key = next(iter(tokens))
    end_token = clip.tokenize("")[key][0][1][0]  # "" tokenizes to [BOS, EOS, padding...]
    if len(tokens[key]) > 1:
        raise ValueError(f"{what}: phrase {phrase!r} is longer than one 75-token chunk; name the "
                         "object in a few words")
    ids = [t[0] for t in tokens[key][0]]
    count = ids.index(end_token, 1) - 1
    if count < 1:
        raise ValueError(f"{what}: phrase {phrase!r} gives no tokens; write the object's words "
                         "(e.g. 'dog') as they appear in the prompt")
    cond = clip.encode_from_tokens(tokens)
    return cond[0, 1:1 + count].detach().float().cpu()


def empty_phrase_embeddings(clip, counts):
    """MIP-Adapter's phrases for the uncond rows: the encoding of the empty prompt at the same
    token positions (1..P_i) as each phrase, so the negative prediction is routed by no words."""
    cond = clip.encode_from_tokens(clip.tokenize(""))
    return [cond[0, 1:1 + count].detach().float().cpu() for count in counts]


def phrase_positions(clip, prompt, phrase, what, encoder="t5xxl"):
    """Where the phrase's tokens sit in the prompt's token sequence of one text encoder (T5 for
    Flux, whose tokens are the context the joint attention reads): a list of indices. The
    phrase is tokenized alone (its tokens before EOS) and looked up as a run in the prompt's."""
    def ids(text):
        tokens = clip.tokenize(text)
        if encoder not in tokens:
            raise ValueError(f"clip: this text encoder has no {encoder} tokens; connect the "
                             "model's own text encoder (Flux: CLIP-L + T5)")
        return [t[0] for chunk in tokens[encoder] for t in chunk]
    end_token = ids("")[0]  # "" tokenizes to [EOS, padding...] without a start token
    phrase_ids = ids(phrase)
    phrase_ids = phrase_ids[:phrase_ids.index(end_token)] if end_token in phrase_ids else phrase_ids
    if not phrase_ids:
        raise ValueError(f"{what}: phrase {phrase!r} gives no tokens; write the object's words "
                         "(e.g. 'dog') as they appear in the prompt")
    start = routing.locate_phrase(ids(prompt), phrase_ids)
    if start is None:
        raise ValueError(f"{what}: phrase {phrase!r} is not in the prompt {prompt!r}; write the "
                         "phrase exactly as the prompt has it, or add the words to the prompt")
    return list(range(start, start + len(phrase_ids)))


def phrase_ids(clip, key, phrase):
    """The phrase's token ids for one text encoder `key` (between BOS and EOS)."""
    chunk = clip.tokenize(phrase)[key][0]
    end = clip.tokenize("")[key][0][1][0]  # "" tokenizes to [BOS, EOS, padding...]
    ids = [t[0] for t in chunk]
    return ids[1:ids.index(end, 1)]


def caption_phrase_rows(clip, caption, phrase):
    """The rows of the caption's encoding (chunk c, token t -> row 77 c + t) that hold the
    phrase's tokens, first occurrence; [] when the caption does not contain them as whole
    words (CLIP's tokenizer splits every word on its own, so a word's tokens are the same
    alone and in a sentence)."""
    key = next(iter(clip.tokenize("")))
    words = phrase_ids(clip, key, phrase)
    chunks = clip.tokenize(caption)[key]
    ids = [t[0] for chunk in chunks for t in chunk]
    start = routing.locate_phrase(ids, words) if words else None
    return [] if start is None else list(range(start, start + len(words)))
