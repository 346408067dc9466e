"""The pack as the host sees it: loaded by the host's own custom-node loader, every node
registered with a category, a display name and a tooltip on every input."""
import multiref

PACK_NODES = {"MultiRefTinyDemoModels"}


def _pack_nodes(host):
    return {name: cls for name, cls in host.nodes.items() if name.startswith("MultiRef")}


def test_host_loader_registered_every_pack_node(host):
    registered = _pack_nodes(host)
    assert set(multiref.NODE_CLASS_MAPPINGS) <= set(registered)
    assert PACK_NODES <= set(registered)
    for name, cls in registered.items():
        assert cls is multiref.NODE_CLASS_MAPPINGS[name], name


def test_every_node_has_category_display_name_and_tooltips(host):
    for name, cls in _pack_nodes(host).items():
        assert cls.CATEGORY.startswith("MultiRef"), name
        assert host.display_names.get(name, "").startswith("MultiRef"), name
        assert callable(getattr(cls, cls.FUNCTION)), name
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), name
        for section, inputs in cls.INPUT_TYPES().items():
            if section == "hidden":
                continue
            for input_name, spec in inputs.items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{name}.{input_name} has no tooltip"
