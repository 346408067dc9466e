"""The pack's layers point one way (docs/ARCHITECTURE.md, "Layers"): every import of every module,
lazy ones inside functions included, read from the source; an import that points up a layer,
from training/ into nodes/, or that closes a cycle fails the test."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIPPED = {"tests", ".venv", ".git", ".ci", "docs", "example_workflows", "api_workflows"}

# Lower numbers are lower layers; a module may import its own layer and the ones below.
LAYERS = (
    ("data", 0, ("kernels", "headless.model_files", "headless.shipped")),
    ("techniques", 1, ("techniques",)),
    ("families", 2, ("families",)),
    ("nodes and training", 3, ("nodes", "training")),
    ("entry points", 4, ("headless", "bench", "run", "__init__", "training.__main__")),
)
# Same layer, one direction only: the trainer node uses the trainer, never the reverse.
FORBIDDEN = (("training", "nodes"),)
# Below the host: no ComfyUI import at all (math and stdlib data tables).
HOST_FREE = ("kernels", "headless.model_files", "headless.shipped", "techniques")


def pack_modules():
    """{dotted module name: file path} of every Python file of the pack (tests and docs aside)."""
    found = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED and not d.startswith(".")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__" and len(parts) > 1:
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def imports_of(name, path, modules):
    """(pack modules, external top-level names) that the file imports anywhere in it."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    package = "" if name == "__init__" else package  # the pack's own root
    inside, outside = set(), set()

    def resolve(target):
        """The pack module a dotted name means: itself, or its nearest enclosing module."""
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found = resolve(alias.name)
                (inside.add(found) if found else outside.add(alias.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                found = resolve(f"{source}.{alias.name}" if source else alias.name)
                if found:
                    inside.add(found)
                elif source:
                    outside.add(source.split(".")[0])
    inside.discard(name)
    return inside, outside


def layer_of(name):
    best = None
    for title, level, prefixes in LAYERS:
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[2]):
                    best = (title, level, prefix)
    return best


def top(name):
    return name.split(".")[0]


@pytest.fixture(scope="module")
def graph():
    modules = pack_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    assert [name for name in graph if layer_of(name) is None] == []


def test_imports_point_down(graph):
    wrong = []
    for name, (inside, outside) in sorted(graph.items()):
        title, level, _ = layer_of(name)
        for target in sorted(inside):
            target_title, target_level, _ = layer_of(target)
            if target_level > level:
                wrong.append(f"{name} ({title}) imports {target} ({target_title}), a higher layer")
            if (top(name), top(target)) in FORBIDDEN:
                wrong.append(f"{name} imports {target}: {top(name)}/ never imports {top(target)}/")
        if any(name == p or name.startswith(p + ".") for p in HOST_FREE) and "comfy" in outside:
            wrong.append(f"{name} imports ComfyUI; its layer is host-free")
    assert wrong == []


def test_no_import_cycle(graph):
    """Depth-first search over the pack's import graph; a back edge is a cycle."""
    state, stack, cycles = {}, [], []

    def visit(name):
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name][0]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []


def test_the_reader_sees_real_imports():
    """The reader resolves relative, lazy and `from package import module` imports (a test of
    the test: a reader that saw nothing would pass every rule above)."""
    modules = pack_modules()
    inside, outside = imports_of("training.dataset", modules["training.dataset"], modules)
    assert {"kernels.msa", "families.text", "families.vision"} <= inside
    inside, outside = imports_of("nodes", modules["nodes"], modules)
    assert {"nodes.msa", "nodes.routing", "nodes.training"} <= inside
    assert "comfy" in imports_of("families.vision", modules["families.vision"], modules)[1]
    assert "nodes" in imports_of("__init__", modules["__init__"], modules)[0]
