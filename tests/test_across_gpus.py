"""Z-Image/Loader Across GPUs in ComfyUI's server: the shipped Base workflow (guidance, ZImageSampler) and the
official graph's KSampler with the model split across two worker processes, on the CPU ("cpu,cpu", gloo), give the
latents of the model loaded in the server's own process; what it refuses, it refuses through the API."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfy_host import load_workflow, shrink
from test_edit_node import error_of, saved_latent
from zimage import ZImageConfig

ACROSS = {"class_type": "ZImageLoaderAcrossGPUs",
          "inputs": {"model_name": "z_image_bf16.safetensors", "gpus": "cpu,cpu", "split": "cfg",
                     "weight_dtype": "default"}}


def base_graph(loader: dict, sampler: str = "ZImageSampler") -> dict:
    graph = shrink(load_workflow("zimage_base_t2i_cfg.api.json"))
    graph["1"] = loader
    del graph["7"], graph["8"]
    graph["6"]["inputs"].update(preset="custom", steps=3, cfg=3.0)
    if sampler == "KSampler":  # ComfyUI's own sampler on the same model and conditioning (cfg = guidance + 1)
        graph["9"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}}
        graph["6"] = {"class_type": "KSampler", "inputs": {
            "model": ["9", 0], "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["5", 0], "seed": 42,
            "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    graph["20"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "across"}}
    return graph


def across(**inputs) -> dict:
    return {"class_type": ACROSS["class_type"], "inputs": {**ACROSS["inputs"], **inputs}}


@pytest.mark.parametrize("sampler", ["ZImageSampler", "KSampler"])
@pytest.mark.parametrize("split", ["cfg", "sequence"])
def test_a_model_across_two_workers_gives_the_in_process_latent(comfy_server, split, sampler):
    one_process = load_workflow("zimage_base_t2i_cfg.api.json")["1"]
    expected = saved_latent(comfy_server, comfy_server.run(base_graph(one_process, sampler)))
    entry = comfy_server.run(base_graph(across(split=split), sampler))
    assert entry["status"]["status_str"] == "success", [m[1]["exception_message"] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    torch.testing.assert_close(saved_latent(comfy_server, entry), expected, rtol=1e-4, atol=1e-4)
    (summary,) = entry["outputs"]["1"]["text"]
    assert f"across cpu, cpu ({split} split" in summary, summary


def test_what_a_model_across_gpus_refuses_comes_back_through_the_api(comfy_server):
    entry = comfy_server.run(base_graph(across(gpus="0,1")))
    if torch.cuda.device_count() < 2:
        assert "this machine has" in error_of(entry)["exception_message"], error_of(entry)
    entry = comfy_server.run(base_graph(across(gpus="first,second")))
    assert "is not a list of GPU numbers" in error_of(entry)["exception_message"]
    dim = ZImageConfig.tiny().dim  # the test server's transformers' width
    save_file({"diffusion_model.layers.0.attention.qkv.lora_A.weight": torch.zeros(2, dim),
               "diffusion_model.layers.0.attention.qkv.lora_B.weight": torch.zeros(3 * dim, 2)},
              str(comfy_server.base / "models" / "loras" / "across_gpus_test.safetensors"))
    graph = base_graph(across())
    graph["10"] = {"class_type": "ZImageLoraLoader",
                   "inputs": {"model": ["1", 0], "lora_name": "across_gpus_test.safetensors", "strength": 1.0}}
    graph["6"]["inputs"]["model"] = ["10", 0]
    entry = comfy_server.run(graph)
    assert "LoRAs do not apply to a model across GPUs" in error_of(entry)["exception_message"]
    graph["10"] = {"class_type": "LoraLoaderModelOnly",  # ComfyUI's own LoRA loader
                   "inputs": {"model": ["1", 0], "lora_name": "across_gpus_test.safetensors", "strength_model": 1.0}}
    entry = comfy_server.run(graph)
    assert "do not apply to a model across GPUs" in error_of(entry)["exception_message"], error_of(entry)
    # the server keeps serving: the in-process model still samples
    one_process = load_workflow("zimage_base_t2i_cfg.api.json")["1"]
    assert saved_latent(comfy_server, comfy_server.run(base_graph(one_process))).isfinite().all()
