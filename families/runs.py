"""The sampling run's lifecycle, the same for every model family: where per-run state (step
counters, device copies of reference tensors, collected maps) is born and where it dies.

Current ComfyUI calls a patched model's ON_PRE_RUN callbacks before each run and its ON_CLEANUP
callbacks after it (also when the run fails). The installable host (comfyui 0.0.1) has neither,
and its sampler hands the patches no schedule: there the hooks ride in the model options
(RUN_HOOKS_KEY) and the pack's own guider calls them around its runs; under the host's KSampler a
run start is told from the sigmas alone (techniques.relevance.StepClock) and nothing marks its
end, so device copies stay until the next run replaces them or the model is freed.
"""
RUN_HOOKS_KEY = "multiref_run_hooks"


class RunHooks:
    """(begin, end) pairs of one patched model, for hosts without lifecycle callbacks. Hosts
    deep-copy model options on clone(): the pairs are kept as they are (they belong to state
    shared across clones), and adding one makes a new RunHooks for the clone alone."""

    def __init__(self, hooks=()):
        self.hooks = tuple(hooks)

    def __deepcopy__(self, memo):
        return self  # immutable: with_hook returns a new one

    def with_hook(self, begin, end):
        return RunHooks(self.hooks + ((begin, end),))

    def begin(self):
        for begin, _ in self.hooks:
            begin()

    def end(self):
        for _, end in self.hooks:
            if end is not None:
                end()


def on_each_run(model, begin, end=None):
    """Call begin() as each sampling run of the clone `model` (and its later clones) starts and
    end() when it is over, through the host's callbacks where it has them, else through the
    pack's guider (run_hooks)."""
    if hasattr(model, "add_callback"):
        from comfy.patcher_extension import CallbacksMP
        model.add_callback(CallbacksMP.ON_PRE_RUN, lambda patcher: begin())
        if end is not None:
            model.add_callback(CallbacksMP.ON_CLEANUP, lambda patcher: end())
        return
    options = model.model_options.setdefault("transformer_options", {})
    options[RUN_HOOKS_KEY] = options.get(RUN_HOOKS_KEY, RunHooks()).with_hook(begin, end)


def run_hooks(model_options):
    """The hooks a sampler of the pack must call itself (hosts without callbacks), or an empty
    RunHooks where the host calls them (or nothing was patched)."""
    return model_options.get("transformer_options", {}).get(RUN_HOOKS_KEY, RunHooks())
