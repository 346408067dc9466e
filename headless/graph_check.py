"""Check an API-format workflow against the host's node classes before anything runs, so a
broken graph gets one line naming the node, the input and the fix (the hosts' own checks say
less: a bare input name, a KeyError, `tuple index out of range`, or, on older hosts that do not
compare link types, a TypeError deep inside the node that got the wrong object).

Only what the node classes declare is read (INPUT_TYPES, RETURN_TYPES, VALIDATE_INPUTS); where
a host would accept something this check cannot judge (combo lists, custom type matching), it
lets the host decide."""
import inspect

# Inputs of these types are widgets (values typed in the editor), not links.
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


class GraphError(ValueError):
    """A workflow that cannot run; the message is one line per problem, joined by '; '."""


def check_graph(prompt, node_classes):
    """Raise GraphError listing every problem of `prompt` ({id: {class_type, inputs}})."""
    unknown = sorted({node["class_type"] for node in prompt.values()} - set(node_classes))
    if unknown:
        raise GraphError(
            f"workflow uses node types this ComfyUI does not have: {', '.join(unknown)}; "
            "install the custom node packs that provide them (MultiRef nodes come from this "
            "pack: check that it loaded without errors)")
    problems = []
    for node_id in sorted(prompt, key=_id_order):
        problems += _node_problems(node_id, prompt, node_classes)
    if problems:
        raise GraphError("; ".join(problems))


def _id_order(node_id):
    text = str(node_id)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _node_problems(node_id, prompt, node_classes):
    node = prompt[node_id]
    cls = node_classes[node["class_type"]]
    where = f"node {node_id} ({node['class_type']})"
    declared = cls.INPUT_TYPES()
    inputs = node.get("inputs") or {}
    problems = []
    for name, spec in (declared.get("required") or {}).items():
        if name not in inputs:
            problems.append(f"{where}: required input '{name}' is missing; {_how_to_fill(spec)}")
    typed = not _validates_types_itself(cls)
    for group in ("required", "optional"):
        for name, spec in (declared.get(group) or {}).items():
            value = inputs.get(name)
            if isinstance(value, list):
                problem = _link_problem(f"{where} input '{name}'", spec[0], value, prompt,
                                        node_classes, typed)
                if problem:
                    problems.append(problem)
    return problems


def _how_to_fill(spec):
    kind = spec[0]
    if isinstance(kind, (list, tuple)):
        return (f"set it to one of its choices, e.g. '{kind[0]}'" if kind
                else "set it to one of its choices (the list is empty here)")
    if kind in WIDGET_TYPES:
        return f"give it a value ({kind})"
    return f"link a {kind} output to it"


def _validates_types_itself(cls):
    """A node whose VALIDATE_INPUTS takes `input_types` judges its link types itself."""
    check = getattr(cls, "VALIDATE_INPUTS", None)
    return check is not None and "input_types" in inspect.signature(check).parameters


def _link_problem(where, expected, link, prompt, node_classes, typed):
    if len(link) != 2:
        return f"{where}: a link is [node_id, output_slot], got {link!r}; fix that value"
    source_id, slot = str(link[0]), link[1]
    if source_id not in prompt:
        return (f"{where}: links to node {source_id}, which is not in the workflow; link it "
                "to an output of a node that is")
    source_type = prompt[source_id]["class_type"]
    outputs = tuple(node_classes[source_type].RETURN_TYPES)
    source = f"node {source_id} ({source_type})"
    if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < len(outputs):
        listed = ", ".join(f"{i} {_type_name(t)}" for i, t in enumerate(outputs))
        return (f"{where}: links to output {slot!r} of {source}, which has "
                f"{len(outputs)} output(s) ({listed}); use one of those slots")
    received = outputs[slot]
    if not typed or _types_match(received, expected):
        return None
    fitting = [i for i, t in enumerate(outputs) if _types_match(t, expected)]
    fix = (f"link output {fitting[0]} of {source}, its {_type_name(expected)}, instead" if fitting
           else f"link a {_type_name(expected)} output instead")
    return (f"{where} takes {_type_name(expected)} but is linked to output {slot} of {source}, "
            f"which gives {_type_name(received)}; {fix}")


def _types_match(received, expected):
    """Lenient on purpose: anything a host might accept passes ('*', unions such as
    'IMAGE,MASK', type objects that compare equal to anything, combo lists)."""
    if not received != expected:  # `!=`, as hosts compare: wildcard types override it
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return True
    wanted = {t.strip() for t in expected.split(",")}
    offered = {t.strip() for t in received.split(",")}
    return "*" in wanted or "*" in offered or bool(wanted & offered)


def _type_name(kind):
    return "a list of choices" if isinstance(kind, (list, tuple)) else str(kind)
