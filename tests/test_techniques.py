"""Each technique runs through one implementation: sampling (the node patches) and the trainer's
step both call the functions of techniques/, so replacing one of them is seen by both paths."""
import os
import sys

import pytest
import torch

from multiref.families import tiny_models
from multiref.nodes.msa import apply_msa
from multiref.techniques import msa as msa_technique
from multiref.techniques import relevance
from multiref.techniques import routing as routing_technique
from multiref.training import loop
from multiref.training.config import TrainConfig

sys.path.insert(0, os.path.dirname(__file__))
import test_msa_node as msa_tests  # noqa: E402
import test_routing_nodes as routing_tests  # noqa: E402
import tiny_checkpoints  # noqa: E402
import training_data  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WATCHED = ((msa_technique, "read_references"), (msa_technique, "with_lora"),
           (routing_technique, "route"), (routing_technique, "image_keys_values"),
           (relevance, "phrase_keys"))


@pytest.fixture
def calls(monkeypatch):
    """{function name: calls}: every watched technique function, counted and then run."""
    counted = {}
    for module, name in WATCHED:
        original = getattr(module, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            counted[_name] = counted.get(_name, 0) + 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(module, name, counting)
    return counted


def test_sampling_and_training_run_the_same_technique_functions(calls, tmp_path):
    from multiref.kernels.checkpoints import load_adapter
    adapter = load_adapter(tiny_checkpoints.write_checkpoint(str(tmp_path), "ip_adapter_plus",
                                                             "sd15")[0])

    # Sampling: the routing node, and MSA with the adapter's self-attention LoRA.
    model, clip = tiny_models.tiny_unet("sd15"), tiny_models.tiny_text_encoder("sd15")
    small = routing_tests.tiny_adapter(model)
    refs = tuple(routing_tests.encoded(small, p, i) for i, p in enumerate(["dog", "cat"]))
    routing_tests.sample(routing_tests.apply(model, small, refs, clip), clip, steps=1)
    vae, xl_clip = tiny_models.tiny_vae(), tiny_models.tiny_text_encoder("sdxl")
    syncd = load_adapter(tiny_checkpoints.write_checkpoint(str(tmp_path), "syncd", "sdxl")[0])
    patched = apply_msa(tiny_models.tiny_unet("sdxl"), msa_tests._encoded(vae, 1), 1.0, 0.0, 1.0,
                        False, "all", "references", adapter=syncd,
                        reference_conditioning="target_text")
    msa_tests._sample(patched, {"sdxl": xl_clip}, "sdxl", steps=1)
    sampling = dict(calls)
    calls.clear()

    # Training: one step of the trainer (reference pass, target pass with routing and MSA).
    data = training_data.write_object_dataset(str(tmp_path / "data"), groups=1, refs=1)
    config = TrainConfig(dataset=data, output_dir=str(tmp_path / "run"), steps=1, batch_size=1,
                         lora_rank=2, resolution=64, seed=0)
    models = loop.Models(tiny_models.tiny_unet("sd15"), vae, clip, "sd15",
                         tiny_models.tiny_clip_vision(), adapter)
    assert torch.isfinite(torch.tensor(loop.evaluation_loss(config, models, micro_batches=1)))
    training = dict(calls)

    for _, name in WATCHED:
        assert sampling.get(name, 0) > 0, f"sampling never called techniques' {name}"
        assert training.get(name, 0) > 0, f"training never called techniques' {name}"
