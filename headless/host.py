"""Boot a ComfyUI host in this process, load the pack through the host's own custom-node
loader, and execute API-format prompts with the host's executor.

Two hosts are supported:
  * an existing ComfyUI checkout (a folder with main.py, nodes.py, comfy/): what users run;
  * the installable ComfyUI package (`pip install --no-deps comfyui==0.0.1`, module `comfy`),
    which any fresh machine can have and the test suite uses.

This module deliberately imports nothing from the pack: the pack is loaded by the host, exactly
as ComfyUI loads it from `custom_nodes/`. It is used by `run.py` and by the tests.
"""
import asyncio
import atexit
import contextlib
import inspect
import logging
import os
import shutil
import sys
import tempfile
import uuid

from . import graph_check, model_files

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_FOLDER_NAME = "ComfyUI-MultiRef"
log = logging.getLogger("multiref.headless")


class HostError(RuntimeError):
    """A host could not be booted or a prompt could not run; the message says what to do."""


class ProgressPrinter:
    """The executor's `server`: receives progress and execution events, prints a progress line."""

    def __init__(self, stream=None, quiet=False, labels=None):
        self.client_id = str(uuid.uuid4())
        self.labels = labels or {}  # node id -> what the progress line calls it
        self.last_node_id = None
        self.last_prompt_id = None
        self.receive_all_progress_notifications = True
        self.sockets_metadata = {}  # no websocket clients: previews use the plain event
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.events = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))
        if self.quiet or not isinstance(data, dict):
            return
        if event == "executing" and data.get("node") is not None:
            self.last_node_id = data["node"]
            label = self.labels.get(str(data["node"]), "")
            print(f"  running node {data['node']} {label}".rstrip(), file=self.stream, flush=True)
        elif event == "progress":
            value, total = data.get("value", 0), data.get("max", 0) or 1
            filled = int(20 * value / total)
            print(f"\r    [{'#' * filled}{'.' * (20 - filled)}] {value}/{total}",
                  end="\n" if value >= total else "", file=self.stream, flush=True)

    def send_progress_text(self, *args, **kwargs):
        pass

    def executed_nodes(self):
        """Ids of the nodes the executor ran, in order."""
        ran = [str(data["node"]) for event, data in self.events
               if event == "executing" and isinstance(data, dict) and data.get("node") is not None]
        return list(dict.fromkeys(ran))

    def queue_updated(self):
        pass


def _boot_argv(extra):
    """The host parses sys.argv when imported: hand it only the options we mean."""
    import torch
    argv = [sys.argv[0] if sys.argv else "comfyui"]
    if not torch.cuda.is_available():
        argv.append("--cpu")
    return argv + list(extra)


class Host:
    def __init__(self, kind, version, nodes, display_names, folder_paths, run_prompt):
        self.kind = kind
        self.version = version
        self.nodes = nodes
        self.display_names = display_names
        self.folder_paths = folder_paths
        self._run_prompt = run_prompt

    # The temporary work folder boot() made (removed at exit), or None for one it was given.
    scratch = None

    def __repr__(self):
        return f"<ComfyUI host: {self.kind} {self.version}>"

    def execute(self, prompt, progress=None):
        """Run an API-format prompt; returns {node_id: ui_output}. Raises HostError on failure;
        a broken graph (unknown node type, bad link, missing input) before anything runs."""
        check_api_format(prompt)
        try:
            graph_check.check_graph(prompt, self.nodes)
        except graph_check.GraphError as exc:
            raise HostError(str(exc)) from None
        return self._run_prompt(prompt, progress or ProgressPrinter(quiet=True))

    def missing_files(self, prompt):
        """Every model file and input picture the prompt names that is not installed."""
        return model_files.missing_files(prompt, self.folder_paths)

    def is_pack_node(self, class_type):
        """True for the node types this pack registered: those of the pack's NODE_CLASS_MAPPINGS
        (not by file path: a virtual environment inside the pack's folder holds the host's own
        nodes)."""
        pack = sys.modules.get(PACK_FOLDER_NAME)  # both hosts: see _name_pack_by_folder
        mappings = getattr(pack, "NODE_CLASS_MAPPINGS", {})
        return class_type in mappings and mappings[class_type] is self.nodes.get(class_type)


def check_api_format(prompt):
    """A UI-format file (what the editor saves) has `nodes` and `links` lists; the executor
    needs the API format: {id: {"class_type": ..., "inputs": {...}}}."""
    if isinstance(prompt, dict) and "nodes" in prompt and "links" in prompt:
        raise HostError("this is a UI-format workflow (editor save file); the headless runner "
                        "needs the API format: in ComfyUI use 'Export (API)' / 'Save (API Format)' "
                        "and pass that file, or use the *_api.json twin in api_workflows/")
    if isinstance(prompt, dict) and "prompt" in prompt and isinstance(prompt["prompt"], dict):
        raise HostError("this file wraps the workflow in a {'prompt': ...} request body; pass the "
                        "inner API-format workflow (the value of 'prompt')")
    if not isinstance(prompt, dict) or not prompt or not all(
            isinstance(v, dict) and "class_type" in v for v in prompt.values()):
        raise HostError("not an API-format workflow: expected a JSON object mapping node ids to "
                        "{'class_type': ..., 'inputs': {...}}")


def _custom_nodes_dir(workdir):
    """A custom_nodes folder holding only this pack (a link under its published folder name)."""
    folder = os.path.join(workdir, "custom_nodes")
    os.makedirs(folder, exist_ok=True)
    link = os.path.join(folder, PACK_FOLDER_NAME)
    if os.path.islink(link) and os.path.realpath(link) != os.path.realpath(PACK_ROOT):
        os.remove(link)  # a workdir kept from another copy of the pack (moved, or a dangling link)
    if not os.path.lexists(link):
        os.symlink(PACK_ROOT, link, target_is_directory=True)
    return folder


def boot(comfyui_path=None, workdir=None, output_dir=None):
    """Boot a host once per process. comfyui_path: a ComfyUI checkout, else the installed
    package. workdir: where models/, input/ and output/ live (a temp folder by default)."""
    global _BOOTED
    if _BOOTED is not None:
        return _BOOTED
    scratch = workdir is None
    if scratch:
        workdir = tempfile.mkdtemp(prefix="multiref_host_")
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    # Loading the host's nodes imports torch._inductor, which makes its cache folder in the
    # system temp folder; a run leaves nothing there, so unless the user chose one it lives
    # in the workdir.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(workdir, "torchinductor"))
    custom_nodes = _custom_nodes_dir(workdir)
    # Our own folder must not be importable as top-level: the pack has a `nodes` package and
    # ComfyUI has a top-level `nodes` module.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != PACK_ROOT]
    if comfyui_path:
        _BOOTED = _boot_checkout(os.path.abspath(comfyui_path), workdir, custom_nodes, output_dir)
        _name_pack_by_folder()
    else:
        _BOOTED = _boot_installable(workdir, custom_nodes, output_dir)
    _BOOTED.scratch = workdir if scratch else None
    return _BOOTED


_BOOTED = None


def _boot_installable(workdir, custom_nodes, output_dir):
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    try:
        sys.argv = _boot_argv(["--cwd", workdir])
        os.chdir(workdir)
        try:
            import comfy.options
        except ImportError as exc:
            raise HostError("no ComfyUI found: pass --comfyui PATH (a ComfyUI checkout) or install "
                            "the test host with `bash .ci/install-host.sh .venv`") from exc
        comfy.options.enable_args_parsing()
        from comfy.cmd import folder_paths
        from comfy.cmd.execution import PromptExecutor, validate_prompt
        from comfy.nodes.package import import_all_nodes_in_workspace
        folder_paths.add_model_folder_path("custom_nodes", custom_nodes)
        if output_dir:
            folder_paths.set_output_directory(os.path.abspath(output_dir))
        exported = import_all_nodes_in_workspace(vanilla_custom_nodes=True)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)

    def run_prompt(prompt, progress):
        valid, error, outputs, node_errors = validate_prompt(prompt)
        if not valid:
            raise HostError(_format_validation(error, node_errors, folder_paths))
        executor = PromptExecutor(progress)
        executor.execute(prompt, str(uuid.uuid4()), {"client_id": progress.client_id}, outputs)
        if not executor.success:
            raise HostError(_format_failure(executor.status_messages))
        return executor.outputs_ui

    return Host("installable comfyui", _dist_version("comfyui"), exported.NODE_CLASS_MAPPINGS,
                exported.NODE_DISPLAY_NAME_MAPPINGS, folder_paths, run_prompt)


def _boot_checkout(path, workdir, custom_nodes, output_dir):
    """Boot a ComfyUI checkout the way its main.py does, minus the web server: the user's
    models/, input/ and custom_nodes/ (plus this pack), outputs to output_dir (or the workdir)."""
    if not os.path.isfile(os.path.join(path, "nodes.py")) or not os.path.isdir(
            os.path.join(path, "comfy")):
        raise HostError(f"--comfyui {path}: not a ComfyUI checkout (expected nodes.py and comfy/ "
                        "inside); point it at the folder that holds ComfyUI's main.py")
    sys.path.insert(0, path)
    output_dir = os.path.abspath(output_dir or os.path.join(workdir, "output"))
    saved_argv = sys.argv
    try:
        sys.argv = _boot_argv(["--output-directory", output_dir,
                               "--temp-directory", os.path.join(workdir, "temp")])
        import comfy
        # A checkout's comfy/ has no __init__.py: an installed `comfy` package (the installable
        # host) wins over it whatever sys.path says.
        if os.path.realpath(os.path.join(path, "comfy")) not in map(os.path.realpath, comfy.__path__):
            raise HostError(f"--comfyui {path}: this Python has the installable comfyui package, "
                            "which hides the checkout's comfy/; run with the Python of that "
                            "ComfyUI's own environment")
        import comfy.options
        comfy.options.enable_args_parsing()
        # main.py imports the checkout's `utils` package before `nodes` puts comfy/ (which has
        # a utils.py) on sys.path; built-in nodes that import the server need the package.
        if os.path.isfile(os.path.join(path, "utils", "__init__.py")):
            import utils  # noqa: F401
        import folder_paths
        folder_paths.set_output_directory(output_dir)
        folder_paths.set_temp_directory(os.path.join(workdir, "temp"))
        _load_extra_model_paths(path)
        if not _pack_already_in(folder_paths.get_folder_paths("custom_nodes")):
            folder_paths.add_model_folder_path("custom_nodes", custom_nodes)
        import execution
        import nodes
        _init_nodes(nodes)
    except ImportError as exc:
        raise HostError(f"--comfyui {path}: a module it needs is missing ({exc}); install that "
                        "ComfyUI's requirements.txt into this Python") from exc
    finally:
        sys.argv = saved_argv
    _install_progress_hook()

    def run_prompt(prompt, progress):
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = _run_maybe_async(
            _call_by_name(execution.validate_prompt, prompt_id=prompt_id, prompt=prompt,
                          partial_execution_list=None))[:4]
        if not valid:
            raise HostError(_format_validation(error, node_errors, folder_paths))
        executor = execution.PromptExecutor(progress)
        _CURRENT_PROGRESS[0] = progress
        try:
            executor.execute(prompt, prompt_id, {"client_id": progress.client_id}, outputs)
        finally:
            _CURRENT_PROGRESS[0] = None
        if not executor.success:
            raise HostError(_format_failure(executor.status_messages))
        return executor.history_result["outputs"] if hasattr(executor, "history_result") \
            else executor.outputs_ui

    version = "unknown"
    try:
        import comfyui_version
        version = comfyui_version.__version__
    except ImportError:
        pass
    return Host("ComfyUI checkout", version, nodes.NODE_CLASS_MAPPINGS,
                nodes.NODE_DISPLAY_NAME_MAPPINGS, folder_paths, run_prompt)


def _init_nodes(nodes):
    """Built-in extra nodes and custom nodes, without the API nodes (they call web services).
    Like main.py, undo any host function a custom node replaced while loading."""
    try:
        import hook_breaker_ac10a0 as hook_breaker
    except ImportError:
        hook_breaker = None
    if hook_breaker:
        hook_breaker.save_functions()
    try:
        return _run_maybe_async(_call_by_name(nodes.init_extra_nodes, init_custom_nodes=True,
                                              init_api_nodes=False))
    finally:
        if hook_breaker:
            hook_breaker.restore_functions()


def _call_by_name(function, **candidates):
    """Call a host function with the arguments its version declares (names are stable across
    versions, positions and counts are not)."""
    params = inspect.signature(function).parameters
    return function(**{k: v for k, v in candidates.items() if k in params})


def _run_maybe_async(result):
    """Recent hosts made loading and validation coroutines; older ones return plain values."""
    return asyncio.run(result) if asyncio.iscoroutine(result) else result


def _load_extra_model_paths(path):
    """The checkout's extra_model_paths.yaml, as its main.py applies it."""
    config = os.path.join(path, "extra_model_paths.yaml")
    if not os.path.isfile(config):
        return
    try:
        from utils.extra_config import load_extra_path_config
    except ImportError:  # before 2025 the loader lived in main.py, which starts the server
        log.warning("%s is not applied with this ComfyUI version; use --models DIR", config)
        return
    load_extra_path_config(config)


def _pack_already_in(custom_node_folders):
    """True when this very folder is already installed in one of the host's custom_nodes."""
    for folder in custom_node_folders:
        if os.path.isdir(folder) and any(
                os.path.realpath(os.path.join(folder, entry)) == os.path.realpath(PACK_ROOT)
                for entry in os.listdir(folder)):
            return True
    return False


def _name_pack_by_folder():
    """A checkout registers the pack in sys.modules under its full path (dots replaced); the
    installable host under its folder name. Give the modules the checkout loaded the folder
    name too, so tests and tools address the pack one way (the same module objects)."""
    init = os.path.realpath(os.path.join(PACK_ROOT, "__init__.py"))
    loaded = [name for name, module in list(sys.modules.items())
              if os.path.realpath(getattr(module, "__file__", None) or "-") == init
              and hasattr(module, "NODE_CLASS_MAPPINGS")]
    if not loaded:
        raise HostError("ComfyUI did not load this pack: its warning in the host's messages "
                        "names the import error (a missing module: install requirements.txt "
                        "into ComfyUI's Python)")
    for name, module in list(sys.modules.items()):
        if name == loaded[0] or name.startswith(loaded[0] + "."):
            sys.modules.setdefault(PACK_FOLDER_NAME + name[len(loaded[0]):], module)


_CURRENT_PROGRESS = [None]


def _install_progress_hook():
    """Current ComfyUI reports ProgressBar updates through a global hook that its main.py sets
    for its server; the headless host sets it for the ProgressPrinter of the running prompt.
    The host calls it with (value, total, preview) and, since 2025, prompt_id and node_id."""
    import comfy.model_management
    import comfy.utils
    try:
        from comfy_execution.progress import get_progress_state
    except ImportError:
        get_progress_state = None

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        comfy.model_management.throw_exception_if_processing_interrupted()
        printer = _CURRENT_PROGRESS[0]
        if printer is None:
            return
        node_id = node_id or printer.last_node_id
        if get_progress_state is not None and node_id is not None:
            get_progress_state().update_progress(node_id, value, total, preview_image)
        printer.send_sync("progress", {"value": value, "max": total, "node": node_id,
                                       "prompt_id": prompt_id or printer.last_prompt_id})

    comfy.utils.set_progress_bar_global_hook(hook)


def _dist_version(name):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _format_validation(error, node_errors, folder_paths):
    lines = []
    for node_id, info in (node_errors or {}).items():
        for err in info.get("errors", []):
            where = f"node {node_id} ({info.get('class_type')})"
            extra = err.get("extra_info") or {}
            name = extra.get("input_name")
            missing = model_files.missing_files(
                {node_id: {"class_type": info.get("class_type"),
                           "inputs": {name: extra.get("received_value")}}}, folder_paths,
                pictures=False) if err.get("type") == "value_not_in_list" else []
            if missing:
                lines.append(f"{where}: model file '{missing[0].file_name}' for input {name} is "
                             f"not installed; put it in {missing[0].folders[0]} (see "
                             f"{model_files.README_SECTION}) or pass --models DIR")
            else:
                lines.append(f"{where}: {err.get('details') or err.get('message')}")
    if not lines:
        lines.append(error.get("message", "invalid prompt") if isinstance(error, dict) else str(error))
    return "; ".join(lines)


def _format_failure(status_messages):
    for event, data in status_messages:
        if event == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type', '').split('.')[-1]}: "
                    f"{str(data.get('exception_message', '')).strip()}")
        if event == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')}"
    return "the prompt did not run (no error was reported by the host)"


@contextlib.contextmanager
def host_output_to(log_path):
    """Send everything the host writes to stdout and stderr (its start-up report, import
    warnings and tracebacks of optional modules, library warnings, its own progress bars) to
    log_path, at the file-descriptor level so that output from C code and from loggers bound
    to the streams is caught too. Yields text streams (stdout, stderr) on the real ones, for
    what the user should see."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = tuple(os.fdopen(os.dup(saved[fd]), "w", buffering=1) for fd in (1, 2))
    try:
        with open(log_path, "a") as log:
            for fd in (1, 2):
                os.dup2(log.fileno(), fd)
            # Python-level writes too, where sys.stdout/sys.stderr are not the descriptors
            # (a caller that captures them)
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    yield terminal
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                for fd, copy in saved.items():
                    os.dup2(copy, fd)
    finally:
        for stream in terminal:
            stream.close()
        for copy in saved.values():
            os.close(copy)
