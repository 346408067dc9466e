"""Cross-attention map constraints (MM-Diff) on a tiny two-object dataset: the same seeded run
twice, with and without the constraint, and on held-out samples after every chunk of steps the
share of each phrase's attention (text maps) and of each reference's image-token attention
(image maps) inside its own object's mask, and the denoising loss.

    python -m bench.attention_constraint                  # CPU, tiny SD1.5 UNet + tiny adapter
    python -m bench.attention_constraint --steps 40 --every 10 --text-weight 4 --image-weight 4
    python -m bench.attention_constraint --world quick    # the learned base and adapter of
                                                          # `python -m bench.quality --scale quick`

Prints one line per measurement (step, both runs' shares and denoising loss) and a summary.
Held-out samples: another draw of the same generator (other object positions, colors, pairs).
With --world, the models are bench.quality's trained base (UNet and text encoder learned from
scratch) and its trained adapter, and the data are that world's two-object scenes (shapes as
the phrases, reference views of each object; held-out scenes use the held-out identities): the
models' queries tell objects apart, which the tiny random ones barely do.
At the end, the shares inside the OTHER object's mask too (the held-out set with the two masks
of each sample swapped): a map that only learned where objects are, not which is which, gains
as much there as inside its own mask.
"""
import argparse
import json
import os
import sys
import tempfile

from bench.common import boot_pack
from headless import host as host_mod

HERE = os.path.dirname(os.path.abspath(__file__))


def two_object_dataset(folder, groups, seed):
    """tests/training_data.py's two-object dataset (the tests and this script share it)."""
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    sys.path.insert(0, tests)
    try:
        import training_data
    finally:
        sys.path.remove(tests)
    return training_data.write_two_object_dataset(folder, groups=groups, seed=seed)


def swapped_masks(manifest):
    """A copy of a two-object manifest with each sample's two object masks swapped."""
    with open(manifest) as f:
        data = json.load(f)
    for sample in data["samples"]:
        first, second = sample["objects"]
        first["mask"], second["mask"] = second["mask"], first["mask"]
    path = os.path.join(os.path.dirname(manifest), "swapped_masks.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def tiny_models(pack):
    tiny = pack("families.tiny_models")
    unet = tiny.tiny_unet("sd15")
    return pack("training.loop").Models(unet, tiny.tiny_vae(), tiny.tiny_text_encoder("sd15"), "sd15",
                                        tiny.tiny_clip_vision(), tiny.tiny_adapter(unet))


def world_models(pack, work):
    """bench.quality's trained base, text encoder and adapter (work = its cache folder of a scale)."""
    from bench.quality import adapter, base
    base.register(host_mod.boot())
    patcher, clip, vae, clip_vision = base.QualityModels().load(os.path.join(work, "base"))
    trained = pack("kernels.checkpoints").load_adapter(os.path.join(work, "multiref", adapter.ADAPTER_NAME))
    return pack("training.loop").Models(patcher, vae, clip, "sd15", clip_vision, trained)


def curves(pack, folder, train_data, held_out, args, text_weight, image_weight):
    """([(step, measurement)], the last measurement with the masks swapped) of one run:
    measured before training and every `every` steps (the run resumes from its own
    checkpoint, so the chunks are one straight run)."""
    loop = pack("training.loop")
    config_cls = pack("training.config").TrainConfig
    models = world_models(pack, args.world_cache) if args.world else tiny_models(pack)
    settings = dict(dataset=train_data, output_dir=os.path.join(folder, "run"),
                    batch_size=args.batch_size, learning_rate=args.learning_rate, lora_rank=8,
                    resolution=args.resolution, save_every=args.every, keep_last=1, seed=args.seed,
                    text_map_weight=text_weight, image_map_weight=image_weight)
    held = config_cls(**dict(settings, dataset=held_out, output_dir=os.path.join(folder, "held"),
                             batch_size=1))
    out = [(0, loop.map_shares(held, models, None, args.held_out))]
    for step in range(args.every, args.steps + 1, args.every):
        result = loop.train(config_cls(**dict(settings, steps=step)), models)
        out.append((step, loop.map_shares(held, models, result, args.held_out)))
    other = config_cls(**dict(held.to_dict(), dataset=swapped_masks(held_out),
                              output_dir=os.path.join(folder, "other")))
    return out, loop.map_shares(other, models, result, args.held_out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=20, help="measure every N steps")
    parser.add_argument("--groups", type=int, default=32, help="training groups")
    parser.add_argument("--held-out", type=int, default=8, help="held-out groups")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--text-weight", type=float, default=1.0)
    parser.add_argument("--image-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--comfyui", help="a ComfyUI checkout (default: the installed host)")
    parser.add_argument("--world", metavar="SCALE", help="bench.quality's trained models and world "
                        "of this scale (run `python -m bench.quality --scale SCALE` first)")
    parser.add_argument("--quality-cache", default=os.path.join(HERE, "quality", ".cache"),
                        help="bench.quality's cache folder (default bench/quality/.cache)")
    args = parser.parse_args(argv)
    args.resolution = 64
    if args.world:
        from bench.quality import adapter, world
        args.world_cache = os.path.join(args.quality_cache, args.world)
        args.resolution = world.SIZE * world.UPSCALE
        if not os.path.isdir(os.path.join(args.world_cache, "multiref")):
            parser.error(f"--world {args.world}: no trained models in {args.world_cache}; run "
                         f"`python -m bench.quality --scale {args.world}` first")
    import torch
    torch.set_num_threads(1)
    pack = boot_pack(args.comfyui)
    with tempfile.TemporaryDirectory(prefix="multiref_bench_") as folder:
        if args.world:
            train_data = adapter.write_dataset(os.path.join(folder, "train"), args.groups, args.seed, 2)
            held_out = adapter.write_dataset(os.path.join(folder, "held_out"), args.held_out,
                                             args.seed + 1000, 2, world.HELD_OUT)
        else:
            train_data = two_object_dataset(os.path.join(folder, "train"), args.groups, args.seed)
            held_out = two_object_dataset(os.path.join(folder, "held_out"), args.held_out,
                                          args.seed + 1000)
        runs = {name: curves(pack, os.path.join(folder, name), train_data, held_out, args, *w)
                for name, w in (("without", (0.0, 0.0)),
                                ("with", (args.text_weight, args.image_weight)))}
    models = f"bench.quality's {args.world} base + adapter" if args.world else "tiny SD1.5 UNet + tiny IP-Adapter"
    print(f"{models}, {args.resolution}px, {args.groups} training / {args.held_out} "
          f"held-out two-object groups, batch {args.batch_size}, lr {args.learning_rate}, "
          f"seed {args.seed}; constraint: text_map_weight {args.text_weight}, image_map_weight "
          f"{args.image_weight}, all layer groups")
    print("share inside own mask on held-out samples (text = phrase tokens, image = reference "
          "tokens); denoising loss on held-out samples")
    print(f"{'step':>5} | {'text w/o':>8} {'text with':>9} | {'image w/o':>9} {'image with':>10} "
          f"| {'loss w/o':>8} {'loss with':>9}")
    for (step, a), (_, b) in zip(runs["without"][0], runs["with"][0]):
        print(f"{step:>5} | {a['text']:>8.4f} {b['text']:>9.4f} | {a['image']:>9.4f} "
              f"{b['image']:>10.4f} | {a['denoise']:>8.4f} {b['denoise']:>9.4f}")
    first, last = runs["with"][0][0][1], runs["with"][0][-1][1]
    plain = runs["without"][0][-1][1]
    for kind in ("text", "image"):
        print(f"{kind}: share inside {first[kind]:.4f} before; after {args.steps} steps "
              f"{last[kind]:.4f} with the constraint, {plain[kind]:.4f} without; inside the "
              f"other object's mask {runs['with'][1][kind]:.4f} with, "
              f"{runs['without'][1][kind]:.4f} without")
    print(f"denoising loss: {first['denoise']:.4f} before; after {args.steps} steps "
          f"{last['denoise']:.4f} with the constraint, {plain['denoise']:.4f} without")


if __name__ == "__main__":
    main()
