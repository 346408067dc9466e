"""The shipped UI workflows in the real ComfyUI editor: the installable host's bundled web
frontend, served by its own server with the pack in custom_nodes, in headless Chromium.
Each UI file loads with every node known, the editor would save it back unchanged, and the
editor's own API export (app.graphToPrompt) equals the file's API twin."""
import io
import json
import os

import pytest
from PIL import Image

from comfy_server import running_server
from headless import shipped, workflow_format as fmt
from headless_browser import Browser, find_browser

UI_FILES = shipped.ui_files()
NAMES = [shipped.name_of(p) for p in UI_FILES]
# Set to a path to (re)write the README picture of a loaded workflow from the screenshot test.
SCREENSHOT_ENV = "MULTIREF_EDITOR_SCREENSHOT"

# Core-node graph for what the shipped workflows may not use yet: LoadImage's upload button
# (exported as "upload"), a widget input fed by a link (seed, width), a forceInput input linked
# and unlinked, a multiline STRING, a seed control.
EDITOR_PROBE_API = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "reference.png", "upload": "image"}},
    "2": {"class_type": "IntAdd", "inputs": {"value0": 40, "value1": 24, "value2": 0,
                                             "value3": 0, "value4": 0}},
    "3": {"class_type": "EmptyLatentImage", "inputs": {"width": ["2", 0], "height": 64,
                                                       "batch_size": 1}},
    "4": {"class_type": "TextDiffuserPrepareInstructPrompt",
          "inputs": {"text": "a cat\nholding a sign", "text_to_render": "hello"}},
    "5": {"class_type": "PreviewString", "inputs": {"value": ["4", 0]}},
    "6": {"class_type": "PreviewString", "inputs": {}},
    "7": {"class_type": "KSampler", "inputs": {"seed": ["2", 0], "steps": 3, "cfg": 6.5,
                                               "sampler_name": "euler", "scheduler": "normal",
                                               "latent_image": ["3", 0], "denoise": 0.75}},
}

# Core nodes whose widgets a frontend extension replaces (webcamCapture.js: a live camera view);
# no workflow of the pack uses them.
EDITOR_REDRAWN = {"WebcamCapture"}

LOAD_JS = """(async (workflow) => {
  app.ui.dialog.close();
  await app.loadGraphData(workflow);
  const saved = app.graph.serialize();
  return {
    nodes: app.graph._nodes.map(n => ({id: n.id, type: n.type, comfyClass: n.comfyClass || null,
                                       registered: n.type in LiteGraph.registered_node_types})),
    saved: saved.nodes.map(n => ({id: n.id, widgets_values: n.widgets_values || [],
      inputs: (n.inputs || []).map(i => [i.name, i.link ?? null, i.widget?.name ?? null])})),
    dialog: app.ui.dialog.element.style.display === "none" ? null
            : app.ui.dialog.textElement.innerText,
    output: (await app.graphToPrompt()).output,
  };
})(%s)"""

LAYOUT_JS = """((types) => Object.fromEntries(types.map(type => {
  const node = LiteGraph.createNode(type);
  return [type, {
    widgets: (node.widgets || []).map(w => [w.name, w.options?.serialize !== false]),
    inputs: (node.inputs || []).map(i => [i.name, i.widget?.name ?? null]),
  }];
})))(%s)"""


@pytest.fixture(scope="module")
def host_nodes(host):
    return host.nodes


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
    executable = find_browser()
    if executable is None:
        reason = ("no chromium on PATH: the editor tests drive a headless Chromium "
                  "(install it with `bash .ci/install-browser.sh`)")
        if os.environ.get("CI"):  # CI installs it: a skip there would hide a broken install
            pytest.fail(reason)
        pytest.skip(reason)
    with running_server(tmp_path_factory.mktemp("editor_server")) as url:
        browser = Browser(executable)
        try:
            browser.call("Emulation.setDeviceMetricsOverride", session=True, width=1600,
                         height=900, deviceScaleFactor=1, mobile=False)
            browser.open(url)
            browser.wait_for("!!window.app", timeout=90)  # set once app.setup() has finished
            yield browser
        finally:
            browser.close()


def _load(editor, ui):
    editor.evaluate("0")  # receives the events still under way, then forget them:
    editor.events.clear()  # page_errors() reports this load only
    return editor.evaluate(LOAD_JS % json.dumps(ui))


def _assert_loads_as_saved(loaded, ui):
    assert loaded["dialog"] is None, f"the editor showed a dialog: {loaded['dialog']}"
    expected = sorted((n["id"], n["type"]) for n in ui["nodes"])
    assert sorted((n["id"], n["type"]) for n in loaded["nodes"]) == expected
    for node in loaded["nodes"]:  # a missing type would load as a bare placeholder node
        assert node["registered"] and node["comfyClass"] == node["type"], node
    # What the editor would save back: the same widget values and input sockets.
    saved = {n["id"]: n for n in loaded["saved"]}
    for node in ui["nodes"]:
        assert saved[node["id"]]["widgets_values"] == node["widgets_values"], node["type"]
        sockets = [[i["name"], i["link"], i.get("widget", {}).get("name")] for i in node["inputs"]]
        assert saved[node["id"]]["inputs"] == sockets, node["type"]


@pytest.mark.parametrize("ui_path", UI_FILES, ids=NAMES)
def test_ui_workflow_loads_and_exports_its_api_twin(editor, ui_path):
    ui = fmt.load(ui_path)
    loaded = _load(editor, ui)
    _assert_loads_as_saved(loaded, ui)
    # Python's == treats 5 and 5.0 alike, as JSON (and the editor) do.
    assert loaded["output"] == fmt.load(shipped.api_path(shipped.name_of(ui_path)))
    assert editor.page_errors() == []


def test_uploads_converted_and_forced_inputs_round_trip_through_the_editor(editor, host_nodes):
    ui = fmt.api_to_ui(EDITOR_PROBE_API, host_nodes)
    loaded = _load(editor, ui)
    _assert_loads_as_saved(loaded, ui)
    assert loaded["output"] == EDITOR_PROBE_API
    assert fmt.ui_to_api(ui, host_nodes) == EDITOR_PROBE_API


def test_a_missing_node_type_is_caught(editor, host_nodes):
    """The check above fails when the editor does not know a node (proof it can fail)."""
    ui = fmt.api_to_ui(EDITOR_PROBE_API, host_nodes)
    ui["nodes"][0]["type"] = "MultiRefNoSuchNode"
    loaded = _load(editor, ui)
    assert "MultiRefNoSuchNode" in (loaded["dialog"] or "")
    with pytest.raises(AssertionError):
        _assert_loads_as_saved(loaded, ui)


def test_editor_widget_layout_matches_the_format_module(editor, host_nodes):
    """Every node type the editor knows (the pack's, those the shipped workflows use, all of
    the host's) gets exactly the widgets and sockets that headless/workflow_format.py assumes
    when it writes and reads UI files."""
    pack = {name for name, cls in host_nodes.items()
            if str(getattr(cls, "CATEGORY", "")).startswith("MultiRef")}
    used = {n["type"] for path in UI_FILES for n in fmt.load(path)["nodes"]}
    probe = {n["class_type"] for n in EDITOR_PROBE_API.values()}
    registered = set(editor.evaluate("Object.keys(LiteGraph.registered_node_types)"))
    assert pack, "the host registered no MultiRef nodes"
    assert pack | used | probe <= registered, sorted((pack | used | probe) - registered)
    types = sorted(registered & set(host_nodes) - EDITOR_REDRAWN)
    layouts = editor.evaluate(LAYOUT_JS % json.dumps(types))
    for name in types:
        widgets = fmt.editor_widgets(host_nodes[name])
        expected_widgets = [[w.name, w.role in (fmt.INPUT, fmt.UPLOAD)] for w in widgets]
        expected_inputs = [[socket, None] for socket, _ in fmt.editor_sockets(host_nodes[name])]
        expected_inputs += [[w.name, w.name] for w in widgets if w.converted]
        assert layouts[name] == {"widgets": expected_widgets, "inputs": expected_inputs}, name


# LiteGraph draws no text below this zoom (litegraph.core.js: `low_quality = scale < 0.6`).
SCREENSHOT_SCALE = 0.7
SCREENSHOT_MARGIN = 30

FIT_VIEW_JS = """((scale, margin) => {
  const nodes = app.graph._nodes, title = LiteGraph.NODE_TITLE_HEIGHT;
  const left = Math.min(...nodes.map(n => n.pos[0]));
  const top = Math.min(...nodes.map(n => n.pos[1] - title));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [margin / scale - left, margin / scale - top];
  app.canvas.draw(true, true);
  return [Math.max(...nodes.map(n => n.pos[0] + n.size[0])) - left,
          Math.max(...nodes.map(n => n.pos[1] + n.size[1])) - top];
})(%s, %s)"""


def test_screenshot_of_a_loaded_workflow(editor, host_nodes):
    """The workflow with the most MultiRef nodes, drawn whole and readable: the page is sized
    to the graph at a zoom where the editor still draws text."""
    def pack_nodes(path):
        return sum(str(getattr(host_nodes[n["type"]], "CATEGORY", "")).startswith("MultiRef")
                   for n in fmt.load(path)["nodes"])

    ui_path = max(UI_FILES, key=pack_nodes)
    _assert_loads_as_saved(_load(editor, fmt.load(ui_path)), fmt.load(ui_path))
    editor.evaluate('document.querySelector(".comfy-menu").style.display = "none"')
    graph_w, graph_h = editor.evaluate(FIT_VIEW_JS % (SCREENSHOT_SCALE, SCREENSHOT_MARGIN))
    width, height = (round(extent * SCREENSHOT_SCALE) + 2 * SCREENSHOT_MARGIN
                     for extent in (graph_w, graph_h))
    try:
        editor.call("Emulation.setDeviceMetricsOverride", session=True, width=width,
                    height=height, deviceScaleFactor=1, mobile=False)
        editor.wait_for(f"app.canvasEl.width === {width} && app.canvasEl.height === {height}",
                        timeout=10)  # the editor resizes its canvas on the window's resize
        editor.evaluate(FIT_VIEW_JS % (SCREENSHOT_SCALE, SCREENSHOT_MARGIN))
        png = editor.screenshot_png()
    finally:
        editor.call("Emulation.setDeviceMetricsOverride", session=True, width=1600,
                    height=900, deviceScaleFactor=1, mobile=False)
        editor.evaluate('document.querySelector(".comfy-menu").style.display = ""')
    image = Image.open(io.BytesIO(png)).convert("L")
    assert image.size == (width, height)
    # A drawn graph has node bodies, text and links: many distinct grey levels, not a blank page.
    assert len(image.getcolors(256)) > 50
    target = os.environ.get(SCREENSHOT_ENV)
    if target:
        with open(target + ".tmp", "wb") as f:
            f.write(png)
        os.replace(target + ".tmp", target)
