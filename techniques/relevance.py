"""Phrase-relevance maps, collected once for every reader: the Routing Maps node (the routing
weights of the prompt rows), Masked Shared Attention's batch mode (a phrase's map of one step gives
the next step's masks) and the trainer's object quality score (training/quality.py).

A map is R (rows, L, N): reference (or phrase) i's share at each of a layer's L positions. The
collector sums the maps of one model evaluation's layers per (step, layer group, layer grid).
"""
import torch
import torch.nn.functional as F

from ..kernels import routing


def schedule_step(schedule, sigma):
    """The step k of a sampler schedule (sigma_0 > ... > sigma_n) with sigma_k >= sigma >
    sigma_k+1; the tolerance absorbs the float rounding of the sigma the host hands on."""
    upper = [float(s) for s in schedule.reshape(-1)[:-1]]
    count = sum(1 for s in upper if s >= sigma * (1 - 1e-5))
    return min(max(count - 1, 0), max(len(upper) - 1, 0))


def phrase_relevance(q, to_k, embeddings, heads):
    """R (rows, L, N) of the phrases (embeddings: [(P_i, C_ctx)]) for the queries q of one
    cross-attention layer whose key projection is to_k (no gradient: the maps only locate)."""
    with torch.no_grad():
        return routing.relevance_maps(q, phrase_keys(to_k, embeddings, q.device, q.dtype), heads)


def phrase_keys(to_k, embeddings, device, dtype):
    """kernels.routing.PhraseKeys of the phrases projected by one layer's to_k, no gradient."""
    with torch.no_grad():
        return routing.phrase_keys([to_k(e.to(device, dtype)) for e in embeddings])


class StepClock:
    """Where a model evaluation stands in its sampling run, told from its sigma: a higher sigma
    than the last one starts a new run. The step of an evaluation is its place in the sampler's
    schedule when the host passes it (`sample_sigmas`): sigma_k >= sigma > sigma_k+1 is step k,
    so samplers that evaluate the model twice per step (heun, dpm_2) still count their own
    steps. Hosts that do not pass it (the installable one) count each lower sigma as the next
    step."""

    def __init__(self):
        self.last_sigma = None
        self.seen = 0  # sigmas seen in this run (the step count without a schedule)
        self.step = 0  # the step of the current model evaluation

    def start(self, sigma, schedule=None):
        """Place a model evaluation at `sigma`; returns (its step, whether a new run began)."""
        sigma = 0.0 if sigma is None else sigma
        new_run = False
        # Every layer of one model evaluation may ask; the step is worked out once, at the
        # first (the schedule lives on the GPU: reading it is a device sync).
        if sigma != self.last_sigma:
            new_run = self.last_sigma is None or sigma > self.last_sigma
            self.seen = 1 if new_run else self.seen + 1
            self.step = self.seen - 1 if schedule is None else schedule_step(schedule, sigma)
            self.last_sigma = sigma
        return self.step, new_run


class RelevanceMaps:
    """The maps of one sampling run (or one scoring pass), summed per step, layer group and
    layer grid; steps and runs as StepClock counts them."""

    def __init__(self):
        self.clock = StepClock()
        self.sums = {}

    @property
    def steps(self):
        """Steps recorded in this run."""
        return 1 + max((step for step, _, _ in self.sums), default=-1)

    def new_run(self):
        """Forget the last run (the host said a new one starts)."""
        self.clock, self.sums = StepClock(), {}

    def to_cpu(self):
        """Keep the maps of a finished run off the device it ran on."""
        for entry in self.sums.values():
            entry[0] = entry[0].cpu()

    def start(self, sigma, schedule=None):
        """Place a model evaluation at `sigma` in the run; returns its step."""
        step, new_run = self.clock.start(sigma, schedule)
        if new_run:
            self.sums = {}
        return step

    def record(self, sigma, block_name, grid, maps, schedule=None, images=None):
        """maps: (rows, L, N) of one layer of layer grid `grid` in layer group `block_name`.
        images: the batch image of each row when a context window holds them (calls of several
        windows then add up image by image, each image averaged over its own records)."""
        key = (self.start(sigma, schedule), block_name, grid)
        maps = maps.detach().float()
        entry = self.sums.get(key)
        if images is not None:
            self._record_images(key, maps, images)
        elif entry is None or entry[0].shape != maps.shape:
            self.sums[key] = [maps.clone(), 1]
        else:
            entry[0].add_(maps)
            entry[1] += 1

    def _record_images(self, key, maps, images):
        """Add maps rows to the rows of their images; the count is then one per image."""
        size = max(images) + 1
        entry = self.sums.get(key)
        if entry is None or not torch.is_tensor(entry[1]) or entry[0].shape[1:] != maps.shape[1:]:
            entry = self.sums[key] = [maps.new_zeros((0,) + maps.shape[1:]), torch.zeros(0)]
        if entry[0].shape[0] < size:
            grow = size - entry[0].shape[0]
            entry[0] = torch.cat([entry[0], maps.new_zeros((grow,) + maps.shape[1:])])
            entry[1] = torch.cat([entry[1], torch.zeros(grow)])
        entry[0].index_add_(0, torch.tensor(images, device=maps.device), maps)
        entry[1].index_add_(0, torch.tensor(images), torch.ones(len(images)))

    def record_routed(self, sigma, block_name, grid, row_roles, shown, active, references,
                      schedule=None, images=None, device=None):
        """Record the routing map of the prompt (`full`) rows of one layer call: shown (rows,
        L, active), (L, active) or None (every active reference everywhere); the references
        not in `active` (gated off at this step) show as zero. images: each row's batch image
        under a context window (see record), or None."""
        full = [i for i, r in enumerate(row_roles) if r == "full"]
        if not full:
            return
        positions = grid[0] * grid[1]
        if shown is None:
            shown = torch.ones(1, 1, len(active), device=device)
        elif shown.ndim == 3 and shown.shape[0] > 1:
            shown = shown[full]
        shown = shown.expand(len(full), positions, len(active))
        if len(active) < references:
            every = shown.new_zeros(len(full), positions, references)
            every[..., list(active)] = shown
            shown = every
        self.record(sigma, block_name, grid, shown, schedule, images)

    def maps(self, step, block_names, size):
        """Mean over the recorded layers of one step and group: (rows, N, H, W) at `size`
        (bilinear), or None when none was recorded."""
        total, layers = None, 0
        for (entry_step, block_name, grid), (summed, count) in self.sums.items():
            if entry_step != step or block_name not in block_names:
                continue
            rows, _, refs = summed.shape
            spatial = summed.transpose(1, 2).reshape(rows, refs, *grid)
            resized = F.interpolate(spatial.cpu(), size=size, mode="bilinear", align_corners=False)
            total = resized if total is None else total + resized
            layers += count
        if torch.is_tensor(layers):  # per image (context windows)
            layers = layers.clamp_min(1).reshape(-1, 1, 1, 1)
        return None if total is None else total / layers

    def mass_inside(self, masks, row=0):
        """mean over the recorded layers of sum_x R_i(x) M_i(x) for one row: masks (N, H, W),
        each reduced to a layer's grid by its covered fraction per cell. Returns (N,)."""
        total, layers = 0.0, 0
        for (_, _, grid), (summed, count) in self.sums.items():
            spatial = summed[row].transpose(0, 1).reshape(-1, *grid)
            covered = F.adaptive_avg_pool2d(masks[:, None].float(), grid)[:, 0].to(spatial)
            total = total + (spatial * covered).sum((1, 2))
            layers += count
        return total / layers
