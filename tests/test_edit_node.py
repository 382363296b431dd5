"""ZImageEdit in the real ComfyUI with a tiny Omni model: reference images steer the result, errors are clear."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from comfy_host import load_workflow

pytestmark = pytest.mark.host


def edit_graph(image: str = "example.png", model: str | None = None) -> dict:
    """The shipped edit workflow, 6 guided steps, saving the latent instead of decoding it."""
    graph = load_workflow("zimage_edit.api.json")
    graph["5"]["inputs"]["image"] = image
    if model:
        graph["1"]["inputs"]["model_name"] = model
    graph["7"]["inputs"].update(preset="custom", steps=6, cfg=3.0, seed=11)
    del graph["8"], graph["9"]
    graph["20"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "edit"}}
    return graph


def saved_latent(server, entry) -> torch.Tensor:
    assert entry["status"]["status_str"] == "success", entry["status"]
    (latent,) = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
    return load_file(str(server.base / "output" / latent["subfolder"] / latent["filename"]))["latent_tensor"]


def error_of(entry) -> dict:
    assert entry["status"]["status_str"] == "error", entry["status"]
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    return error


def write_image(server, name: str, width: int, height: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(server.base / "input" / name)
    return name


def test_the_reference_image_steers_the_result(comfy_server):
    other = write_image(comfy_server, "edit_other.png", 320, 256, seed=21)
    first = saved_latent(comfy_server, comfy_server.run(edit_graph()))
    again = saved_latent(comfy_server, comfy_server.run(edit_graph()))
    swapped = saved_latent(comfy_server, comfy_server.run(edit_graph(other)))
    assert first.shape == (1, 16, 32, 40)  # the reference's size: 320x256 pixels
    assert torch.equal(first, again)  # same seed, same reference: the same result
    assert (first - swapped).norm() / first.norm() > 1e-2  # same seed, another reference: another result

    # the same seed and instruction without a reference: the Omni model as a text-to-image model
    plain = edit_graph()
    plain["4b"] = {"class_type": "ZImageTextEncode", "inputs": {"clip": ["2", 0], "template": "official",
                                                                "prompt": plain["6"]["inputs"]["instruction"],
                                                                "negative_prompt": ""}}
    plain["7"]["inputs"].update(positive=["4b", 0], negative=["4b", 1])
    plain["30"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["3", 0]}}
    plain["7"]["inputs"]["latent"] = ["30", 0]
    del plain["6"], plain["4"]
    without = saved_latent(comfy_server, comfy_server.run(plain))
    assert without.shape == first.shape
    assert (first - without).norm() / first.norm() > 1e-2


def test_two_reference_images_of_different_sizes(comfy_server):
    second = write_image(comfy_server, "edit_second.png", 192, 256, seed=22)
    graph = edit_graph()
    graph["5b"] = {"class_type": "LoadImage", "inputs": {"image": second}}
    graph["6"]["inputs"]["image_2"] = ["5b", 0]
    two = saved_latent(comfy_server, comfy_server.run(graph))
    one = saved_latent(comfy_server, comfy_server.run(edit_graph()))
    assert two.shape == one.shape == (1, 16, 32, 40)
    assert (two - one).norm() / one.norm() > 1e-2


def test_clear_errors_and_the_server_keeps_serving(comfy_server):
    turbo = error_of(comfy_server.run(edit_graph(model="z_image_turbo_bf16.safetensors")))
    assert turbo["node_type"] == "ZImageEdit" and "Turbo/Base" in turbo["exception_message"]
    assert "Z-Image-Edit" in turbo["exception_message"]

    odd = write_image(comfy_server, "edit_odd.png", 100, 90, seed=23)
    size = error_of(comfy_server.run(edit_graph(odd)))
    assert "100x90" in size["exception_message"] and "multiples of 16" in size["exception_message"]

    # the positive from ZImageEdit with a negative that carries no references
    mixed = edit_graph()
    mixed["4b"] = {"class_type": "ZImageTextEncode", "inputs": {"clip": ["2", 0], "template": "official",
                                                                "prompt": "x", "negative_prompt": ""}}
    mixed["7"]["inputs"]["negative"] = ["4b", 1]
    assert "negative" in error_of(comfy_server.run(mixed))["exception_message"]

    assert saved_latent(comfy_server, comfy_server.run(edit_graph())).shape == (1, 16, 32, 40)


def test_ksampler_samples_the_edit_conditioning_as_zimage_sampler_does(comfy_server):
    """ZImageEdit's conditioning under native KSampler (euler, simple, cfg = guidance + 1, ModelSamplingAuraFlow
    shift 3): the reference images reach every evaluation, negative pass included, and the latent is
    ZImageSampler's. 8 steps: the simple schedule then hits the flow schedule's sigmas exactly."""
    ours = edit_graph()
    ours["7"]["inputs"]["steps"] = 8
    native = edit_graph()
    native["7"] = {"class_type": "KSampler", "inputs": {"model": ["30", 0], "positive": ["6", 0], "negative": ["6", 1],
                                                        "latent_image": ["6", 2], "seed": 11, "steps": 8, "cfg": 4.0,
                                                        "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    native["30"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}}
    a = saved_latent(comfy_server, comfy_server.run(ours))
    b = saved_latent(comfy_server, comfy_server.run(native))
    assert a.shape == b.shape == (1, 16, 32, 40)
    assert ((a - b).norm() / a.norm()).item() < 1e-4


def test_instruction_chunks_tokenize_as_qwen_does(comfyui_path):
    """The Omni chunks go through ComfyUI's tokenizer with no template added; the vision markers stay single
    special tokens, as Qwen's own tokenizer (the one diffusers' pipeline uses) reads them."""
    import os

    import comfy.text_encoders.z_image as z_image
    from transformers import Qwen2Tokenizer

    from zimage import omni_prompt_chunks

    ours = z_image.ZImageTokenizer()
    qwen = Qwen2Tokenizer.from_pretrained(os.path.join(os.path.dirname(z_image.__file__), "qwen25_tokenizer"))
    for n in (1, 2):
        for text in omni_prompt_chunks("replace the background with a rainy street 让她手里拿着一杯咖啡", n):
            ids = [t for t, _ in ours.tokenize_with_weights(text, llama_template="{}")["qwen3_4b"][0]]
            assert ids == qwen(text, add_special_tokens=False)["input_ids"], text


def test_denoise_below_one_starts_from_the_source_image(comfy_server):
    """ZImageEdit's latent is the source image: with denoise < 1 the edit starts from it, and stays nearer it."""
    graph = edit_graph()
    graph["21"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 2], "filename_prefix": "edit_source"}}
    entry = comfy_server.run(graph)
    latents = {f["filename"].split("_")[1]: f for out in entry["outputs"].values() for f in out.get("latents", [])}
    assert entry["status"]["status_str"] == "success" and len(latents) == 2
    source = load_file(str(comfy_server.base / "output" / latents["source"]["subfolder"] /
                           latents["source"]["filename"]))["latent_tensor"]
    full = saved_latent(comfy_server, comfy_server.run(edit_graph()))
    partial_graph = edit_graph()
    partial_graph["7"]["inputs"]["denoise"] = 0.3
    partial = saved_latent(comfy_server, comfy_server.run(partial_graph))
    assert source.shape == full.shape == partial.shape
    assert (partial - source).norm() < (full - source).norm()


def test_text_nodes_refuse_a_missing_or_foreign_text_encoder(zimage_pack):
    import importlib
    from types import SimpleNamespace

    require_qwen3 = importlib.import_module(f"{zimage_pack.__name__}.nodes.text_encode").require_qwen3
    with pytest.raises(ValueError, match="clip input is empty"):
        require_qwen3(None, "ZImageEdit")
    with pytest.raises(ValueError, match="ZImageEdit: this CLIP is not Qwen3-4B"):
        require_qwen3(SimpleNamespace(tokenizer=SimpleNamespace(clip_name="l")), "ZImageEdit")
    require_qwen3(SimpleNamespace(tokenizer=SimpleNamespace(clip_name="qwen3_4b")), "ZImageEdit")
