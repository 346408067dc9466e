"""What the benchmarks share: booting the host with the pack loaded the way ComfyUI loads it,
the kernels alone for the parts that need no host, and where and at what shapes a benchmark runs
(Setup: the SDXL-shaped UNet on CUDA or with --sdxl, else the tiny SDXL-like one).

Run the benchmarks from the pack's folder as modules: `python -m bench.<name>`.
"""
import dataclasses
import importlib
import time

import torch

from headless import host

SDXL_RESOLUTION = 1024
SDXL_POOLED = 1280  # text encoder G's pooled output: SDXL's 2816-wide adm = 1280 + 6 x 256
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def boot_pack(comfyui_path=None):
    """Boot the installed host, or the ComfyUI checkout at `comfyui_path` (as run.py does);
    returns name -> the pack's module as the host loaded it, e.g. pack("families.tiny_models")."""
    host.boot(comfyui_path)
    return lambda name: importlib.import_module(f"{host.PACK_FOLDER_NAME}.{name}")


def load_kernel(name):
    """kernels/<name>.py imported from the pack's folder as the package `kernels` (the kernels
    import only torch and each other): no host needed."""
    return importlib.import_module(f"kernels.{name}")


def add_setup_options(parser):
    parser.add_argument("--sdxl", action="store_true",
                        help="the SDXL-shaped UNet and SDXL shapes even without CUDA (on a CPU in "
                             "float32: a smoke run of the GPU mode, its timings mean nothing)")
    parser.add_argument("--resolution", type=int, default=None,
                        help=f"image side in pixels for the SDXL-shaped UNet (default "
                             f"{SDXL_RESOLUTION}; a multiple of 32)")


@dataclasses.dataclass(frozen=True)
class Setup:
    """Where a benchmark runs and at what shapes. `sdxl`: the host's UNetModel with the real SDXL
    configuration (random weights) at `resolution`; else the tiny SDXL-like UNet."""
    device: torch.device
    dtype: torch.dtype
    sdxl: bool
    resolution: int

    @property
    def cuda(self):
        return self.device.type == "cuda"

    @property
    def latent(self):
        return self.resolution // 8, self.resolution // 8

    def describe(self):
        device = torch.cuda.get_device_name(self.device) if self.cuda else "CPU"
        return f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}"

    def model_label(self):
        name = "SDXL-shaped UNet" if self.sdxl else "tiny SDXL-like UNet"
        return f"{name} {DTYPE_NAMES[self.dtype]}"

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize()

    def unet(self, pack):
        tiny = pack("families.tiny_models")
        if self.sdxl:
            return tiny.sdxl_shaped_unet(self.device, self.dtype)
        return tiny.tiny_unet("sdxl")

    def widths(self, pack):
        """(text context, pooled text, adm) widths of the model's conditioning."""
        tiny = pack("families.tiny_models")
        if self.sdxl:
            return tiny.SDXL_UNET["context_dim"], SDXL_POOLED, tiny.SDXL_UNET["adm_in_channels"]
        return tiny.SDXL_CONTEXT, tiny.TEXT_G_WIDTH, tiny.SDXL_ADM

    def sampling_inputs(self, pack, gen):
        """Positive and negative conditioning (77 tokens, pooled text and image size, as SDXL's
        text encoders give them) and the initial noise, drawn from `gen`."""
        context, pooled, _ = self.widths(pack)
        h, w = self.latent
        extra = {"pooled_output": torch.randn(1, pooled, generator=gen), "width": 8 * w,
                 "height": 8 * h}
        positive = [[torch.randn(1, 77, context, generator=gen), extra]]
        negative = [[torch.zeros(1, 77, context), dict(extra)]]
        return positive, negative, torch.randn(1, 4, h, w, generator=gen)

    def per_step(self, run, steps):
        """Seconds per step of run(steps) after a warm-up run of 2 steps, or of `steps` when
        fewer (model load, kernel selection)."""
        run(min(2, steps))
        self.synchronize()
        start = time.perf_counter()
        run(steps)
        self.synchronize()
        return (time.perf_counter() - start) / steps


def setup(parser, args, cuda_dtype=torch.float16, tiny_resolution=128):
    """The Setup of the parsed `args`: on CUDA the SDXL-shaped UNet in `cuda_dtype`; on a CPU the
    tiny UNet at `tiny_resolution`, or with --sdxl the SDXL-shaped one in float32 (half precision
    is slow or missing for some CPU operators)."""
    cuda = torch.cuda.is_available()
    sdxl = cuda or args.sdxl
    if args.resolution is not None:
        if not sdxl:
            parser.error("--resolution sets the SDXL-shaped UNet's size: add --sdxl (or run on "
                         "a CUDA machine)")
        if args.resolution < 64 or args.resolution % 32:
            parser.error(f"--resolution {args.resolution}: use a multiple of 32, at least 64 "
                         f"(the SDXL UNet halves the 1/8 latent twice)")
    resolution = (args.resolution or SDXL_RESOLUTION) if sdxl else tiny_resolution
    return Setup(torch.device("cuda" if cuda else "cpu"), cuda_dtype if cuda else torch.float32,
                 sdxl, resolution)
