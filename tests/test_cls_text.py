"""CLS-augmented text (MM-Diff) on the host's real (tiny) text encoders, SD1.5 (L) and SDXL (L+G).

What "only the entity changes" means here: CLIP's text encoders are causal, so every output
position after the entity reads it through attention and changes. What can honestly be held
bit-identical is (a) the token embeddings fed to the encoder at every other position, and (b) the
encoder's outputs at the positions BEFORE the entity (a causal position never reads a later one:
the masked scores are exactly zero weight). Both are compared exactly; the fused embedding is
compared with the MLP written out below at a float32 tolerance."""
import json
import math

import pytest
import torch
from safetensors.torch import save_file

import tiny_checkpoints as tc
from multiref.families import cls_text as host_cls_text
from multiref.families import tiny_models
from multiref.kernels import checkpoints, cls_text, encoded_files
from multiref.kernels.references import EncodedReference

PROMPT = "a photo of a dog on the grass"
CLASS_WIDTH = tiny_models.CLIP_VISION_PROJECTION


@pytest.fixture(scope="module")
def clips():
    return {family: tiny_models.tiny_text_encoder(family) for family in ("sd15", "sdxl")}


def reference(phrase="dog", weight=1.0, seed=0, views=2):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(1, 4, 16, generator=g)
    return EncodedReference(image_tokens=tokens, uncond_tokens=torch.zeros_like(tokens),
                            latents=None, masks=None, phrase=phrase, weight=weight,
                            start_percent=0.0, end_percent=1.0, adapter_fingerprint="x",
                            class_embedding=torch.randn(views, CLASS_WIDTH, generator=g))


def trained_like(clip, seed=0):
    """A fusion whose every weight is random (the last layer too), as after training."""
    fusion = cls_text.ClsTextFusion(host_cls_text.text_widths(clip), CLASS_WIDTH)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in fusion.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return fusion


def encoder_inputs(clip, tokens):
    """{key: (B, L, C) what each text transformer's encoder stack receives (token + position
    embeddings)} and the host's (cond, pooled), captured with forward pre-hooks."""
    seen, handles = {}, []
    for key, encoder in host_cls_text.text_encoders(clip).items():
        def hook(module, args, kwargs, key=key):
            seen[key] = (args[0] if args else kwargs["x"]).detach().clone()
        handles.append(encoder.transformer.text_model.encoder.register_forward_pre_hook(
            hook, with_kwargs=True))
    try:
        with torch.no_grad():
            out = host_cls_text.encode(clip, tokens)
    finally:
        for h in handles:
            h.remove()
    return seen, out


def slow_fusion(fusion, key, word, cls):
    """word + W3 gelu(W1 LN([word ; Wp cls + bp]) + b1) + b3, written out."""
    s = {k: v.double() for k, v in fusion.encoders[key].state_dict().items()}
    projected = s["proj.weight"] @ cls.double() + s["proj.bias"]
    x = torch.cat([word.double(), projected])
    x = (x - x.mean()) / torch.sqrt(((x - x.mean()) ** 2).mean() + 1e-5)
    x = x * s["mlp.0.weight"] + s["mlp.0.bias"]
    h = s["mlp.1.weight"] @ x + s["mlp.1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return word.double() + s["mlp.3.weight"] @ h + s["mlp.3.bias"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_untrained_fusion_gives_the_plain_encoding_exactly(clips, family):
    clip = clips[family]
    fusion = cls_text.ClsTextFusion(host_cls_text.text_widths(clip), CLASS_WIDTH)
    tokens, replaced = host_cls_text.augmented_tokens(clip, PROMPT, (reference(),), fusion)
    assert all(len(v) == 1 for v in replaced.values())
    assert all(torch.is_tensor(tokens[k][c][p][0]) for k, v in replaced.items() for c, p in v)
    with torch.no_grad():
        cond, pooled = host_cls_text.encode(clip, tokens)
        plain, plain_pooled = host_cls_text.encode(clip, clip.tokenize(PROMPT))
    assert torch.equal(cond, plain)
    assert torch.equal(pooled, plain_pooled)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_only_the_entity_token_changes_and_equals_the_mlp(clips, family):
    clip = clips[family]
    fusion, ref = trained_like(clip), reference()
    tokens, replaced = host_cls_text.augmented_tokens(clip, PROMPT, (ref,), fusion)
    fed, (cond, pooled) = encoder_inputs(clip, tokens)
    fed_plain, (plain, plain_pooled) = encoder_inputs(clip, clip.tokenize(PROMPT))
    dog = clip.tokenize("dog")["l"][0][1][0]
    entity = [t[0] for t in clip.tokenize(PROMPT)["l"][0]].index(dog)
    column = 0
    for key, encoder in host_cls_text.text_encoders(clip).items():
        assert replaced[key] == [(0, entity)]
        others = [i for i in range(fed[key].shape[1]) if i != entity]
        assert torch.equal(fed[key][:, others], fed_plain[key][:, others])
        position = encoder.transformer.text_model.embeddings.position_embedding.weight[entity]
        word = encoder.transformer.text_model.embeddings.token_embedding.weight[dog].float()
        torch.testing.assert_close(fed_plain[key][0, entity], word + position.float())
        expected = slow_fusion(fusion, key, word, ref.class_embedding.mean(0)).float()
        assert not torch.allclose(expected, word, atol=1e-2)  # the fusion does move the word
        torch.testing.assert_close(fed[key][0, entity] - position.float(), expected,
                                   atol=1e-5, rtol=1e-5)
        # The encoder's output (this encoder's columns of the context): exact before the entity
        # (causal), changed at it.
        width = fed[key].shape[-1]
        columns = slice(column, column + width) if family == "sdxl" else slice(None)
        column += width
        assert torch.equal(cond[0, :entity, columns], plain[0, :entity, columns])
        assert not torch.allclose(cond[0, entity, columns], plain[0, entity, columns])


def test_phrase_not_in_prompt_is_named(clips):
    clip = clips["sd15"]
    fusion = cls_text.ClsTextFusion(host_cls_text.text_widths(clip), CLASS_WIDTH)
    with pytest.raises(host_cls_text.PhraseNotInPrompt, match="'cat' is not in the prompt"):
        host_cls_text.augmented_tokens(clip, PROMPT, (reference("cat"),), fusion)


def test_weight_zero_reference_is_left_out(clips):
    clip = clips["sd15"]
    fusion = trained_like(clip)
    tokens, replaced = host_cls_text.augmented_tokens(
        clip, PROMPT, (reference("cat", weight=0.0),), fusion)
    assert replaced == {"l": []} and tokens == clip.tokenize(PROMPT)


def test_fusion_of_another_family_is_refused(clips):
    fusion = cls_text.ClsTextFusion(host_cls_text.text_widths(clips["sdxl"]), CLASS_WIDTH)
    with pytest.raises(ValueError, match=r"cls_fusion: made for text encoders \['g', 'l'\]"):
        host_cls_text.augmented_tokens(clips["sd15"], PROMPT, (reference(),), fusion)


def test_fusion_file_round_trip_and_detection(clips, tmp_path):
    fusion = trained_like(clips["sdxl"])
    path = cls_text.save(fusion, str(tmp_path / "fusion.safetensors"))
    loaded = cls_text.load(path)
    assert loaded.family == "sdxl" and loaded.image_width == CLASS_WIDTH
    assert loaded.fingerprint == fusion.fingerprint
    for name, value in fusion.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    keys = set(cls_text.tensors_of(fusion))
    assert "cls_text.g.mlp.3.weight" in keys and "cls_text.l.proj.bias" in keys
    with pytest.raises(checkpoints.CheckpointError, match="MultiRef CLS Fusion Loader"):
        checkpoints.load_adapter(path)
    partial = {k: v for k, v in cls_text.tensors_of(fusion).items() if k != "cls_text.l.mlp.1.bias"}
    with pytest.raises(checkpoints.CheckpointError, match=r"cls_text.l lacks \['mlp.1.bias'\]"):
        cls_text.from_tensors(partial, "partial")


def test_encoded_references_carry_the_class_embedding(host, tmp_path):
    vision, unet = tiny_models.tiny_clip_vision(), tiny_models.tiny_unet("sd15")
    adapter_path, _ = tc.write_checkpoint(str(tmp_path), "ip_adapter", "sd15")
    adapter = checkpoints.load_adapter(adapter_path)
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    refs = host.nodes["MultiRefReference"]().make(images, "dog", 1.0, 0.0, 1.0)[0]
    encoded = host.nodes["MultiRefEncodeReferences"]().encode(refs, adapter, vision, unet, 0)[0]
    expected = torch.stack([vision.encode_image(images[i:i + 1])["image_embeds"][0]
                            for i in range(2)]).float()
    torch.testing.assert_close(encoded[0].class_embedding, expected, atol=1e-5, rtol=1e-5)
    path = encoded_files.save(encoded, str(tmp_path / "refs.references.safetensors"))
    assert torch.equal(encoded_files.load(path)[0].class_embedding, encoded[0].class_embedding)


def test_node_delay_gives_plain_then_augmented(host, clips):
    clip = clips["sdxl"]
    fusion, ref = trained_like(clip), reference()
    node = host.nodes["MultiRefClsTextEncode"]()
    (whole,) = node.encode(clip, PROMPT, (ref,), fusion, 0.0)
    (delayed,) = node.encode(clip, PROMPT, (ref,), fusion, 0.3)
    (plain,) = host.nodes["CLIPTextEncode"]().encode(clip, PROMPT)
    assert len(whole) == 1 and "start_percent" not in whole[0][1]
    assert [(c[1]["start_percent"], c[1]["end_percent"]) for c in delayed] == [(0.0, 0.3), (0.3, 1.0)]
    assert torch.equal(delayed[0][0], plain[0][0])
    assert torch.equal(delayed[0][1]["pooled_output"], plain[0][1]["pooled_output"])
    assert torch.equal(delayed[1][0], whole[0][0])
    assert not torch.equal(whole[0][0], plain[0][0])


def test_references_file_without_class_embeddings_still_loads(tmp_path):
    """A file saved before class embeddings existed: its entries lack the key."""
    ref = reference()
    entry = {"phrase": "dog", "weight": 1.0, "start_percent": 0.0, "end_percent": 1.0,
             "latents": False, "masks": False}
    path = str(tmp_path / "old.references.safetensors")
    save_file({"ref.0.image_tokens": ref.image_tokens, "ref.0.uncond_tokens": ref.uncond_tokens},
              path, metadata={"format": encoded_files.FORMAT, "format_version": "1",
                              "adapter_fingerprint": "x", "references": json.dumps([entry])})
    (loaded,) = encoded_files.load(path)
    assert loaded.class_embedding is None and torch.equal(loaded.image_tokens, ref.image_tokens)
    clip = tiny_models.tiny_text_encoder("sd15")
    fusion = cls_text.ClsTextFusion(host_cls_text.text_widths(clip), CLASS_WIDTH)
    with pytest.raises(ValueError, match="has no CLIP class embedding; encode it again"):
        host_cls_text.augmented_tokens(clip, PROMPT, (loaded,), fusion)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_trainers_differentiable_path_equals_the_nodes_and_reaches_the_fusion(clips, family):
    """The trainer's copy (substituting table, out-of-place layers) computes what the node's
    token-list path computes, and the loss's gradient reaches every part of the fusion."""
    clip = clips[family]
    fusion, ref = trained_like(clip), reference()
    trainable = host_cls_text.TrainableText(clip, torch.device("cpu"))
    cond, pooled = trainable.encode(PROMPT, [(1, "dog", ref.class_embedding.mean(0))], fusion)
    tokens, _ = host_cls_text.augmented_tokens(clip, PROMPT, (ref,), fusion)
    with torch.no_grad():
        node_cond, node_pooled = host_cls_text.encode(clip, tokens)
    torch.testing.assert_close(cond, node_cond, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pooled, node_pooled, atol=1e-6, rtol=1e-6)
    (cond.square().sum() + pooled.square().sum()).backward()
    for name, p in fusion.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in clip.cond_stage_model.parameters())  # its own copy
    assert all(p.grad is None for p in trainable.model.parameters())  # frozen


def test_missing_fusion_file_is_named_with_the_folders_searched(host):
    loader = host.nodes["MultiRefClsFusionLoader"]
    message = loader.VALIDATE_INPUTS("nowhere.safetensors")
    assert "'nowhere.safetensors' not found. Searched:" in message and "cls_text on" in message
    with pytest.raises(checkpoints.CheckpointError, match="fusion_name: file 'nowhere"):
        loader().load("nowhere.safetensors")


def test_two_references_with_one_phrase_are_refused(clips):
    clip = clips["sd15"]
    fusion = trained_like(clip)
    with pytest.raises(ValueError, match=r"several references have the phrase\(s\) \['dog'\]"):
        host_cls_text.augmented_tokens(clip, PROMPT, (reference(), reference(seed=1)), fusion)
    # The same with one of them off is fine.
    host_cls_text.augmented_tokens(clip, PROMPT, (reference(), reference(weight=0.0)), fusion)


def test_two_references_each_fuse_their_own_class_embedding(clips):
    clip = clips["sdxl"]
    fusion = trained_like(clip)
    cat, dog = reference("cat", seed=1), reference("dog", seed=2)
    prompt = "a cat and a dog"
    tokens, replaced = host_cls_text.augmented_tokens(clip, prompt, (cat, dog), fusion)
    fed, _ = encoder_inputs(clip, tokens)
    fed_plain, _ = encoder_inputs(clip, clip.tokenize(prompt))
    ids = [t[0] for t in clip.tokenize(prompt)["l"][0]]
    for key, encoder in host_cls_text.text_encoders(clip).items():
        embeddings = encoder.transformer.text_model.embeddings
        places = []
        for ref in (cat, dog):
            word_id = clip.tokenize(ref.phrase)["l"][0][1][0]
            p = ids.index(word_id)
            places.append(p)
            word = embeddings.token_embedding.weight[word_id].float()
            expected = slow_fusion(fusion, key, word, ref.class_embedding.mean(0)).float()
            torch.testing.assert_close(fed[key][0, p] - embeddings.position_embedding.weight[p].float(),
                                       expected, atol=1e-5, rtol=1e-5)
        assert sorted(replaced[key]) == [(0, p) for p in sorted(places)]
        others = [i for i in range(fed[key].shape[1]) if i not in places]
        assert torch.equal(fed[key][:, others], fed_plain[key][:, others])
