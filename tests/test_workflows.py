"""Every shipped workflow: its UI file and API twin describe the same graph, and the API file
executes in the host with the downloadable models swapped for tiny ones of the same kind and
the shipped example pictures, which the pack copied into the host's input folder at load."""
import copy
import filecmp
import logging
import os

import pytest
from PIL import Image

from conftest import headless_host
from headless import shipped, workflow_format as fmt
from multiref.nodes import example_inputs
import workflow_models

API_FILES = shipped.api_files()
NAMES = [shipped.name_of(p) for p in API_FILES]


def _ui_path(api_path):
    return shipped.ui_path(shipped.name_of(api_path))


def skip_where_the_host_cannot_run(host, name):
    """The Flux workflows need a current ComfyUI; on the installable host they skip, saying so."""
    reason = shipped.needs_current_host(name)
    if reason and host.kind == "installable comfyui":
        pytest.skip(reason)


def test_every_capability_has_both_formats():
    assert API_FILES
    for api_path in API_FILES:
        assert os.path.isfile(_ui_path(api_path)), f"no UI twin for {api_path}"


@pytest.mark.parametrize("api_path", API_FILES, ids=NAMES)
def test_ui_file_and_api_twin_are_the_same_graph(host, api_path):
    skip_where_the_host_cannot_run(host, shipped.name_of(api_path))
    api = fmt.load(api_path)
    ui = fmt.load(_ui_path(api_path))
    assert fmt.ui_to_api(ui, host.nodes) == api
    # Links carry the type the source node really outputs.
    by_id = {n["id"]: n for n in ui["nodes"]}
    for link_id, src, slot, dst, dst_slot, link_type in ui["links"]:
        assert host.nodes[by_id[src]["type"]].RETURN_TYPES[slot] == link_type
        assert by_id[dst]["inputs"][dst_slot]["link"] == link_id


def _pictures(api):
    return sorted({node["inputs"]["image"] for node in api.values()
                   if node["class_type"] in ("LoadImage", "LoadImageMask")})


def test_every_picture_a_workflow_names_is_shipped_and_in_the_input_folder(host):
    """What makes the workflows run unchanged: each picture they load is an example_inputs/
    file, which the pack's load put into the host's input folder (where Load Image lists)."""
    shipped_pictures = example_inputs.example_files()
    named = {name for path in API_FILES for name in _pictures(fmt.load(path))}
    assert named, "no shipped workflow loads a picture"
    assert named <= set(shipped_pictures), sorted(named - set(shipped_pictures))
    assert set(shipped_pictures) <= named, "shipped pictures no workflow uses: " + \
        ", ".join(sorted(set(shipped_pictures) - named))
    folder = host.folder_paths.get_input_directory()
    for name in sorted(named):
        assert filecmp.cmp(os.path.join(folder, name), shipped_pictures[name], shallow=False), name
    listed = host.nodes["LoadImage"].INPUT_TYPES()["required"]["image"][0]
    assert named <= set(listed), "Load Image does not list " + ", ".join(sorted(named - set(listed)))


def test_copying_the_pictures_never_overwrites_a_users_file(tmp_path, caplog):
    users = tmp_path / "multiref_chelsea.jpg"
    users.write_bytes(b"the user's own picture")
    with caplog.at_level(logging.INFO, logger="multiref"):
        copied = example_inputs.copy_to_input_folder(str(tmp_path))
    expected = set(example_inputs.example_files())
    assert set(copied) == expected - {"multiref_chelsea.jpg"}
    assert users.read_bytes() == b"the user's own picture"
    assert sorted(os.listdir(tmp_path)) == sorted(expected)  # no temporary file left
    assert "multiref_chelsea.jpg" in caplog.text and str(tmp_path) in caplog.text
    assert example_inputs.copy_to_input_folder(str(tmp_path)) == []  # nothing missing now


def test_an_unwritable_input_folder_is_logged_not_raised(tmp_path, caplog):
    blocked = tmp_path / "input"
    blocked.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="multiref"):
        assert example_inputs.copy_to_input_folder(str(blocked)) == []
    assert "example_inputs" in caplog.text and str(blocked) in caplog.text


@pytest.mark.parametrize("api_path", API_FILES, ids=NAMES)
def test_api_workflow_executes_in_the_host(host, api_path, tmp_path):
    skip_where_the_host_cannot_run(host, shipped.name_of(api_path))
    prompt = workflow_models.swap_in_tiny_models(fmt.load(api_path), host, tmp_path)
    outputs = host.execute(prompt)
    assert outputs, "the workflow produced no output"
    name = shipped.name_of(api_path)
    if os.environ.get("MULTIREF_WRITE_THUMBNAILS") and name in shipped.CURRENT_HOST_ONLY:
        # The 2024 editor that draws the other thumbnails has no Flux nodes: the output it is.
        folder = host.folder_paths.get_output_directory()
        pictures = [Image.open(os.path.join(folder, image["subfolder"], image["filename"]))
                    for ui in outputs.values() for image in ui.get("images", [])]
        _write_demo_thumbnail(pictures, shipped.thumbnail_path(name))


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


DEMO_PACK_NODES = {"MultiRefTinyDemoModels", "MultiRefTinyDemoAdapter", "MultiRefReference",
                   "MultiRefEncodeReferences", "MultiRefApplyAdapter", "MultiRefApplyMSA",
                   "MultiRefNormalizedCFGGuider", "MultiRefRoutingMaps"}


def test_the_demo_runs_the_packs_nodes_and_saves_picture_and_routing_maps(host):
    """The default demo (run.py without a workflow) unchanged: no model swap, no download."""
    demo = fmt.load(shipped.api_path("demo_tiny"))
    kinds = [node["class_type"] for node in demo.values()]
    assert DEMO_PACK_NODES <= set(kinds), sorted(DEMO_PACK_NODES - set(kinds))
    assert kinds.count("MultiRefReference") == 2
    for node in demo.values():
        if node["class_type"] == "MultiRefReference":
            assert node["inputs"]["phrase"] and "mask" in node["inputs"], node
    assert next(n for n in demo.values()
                if n["class_type"] == "MultiRefApplyAdapter")["inputs"]["mode"] == "weighted"
    outputs = host.execute(copy.deepcopy(demo))
    saved = {demo[node_id]["inputs"]["images"][0]: ui["images"] for node_id, ui in outputs.items()
             if demo[node_id]["class_type"] == "SaveImage"}
    sources = {demo[node_id]["class_type"]: images for node_id, images in saved.items()}
    assert set(sources) == {"VAEDecode", "MultiRefRoutingMaps"}, set(sources)
    assert all(len(images) == 1 for images in saved.values())
    if os.environ.get("MULTIREF_WRITE_THUMBNAILS"):
        folder = host.folder_paths.get_output_directory()
        pictures = [Image.open(os.path.join(folder, image["subfolder"], image["filename"]))
                    for kind in ("VAEDecode", "MultiRefRoutingMaps") for image in sources[kind]]
        _write_demo_thumbnail(pictures, shipped.thumbnail_path("demo_tiny"))


def _write_demo_thumbnail(pictures, path, height=192):
    """The demo's picture and its routing maps side by side, enlarged without smoothing."""
    scaled = [p.convert("RGB").resize((p.width * height // p.height, height), Image.NEAREST)
              for p in pictures]
    sheet = Image.new("RGB", (sum(p.width for p in scaled), height))
    for i, picture in enumerate(scaled):
        sheet.paste(picture, (sum(p.width for p in scaled[:i]), 0))
    sheet.save(path, quality=90)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_tiny_demo_adapter_fits_every_cross_attention_of_the_tiny_unet(family):
    from multiref.kernels.checkpoints import bind_to_unet, cross_attention_dims
    from multiref.families import tiny_models
    model = tiny_models.tiny_unet(family)
    unet = model.model.diffusion_model
    adapter = bind_to_unet(tiny_models.tiny_adapter(model), unet)  # raises on any mismatch
    assert adapter.family == family
    dims = cross_attention_dims(unet)
    assert len(adapter.layers) == len(dims)
    for location, (context, inner) in dims.items():
        layer = adapter.layer(location)
        assert (layer.context_dim, layer.inner_dim) == (context, inner)


def test_template_folder_holds_ui_files_and_their_thumbnails_only():
    """ComfyUI lists every *.json of example_workflows/ as a template and asks for NAME.jpg
    beside it; an API file there would be a template the editor cannot open."""
    files = sorted(os.listdir(shipped.UI_DIR))
    names = [shipped.name_of(p) for p in shipped.ui_files()]
    assert files == sorted([f"{n}.json" for n in names] + [f"{n}.jpg" for n in names])
    for name in names:
        assert "nodes" in fmt.load(shipped.ui_path(name)), name  # the editor's format
        with Image.open(shipped.thumbnail_path(name)) as picture:
            assert picture.format == "JPEG" and min(picture.size) >= 64, name
