"""Prove the methods on learned weights: `python -m bench.quality [--scale quick|full|gpu]`.

1. base: a tiny text-to-image model trained from scratch on the world (base.py), cached;
2. adapter: an IP-Adapter Plus layout adapter fine-tuned by the MultiRef Train node (adapter.py),
   cached;
3. figures through the shipped nodes and the host's sampler (evaluate.py): the base's shape
   criterion, identity fidelity, confusion with two references (sum / weighted / mask, each with
   and without MSA), saturation and prompt following vs image guidance scale, plain vs
   normalized; every share with a 95% Wilson interval (report.py).
Trained weights are kept in --cache (default bench/quality/.cache, ignored by git) under the
scale's name; a second run only evaluates. `--pictures DIR` writes the sample grids there."""
import argparse
import json
import logging
import os
import sys
import time

import torch

from headless import host as host_mod

from . import adapter, base, evaluate, report

HERE = os.path.dirname(os.path.abspath(__file__))
# base: steps, batch, learning rate, scene pool; adapter: steps, groups, batch, learning rate;
# evaluation: samples per base prompt, fidelity scenes x samples, confusion scenes x samples,
# guidance scenes x samples, sampling steps. `tiny` is what a 2-core machine shared with other
# work manages in about 40 minutes (its figures have wide intervals). Base steps were doubled when
# attention at 16x16 was dropped (a step costs half the CPU time: same minutes per scale).
# `quick` has 4,800 base steps because half its captions name colours (BASE_RECIPE): such a base
# drew the prompted shape in 41% of samples at 1,600 steps, 69% at 3,200, 94% at 4,800.
SCALES = {
    "smoke": dict(base=(2, 4, 1e-3, 16), adapter=(1, 2, 2, 1e-4), base_eval=1, fidelity=(1, 1),
                  confusion=(1, 1), guidance=(1, 1), channels=32, steps=2),
    "tiny": dict(base=(400, 16, 2e-3, 1024), adapter=(60, 128, 2, 3e-4), base_eval=4,
                 fidelity=(4, 3), confusion=(4, 3), guidance=(2, 3), channels=32, steps=10),
    "quick": dict(base=(4800, 32, 2e-3, 4096), adapter=(6000, 1024, 4, 1e-3), base_eval=8,
                  fidelity=(16, 4), confusion=(16, 3), guidance=(4, 3), channels=32, steps=20),
    "full": dict(base=(8000, 48, 2e-3, 16384), adapter=(6000, 4000, 8, 1e-3), base_eval=32,
                 fidelity=(16, 8), confusion=(24, 6), guidance=(8, 6), channels=32, steps=20),
    "gpu": dict(base=(60000, 128, 1e-3, 65536), adapter=(6000, 8000, 16, 2e-4), base_eval=64,
                fidelity=(32, 16), confusion=(48, 16), guidance=(16, 16), channels=64, steps=30),
}
# every scale's base is sampled from an average of its weights (the best of the equal-CPU-time
# comparisons of `python -m bench.quality.tune`, bench/RESULTS.md), and its text encoder is
# trained with it (its captions then differ where the UNet reads them). Half of its training
# captions name the objects' colours ("a red blue circle"), as real bases learn colours from
# their captions: without them the base has no path an adapter can steer identity through (a
# trained decoupled image attention with oracle identity tokens changed its loss by nothing),
# with the colours after the shape the base ignored them (bench/RESULTS.md).
BASE_RECIPE = dict(ema=0.995, text_encoder=True, colour_captions=0.5)
log = logging.getLogger("multiref.quality")


def unet_config(scale):
    return dict(base.UNET_CONFIG, model_channels=SCALES[scale]["channels"])


def run(scale, cache, pictures=None, host=None):
    """Train what is not cached, evaluate, return (figures, seconds per phase)."""
    s = SCALES[scale]
    work = os.path.abspath(os.path.join(cache, scale))
    os.makedirs(os.path.join(work, "input"), exist_ok=True)
    host = host or host_mod.boot(workdir=os.path.join(work, "host"), output_dir=os.path.join(work, "output"))
    host.folder_paths.set_input_directory(os.path.join(work, "input"))
    base.register(host)
    evaluate.register(host)
    times, base_folder = {}, os.path.join(work, "base")
    start = time.time()
    base_recipe = json.dumps({"base": s["base"], "unet": unet_config(scale), **BASE_RECIPE}, sort_keys=True)
    if base.saved_recipe(base_folder) != base_recipe:  # not trained yet, or with other settings
        steps, batch, lr, pool = s["base"]
        patcher, curve, text_weights = base.train(host, steps, batch, lr, pool, unet_config=unet_config(scale),
                                                  log_every=max(steps // 20, 1), **BASE_RECIPE)
        base.save(patcher, base_folder, curve, unet_config(scale), text_weights, base_recipe)
    times["base training"] = time.time() - start
    curve = base.saved_curve(base_folder)  # the metadata alone, not the weights
    start = time.time()
    models = os.path.join(work, "multiref")
    host.folder_paths.add_model_folder_path("multiref", models)
    adapter_recipe = json.dumps({"adapter": s["adapter"], "base": base_recipe, **adapter.TRAIN_SETTINGS},
                                sort_keys=True)
    if adapter.saved_recipe(models) != adapter_recipe:
        steps, groups, batch, lr = s["adapter"]
        adapter.train(host, base_folder, work, steps, groups, batch, lr, adapter_recipe)
    times["adapter training"] = time.time() - start
    figures, grids = {"text_scale": evaluate.TEXT_SCALE, "base_curve": curve}, {}
    start = time.time()
    steps = s["steps"]
    figures["base"], grids["base"] = evaluate.base_shapes(host, base_folder, s["base_eval"], steps)
    figures["fidelity"], grids["fidelity"] = evaluate.identity_fidelity(host, base_folder,
                                                                        *s["fidelity"], steps)
    figures["confusion"], grids["confusion"] = evaluate.confusion(host, base_folder, *s["confusion"], steps)
    figures["guidance"], grids["guidance"] = evaluate.guidance(host, base_folder, *s["guidance"], steps)
    times["evaluation"] = time.time() - start
    if pictures:
        _pictures(grids, pictures)
    return figures, times


def _pictures(grids, folder):
    report.grid([grids["base"][i:i + 8] for i in range(0, len(grids["base"]), 8)],
                os.path.join(folder, "quality_base_samples.png"))
    report.grid(grids["fidelity"], os.path.join(folder, "quality_identity_fidelity.png"))
    rows = [row for setting in evaluate.SETTINGS for row in grids["confusion"].get(setting, [])[:2]]
    report.grid(rows, os.path.join(folder, "quality_confusion.png"))
    report.grid(grids["guidance"], os.path.join(folder, "quality_guidance.png"))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=list(SCALES), default="quick",
                        help="quick (default): about 36 minutes on 2 idle CPU cores; full: "
                             "tighter intervals, about 90 (estimated, not yet run); gpu: larger "
                             "and longer, for a CUDA GPU; tiny: a shared 2-core machine's 40 "
                             "minutes; smoke: the tests' seconds-long run")
    parser.add_argument("--cache", default=os.path.join(HERE, ".cache"),
                        help="where trained weights are kept (default bench/quality/.cache)")
    parser.add_argument("--pictures", default=None, help="folder for the sample grids (e.g. docs/images)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    start = time.time()
    figures, times = run(args.scale, args.cache, args.pictures)
    total = time.time() - start
    print(f"\n`python -m bench.quality --scale {args.scale}`: {total / 60:.1f} min in all "
          + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    curve = [[c[0], round(c[1], 4), round(c[2])] for c in figures["base_curve"]]
    print(f"base loss curve (step, loss, seconds): {json.dumps(curve)}")
    print("\n".join(report.table(figures)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
