"""Convert between ComfyUI's two workflow formats, using the node definitions.

UI format (what the editor saves and loads): {"nodes": [...], "links": [...], ...}; every node
lists its linked inputs and its widget values (in INPUT_TYPES order) in `widgets_values`.
API format (what POST /prompt takes): {id: {"class_type": ..., "inputs": {name: value or
[source_id, output_slot]}}}.

The pack keeps one API file per capability as the source and generates its UI twin from it
with `python headless/make_ui_twins.py`; tests convert each UI file back and require the same
graph.
"""
import json

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
UI_VERSION = 0.4


def input_specs(node_class):
    """[(name, type, options, required)] in the order the editor shows them."""
    specs = []
    for section in ("required", "optional"):
        for name, spec in node_class.INPUT_TYPES().get(section, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, spec[0], options, section == "required"))
    return specs


def is_widget(input_type, options):
    if options.get("forceInput"):
        return False
    return isinstance(input_type, (list, tuple)) or input_type in WIDGET_TYPES


def has_seed_control(name, input_type, options):
    """The editor adds a 'control after generate' widget value after seed-like INT inputs."""
    return input_type == "INT" and (options.get("control_after_generate")
                                    or name in ("seed", "noise_seed"))


def _is_link(value):
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) \
        and isinstance(value[0], (str, int))


def api_to_ui(api, node_classes):
    """Lay the API graph out left to right by depth and write the editor's format."""
    depth = {}

    def node_depth(node_id):
        if node_id not in depth:
            depth[node_id] = 0
            sources = [v[0] for v in api[node_id]["inputs"].values() if _is_link(v)]
            depth[node_id] = 1 + max((node_depth(str(s)) for s in sources), default=-1)
        return depth[node_id]

    links, nodes, outputs_links = [], [], {}
    for node_id in api:
        node_depth(node_id)
    for node_id, node in api.items():
        for name, value in node["inputs"].items():
            if _is_link(value):
                link_id = len(links) + 1
                outputs_links.setdefault((str(value[0]), value[1]), []).append(link_id)
                links.append([link_id, int(value[0]), value[1], int(node_id), name])
    rows_used = {}
    for node_id, node in sorted(api.items(), key=lambda item: int(item[0])):
        cls = node_classes[node["class_type"]]
        column = depth[node_id]
        row = rows_used.get(column, 0)
        rows_used[column] = row + 1
        ui_inputs, widgets = [], []
        for name, input_type, options, _ in input_specs(cls):
            value = node["inputs"].get(name)
            if is_widget(input_type, options) and not _is_link(value):
                widgets.append(value if name in node["inputs"] else options.get("default"))
                if has_seed_control(name, input_type, options):
                    widgets.append("fixed")
            elif name in node["inputs"]:
                link = next(l for l in links if l[3] == int(node_id) and l[4] == name)
                ui_inputs.append({"name": name, "type": _type_name(input_type), "link": link[0]})
        ui_outputs = [{"name": (getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)[slot],
                       "type": rtype, "slot_index": slot,
                       "links": outputs_links.get((node_id, slot), [])}
                      for slot, rtype in enumerate(cls.RETURN_TYPES)]
        nodes.append({"id": int(node_id), "type": node["class_type"],
                      "pos": [40 + 360 * column, 40 + 260 * row], "size": [320, 200],
                      "flags": {}, "order": depth[node_id], "mode": 0,
                      "inputs": ui_inputs, "outputs": ui_outputs,
                      "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets})
    # The editor stores each link's type; fill it from the source node's output.
    by_id = {n["id"]: n for n in nodes}
    ui_links = [[lid, src, slot, dst, _slot_of(by_id[dst], name),
                 by_id[src]["outputs"][slot]["type"]] for lid, src, slot, dst, name in links]
    return {"last_node_id": max(by_id), "last_link_id": len(ui_links), "nodes": nodes,
            "links": ui_links, "groups": [], "config": {}, "extra": {}, "version": UI_VERSION}


def _slot_of(node, input_name):
    return next(i for i, entry in enumerate(node["inputs"]) if entry["name"] == input_name)


def _type_name(input_type):
    return "COMBO" if isinstance(input_type, (list, tuple)) else input_type


def ui_to_api(ui, node_classes):
    """What the editor's 'Export (API)' produces from a UI file (for the pack's node set)."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        if node["type"] not in node_classes:
            raise KeyError(f"node {node['id']}: unknown node type {node['type']!r}")
        cls = node_classes[node["type"]]
        linked = {entry["name"]: links[entry["link"]] for entry in node.get("inputs", [])
                  if entry.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, input_type, options, _ in input_specs(cls):
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
            if is_widget(input_type, options) and name not in linked:
                if not values:
                    raise ValueError(f"node {node['id']} ({node['type']}): no widget value for "
                                     f"input {name!r}; the file was saved with another version "
                                     "of this node")
                inputs[name] = values.pop(0)
                if has_seed_control(name, input_type, options) and values:
                    values.pop(0)
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values "
                             "left over; the file was saved with another version of this node")
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def load(path):
    with open(path) as f:
        return json.load(f)
