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


def api_to_ui(api, node_classes):
    """Lay the API graph out left to right by depth and write the editor's format: every
    socket input (linked or not), widget inputs fed by a link as converted inputs
    ("widget": {"name": ...}), and one widgets_values entry per editor widget."""
    depth = {}

    def node_depth(node_id):
        if node_id not in depth:
            depth[node_id] = 0
            sources = [v[0] for v in api[node_id]["inputs"].values() if _is_link(v)]
            depth[node_id] = 1 + max((node_depth(str(s)) for s in sources), default=-1)
        return depth[node_id]

    for node_id in api:
        node_depth(node_id)
    link_ids = {}  # (destination id, input name) -> link id
    for node_id, node in sorted(api.items(), key=lambda item: int(item[0])):
        for name, value in node["inputs"].items():
            if _is_link(value):
                link_ids[(node_id, name)] = len(link_ids) + 1
    links, nodes, outputs_links = [], [], {}
    rows_used = {}
    for node_id, node in sorted(api.items(), key=lambda item: int(item[0])):
        cls = node_classes[node["class_type"]]
        column = depth[node_id]
        row = rows_used.get(column, 0)
        rows_used[column] = row + 1
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
        nodes.append({"id": int(node_id), "type": node["class_type"],
                      "pos": [40 + 360 * column, 40 + 260 * row], "size": [320, 200],
                      "flags": {}, "order": depth[node_id], "mode": 0,
                      "inputs": ui_inputs, "outputs": ui_outputs,
                      "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets_values})
    # Output link lists are complete only now: a source may have a higher id than its targets.
    for ui_node in nodes:
        for slot, output in enumerate(ui_node["outputs"]):
            output["links"] = sorted(outputs_links.get((str(ui_node["id"]), slot), []))
    # The editor stores each link's type; fill it from the source node's output.
    by_id = {n["id"]: n for n in nodes}
    ui_links = [[lid, src, slot, dst, dst_slot, by_id[src]["outputs"][slot]["type"]]
                for lid, src, slot, dst, dst_slot in sorted(links)]
    return {"last_node_id": max(by_id), "last_link_id": len(ui_links), "nodes": nodes,
            "links": ui_links, "groups": [], "config": {}, "extra": {}, "version": UI_VERSION}


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
