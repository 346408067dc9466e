"""Convert between ComfyUI's two workflow formats, using the node definitions.

UI format (what the editor saves and loads): {"nodes": [...], "links": [...], ...}; every node
lists its input sockets and, in `widgets_values`, one value per widget the editor gives it
(`editor_widgets`: input widgets in INPUT_TYPES order plus the editor's own extra widgets).
API format (what POST /prompt takes): {id: {"class_type": ..., "inputs": {name: value or
[source_id, output_slot]}}}.

The pack keeps one API file per capability as the source and generates its UI twin from it
with `python -m headless.make_ui_twins` (from the pack's folder); tests convert each UI file back and require the same
graph, and tests/test_editor.py loads each UI file in the real editor and requires that its
own API export equals the API twin.
"""
import json
from typing import NamedTuple

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
UI_VERSION = 0.4
# Roles of the editor's widgets. Only INPUT and UPLOAD widgets are exported to the API format.
INPUT, CONTROL, FILTER, UPLOAD = "input", "control", "filter", "upload"


class Widget(NamedTuple):
    name: str
    role: str
    ui_value: object  # what a generated UI file stores when the API file gives no value
    converted: bool = False  # forceInput/defaultInput: the editor shows it as an input socket


def input_specs(node_class):
    """[(name, type, options, required)] in the order the editor shows them."""
    specs = []
    for section in ("required", "optional"):
        for name, spec in node_class.INPUT_TYPES().get(section, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, spec[0], options, section == "required"))
    return specs


def is_widget(input_type):
    """The editor gives every combo and INT/FLOAT/STRING/BOOLEAN input a widget (forceInput
    ones too: it converts those to a socket but keeps the widget and its saved value)."""
    return isinstance(input_type, (list, tuple)) or input_type in WIDGET_TYPES


def has_seed_control(name, input_type, options):
    """The editor adds a 'control after generate' widget after seed-like INT inputs."""
    return input_type == "INT" and (options.get("control_after_generate")
                                    or name in ("seed", "noise_seed"))


def editor_widgets(node_class):
    """The widgets the 2024 editor (scripts/app.js registerNodeDef with its core extensions)
    creates for a node, in order: `widgets_values` in a UI file holds one value per widget."""
    widgets = []
    specs = input_specs(node_class)
    upload_after = None
    if any(name == "image" and required and options.get("image_upload") is True
           for name, _, options, required in specs):
        # uploadImage.js appends an "upload" button input to the required inputs.
        upload_after = max(i for i, spec in enumerate(specs) if spec[3])
    for i, (name, input_type, options, _) in enumerate(specs):
        if is_widget(input_type):
            converted = bool(options.get("forceInput") or options.get("defaultInput"))
            widgets.append(Widget(name, INPUT, _default(input_type, options), converted))
            control = options.get("control_after_generate")
            control_name = control if isinstance(control, str) else "control_after_generate"
            # "fixed" rather than the editor's "randomize": a shared workflow reproduces.
            if has_seed_control(name, input_type, options):
                widgets.append(Widget(control_name, CONTROL, "fixed"))
            elif isinstance(input_type, (list, tuple)) and control:
                widgets += [Widget(control_name, CONTROL, "fixed"),
                            Widget("control_filter_list", FILTER, "")]
        if i == upload_after:
            widgets.append(Widget("upload", UPLOAD, "image"))
    return widgets


def editor_sockets(node_class):
    """[(name, type)] of the link-only inputs, in the order the editor creates them."""
    return [(name, input_type) for name, input_type, _, _ in input_specs(node_class)
            if not is_widget(input_type)]


def _default(input_type, options):
    if "default" in options:
        return options["default"]
    if isinstance(input_type, (list, tuple)):
        return input_type[0] if input_type else None
    return {"STRING": "", "BOOLEAN": False}.get(input_type, 0)


def _is_link(value):
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) \
        and isinstance(value[0], (str, int))


# Layout: the editor draws node text only from zoom 0.6 up (LiteGraph's low-quality threshold),
# so a graph must fit a 1920x1080 window at READABLE_ZOOM: columns are stacked until this height.
NODE_WIDTH, COLUMN_GAP, ROW_GAP, TITLE_HEIGHT = 300, 50, 40, 30
READABLE_ZOOM, WINDOW, MARGIN = 0.65, (1920, 1080), 20
STACK_HEIGHT = WINDOW[1] / READABLE_ZOOM - 2 * MARGIN - TITLE_HEIGHT
SLOT_HEIGHT, WIDGET_HEIGHT, PREVIEW_HEIGHT, MULTILINE_HEIGHT = 20, 24, 240, 60


def _depths(api):
    """Column of each node: one after its deepest source, then moved right up to just before
    its nearest consumer (so a loader sits beside what it feeds: short links)."""
    depth, consumers = {}, {node_id: [] for node_id in api}
    for node_id, node in api.items():
        for value in node["inputs"].values():
            if _is_link(value):
                consumers[str(value[0])].append(node_id)

    def node_depth(node_id):
        if node_id not in depth:
            depth[node_id] = 0
            sources = [v[0] for v in api[node_id]["inputs"].values() if _is_link(v)]
            depth[node_id] = 1 + max((node_depth(str(s)) for s in sources), default=-1)
        return depth[node_id]

    for node_id in api:
        node_depth(node_id)
    for node_id in sorted(api, key=lambda n: -depth[n]):
        if consumers[node_id]:
            depth[node_id] = max(depth[node_id], min(depth[c] for c in consumers[node_id]) - 1)
    return depth


def _height(node_class, ui_inputs):
    """About the height the editor gives the node (slots, widgets, a loaded picture)."""
    specs = {name: (input_type, options) for name, input_type, options, _ in input_specs(node_class)}
    widgets = [w for w in editor_widgets(node_class) if not w.converted]
    slots = max(len(ui_inputs), len(node_class.RETURN_TYPES))
    height = SLOT_HEIGHT * slots + WIDGET_HEIGHT * len(widgets) + 10
    height += sum(MULTILINE_HEIGHT for w in widgets if w.name in specs
                  and specs[w.name][1].get("multiline"))
    return height + (PREVIEW_HEIGHT if any(w.role == UPLOAD for w in widgets) else 0)


def _positions(depth, heights):
    """Of the stackings below, the one that fits a 1920x1080 window at the largest zoom."""
    def zoom(positions):
        right = max(x for x, _ in positions.values()) + NODE_WIDTH + MARGIN
        bottom = max(y + heights[n] for n, (_, y) in positions.items()) + MARGIN
        return min(WINDOW[0] / right, WINDOW[1] / bottom)

    return max((_stacked(depth, heights, limit) for limit in range(400, int(STACK_HEIGHT), 50)),
               key=zoom)


def _stacked(depth, heights, stack_height):
    """Columns left to right; consecutive columns share one stack while it stays under
    stack_height, so a long chain wraps into a compact grid instead of a wide row."""
    columns = {}
    for node_id in sorted(depth, key=int):
        columns.setdefault(depth[node_id], []).append(node_id)
    stacks, used = [[]], 0
    for column in sorted(columns):
        extent = sum(heights[n] + TITLE_HEIGHT + ROW_GAP for n in columns[column])
        if stacks[-1] and used + extent > stack_height:
            stacks.append([])
            used = 0
        stacks[-1].extend(columns[column])
        used += extent
    positions = {}
    for x, stack in enumerate(stacks):
        y = MARGIN + TITLE_HEIGHT
        for node_id in stack:
            positions[node_id] = [MARGIN + x * (NODE_WIDTH + COLUMN_GAP), y]
            y += heights[node_id] + TITLE_HEIGHT + ROW_GAP
    return positions


def _view(nodes):
    """The zoom and offset the editor opens the graph with (extra.ds): all of it in a
    1920x1080 window, at the largest zoom up to 1."""
    right = max(n["pos"][0] + n["size"][0] for n in nodes) + MARGIN
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes) + MARGIN
    scale = round(min(1.0, WINDOW[0] / right, WINDOW[1] / bottom), 3)
    return {"scale": scale, "offset": [0, 0]}


def api_to_ui(api, node_classes):
    """Lay the API graph out (columns by dependency depth, stacked to fit a 1920x1080 window
    at a zoom where the editor draws text) and write the editor's format: every socket input
    (linked or not), widget inputs fed by a link as converted inputs ("widget": {"name": ...}),
    and one widgets_values entry per editor widget."""
    depth = _depths(api)
    link_ids = {}  # (destination id, input name) -> link id
    for node_id, node in sorted(api.items(), key=lambda item: int(item[0])):
        for name, value in node["inputs"].items():
            if _is_link(value):
                link_ids[(node_id, name)] = len(link_ids) + 1
    links, nodes, outputs_links, heights = [], [], {}, {}
    for node_id, node in sorted(api.items(), key=lambda item: int(item[0])):
        cls = node_classes[node["class_type"]]
        values = node["inputs"]
        widgets = editor_widgets(cls)
        ui_inputs = [{"name": name, "type": input_type, "link": link_ids.get((node_id, name))}
                     for name, input_type in editor_sockets(cls)]
        types = {name: input_type for name, input_type, _, _ in input_specs(cls)}
        ui_inputs += [{"name": w.name, "type": _type_name(types[w.name]),
                       "widget": {"name": w.name}, "link": link_ids.get((node_id, w.name))}
                      for w in widgets if w.role == INPUT
                      and (w.converted or (node_id, w.name) in link_ids)]
        widgets_values = []
        for w in widgets:
            given = values.get(w.name) if w.role in (INPUT, UPLOAD) else None
            widgets_values.append(w.ui_value if given is None or _is_link(given) else given)
        for slot, entry in enumerate(ui_inputs):
            if entry["link"] is not None:
                source = values[entry["name"]]
                outputs_links.setdefault((str(source[0]), source[1]), []).append(entry["link"])
                links.append([entry["link"], int(source[0]), source[1], int(node_id), slot])
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        ui_outputs = [{"name": names[slot], "type": _type_name(rtype), "slot_index": slot,
                       "links": []}
                      for slot, rtype in enumerate(cls.RETURN_TYPES)]
        heights[node_id] = _height(cls, ui_inputs)
        nodes.append({"id": int(node_id), "type": node["class_type"],
                      "pos": None, "size": [NODE_WIDTH, heights[node_id]],
                      "flags": {}, "order": depth[node_id], "mode": 0,
                      "inputs": ui_inputs, "outputs": ui_outputs,
                      "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets_values})
    positions = _positions(depth, heights)
    for ui_node in nodes:
        ui_node["pos"] = positions[str(ui_node["id"])]
    # Output link lists are complete only now: a source may have a higher id than its targets.
    for ui_node in nodes:
        for slot, output in enumerate(ui_node["outputs"]):
            output["links"] = sorted(outputs_links.get((str(ui_node["id"]), slot), []))
    # The editor stores each link's type; fill it from the source node's output.
    by_id = {n["id"]: n for n in nodes}
    ui_links = [[lid, src, slot, dst, dst_slot, by_id[src]["outputs"][slot]["type"]]
                for lid, src, slot, dst, dst_slot in sorted(links)]
    return {"last_node_id": max(by_id), "last_link_id": len(ui_links), "nodes": nodes,
            "links": ui_links, "groups": [], "config": {}, "extra": {"ds": _view(nodes)},
            "version": UI_VERSION}


def _type_name(input_type):
    return "COMBO" if isinstance(input_type, (list, tuple)) else input_type


def ui_to_api(ui, node_classes):
    """What the editor's 'Export (API)' (app.graphToPrompt) produces from a UI file: every
    exported widget's value (a converted widget only while its socket is linked), then every
    linked input as [source id, output slot]."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        if node["type"] not in node_classes:
            raise KeyError(f"node {node['id']}: unknown node type {node['type']!r}")
        widgets = editor_widgets(node_classes[node["type"]])
        values = node.get("widgets_values", [])
        label = f"node {node['id']} ({node['type']})"
        if len(values) < len(widgets):
            raise ValueError(f"{label}: no widget value for input {widgets[len(values)].name!r}; "
                             "the file was saved with another version of this node")
        if len(values) > len(widgets):
            raise ValueError(f"{label}: {len(values) - len(widgets)} widget values left over; "
                             "the file was saved with another version of this node")
        entries = node.get("inputs", [])
        linked = {e["name"]: links[e["link"]] for e in entries if e.get("link") is not None}
        converted = {e["widget"]["name"] for e in entries if e.get("widget")}
        inputs = {}
        for widget, value in zip(widgets, values):
            if widget.role in (INPUT, UPLOAD) and (widget.name not in converted
                                                   or widget.name in linked):
                inputs[widget.name] = value
        for name, link in linked.items():
            inputs[name] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def load(path):
    with open(path) as f:
        return json.load(f)
