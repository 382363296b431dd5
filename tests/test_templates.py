"""ComfyUI's official Z-Image templates with UNETLoader replaced by ZImageLoader and nothing else changed, run as a
user runs them: opened in the real frontend, turned into a prompt and queued by the app, the result read back from
the server's history.

The templates are the host's own: read from its comfyui-workflow-templates packages (the files the template browser
opens), so each host version is tested with the templates it ships. 0.8.0's packages hold Turbo and the Fun Union
ControlNet; 0.14.1's add Base. The Z-Image-Turbo 2K upscaler (KSampler dpmpp_2m_sde / beta at denoise 0.33 after a
4x ESRGAN) is in neither: tests/templates/ keeps a copy (see its README), opened where the host has the nodes it
uses (ImageCompare arrived after 0.8).

The one edit is the loader: each UNETLoader, inside the templates' subgraphs too, becomes a ZImageLoader with the same
node id, the same links, unet_name's value as model_name, its weight_dtype, and ZImageLoader's defaults for the rest;
a promoted widget that named the loader's unet_name names model_name. The test checks that the prompt the app
queues differs from the untouched template's in the loader nodes alone.

With a CUDA device the templates run at their own sizes. On CPU the image size is the one other change, the same in
the untouched template the prompt is compared with (at_cpu_size): the test server's VAE is the full FLUX VAE, and on
two CPU cores Turbo at 1024x1024 took 190 s and Base (25 steps, cfg 4) 430 s, and the 2K upscaler (a 2048x2048 VAE
encode and decode) ran out of 23 GB of memory. On CPU they sample 512x512: EmptySD3LatentImage's size (promoted to
the subgraph node's width and height in Turbo and Base), and the upscaler's ImageScaleToTotalPixels megapixels
(1 -> 1/16: 256x256 before its 4x ESRGAN and 0.5 scale).

ComfyUI's UNETLoader cannot load the test server's tiny transformer (its model detection knows Z-Image only at the
released width, 3840, and builds a timestep MLP of another shape), so the untouched templates are not run here:
tests/test_comfy_nodes.py and tests/test_controlnet.py compare native KSampler and the Fun ControlNet nodes on the
pack's model against ComfyUI's own model on the same weights.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from comfy_host import PACK_ROOT, output_images
from conftest import skip_unless_host_has
from test_browser import AppPage

pytestmark = pytest.mark.host

COPIES = PACK_ROOT / "tests" / "templates"
# template id: node types it needs that older hosts lack (beyond the loader swap, nothing is checked by name)
TEMPLATES = {
    "image_z_image_turbo": (),
    "image_z_image": (),
    "image_z_image_turbo_fun_union_controlnet": (),
    "utility_z_image_turbo_2k_upscaler.app": ("ImageCompare",),
}
RUN_TIMEOUT_S = 900
CPU_SIDE = 512
# The app's prompts of the templates with ZImageLoader, at the templates' own sizes, as ComfyUI 0.14.1's frontend and
# template packages make them: checked here against the app on that host (written anew with
# ZIMAGE_WRITE_TEMPLATE_PROMPTS=1), and run as they are on the GPU through ComfyUI's executor
# (tests/test_gpu_host.py), where their full sizes take seconds.
FULL_SIZE_PROMPTS = COPIES / "zimage_prompts"
FULL_SIZE_HOST = "0.14.1"

# Wraps the app's API client so that the prompt id of what the app queues can be read back; the app's own
# queuePrompt (the Run button's handler) then does the queuing.
QUEUE_AS_THE_RUN_BUTTON = """async () => {
    const api = window.app.api
    const queued = []
    const original = api.queuePrompt
    api.queuePrompt = async function (...args) {
        const response = await original.apply(this, args)
        queued.push(response)
        return response
    }
    try {
        await window.app.queuePrompt(0, 1)
    } finally {
        api.queuePrompt = original
    }
    return queued
}"""
GRAPH_TO_PROMPT = "async () => (await window.app.graphToPrompt()).output"


def template_file(template_id: str) -> Path:
    """The host's own copy of a template (as the template browser finds it), else the copy kept in tests/templates;
    a template in neither is skipped as one this host version does not ship."""
    filename = template_id + ".json"
    try:
        import comfyui_workflow_templates

        return Path(comfyui_workflow_templates.get_asset_path(template_id, filename))
    except (ImportError, KeyError, FileNotFoundError):
        pass
    if (COPIES / filename).is_file():
        return COPIES / filename
    skip_unless_host_has(False, f"{filename} in its comfyui-workflow-templates packages")


def host_version() -> str:
    import comfyui_version

    return comfyui_version.__version__


def graphs(workflow: dict) -> list[dict]:
    """The top-level graph and every subgraph definition: each has its own nodes and links."""
    return [workflow, *workflow.get("definitions", {}).get("subgraphs", [])]


def with_zimage_loader(workflow: dict, loader_info: dict) -> tuple[dict, int]:
    """The template with each UNETLoader replaced by a ZImageLoader, nothing else changed; and how many."""
    workflow = copy.deepcopy(workflow)
    required = loader_info["input"]["required"]
    optional = loader_info["input"].get("optional", {})
    dtypes = required["weight_dtype"][0]
    replaced: dict[str, set[str]] = {}  # graph id (a subgraph's id, the workflow's for the top) -> loader node ids
    for graph in graphs(workflow):
        for node in graph["nodes"]:
            if node["type"] != "UNETLoader":
                continue
            unet_name, weight_dtype = node["widgets_values"]
            assert weight_dtype in dtypes, f"UNETLoader {node['id']}: weight_dtype {weight_dtype!r} is no choice " \
                                           f"of ZImageLoader's ({dtypes})"
            node["type"] = "ZImageLoader"
            node["widgets_values"] = [unet_name, weight_dtype, required["attention"][1]["default"],
                                      *(spec[1]["default"] for spec in optional.values())]
            for slot in node.get("inputs", []):  # unet_name promoted to a subgraph input: the link stays
                if slot["name"] == "unet_name":
                    slot.update(name="model_name", localized_name="model_name", widget={"name": "model_name"})
            for slot, name in zip(node["outputs"], loader_info["output_name"]):
                slot.update(name=name, localized_name=name)
            properties = node.setdefault("properties", {})
            for key in ("cnr_id", "ver"):
                properties.pop(key, None)
            properties["Node name for S&R"] = "ZImageLoader"
            replaced.setdefault(str(graph.get("id")), set()).add(str(node["id"]))
    for graph in graphs(workflow):  # widgets of a subgraph's inner nodes shown on the subgraph node
        for node in graph["nodes"]:
            inner = replaced.get(node["type"], set())
            for proxy in node.get("properties", {}).get("proxyWidgets") or []:
                if proxy[0] in inner and proxy[1] == "unet_name":
                    proxy[1] = "model_name"
    return workflow, sum(map(len, replaced.values()))


def at_cpu_size(workflow: dict) -> dict:
    """The template sampling CPU_SIDE x CPU_SIDE: the only change besides the loader, made on CPU alone."""
    workflow = copy.deepcopy(workflow)
    for graph in graphs(workflow):
        for node in graph["nodes"]:
            values = node.get("widgets_values")
            if node["type"] in ("EmptySD3LatentImage", "EmptyLatentImage"):
                values[:2] = [CPU_SIDE, CPU_SIDE]
            elif node["type"] == "ImageScaleToTotalPixels":  # the upscaler's: then 4x ESRGAN, then 0.5x
                values[1] = (CPU_SIDE / 2) ** 2 / 1024 ** 2
            for n, proxy in enumerate(node.get("properties", {}).get("proxyWidgets") or []):
                if proxy[0] == "-1" and proxy[1] in ("width", "height"):  # a subgraph input shown on the node
                    values[n] = CPU_SIDE
    return workflow


def loader_nodes_differ_only(native: dict, ours: dict) -> list[str]:
    """What differs between two queued prompts other than UNETLoader -> ZImageLoader (unet_name -> model_name)."""
    found = []
    if set(native) != set(ours):
        found.append(f"node ids: {sorted(set(native) ^ set(ours))}")
    for node_id in sorted(set(native) & set(ours)):
        a, b = native[node_id], ours[node_id]
        if a["class_type"] == "UNETLoader":
            inputs = dict(a["inputs"])
            inputs["model_name"] = inputs.pop("unet_name")
            extra = {k: v for k, v in b["inputs"].items() if k not in inputs}
            if b["class_type"] != "ZImageLoader" or {k: b["inputs"].get(k) for k in inputs} != inputs:
                found.append(f"{node_id}: {json.dumps(a)} -> {json.dumps(b)}")
            elif set(extra) != {"attention", "compile", "cuda_graphs"}:
                found.append(f"{node_id}: ZImageLoader inputs {sorted(extra)} beyond UNETLoader's")
        elif a != b:
            found.append(f"{node_id}:\n  template {json.dumps(a)}\n  ours     {json.dumps(b)}")
    return found


def as_received(prompt: dict) -> dict:
    """The app's prompt as the server keeps it: a widget value that is a list travels wrapped as {"__value__": [...]}
    (so that it is not read as a link) and the server unwraps it."""
    def unwrap(value):
        return value["__value__"] if isinstance(value, dict) and set(value) == {"__value__"} else value

    return {node_id: {**node, "inputs": {k: unwrap(v) for k, v in node["inputs"].items()}}
            for node_id, node in prompt.items()}


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


def open_and_convert(app: AppPage, workflow: dict, path: Path) -> dict:
    path.write_text(json.dumps(workflow))
    app.open_file(path, len(workflow["nodes"]))
    return app.page.evaluate(GRAPH_TO_PROMPT)


@pytest.mark.parametrize("template_id", list(TEMPLATES))
def test_template_runs_with_zimage_loader(app_page, comfy_server, object_info, tmp_path, template_id):
    app = app_page
    path = template_file(template_id)
    for node_type in TEMPLATES[template_id]:
        skip_unless_host_has(node_type in object_info, f"{node_type} node (the template {path.name} uses it)")
    template = json.loads(path.read_text())
    full_size = with_zimage_loader(template, object_info["ZImageLoader"])[0]
    if not torch.cuda.is_available():
        template = at_cpu_size(template)
    ours, count = with_zimage_loader(template, object_info["ZImageLoader"])
    assert count >= 1, f"{path.name}: no UNETLoader to replace"

    # the untouched template as the app converts it, then ours: the same prompt but for the loader
    native_prompt = open_and_convert(app, template, tmp_path / f"native_{path.name}")
    since = len(app.log)
    prompt = open_and_convert(app, ours, tmp_path / f"zimage_{path.name}")
    differences = loader_nodes_differ_only(native_prompt, prompt)
    assert not differences, f"{path.name}: the app's prompts differ beyond the loader:\n" + "\n".join(differences)
    kinds = [node["class_type"] for node in prompt.values()]
    # a bypassed subgraph (0.8.0's Turbo template keeps a LoRA variant so) has its loader replaced but not queued
    assert 1 <= kinds.count("ZImageLoader") <= count and "UNETLoader" not in kinds, kinds
    if not torch.cuda.is_available():  # the smaller size reached the prompt (else the run would take its own)
        sizes = {(n["inputs"]["width"], n["inputs"]["height"]) for n in prompt.values()
                 if n["class_type"] in ("EmptySD3LatentImage", "EmptyLatentImage")
                 and isinstance(n["inputs"]["width"], int)}  # not a link: the ControlNet's takes its image's size
        assert sizes <= {(CPU_SIDE, CPU_SIDE)}, sizes
    unknown = sorted({kind for kind in kinds if kind not in object_info})
    assert not unknown, f"{path.name}: node types this host lacks: {unknown}"
    app.page.screenshot(path=str(tmp_path / "opened.png"))
    assert not app.problems(since), f"{path.name}:\n" + "\n".join(app.problems(since))

    if host_version() == FULL_SIZE_HOST:  # the prompt the GPU test runs is the app's, at the template's own size
        kept = FULL_SIZE_PROMPTS / f"{template_id}.api.json"
        converted = open_and_convert(app, full_size, tmp_path / f"full_{path.name}")
        if os.environ.get("ZIMAGE_WRITE_TEMPLATE_PROMPTS"):
            kept.parent.mkdir(exist_ok=True)
            kept.write_text(json.dumps(converted, indent=1) + "\n")
        assert kept.is_file() and json.loads(kept.read_text()) == converted, \
            f"{kept.name} is not what the app makes of the template now: rerun with ZIMAGE_WRITE_TEMPLATE_PROMPTS=1"
        # back to the one run here (under another file name: the app keeps a tab per name)
        assert open_and_convert(app, ours, tmp_path / f"run_{path.name}") == prompt

    queued = app.page.evaluate(QUEUE_AS_THE_RUN_BUTTON)
    assert len(queued) == 1 and queued[0].get("prompt_id"), f"{path.name}: the app queued {json.dumps(queued)[:2000]}"
    assert not queued[0].get("node_errors"), json.dumps(queued[0]["node_errors"])[:2000]
    entry = comfy_server.wait(queued[0]["prompt_id"], timeout=RUN_TIMEOUT_S)
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "success", f"{path.name}: " + json.dumps(errors)[:3000]
    assert entry["prompt"][2] == as_received(prompt), "the server ran another prompt than the app converted"

    saved = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"]
    assert saved, f"{path.name}: no SaveImage"
    for node_id in saved:
        images = entry["outputs"].get(node_id, {}).get("images", [])
        assert images, f"{path.name}: SaveImage {node_id} saved nothing"
        for image in images:
            file = comfy_server.base / "output" / image["subfolder"] / image["filename"]
            assert image["type"] == "output" and file.is_file() and file.stat().st_size > 1000, image
    assert output_images(entry)
    assert not app.problems(since), f"{path.name}:\n" + "\n".join(app.problems(since))
