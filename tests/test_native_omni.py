"""Reference images written by ComfyUI's own nodes reach the engine: TextEncodeZImageOmni's conditioning (ComfyUI
0.14 and later) with ZImageLoader's MODEL, under ZImageSampler and KSampler, and SigLIP2 NaFlex vision encoders.

The pack reads TextEncodeZImageOmni's entries (reference_latents, clip_vision_outputs,
reference_latents_text_embeds) as ZImageEdit writes them, so the same image and instruction give the same latent
through either node; without that mapping the references were dropped and the result was the plain prompt's.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from comfy_host import NAFLEX_FILE, OMNI_FILE, VISION_FILE, host_has_naflex, load_workflow
from conftest import skip_unless_host_has
from test_edit_node import error_of, saved_latent, write_image

pytestmark = pytest.mark.host

INSTRUCTION = "make the sky purple"


def has_native_omni() -> bool:
    import comfy_extras.nodes_zimage  # noqa: F401  (0.14 and later)

    return True


@pytest.fixture(scope="module")
def native_omni(comfyui_path):
    try:
        present = has_native_omni()
    except ImportError:
        present = False
    skip_unless_host_has(present, "TextEncodeZImageOmni")


def base_graph(image: str, sampler: dict, vision: str = VISION_FILE, model: str = OMNI_FILE) -> dict:
    """Loaders, the image, a sampler node "7" and SaveLatent; conditioning nodes are added by each test."""
    graph = load_workflow("zimage_edit.api.json")
    graph["1"]["inputs"]["model_name"] = model
    graph["4"]["inputs"]["clip_name"] = vision
    graph["5"]["inputs"]["image"] = image
    del graph["6"], graph["8"], graph["9"]
    graph["7"] = sampler
    graph["20"] = {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": "omni"}}
    return graph


def zimage_sampler(positive, negative, latent) -> dict:
    return {"class_type": "ZImageSampler", "inputs": {
        "model": ["1", 0], "positive": positive, "negative": negative, "latent": latent, "seed": 3, "preset": "custom",
        "steps": 8, "cfg": 2.0, "shift": 3.0, "denoise": 1.0, "cfg_normalization": 0.0, "cfg_truncation": 1.0}}


def native_encode(prompt: str, images: bool = True, vae: bool = True, encoder: bool = True) -> dict:
    inputs = {"clip": ["2", 0], "prompt": prompt, "auto_resize_images": False}
    if images:
        inputs["image1"] = ["5", 0]
    if vae:
        inputs["vae"] = ["3", 0]
    if encoder:
        inputs["image_encoder"] = ["4", 0]
    return {"class_type": "TextEncodeZImageOmni", "inputs": inputs}


def with_native_conditioning(image: str, sampler_node=zimage_sampler, **encode) -> dict:
    graph = base_graph(image, sampler_node(["10", 0], ["11", 0], ["12", 0]))
    graph["10"] = native_encode(INSTRUCTION, **encode)
    graph["11"] = native_encode("", **encode)
    graph["12"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["3", 0]}}
    return graph


def with_zimage_edit(image: str, vision: str = VISION_FILE) -> dict:
    graph = base_graph(image, zimage_sampler(["6", 0], ["6", 1], ["6", 2]), vision=vision)
    graph["6"] = {"class_type": "ZImageEdit", "inputs": {
        "model": ["1", 0], "clip": ["2", 0], "clip_vision": ["4", 0], "vae": ["3", 0], "image": ["5", 0],
        "instruction": INSTRUCTION, "negative_prompt": ""}}
    return graph


def test_native_omni_conditioning_gives_zimage_edits_result(comfy_server, native_omni):
    """A square image (TextEncodeZImageOmni crops for a fixed-size SigLIP, ZImageEdit does not; a square is the
    same either way) and no auto resize: both nodes hand the engine the same chunks and references."""
    image = write_image(comfy_server, "omni_square.png", 256, 256, seed=31)
    native = saved_latent(comfy_server, comfy_server.run(with_native_conditioning(image)))
    ours = saved_latent(comfy_server, comfy_server.run(with_zimage_edit(image)))
    assert native.shape == ours.shape == (1, 16, 32, 32)
    assert torch.equal(native, ours)

    # the defect this guards against, the images dropped: another image, another result
    other = write_image(comfy_server, "omni_other.png", 256, 256, seed=33)
    swapped = saved_latent(comfy_server, comfy_server.run(with_native_conditioning(other)))
    assert (native - swapped).norm() / native.norm() > 1e-2


def test_ksampler_reads_native_omni_conditioning_as_zimage_sampler_does(comfy_server, native_omni):
    image = write_image(comfy_server, "omni_square.png", 256, 256, seed=31)

    def ksampler(positive, negative, latent):
        return {"class_type": "KSampler", "inputs": {
            "model": ["30", 0], "positive": positive, "negative": negative, "latent_image": latent, "seed": 3,
            "steps": 8, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}

    graph = with_native_conditioning(image, sampler_node=ksampler)
    graph["30"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}}
    native = saved_latent(comfy_server, comfy_server.run(graph))
    ours = saved_latent(comfy_server, comfy_server.run(with_native_conditioning(image)))
    assert ((native - ours).norm() / ours.norm()).item() < 1e-4


@pytest.mark.parametrize("missing, message", [
    ("encoder", "connect a SigLIP vision model"),
    ("vae", "connect the VAE"),
])
def test_native_omni_conditioning_missing_a_part_is_refused(comfy_server, native_omni, missing, message):
    """Native ComfyUI samples references without vision features with pad tokens and drops vision features without
    latents; the engine needs both, and says which is missing."""
    image = write_image(comfy_server, "omni_square.png", 256, 256, seed=31)
    graph = with_native_conditioning(image, **{missing: False})
    error = error_of(comfy_server.run(graph))
    assert error["node_type"] == "ZImageSampler" and message in error["exception_message"]


def test_native_omni_conditioning_on_a_turbo_model_is_refused(comfy_server, native_omni):
    image = write_image(comfy_server, "omni_square.png", 256, 256, seed=31)
    graph = with_native_conditioning(image)
    graph["1"]["inputs"]["model_name"] = "z_image_turbo_bf16.safetensors"
    error = error_of(comfy_server.run(graph))
    assert "no SigLIP image embedder" in error["exception_message"]


def test_odd_reference_latents_are_cropped_as_the_official_pipeline_crops(zimage_pack):
    """TextEncodeZImageOmni's auto resize makes sides multiples of 8 pixels, so latents can be odd; the model reads
    2x2 patches. The last odd row or column goes (8 pixels), as the official pipeline crops to 16."""
    reference_conds = importlib.import_module(f"{zimage_pack.__name__}.nodes.reference_images").reference_conds
    latent = torch.randn(1, 16, 111, 148)
    vision = {"last_hidden_state": torch.randn(1, 16, 24)}
    texts = [torch.randn(1, 4, 32), torch.randn(1, 2, 32)]
    conds = reference_conds({"reference_latents": [latent], "clip_vision_outputs": [vision],
                             "reference_latents_text_embeds": texts}, lambda x: x * 2)
    assert torch.equal(conds["ref_latents"][0], latent[..., :110, :148] * 2)
    assert conds["siglip_feats"][0].shape == (1, 4, 4, 24)
    assert [t.shape for t in conds["ref_contexts"]] == [t.shape for t in texts]


def test_naflex_vision_encoder_gives_a_grid_of_the_images_aspect(comfyui_path, comfy_base, zimage_pack):
    """A SigLIP2 NaFlex encoder (ComfyUI 0.14 and later) encodes a 320x256 image as a 9x7 grid of patches, not a
    square; ZImageEdit used to refuse it as "not a square grid"."""
    skip_unless_host_has(host_has_naflex(), "SigLIP2 NaFlex vision encoders")
    import comfy.clip_vision

    siglip_grid = importlib.import_module(f"{zimage_pack.__name__}.nodes.reference_images").siglip_grid
    encoder = comfy.clip_vision.load(str(comfy_base / "models" / "clip_vision" / NAFLEX_FILE))
    output = encoder.encode_image(torch.rand(1, 256, 320, 3), crop=False)
    grid = siglip_grid(output)
    assert grid.shape == (7, 9, 24)
    assert torch.equal(grid.reshape(63, 24), output["last_hidden_state"][0])


def test_zimage_edit_with_a_naflex_encoder_runs_on_a_non_square_image(comfy_server):
    skip_unless_host_has(host_has_naflex(), "SigLIP2 NaFlex vision encoders")
    image = write_image(comfy_server, "omni_wide.png", 320, 256, seed=32)
    naflex = saved_latent(comfy_server, comfy_server.run(with_zimage_edit(image, vision=NAFLEX_FILE)))
    fixed = saved_latent(comfy_server, comfy_server.run(with_zimage_edit(image)))
    assert naflex.shape == fixed.shape == (1, 16, 32, 40)
    assert (naflex - fixed).norm() / fixed.norm() > 1e-3  # the other encoder's features are what the model read
