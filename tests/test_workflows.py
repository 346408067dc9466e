"""Every shipped workflow: its UI file and API twin describe the same graph, and the API file
executes in the host with the downloadable models swapped for tiny ones of the same kind."""
import copy
import os

import pytest

from conftest import headless_host
from headless import shipped, workflow_format as fmt
import workflow_models

API_FILES = shipped.api_files()
NAMES = [shipped.name_of(p) for p in API_FILES]


def _ui_path(api_path):
    return shipped.ui_path(shipped.name_of(api_path))


def test_every_capability_has_both_formats():
    assert API_FILES
    for api_path in API_FILES:
        assert os.path.isfile(_ui_path(api_path)), f"no UI twin for {api_path}"


@pytest.mark.parametrize("api_path", API_FILES, ids=NAMES)
def test_ui_file_and_api_twin_are_the_same_graph(host, api_path):
    api = fmt.load(api_path)
    ui = fmt.load(_ui_path(api_path))
    assert fmt.ui_to_api(ui, host.nodes) == api
    # Links carry the type the source node really outputs.
    by_id = {n["id"]: n for n in ui["nodes"]}
    for link_id, src, slot, dst, dst_slot, link_type in ui["links"]:
        assert host.nodes[by_id[src]["type"]].RETURN_TYPES[slot] == link_type
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id


@pytest.mark.parametrize("api_path", API_FILES, ids=NAMES)
def test_api_workflow_executes_in_the_host(host, api_path, tmp_path):
    prompt = workflow_models.swap_in_tiny_models(fmt.load(api_path), host, tmp_path)
    outputs = host.execute(prompt)
    assert outputs, "the workflow produced no output"


def test_a_workflow_out_of_step_with_its_nodes_fails(host, tmp_path):
    """Renaming an input (what an incompatible node change does) must be caught, in both the API
    file (by the host's validation) and the UI file (by the widget layout)."""
    api_path = shipped.api_path("single_subject_views")
    api, ui = fmt.load(api_path), fmt.load(_ui_path(api_path))
    broken = workflow_models.swap_in_tiny_models(api, host, tmp_path)
    node = next(n for n in broken.values() if n["class_type"] == "MultiRefApplyAdapter")
    node["inputs"]["strength"] = node["inputs"].pop("scale")
    with pytest.raises(headless_host.HostError, match="scale"):
        host.execute(broken)
    short = copy.deepcopy(ui)
    adapter = next(n for n in short["nodes"] if n["type"] == "MultiRefApplyAdapter")
    adapter["widgets_values"].pop()
    with pytest.raises(ValueError, match="widget value"):
        fmt.ui_to_api(short, host.nodes)
