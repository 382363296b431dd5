"""The UI-format workflows (what a user drags onto the canvas) against their API-format twins, inside ComfyUI.

Each workflows/NAME.json is turned into API format here by a converter written for this test from the
frontend's conventions and /object_info alone (it shares no code with tools/make_ui_workflows.py, which wrote
the files), and must equal workflows/NAME.api.json: same nodes, class types, titles, widget values and links.
The converted UI workflow is then run through /prompt, so the UI file itself is shown to execute.
"""

from __future__ import annotations

import json

import pytest

from comfy_host import PACK_ROOT, load_workflow, output_images, shrink

pytestmark = pytest.mark.host

WORKFLOW_DIR = PACK_ROOT / "workflows"
API_FILES = sorted(p.name for p in WORKFLOW_DIR.glob("*.api.json"))
UI_FILES = sorted(p.name for p in WORKFLOW_DIR.glob("*.json") if not p.name.endswith(".api.json"))
CONTROL_MODES = {"fixed", "increment", "decrement", "randomize"}
PRIMITIVE_WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def api_twin(ui_name: str) -> str:
    return ui_name.removesuffix(".json") + ".api.json"


def is_widget(spec) -> bool:
    """Whether the frontend draws this /object_info input as a widget (else it is a socket for a link)."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(spec[0], list) or spec[0] in PRIMITIVE_WIDGETS) and not options.get("forceInput", False)


def control_widgets(name: str, spec) -> int:
    """Values the frontend stores after a widget's own: the control_after_generate mode of an INT or FLOAT
    (an INT called seed or noise_seed gets one unless its spec sets the flag false)."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    flag = options.get("control_after_generate", name in ("seed", "noise_seed") if spec[0] == "INT" else False)
    if flag and isinstance(spec[0], list):
        raise AssertionError(f"{name}: a combo with control_after_generate (two extra values) is not expected here")
    return 1 if flag else 0


def default_of(spec):
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    assert isinstance(spec[0], list) and spec[0], f"no default for {spec}"
    return spec[0][0]  # a combo starts at its first choice


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow (version 0.4) as the API prompt the frontend would queue."""
    assert workflow.get("version") == 0.4, f"version {workflow.get('version')!r}, expected 0.4"
    links = {}
    for link in workflow["links"]:
        assert len(link) == 6, f"link {link} is not [id, from_node, from_slot, to_node, to_slot, type]"
        assert link[0] not in links, f"link id {link[0]} used twice"
        links[link[0]] = link
    nodes = {}
    for node in workflow["nodes"]:
        assert node["id"] not in nodes, f"node id {node['id']} used twice"
        nodes[node["id"]] = node
    assert workflow["last_node_id"] >= max(nodes), "last_node_id is below a node id"
    assert workflow["last_link_id"] >= max(links, default=0), "last_link_id is below a link id"

    prompt = {}
    for node_id, node in nodes.items():
        kind = node["type"]
        where = f"node {node_id} ({kind})"
        assert kind in object_info, f"{where}: not a node type of this ComfyUI"
        assert node.get("mode", 0) == 0, f"{where}: mode {node['mode']} (muted or bypassed) in a shipped workflow"
        info = object_info[kind]
        values = list(node.get("widgets_values") or [])
        inputs = {}

        def take(input_name):
            assert values, f"{where}: widgets_values ran out at {input_name!r}"
            return values.pop(0)

        for section in ("required", "optional"):
            specs = info["input"].get(section, {})
            for input_name in info["input_order"].get(section, []):
                spec = specs[input_name]
                if not is_widget(spec):
                    continue
                if not values and section == "optional":
                    # a file saved before this optional widget existed: the frontend leaves it at its default
                    inputs[input_name] = default_of(spec)
                    continue
                inputs[input_name] = take(input_name)
                for _ in range(control_widgets(input_name, spec)):
                    mode = take(f"{input_name}'s control_after_generate")
                    assert mode in CONTROL_MODES, f"{where}: {mode!r} where {input_name}'s control mode belongs"
            if section == "required" and any(is_widget(s) and len(s) > 1 and s[1].get("image_upload")
                                             for s in specs.values()):
                assert take("upload") == "image", f"{where}: the upload widget's value is not 'image'"
        assert not values, f"{where}: widgets_values has {len(values)} value(s) no widget takes: {values}"

        for slot, ui_input in enumerate(node.get("inputs", [])):
            if ui_input.get("link") is None:
                continue
            link_id, from_node, from_slot, to_node, to_slot, link_type = links[ui_input["link"]]
            assert (to_node, to_slot) == (node_id, slot), f"{where}: link {link_id} ends at {to_node}:{to_slot}"
            source = nodes[from_node]
            output = source["outputs"][from_slot]
            assert link_id in output["links"], f"{where}: node {from_node} output {from_slot} does not list link {link_id}"
            assert link_type == output["type"] == object_info[source["type"]]["output"][from_slot], \
                f"{where}: link {link_id} carries {link_type}, output is {output['type']}"
            inputs[ui_input["name"]] = [str(from_node), from_slot]
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs,
                                "_meta": {"title": node.get("title") or info["display_name"]}}
    return prompt


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


def test_every_workflow_has_a_twin():
    assert API_FILES, "no API-format workflows in workflows/"
    assert [api_twin(name) for name in UI_FILES] == API_FILES, (UI_FILES, API_FILES)


@pytest.mark.parametrize("name", API_FILES + UI_FILES)
def test_every_node_type_is_in_object_info(object_info, name):
    workflow = load_workflow(name)
    types = {n["class_type"] for n in workflow.values()} if name.endswith(".api.json") else \
        {n["type"] for n in workflow["nodes"]}
    assert types and types <= set(object_info), f"{name}: unknown node types {sorted(types - set(object_info))}"


@pytest.mark.parametrize("name", UI_FILES)
def test_ui_workflow_equals_its_api_twin(object_info, name):
    converted = ui_to_api(load_workflow(name), object_info)
    twin = load_workflow(api_twin(name))
    assert sorted(converted, key=int) == sorted(twin, key=int), "different node ids"
    for node_id, node in twin.items():
        assert converted[node_id] == node, f"node {node_id}:\nUI  {json.dumps(converted[node_id])}\nAPI {json.dumps(node)}"


def test_seeds_stay_fixed_so_the_ui_runs_the_api_seed():
    for name in UI_FILES:
        for node in load_workflow(name)["nodes"]:
            if node["type"] == "ZImageSampler":
                assert node["widgets_values"][1] == "fixed", f"{name}: seed control is {node['widgets_values'][1]!r}"


@pytest.mark.parametrize("name", UI_FILES)
def test_ui_workflow_runs_through_the_server(comfy_server, object_info, name):
    prompt = shrink(ui_to_api(load_workflow(name), object_info))
    prefix = "ui_" + name.removesuffix(".json")
    (save_id,) = [i for i, n in prompt.items() if n["class_type"] == "SaveImage"]
    prompt[save_id]["inputs"]["filename_prefix"] = prefix  # a new output: the save runs, not a cache hit
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (image,) = output_images(entry)
    assert image["filename"].startswith(prefix)
    path = comfy_server.base / "output" / image["subfolder"] / image["filename"]
    assert path.is_file() and path.stat().st_size > 1000


def test_the_converter_catches_a_shifted_widget_or_a_wrong_link(object_info):
    """The equality above means something only if the converter rejects what the frontend would misread."""
    ui = load_workflow("zimage_turbo_t2i.json")
    (sampler,) = [n for n in ui["nodes"] if n["type"] == "ZImageSampler"]
    no_control = json.loads(json.dumps(ui))
    next(n for n in no_control["nodes"] if n["id"] == sampler["id"])["widgets_values"].pop(1)
    with pytest.raises(AssertionError, match="control mode"):
        ui_to_api(no_control, object_info)
    wrong_slot = json.loads(json.dumps(ui))
    link = next(link for link in wrong_slot["links"] if link[3] == sampler["id"] and link[4] == 0)
    link[4] = 1
    with pytest.raises(AssertionError, match="ends at"):
        ui_to_api(wrong_slot, object_info)
    assert ui_to_api(ui, object_info) == load_workflow("zimage_turbo_t2i.api.json")
