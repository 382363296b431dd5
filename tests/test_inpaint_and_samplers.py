"""ZImageSampler's inpainting masks, batch_index noise and res_multistep sampler inside ComfyUI, against native
KSampler (ModelSamplingAuraFlow shift 3, scheduler simple, 8 steps: the simple schedule then hits the flow
schedule's sigmas exactly, cfg = ZImageSampler's cfg + 1).

Through the server: the masks that SetLatentNoiseMask, VAEEncodeForInpaint and InpaintModelConditioning put on a
LATENT (from LoadImage's mask of an image with a transparent rectangle), LatentFromBatch's batch_index, and
res_multistep text-to-image. In-process: mask layouts and batch repeats, guidance and img2img under
res_multistep, and what is refused.
"""

from __future__ import annotations

import importlib
import json
import threading
import uuid

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from comfy_host import load_workflow, shrink
from helpers import randomize_
import test_browser
from zimage import ZImageConfig

pytestmark = pytest.mark.host

TOLERANCE = 1e-4  # the relative error the euler KSampler-equality test allows (test_comfy_nodes.py)
# the transparent rectangle of the test image, in latent cells (8 pixels): rows 8..19, columns 12..27
HOLE = (slice(8, 20), slice(12, 28))
MASK_IMAGE = "zimage_inpaint_test.png"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def far_from_hole(height: int, width: int, margin: int = 2) -> torch.Tensor:
    """Latent cells at least `margin` cells from the hole: untouched by a grown or resized mask's edge."""
    keep = torch.ones(height, width, dtype=torch.bool)
    keep[HOLE[0].start - margin: HOLE[0].stop + margin, HOLE[1].start - margin: HOLE[1].stop + margin] = False
    return keep


def latents_by_node(server, entry) -> dict[str, torch.Tensor]:
    assert entry["status"]["status_str"] == "success", entry["status"]
    found = {}
    for node_id, out in entry["outputs"].items():
        for f in out.get("latents", []):
            found[node_id] = load_file(str(server.base / "output" / f["subfolder"] / f["filename"]))["latent_tensor"]
    return found


@pytest.fixture(scope="module")
def mask_image(comfy_server):
    """320x256 random pixels, transparent (LoadImage's mask 1) over the hole's pixels."""
    g = torch.Generator().manual_seed(21)
    rgba = (torch.rand(256, 320, 4, generator=g) * 255).to(torch.uint8)
    rgba[..., 3] = 255
    rgba[HOLE[0].start * 8: HOLE[0].stop * 8, HOLE[1].start * 8: HOLE[1].stop * 8, 3] = 0
    Image.fromarray(rgba.numpy(), "RGBA").save(comfy_server.base / "input" / MASK_IMAGE)
    return MASK_IMAGE


def ksampler_node(positive, negative, latent, sampler: str, seed: int = 42) -> dict:
    return {"class_type": "KSampler", "inputs": {"model": ["30", 0], "positive": positive, "negative": negative,
                                                 "latent_image": latent, "seed": seed, "steps": 8, "cfg": 1.0,
                                                 "sampler_name": sampler, "scheduler": "simple", "denoise": 1.0}}


AURA_FLOW = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}}


def inpaint_graph(how: str, sampler: str, native: bool) -> dict:
    """The shipped inpainting workflow on the test image, its mask put on the latent by `how`; the sampler's
    input and output latents saved (SaveLatent 21 and 22) instead of decoded."""
    graph = load_workflow("zimage_turbo_inpaint.api.json")
    del graph["7"], graph["8"]
    graph["9"]["inputs"]["image"] = MASK_IMAGE
    positive, negative, latent = ["4", 0], ["4", 1], ["10", 0]
    if how == "SetLatentNoiseMask":
        graph["10"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["9", 0], "vae": ["3", 0]}}
        graph["11"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["10", 0], "mask": ["9", 1]}}
        latent = ["11", 0]
    elif how == "InpaintModelConditioning":
        graph["10"] = {"class_type": "InpaintModelConditioning", "inputs": {
            "positive": positive, "negative": negative, "vae": ["3", 0], "pixels": ["9", 0], "mask": ["9", 1],
            "noise_mask": True}}
        positive, negative, latent = ["10", 0], ["10", 1], ["10", 2]
    graph["6"]["inputs"].update(positive=positive, negative=negative, latent=latent, sampler=sampler)
    if native:
        graph["6"] = ksampler_node(positive, negative, latent, sampler)
        graph["30"] = AURA_FLOW
    tag = uuid.uuid4().hex[:8]  # new outputs: the saves run, not a cache hit
    graph["21"] = {"class_type": "SaveLatent", "inputs": {"samples": latent, "filename_prefix": f"in_{tag}"}}
    graph["22"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"out_{tag}"}}
    return graph


@pytest.mark.parametrize("sampler", ["euler", "res_multistep"])
@pytest.mark.parametrize("how", ["SetLatentNoiseMask", "VAEEncodeForInpaint", "InpaintModelConditioning"])
def test_inpainting_keeps_the_unmasked_region_and_matches_ksampler(comfy_server, mask_image, how, sampler):
    ours = latents_by_node(comfy_server, comfy_server.run(inpaint_graph(how, sampler, native=False)))
    native = latents_by_node(comfy_server, comfy_server.run(inpaint_graph(how, sampler, native=True)))
    start, out, reference = ours["21"], ours["22"], native["22"]
    assert torch.equal(start, native["21"]) and out.shape == start.shape == (1, 16, 32, 40)
    assert rel(out, reference) < TOLERANCE
    keep = far_from_hole(32, 40).expand_as(out)
    # the unmasked region is the input latent's, for both samplers alike (float32 rounding of the steps)
    assert (out - start)[keep].abs().max() < 1e-4
    assert (reference - start)[keep].abs().max() < 1e-4
    hole = (slice(None), slice(None), *HOLE)
    assert rel(out[hole], start[hole]) > 0.2  # the masked region is sampled anew


def test_a_mask_that_covers_nothing_returns_the_input(comfy_server):
    """The shipped workflow on an image without transparency: LoadImage's mask is empty, so nothing is sampled
    and the latent comes back as VAEEncodeForInpaint made it."""
    graph = inpaint_graph("VAEEncodeForInpaint", "res_multistep", native=False)
    graph["9"]["inputs"]["image"] = "example.png"
    latents = latents_by_node(comfy_server, comfy_server.run(graph))
    assert (latents["22"] - latents["21"]).abs().max() < 1e-4


def text_to_image_graph(sampler_node: dict, batch: int = 1, from_batch: tuple[int, int] | None = None) -> dict:
    graph = shrink(load_workflow("zimage_turbo_t2i.api.json"))
    del graph["7"], graph["8"]
    graph["5"]["inputs"]["batch_size"] = batch
    graph["6"] = sampler_node
    if from_batch is not None:
        graph["12"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["5", 0], "batch_index": from_batch[0],
                                                                   "length": from_batch[1]}}
        sampler_node["inputs"]["latent" if "latent" in sampler_node["inputs"] else "latent_image"] = ["12", 0]
    if sampler_node["class_type"] == "KSampler":
        graph["30"] = AURA_FLOW
    graph["20"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": uuid.uuid4().hex}}
    return graph


def zimage_sampler_node(sampler: str, seed: int = 5) -> dict:
    node = json.loads(json.dumps(load_workflow("zimage_turbo_t2i.api.json")["6"]))
    node["inputs"].update(seed=seed, sampler=sampler)
    return node


def run_latent(server, graph) -> torch.Tensor:
    return latents_by_node(server, server.run(graph))["20"]


def test_res_multistep_text_to_image_matches_ksampler(comfy_server):
    ours = run_latent(comfy_server, text_to_image_graph(zimage_sampler_node("res_multistep")))
    native = run_latent(comfy_server, text_to_image_graph(ksampler_node(["4", 0], ["4", 1], ["5", 0],
                                                                        "res_multistep", seed=5)))
    euler = run_latent(comfy_server, text_to_image_graph(zimage_sampler_node("euler")))
    assert ours.shape == native.shape == (1, 16, 32, 32)
    assert rel(ours, native) < TOLERANCE
    assert rel(ours, euler) > 1e-3  # the widget's choice is what runs


def test_batch_index_gives_the_noise_of_those_batch_entries_as_ksampler(comfy_server):
    """LatentFromBatch(1, 2) of a batch of 3: the two latents get entries 1 and 2's noise, as under KSampler, and
    come out as entries 1 and 2 of the whole batch's run."""
    ours = run_latent(comfy_server, text_to_image_graph(zimage_sampler_node("euler"), batch=3, from_batch=(1, 2)))
    native = run_latent(comfy_server, text_to_image_graph(ksampler_node(["4", 0], ["4", 1], ["5", 0], "euler", 5),
                                                          batch=3, from_batch=(1, 2)))
    whole = run_latent(comfy_server, text_to_image_graph(zimage_sampler_node("euler"), batch=3))
    assert ours.shape == (2, 16, 32, 32)
    assert rel(ours, native) < TOLERANCE
    assert rel(ours, whole[1:]) < 1e-5
    assert rel(ours, whole[:2]) > 1e-2


def test_an_unknown_sampler_is_refused_with_the_choices(comfy_server):
    prompt = shrink(load_workflow("zimage_turbo_t2i.api.json"))
    prompt["6"]["inputs"]["sampler"] = "dpmpp_2m_sde"
    status, body = comfy_server.queue(prompt)
    assert status == 400, body
    message = json.dumps(body["node_errors"]["6"])
    assert "dpmpp_2m_sde" in message and "res_multistep" in message


def in_a_browser(server, path, node_count: int) -> tuple[dict, list[str]]:
    """Opens a workflow file in the app as test_browser.py does; returns the prompt the app would queue and the
    problems the page logged. In a thread of its own: test_browser.py's browser may be running in this one, and
    one thread holds one Playwright."""
    if test_browser.sync_playwright is None or not test_browser.os.access(test_browser.CHROMIUM, test_browser.os.X_OK):
        pytest.skip("BROWSER TEST SKIPPED: playwright or chromium is missing (see tests/test_browser.py)")
    status, body = server.request("/settings/Comfy.TutorialCompleted", True)
    assert status == 200, body
    result = {}

    def run():
        try:
            with test_browser.sync_playwright() as p:
                browser = p.chromium.launch(executable_path=test_browser.CHROMIUM, args=test_browser.CHROMIUM_ARGS)
                app = test_browser.AppPage(browser, server.url)
                since = len(app.log)  # console errors from here on (loading the app may meet other tests' prompts)
                app.open_file(path, node_count)
                result["queued"] = app.page.evaluate("async () => (await window.app.graphToPrompt()).output")
                result["problems"] = app.problems(since)
                browser.close()
        except BaseException as e:  # raised again in the test's thread
            result["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if "error" in result:
        raise result["error"]
    return result["queued"], result["problems"]


def test_a_workflow_saved_before_the_sampler_widget_opens_with_euler(comfy_server, tmp_path):
    """UI files store widget values by position. The sampler widget is optional and last, so a file saved before it
    existed opens in the app with every value where it was and the sampler at its default, euler, which is what
    it ran with."""
    workflow = load_workflow("zimage_turbo_t2i.json")
    (node,) = [n for n in workflow["nodes"] if n["type"] == "ZImageSampler"]
    assert node["widgets_values"].pop() == "euler" and node["inputs"].pop()["name"] == "sampler"
    path = tmp_path / "zimage_saved_before_sampler.json"
    path.write_text(json.dumps(workflow))
    queued, problems = in_a_browser(comfy_server, path, len(workflow["nodes"]))
    twin = load_workflow("zimage_turbo_t2i.api.json")
    assert twin[str(node["id"])]["inputs"]["sampler"] == "euler"
    assert {i: n["inputs"] for i, n in queued.items()} == {i: n["inputs"] for i, n in twin.items()}
    assert not problems, problems


# --- in-process: the node and KSampler on a tiny float32 model -------------------------------------------------

CFG = ZImageConfig.tiny()


@pytest.fixture(scope="module")
def host(zimage_pack):
    import comfy.model_management
    import nodes as comfy_nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

    pack = zimage_pack.__name__
    comfy_model = importlib.import_module(f"{pack}.nodes.comfy_model")
    network = importlib.import_module(f"{pack}.zimage").S3DiT(CFG, ops=comfy_model.comfy_ops(None, torch.float32))
    model = comfy_model.comfy_model(randomize_(network, 7).eval())
    (aura,) = ModelSamplingAuraFlow().patch_aura(model, 3.0)
    yield dict(model=model, aura=aura, ksampler=comfy_nodes.common_ksampler,
               zimage=importlib.import_module(f"{pack}.nodes.sampler").ZImageSampler())
    comfy.model_management.unload_all_models()


def prompt(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 6, CFG.cap_feat_dim, generator=g), {}]]


def image_latent(batch: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 16, 8, 12, generator=torch.Generator().manual_seed(seed))


def both(host, latent: dict, sampler="euler", steps=8, denoise=1.0, cfg=0.0, seed=9):
    """(ZImageSampler's latent, KSampler's) for the same inputs; KSampler's cfg is ZImageSampler's + 1."""
    positive, negative = prompt(0), prompt(1)
    ours = host["zimage"].sample(host["model"], positive, latent, seed, "custom", steps, cfg, 3.0, denoise, 0.0, 1.0,
                                 negative=negative, sampler=sampler)[0]["samples"]
    native = host["ksampler"](host["aura"], seed, steps, cfg + 1.0, sampler, "simple", positive, negative, latent,
                              denoise=denoise)[0]["samples"]
    return ours, native


def left_half(height: int, width: int) -> torch.Tensor:
    mask = torch.zeros(height, width)
    mask[:, : width // 2] = 1.0
    return mask


MASK_LAYOUTS = {
    "pixels [H, W]": (1, lambda: left_half(64, 96)),
    "latent [B, H, W]": (2, lambda: left_half(8, 12).expand(2, 8, 12)),
    "pixels [B, 1, H, W], soft": (2, lambda: torch.rand(2, 1, 64, 96, generator=torch.Generator().manual_seed(4))),
    "one mask for a batch of 3": (3, lambda: left_half(64, 96)[None]),
    "2 masks tiled over 4 latents": (4, lambda: torch.stack([left_half(8, 12), left_half(8, 12).flip(1)])),
    "another aspect, stretched": (1, lambda: left_half(40, 40)),
}


@pytest.mark.parametrize("layout", list(MASK_LAYOUTS))
def test_mask_layouts_are_read_as_ksampler_reads_them(host, layout):
    batch, make = MASK_LAYOUTS[layout]
    start = image_latent(batch)
    ours, native = both(host, {"samples": start, "noise_mask": make()})
    assert rel(ours, native) < TOLERANCE
    assert rel(ours, both(host, {"samples": start})[0]) > 1e-2  # the mask changed the result


@pytest.mark.parametrize("sampler", ["euler", "res_multistep"])
def test_guidance_and_img2img_under_each_sampler_match_ksampler(host, sampler):
    """cfg 3 (KSampler 4) with a negative pass, and denoise 0.5 of 4 steps: the last 4 sigmas of the 8-step grid."""
    start = {"samples": image_latent(1)}
    for kwargs in (dict(cfg=3.0), dict(steps=4, denoise=0.5)):
        ours, native = both(host, start, sampler, **kwargs)
        assert rel(ours, native) < TOLERANCE, kwargs


def test_an_all_zero_latent_is_used_as_it_is_as_ksampler_does(host):
    """KSampler does not shift an empty latent into the model's latent space; img2img or a mask over one match."""
    zeros = torch.zeros(1, 16, 8, 12)
    for latent, denoise in (({"samples": zeros}, 0.5), ({"samples": zeros, "noise_mask": left_half(8, 12)}, 1.0)):
        ours, native = both(host, latent, steps=4 if denoise < 1 else 8, denoise=denoise)
        assert rel(ours, native) < TOLERANCE


@pytest.mark.parametrize("latent,message", [
    ({"noise_mask": torch.ones(1, 2, 8, 12)}, r"noise_mask is \[1, 2, 8, 12\]; it must be a MASK"),
    ({"noise_mask": torch.ones(8)}, r"noise_mask is \[8\]; it must be a MASK"),
    ({"noise_mask": torch.ones(3, 8, 12)}, r"noise_mask holds 3 masks for 2 latents; give one mask for all, or one per latent"),
    ({"noise_mask": torch.full((8, 12), 2.0)}, r"noise_mask: the mask's values must be finite and in \[0, 1\]"),
    ({"noise_mask": torch.full((8, 12), float("nan"))}, r"noise_mask: the mask's values must be finite"),
    ({"batch_index": [0]}, r"batch_index is \[0\] for 2 latents; it must hold one whole number >= 0 per latent"),
    ({"batch_index": [0, -1]}, r"batch_index is \[0, -1\]"),
])
def test_what_the_node_cannot_honour_is_refused(host, latent, message):
    with pytest.raises(ValueError, match=f"ZImageSampler: the latent's {message}"):
        host["zimage"].sample(host["model"], prompt(0), {"samples": image_latent(2), **latent}, 0, "custom", 2, 0.0,
                              3.0, 1.0, 0.0, 1.0)


def test_an_unknown_sampler_is_refused_in_process(host):
    with pytest.raises(ValueError, match="ZImageSampler: unknown sampler 'heun'; choose one of euler, res_multistep"):
        host["zimage"].sample(host["model"], prompt(0), {"samples": image_latent(1)}, 0, "custom", 2, 0.0, 3.0, 1.0,
                              0.0, 1.0, sampler="heun")
