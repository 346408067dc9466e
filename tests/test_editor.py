"""The shipped UI workflows in the real ComfyUI editor, served by the session host's own server
with the pack in custom_nodes, in headless Chromium: the installable host's bundled 2024
frontend, or on a ComfyUI checkout (the current-ComfyUI tier) the comfyui-frontend-package that
its requirements.txt pins (1.27.10 for 0.3.64). Each UI file loads with every node known, the
editor would save it back with the same values and links, and the editor's own API export
(app.graphToPrompt) equals the file's API twin, up to what the current editor adds or drops
(`current_editor_export`)."""
import io
import json
import os
import urllib.request

import pytest
from PIL import Image

from comfy_server import running_server
from conftest import HOST, headless_host
from headless import shipped, workflow_format as fmt
from headless_browser import Browser, find_browser

UI_FILES = shipped.ui_files()
NAMES = [shipped.name_of(p) for p in UI_FILES]
# The UI files this host's editor can open (the Flux ones need a current ComfyUI's nodes).
OPENABLE_UI_FILES = [p for p in UI_FILES if HOST.kind != "installable comfyui"
                     or not shipped.needs_current_host(shipped.name_of(p))]


def skip_unless_openable(ui_path):
    if ui_path not in OPENABLE_UI_FILES:
        pytest.skip(shipped.needs_current_host(shipped.name_of(ui_path)))
# Set to a path to (re)write the README picture of a loaded workflow from the screenshot test.
SCREENSHOT_ENV = "MULTIREF_EDITOR_SCREENSHOT"

# Core-node graphs for what the shipped workflows may not use yet: LoadImage's upload button, a
# widget input fed by a link (seed, width), a multiline STRING, a seed control, and (2024
# editor) a forceInput input linked and unlinked. One per editor: the hosts' core nodes differ.
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
CURRENT_EDITOR_PROBE_API = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "reference.png", "upload": "image"}},
    "2": {"class_type": "PrimitiveInt", "inputs": {"value": 64}},
    "3": {"class_type": "EmptyLatentImage", "inputs": {"width": ["2", 0], "height": 64,
                                                       "batch_size": 1}},
    "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat\nholding a sign"}},
    "7": {"class_type": "KSampler", "inputs": {"seed": ["2", 0], "steps": 3, "cfg": 6.5,
                                               "sampler_name": "euler", "scheduler": "normal",
                                               "latent_image": ["3", 0], "denoise": 0.75}},
}

# The checkout's pinned frontend (1.27) rather than the installable host's 2024 one.
CURRENT_EDITOR = HOST.kind == "ComfyUI checkout"


def current_editor_export(api, display_names):
    """What the current editor's Export (API) gives for a graph whose 2024 export is `api`: it
    adds each node's title as `_meta.title` and leaves out Load Image's upload button
    ("upload": "image"), which the 2024 editor exported as an input."""
    return {node_id: {"class_type": node["class_type"],
                      "inputs": {k: v for k, v in node["inputs"].items() if k != "upload"},
                      "_meta": {"title": display_names.get(node["class_type"], node["class_type"])}}
            for node_id, node in api.items()}


def probe_api():
    return CURRENT_EDITOR_PROBE_API if CURRENT_EDITOR else EDITOR_PROBE_API


def expected_export(api, host):
    return current_editor_export(api, host.display_names) if CURRENT_EDITOR else api


def expected_sockets(ui_node, node_class):
    """The input sockets the editor saves for a UI node: the file's own; the current editor adds
    one unlinked socket per exported widget that has none (its widget inputs), in widget order."""
    sockets = [[i["name"], i["link"], i.get("widget", {}).get("name")] for i in ui_node["inputs"]]
    if CURRENT_EDITOR:
        have = {socket[0] for socket in sockets}
        sockets += [[w.name, None, w.name] for w in fmt.editor_widgets(node_class)
                    if w.role in (fmt.INPUT, fmt.UPLOAD) and w.name not in have]
    return sockets


# Core nodes whose widgets a frontend extension replaces (webcamCapture.js: a live camera view);
# no workflow of the pack uses them.
EDITOR_REDRAWN = {"WebcamCapture"}

# Dialogs: the 2024 editor's one (app.ui.dialog) and the current editor's (PrimeVue .p-dialog,
# e.g. its missing-nodes dialog); each load starts with none open.
DIALOG_JS = """(() => {
  const legacy = app.ui.dialog.element.style.display === "none" ? null
                 : app.ui.dialog.textElement.innerText;
  const current = [...document.querySelectorAll(".p-dialog")].map(d => d.innerText).join("\\n");
  return legacy || current || null;
})()"""

LOAD_JS = """(async (workflow) => {
  app.ui.dialog.close();
  document.querySelectorAll(".p-dialog-close-button").forEach(b => b.click());
  await app.loadGraphData(workflow);
  await new Promise(r => setTimeout(r, 50));  // the current editor opens its dialogs a tick later
  const saved = app.graph.serialize();
  return {
    nodes: app.graph._nodes.map(n => ({id: n.id, type: n.type, comfyClass: n.comfyClass || null,
                                       registered: n.type in LiteGraph.registered_node_types})),
    saved: saved.nodes.map(n => ({id: n.id, widgets_values: n.widgets_values || [],
      inputs: (n.inputs || []).map(i => [i.name, i.link ?? null, i.widget?.name ?? null])})),
    dialog: %s,
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
    workdir = tmp_path_factory.mktemp("editor_server")
    # The current editor opens its template browser on a first visit; a user who has been
    # there before (this setting, kept in the server's user folder) starts on an empty graph.
    settings = workdir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    with running_server(workdir) as url:
        browser = Browser(executable)
        try:
            browser.call("Emulation.setDeviceMetricsOverride", session=True, width=1600,
                         height=900, deviceScaleFactor=1, mobile=False)
            browser.open(url)
            browser.wait_for("!!window.app", timeout=90)  # set once app.setup() has finished
            browser.server_url = url
            yield browser
        finally:
            browser.close()


def _load(editor, ui):
    editor.evaluate("0")  # receives the events still under way, then forget them:
    editor.events.clear()  # page_errors() reports this load only
    return editor.evaluate(LOAD_JS % (DIALOG_JS, json.dumps(ui)))


def _assert_loads_as_saved(loaded, ui, host_nodes):
    assert loaded["dialog"] is None, f"the editor showed a dialog: {loaded['dialog']}"
    expected = sorted((n["id"], n["type"]) for n in ui["nodes"])
    assert sorted((n["id"], n["type"]) for n in loaded["nodes"]) == expected
    for node in loaded["nodes"]:  # a missing type would load as a bare placeholder node
        assert node["registered"] and node["comfyClass"] == node["type"], node
    # What the editor would save back: the same widget values and input sockets.
    saved = {n["id"]: n for n in loaded["saved"]}
    for node in ui["nodes"]:
        assert saved[node["id"]]["widgets_values"] == node["widgets_values"], node["type"]
        sockets = expected_sockets(node, host_nodes[node["type"]])
        assert saved[node["id"]]["inputs"] == sockets, node["type"]


@pytest.mark.parametrize("ui_path", UI_FILES, ids=NAMES)
def test_ui_workflow_loads_and_exports_its_api_twin(editor, host, ui_path):
    skip_unless_openable(ui_path)
    ui = fmt.load(ui_path)
    loaded = _load(editor, ui)
    _assert_loads_as_saved(loaded, ui, host.nodes)
    # Python's == treats 5 and 5.0 alike, as JSON (and the editor) do.
    api = fmt.load(shipped.api_path(shipped.name_of(ui_path)))
    assert loaded["output"] == expected_export(api, host)
    assert editor.page_errors() == []


def test_uploads_converted_and_forced_inputs_round_trip_through_the_editor(editor, host, host_nodes):
    ui = fmt.api_to_ui(probe_api(), host_nodes)
    loaded = _load(editor, ui)
    _assert_loads_as_saved(loaded, ui, host_nodes)
    assert loaded["output"] == expected_export(probe_api(), host)
    assert fmt.ui_to_api(ui, host_nodes) == probe_api()


def test_a_missing_node_type_is_caught(editor, host_nodes):
    """The check above fails when the editor does not know a node (proof it can fail)."""
    ui = fmt.api_to_ui(probe_api(), host_nodes)
    ui["nodes"][0]["type"] = "MultiRefNoSuchNode"
    loaded = _load(editor, ui)
    assert "MultiRefNoSuchNode" in (loaded["dialog"] or "")
    with pytest.raises(AssertionError):
        _assert_loads_as_saved(loaded, ui, host_nodes)


def test_editor_widget_layout_matches_the_format_module(editor, host_nodes):
    """Every node type the editor knows (the pack's, those the shipped workflows use, all of
    the host's) gets exactly the widgets and sockets that headless/workflow_format.py assumes
    when it writes and reads UI files. The current editor differs in three ways the UI files
    survive: one widget input socket per exported widget, no widget for a forceInput input
    (only its socket), and an upload button that is not exported; its check covers the
    pack's nodes and those the shipped workflows use (UI files of other nodes are not ours)."""
    pack = {name for name, cls in host_nodes.items()
            if str(getattr(cls, "CATEGORY", "")).startswith("MultiRef")}
    used = {n["type"] for path in OPENABLE_UI_FILES for n in fmt.load(path)["nodes"]}
    probe = {n["class_type"] for n in probe_api().values()}
    registered = set(editor.evaluate("Object.keys(LiteGraph.registered_node_types)"))
    assert pack, "the host registered no MultiRef nodes"
    assert pack | used | probe <= registered, sorted((pack | used | probe) - registered)
    types = sorted((pack | used) if CURRENT_EDITOR else
                   (registered & set(host_nodes) - EDITOR_REDRAWN))
    layouts = editor.evaluate(LAYOUT_JS % json.dumps(types))
    for name in types:
        widgets = fmt.editor_widgets(host_nodes[name])
        sockets = [[socket, None] for socket, _ in fmt.editor_sockets(host_nodes[name])]
        if CURRENT_EDITOR:
            expected = {"widgets": [[w.name, w.role == fmt.INPUT] for w in widgets
                                    if not w.converted],
                        "inputs": sockets + [[w.name, w.name] for w in widgets
                                             if w.role in (fmt.INPUT, fmt.UPLOAD)]}
        else:
            expected = {"widgets": [[w.name, w.role in (fmt.INPUT, fmt.UPLOAD)] for w in widgets],
                        "inputs": sockets + [[w.name, w.name] for w in widgets if w.converted]}
        assert layouts[name] == expected, name


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
    if CURRENT_EDITOR:
        pytest.skip("the README's editor picture is taken in the 2024 editor (its canvas "
                    "follows a resized window; the current editor's layout differs)")
    def pack_nodes(path):
        return sum(str(getattr(host_nodes[n["type"]], "CATEGORY", "")).startswith("MultiRef")
                   for n in fmt.load(path)["nodes"])

    ui_path = max(OPENABLE_UI_FILES, key=pack_nodes)
    _assert_loads_as_saved(_load(editor, fmt.load(ui_path)), fmt.load(ui_path), host_nodes)
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


# The window the layout is made for (headless/workflow_format.py) and LiteGraph's zoom below
# which it draws no text.
WINDOW = (1920, 1080)
TEXT_ZOOM = 0.6

EXTENT_JS = """(() => {
  const nodes = app.graph._nodes, title = LiteGraph.NODE_TITLE_HEIGHT;
  const box = [Math.min(...nodes.map(n => n.pos[0])), Math.min(...nodes.map(n => n.pos[1] - title)),
               Math.max(...nodes.map(n => n.pos[0] + n.size[0])),
               Math.max(...nodes.map(n => n.pos[1] + n.size[1]))];
  const groups = app.graph._groups || [];
  return {box, overlaps: nodes.flatMap(a => nodes.filter(b => a.id < b.id
    && a.pos[0] < b.pos[0] + b.size[0] && b.pos[0] < a.pos[0] + a.size[0]
    && a.pos[1] - title < b.pos[1] + b.size[1] && b.pos[1] - title < a.pos[1] + a.size[1])
    .map(b => [a.id, b.id]))};
})()"""


@pytest.mark.parametrize("ui_path", UI_FILES, ids=NAMES)
def test_workflow_fits_a_full_hd_window_at_a_zoom_that_draws_text(editor, host_nodes, ui_path):
    """Node sizes as the editor itself makes them: the whole graph, without overlapping nodes,
    fits 1920x1080 at a zoom of at least 0.6, and the file opens at such a zoom."""
    skip_unless_openable(ui_path)
    ui = fmt.load(ui_path)
    _load(editor, ui)
    extent = editor.evaluate(EXTENT_JS)
    left, top, right, bottom = extent["box"]
    assert extent["overlaps"] == []
    fit = min(WINDOW[0] / (right - left), WINDOW[1] / (bottom - top))
    assert fit >= TEXT_ZOOM, f"{right - left:.0f} x {bottom - top:.0f} needs zoom {fit:.2f}"
    assert ui["extra"]["ds"]["scale"] >= TEXT_ZOOM


THUMBNAILS_ENV = "MULTIREF_WRITE_THUMBNAILS"  # set to 1 to (re)write example_workflows/NAME.jpg
THUMBNAIL_WIDTH = 480
# Workflows whose thumbnail is a render of their output instead (tests/test_workflows.py).
# The Flux workflows too: the 2024 editor that draws the graphs has no Flux nodes.
RENDERED_THUMBNAILS = {"demo_tiny", *shipped.CURRENT_HOST_ONLY}


@pytest.mark.skipif(not os.environ.get(THUMBNAILS_ENV), reason=f"set {THUMBNAILS_ENV}=1 to "
                    "rewrite the template browser's thumbnails")
def test_write_thumbnails_of_the_graphs(editor, host_nodes):
    """Each workflow drawn in a 1920x1080 window at the zoom it opens with, shrunk."""
    if CURRENT_EDITOR:
        pytest.skip("thumbnails are drawn by the 2024 editor")
    editor.evaluate('document.querySelector(".comfy-menu").style.display = "none"')
    editor.call("Emulation.setDeviceMetricsOverride", session=True, width=WINDOW[0],
                height=WINDOW[1], deviceScaleFactor=1, mobile=False)
    editor.wait_for(f"app.canvasEl.width === {WINDOW[0]}", timeout=10)
    try:
        for ui_path in UI_FILES:
            if shipped.name_of(ui_path) in RENDERED_THUMBNAILS:
                continue
            ui = fmt.load(ui_path)
            _load(editor, ui)
            editor.evaluate(FIT_VIEW_JS % (ui["extra"]["ds"]["scale"], 20))
            picture = Image.open(io.BytesIO(editor.screenshot_png())).convert("RGB")
            picture.thumbnail((THUMBNAIL_WIDTH, THUMBNAIL_WIDTH))
            picture.save(shipped.thumbnail_path(shipped.name_of(ui_path)), quality=85)
    finally:
        editor.call("Emulation.setDeviceMetricsOverride", session=True, width=1600,
                    height=900, deviceScaleFactor=1, mobile=False)
        editor.evaluate('document.querySelector(".comfy-menu").style.display = ""')


BROWSE_TEMPLATES_JS = """(async (module, names) => {
  await app.extensionManager.command.execute("Comfy.BrowseTemplates");
  const dialog = () => document.querySelector(".p-dialog");
  const shown = () => names.filter(n => dialog()?.innerText.split("\\n").includes(n));
  for (let i = 0; i < 100 && !shown().length; i++) await new Promise(r => setTimeout(r, 100));
  // The browser shows a first page of cards and adds more as its list scrolls to the bottom.
  const titles = new Set(), drawn = new Map();
  const list = () => dialog().querySelector(".p-dataview-content") || dialog();
  for (let i = 0; i < 100 && names.some(n => !titles.has(n)); i++) {
    dialog().innerText.split("\\n").forEach(t => titles.add(t));
    // Up, then down again: the bottom must come into view anew to load the next page.
    list().scrollTop = i %% 2 ? list().scrollHeight : 0;
    await new Promise(r => setTimeout(r, 150));
  }
  list().scrollTop = 0;
  const card = name => [...dialog().querySelectorAll("img")].find(i => i.alt === name);
  for (const name of names) {  // a thumbnail loads once its card has stayed in view a moment
    for (let i = 0; i < 50 && !(card(name)?.complete && card(name)?.naturalWidth); i++) {
      card(name)?.closest(".p-card")?.scrollIntoView({block: "center"});
      await new Promise(r => setTimeout(r, 100));
    }
    drawn.set(name, card(name)?.naturalWidth || 0);
  }
  const result = {titles: [...titles], drawn: [...drawn], module: titles.has(module)};
  document.querySelectorAll(".p-dialog-close-button").forEach(b => b.click());
  return result;
})(%s, %s)"""

OPEN_TEMPLATE_JS = """(async (module, name) => {
  // A dialog still closing from before (the Templates browser) is not this template's doing.
  document.querySelectorAll(".p-dialog-close-button").forEach(b => b.click());
  for (let i = 0; i < 40 && document.querySelector(".p-dialog"); i++) {
    await new Promise(r => setTimeout(r, 50));
  }
  const response = await fetch(`api/workflow_templates/${module}/${name}.json`);
  await app.loadGraphData(await response.json(), true, true, name);
  await new Promise(r => setTimeout(r, 200));
  return {status: response.status, nodes: app.graph._nodes.length, dialog: %s,
          text: document.body.innerText};
})(%s, %s)"""


def test_template_browser_lists_the_ui_files_with_thumbnails_and_opens_each(editor):
    """The current editor's Templates dialog, for this pack: only the UI files (no API twin,
    which the editor cannot open), each with its NAME.jpg served, each opening cleanly."""
    if not CURRENT_EDITOR:
        pytest.skip("the 2024 editor has no template browser for custom-node workflows")
    module = headless_host.PACK_FOLDER_NAME
    url = f"{editor.server_url}/api/workflow_templates"
    listed = json.loads(urllib.request.urlopen(url).read())
    assert sorted(listed[module]) == sorted(NAMES)
    for name in NAMES:
        with urllib.request.urlopen(f"{url}/{module}/{name}.jpg") as reply:
            assert reply.headers["Content-Type"] == "image/jpeg", name
            assert Image.open(io.BytesIO(reply.read())).format == "JPEG"
    editor.call("Network.enable", session=True)
    editor.events.clear()
    shown = editor.evaluate(BROWSE_TEMPLATES_JS % (json.dumps(module), json.dumps(NAMES)),
                            timeout=90)
    assert shown["module"], shown["titles"]
    # A card's title is the file name; API twins (NAME_api) must not be among them.
    cards = [t for t in shown["titles"] if t in NAMES or t.endswith("_api")]
    assert set(cards) == set(NAMES), shown["titles"]
    assert sorted(alt for alt, width in shown["drawn"] if width > 0) == sorted(NAMES), shown["drawn"]
    fetched = {event["params"]["response"]["url"].rsplit("/", 1)[-1]:
               event["params"]["response"]["status"] for event in editor.events
               if event["method"] == "Network.responseReceived"
               and f"/workflow_templates/{module}/" in event["params"]["response"]["url"]}
    assert fetched == {f"{name}.jpg": 200 for name in NAMES}, fetched
    editor.call("Network.disable", session=True)
    for name in NAMES:
        editor.evaluate("0")
        editor.events.clear()
        opened = editor.evaluate(OPEN_TEMPLATE_JS % (DIALOG_JS, json.dumps(module),
                                                     json.dumps(name)))
        assert opened["status"] == 200 and opened["nodes"] == len(fmt.load(shipped.ui_path(name))["nodes"])
        assert opened["dialog"] is None, opened["dialog"]
        assert "does not contain a valid version" not in opened["text"], name
        assert editor.page_errors() == [], name
