"""Equal-cost comparison of base training recipes: `python -m bench.quality.tune RECIPE
--cpu-seconds N`. Trains the base with one recipe until this process has used N seconds of CPU
time (a fair budget on cores shared with other work, where wall time is not), then measures
the base's shape figures through the host's sampler (evaluate.base_shapes) and prints one JSON
line: recipe, steps, loss curve, shares with 95% Wilson intervals."""
import argparse
import json
import logging
import os
import sys
import tempfile
import time

import torch

from headless import host as host_mod

from . import base, evaluate, report

ATTENTION_COARSE = dict(transformer_depth=[0, 0, 1], transformer_depth_output=[0, 0, 0, 0, 1, 1])
ATTENTION_16_AND_8 = dict(transformer_depth=[0, 1, 1], transformer_depth_output=[0, 0, 1, 1, 1, 1])
# name: (UNet config changes, train() keywords); all at lr 2e-3, pool 4096, seed 0
RECIPES = {
    "attn16+8": (ATTENTION_16_AND_8, dict(batch=32)),
    "attn8": (ATTENTION_COARSE, dict(batch=32)),
    "attn8_ema": (ATTENTION_COARSE, dict(batch=32, ema=0.995)),
    "attn8_ema_ramp": (ATTENTION_COARSE, dict(batch=32, ema=0.995, ramp=True)),
    "attn8_ema_ramp_b16": (ATTENTION_COARSE, dict(batch=16, ema=0.995, ramp=True)),
    "attn8_ema_ramp_minsnr": (ATTENTION_COARSE, dict(batch=32, ema=0.995, ramp=True, min_snr=5.0)),
    "attn8_ema_text": (ATTENTION_COARSE, dict(batch=32, ema=0.995, text_encoder=True)),
    "attn16+8_ema_text": (ATTENTION_16_AND_8, dict(batch=32, ema=0.995, text_encoder=True)),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.quality.tune", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", choices=list(RECIPES))
    parser.add_argument("--cpu-seconds", type=float, default=240)
    parser.add_argument("--per-prompt", type=int, default=16, help="samples per single-object prompt")
    parser.add_argument("--sampling-steps", type=int, default=20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    work = tempfile.mkdtemp(prefix="multiref_tune_")
    host = host_mod.boot(workdir=os.path.join(work, "host"), output_dir=os.path.join(work, "output"))
    base.register(host)
    changes, keywords = RECIPES[args.recipe]
    config = dict(base.UNET_CONFIG, **changes)
    start = time.time()
    patcher, curve, text_weights = base.train(host, None, lr=2e-3, pool_size=4096, unet_config=config,
                                              log_every=25, cpu_seconds=args.cpu_seconds, **keywords)
    folder = os.path.join(work, "base")
    base.save(patcher, folder, curve, config, text_weights)
    trained = time.time() - start
    figures, _ = evaluate.base_shapes(host, folder, args.per_prompt, args.sampling_steps)
    print(json.dumps({
        "recipe": args.recipe, "cpu_seconds": args.cpu_seconds, "steps": curve[-1][0],
        "train_wall_s": round(trained), "eval_wall_s": round(time.time() - start - trained),
        "single_shape": report.share(figures["single_shape"]), "two_shapes": report.share(figures["two_shapes"]),
        "curve": [[c[0], round(c[1], 4), round(c[3])] for c in curve]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
