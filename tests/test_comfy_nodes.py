"""The pack inside a real ComfyUI: import, /object_info, every workflow, the API queue, errors, interruption,
and native interop (KSampler + ModelSamplingAuraFlow, CLIPTextEncode)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfy_host import load_workflow, output_images, shrink

pytestmark = pytest.mark.host

OUR_NODES = ["ZImageLoader", "ZImageLoraLoader", "ZImageTextEncode", "ZImageLatent", "ZImageSampler", "ZImageEdit"]
# every shipped API workflow: a new one is run without being listed here
API_WORKFLOWS = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "workflows").glob("*.api.json"))


def test_pack_imports_in_comfyui(comfyui_path, comfy_base):
    result = subprocess.run([sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory",
                             str(comfy_base)], cwd=comfyui_path, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    import_lines = [line for line in log.splitlines() if "comfyui-zimage" in line]
    assert import_lines and not any("IMPORT FAILED" in line for line in import_lines), log[-3000:]


def test_object_info_lists_the_nodes_with_tooltips(comfy_server):
    info = comfy_server.get("/object_info")
    for name in OUR_NODES:
        node = info[name]
        assert node["category"] == "Z-Image"
        assert node["display_name"].startswith("Z-Image/")
        assert node["description"]
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
    sampler = info["ZImageSampler"]["input"]
    assert set(sampler["required"]) >= {"model", "positive", "latent", "seed", "steps", "cfg", "shift", "denoise",
                                        "cfg_normalization", "cfg_truncation", "preset"}
    assert "negative" in sampler["optional"]
    assert set(info["ZImageEdit"]["input"]["required"]) == {"model", "clip", "clip_vision", "vae", "image",
                                                            "instruction", "negative_prompt"}
    assert "z_image_turbo_bf16.safetensors" in info["ZImageLoader"]["input"]["required"]["model_name"][0]


@pytest.mark.parametrize("workflow", API_WORKFLOWS)
def test_workflow_runs_end_to_end(comfy_server, workflow):
    entry = comfy_server.run(shrink(load_workflow(workflow)))
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = output_images(entry)
    assert len(images) == 1
    path = comfy_server.base / "output" / images[0]["subfolder"] / images[0]["filename"]
    assert path.is_file() and path.stat().st_size > 1000


def test_twenty_queued_prompts_all_finish(comfy_server):
    workflow = shrink(load_workflow("zimage_turbo_t2i.api.json"))
    ids = []
    for seed in range(20):
        prompt = json.loads(json.dumps(workflow))
        prompt["6"]["inputs"]["seed"] = 1000 + seed
        prompt["8"]["inputs"]["filename_prefix"] = f"queue_{seed}"
        status, body = comfy_server.queue(prompt)
        assert status == 200, body
        ids.append(body["prompt_id"])
    files = set()
    for prompt_id in ids:
        entry = comfy_server.wait(prompt_id)
        assert entry["status"]["status_str"] == "success"
        (image,) = output_images(entry)
        files.add(image["filename"])
    assert len(files) == 20


def _refused(comfy_server, prompt, node_id):
    status, body = comfy_server.queue(prompt)
    assert status == 400, body
    errors = body["node_errors"][node_id]["errors"]
    return " ".join(f"{e['message']} {e.get('details', '')}" for e in errors)


def test_bad_prompts_get_clear_node_errors_and_the_server_keeps_serving(comfy_server):
    good = shrink(load_workflow("zimage_turbo_t2i.api.json"))

    missing = json.loads(json.dumps(good))
    missing["1"]["inputs"]["model_name"] = "z_image_missing.safetensors"
    assert "z_image_missing.safetensors" in _refused(comfy_server, missing, "1")

    odd_size = json.loads(json.dumps(good))
    odd_size["5"]["inputs"].update(width=1000, height=1001)
    message = _refused(comfy_server, odd_size, "5")
    assert "multiple of 16" in message and "1001" in message

    no_steps = json.loads(json.dumps(good))
    no_steps["6"]["inputs"].update(steps=0, preset="custom")
    assert "steps" in _refused(comfy_server, no_steps, "6")

    entry = comfy_server.run(good)
    assert entry["status"]["status_str"] == "success"


def test_runtime_errors_reach_the_api_and_the_next_prompt_runs(comfy_server):
    """An error raised while running (cfg without a negative) comes back in /history with its message."""
    prompt = shrink(load_workflow("zimage_turbo_t2i.api.json"))
    del prompt["6"]["inputs"]["negative"]
    prompt["6"]["inputs"].update(preset="custom", cfg=3.0)
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and "negative" in errors[0]["exception_message"] and errors[0]["node_type"] == "ZImageSampler"
    assert comfy_server.run(shrink(load_workflow("zimage_turbo_t2i.api.json")))["status"]["status_str"] == "success"


def test_interrupt_stops_sampling_within_a_step(comfy_server):
    prompt = shrink(load_workflow("zimage_turbo_t2i.api.json"), side=1536)
    prompt["6"]["inputs"].update(preset="custom", steps=200, seed=7)
    prompt["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "interrupted"}}
    del prompt["8"]
    status, body = comfy_server.queue(prompt)
    assert status == 200, body
    prompt_id = body["prompt_id"]
    deadline = time.time() + 60
    while not any(item[1] == prompt_id for item in comfy_server.get("/queue")["queue_running"]):
        assert time.time() < deadline
        time.sleep(0.1)
    time.sleep(3.0)  # loaders are cached by now: this is well inside the 200 steps (~0.5 s each)
    sent = time.time()
    comfy_server.request("/interrupt", {})
    entry = comfy_server.wait(prompt_id, timeout=120)
    latency = time.time() - sent
    kinds = [m[0] for m in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert latency < 2.5, f"interrupt took {latency:.1f} s"
    assert comfy_server.run(shrink(load_workflow("zimage_turbo_t2i.api.json")))["status"]["status_str"] == "success"


def _saved_latent(comfy_server, entry) -> torch.Tensor:
    (latent,) = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
    path = comfy_server.base / "output" / latent["subfolder"] / latent["filename"]
    return load_file(str(path))["latent_tensor"]


def _latent_graph(sampler_nodes: dict, encode: str = "ours") -> dict:
    graph = shrink(load_workflow("zimage_turbo_t2i.api.json"))
    del graph["7"], graph["8"]
    if encode == "native":
        prompt = graph["4"]["inputs"]["prompt"]
        graph["4"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": prompt}}
    graph.update(sampler_nodes)
    graph["20"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "compare"}}
    return graph


def test_native_ksampler_with_model_sampling_aura_flow_matches_zimage_sampler(comfy_server):
    """KSampler(euler, simple, 8 steps, cfg 1) on ModelSamplingAuraFlow(shift 3) is the Turbo recipe: the
    simple schedule at 8 steps is exactly 3t/(1+2t) on t = 1, 7/8, ..., 0, and the noise is the same."""
    ours = _latent_graph({})
    ours["6"]["inputs"].update(seed=5)
    native = _latent_graph({
        "6": {"class_type": "KSampler", "inputs": {"model": ["30", 0], "positive": ["4", 0], "negative": ["4", 1],
                                                   "latent_image": ["5", 0], "seed": 5, "steps": 8, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "30": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}},
    })
    a = _saved_latent(comfy_server, comfy_server.run(ours))
    b = _saved_latent(comfy_server, comfy_server.run(native))
    assert a.shape == b.shape == (1, 16, 32, 32)
    assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_native_clip_text_encode_conditioning_is_accepted(comfy_server):
    """CLIPTextEncode writes the same chat template: its conditioning gives the same latent."""
    ours = _latent_graph({})
    native = _latent_graph({}, encode="native")
    native["6"]["inputs"]["negative"] = ["4", 0]
    a = _saved_latent(comfy_server, comfy_server.run(ours))
    b = _saved_latent(comfy_server, comfy_server.run(native))
    assert torch.equal(a, b)


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e4m3fn_fast"])
def test_fp8_weight_dtypes_sample_close_to_full_precision(comfy_server, weight_dtype):
    """fp8 storage (bf16 matmuls) and fp8 matmuls run through ComfyUI and stay near the full-precision result."""
    full = _saved_latent(comfy_server, comfy_server.run(_latent_graph({})))
    graph = _latent_graph({})
    graph["1"]["inputs"]["weight_dtype"] = weight_dtype
    fp8 = _saved_latent(comfy_server, comfy_server.run(graph))
    err = ((fp8 - full).norm() / full.norm()).item()
    assert 1e-4 < err < 0.25, err


def test_fp8_storage_covers_every_block_stack_of_an_omni_model(zimage_pack):
    """fp8_e4m3fn storage keeps every block's matrices in e4m3, the SigLIP refiner's of an Omni/Edit model too
    (a second, shorter list of stacks once left them in full precision)."""
    import importlib

    from helpers import randomize_
    from zimage import ZImageConfig

    pack = zimage_pack.__name__
    comfy_model = importlib.import_module(f"{pack}.nodes.comfy_model")
    S3DiT = importlib.import_module(f"{pack}.zimage").S3DiT
    network = S3DiT(ZImageConfig.tiny(siglip_feat_dim=24), ops=comfy_model.comfy_ops(torch.float8_e4m3fn, torch.float32))
    model = comfy_model.comfy_model(randomize_(network, 0), torch.float8_e4m3fn)
    transformer = model.model.diffusion_model
    for name, stack in zip(transformer.cfg.block_stacks, transformer.block_stacks()):
        for module_name, module in stack.named_modules():
            if isinstance(module, torch.nn.Linear):
                assert module.weight.dtype == torch.float8_e4m3fn, f"{name}.{module_name}"
    assert transformer.x_embedder.weight.dtype == torch.float32  # outside the blocks: the compute dtype


def test_the_readme_names_the_nodes_and_outputs_as_the_graph_editor_shows_them(comfy_server):
    """The README's node table uses the display names the graph editor shows; the LoRA node's output carries the
    name of the loader's, whose place it takes."""
    from comfy_host import PACK_ROOT

    readme = (PACK_ROOT / "README.md").read_text()
    info = comfy_server.get("/object_info")
    for name in OUR_NODES:
        assert f"| {info[name]['display_name']} (`{name}`) |" in readme, name
    assert info["ZImageLoraLoader"]["output_name"] == info["ZImageLoader"]["output_name"] == ["model"]
