"""What a MODEL or a widget carries that the engine cannot honour is refused by name, never silently dropped.

ComfyUI nodes between the loader and the sampler change a MODEL by adding options to its ModelPatcher: block
patches, block replacements, wrappers, CFG functions, a replaced model sampling. Apart from the Fun ControlNets'
patches, which the engine runs (tests/test_controlnet.py), the engine runs none of the block-level ones and
ZImageSampler none of the sampler-level ones; a sampler that met them would return an image as if they were not
there. Both samplers refuse them instead, and NaN widget values (an API prompt can carry NaN) are refused by name.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from comfy_host import load_workflow, shrink
from helpers import randomize_
from zimage import ZImageConfig

pytestmark = pytest.mark.host

CFG = ZImageConfig.tiny()


@pytest.fixture(scope="module")
def host(zimage_pack):
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import nodes as comfy_nodes

    pack = zimage_pack.__name__
    # the native nodes these tests use, from the modules ComfyUI's server loads them from
    native = {}
    for module in ("comfy_extras.nodes_model_advanced", "comfy_extras.nodes_model_patch"):
        native.update(importlib.import_module(module).NODE_CLASS_MAPPINGS)
    return dict(mm=comfy.model_management, model_patcher=comfy.model_patcher, nodes=comfy_nodes, native=native,
                extension=comfy.patcher_extension,
                comfy_model=importlib.import_module(f"{pack}.nodes.comfy_model"),
                sampler=importlib.import_module(f"{pack}.nodes.sampler").ZImageSampler,
                S3DiT=importlib.import_module(f"{pack}.zimage").S3DiT)


@pytest.fixture
def model(host):
    """A tiny Z-Image MODEL as ZImageLoader makes one (ComfyUI's layer classes, float32 on the CPU)."""
    comfy_model = host["comfy_model"]
    network = host["S3DiT"](CFG, ops=comfy_model.comfy_ops(None, torch.float32))
    yield comfy_model.comfy_model(randomize_(network, 0).eval())
    host["mm"].unload_all_models()


def conditioning(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 5, CFG.cap_feat_dim, generator=g), {}]]


LATENT = {"samples": torch.zeros(1, 16, 8, 8)}


def ksample(host, model, cfg: float = 1.0) -> torch.Tensor:
    return host["nodes"].common_ksampler(model, 0, 2, cfg, "euler", "simple", conditioning(0), conditioning(1),
                                         LATENT)[0]["samples"]


def zsample(host, model, **widgets) -> torch.Tensor:
    values = dict(seed=0, preset="custom", steps=2, cfg=0.0, shift=3.0, denoise=1.0, cfg_normalization=0.0,
                  cfg_truncation=1.0)
    values.update(widgets)
    return host["sampler"]().sample(model, conditioning(0), LATENT, **values)[0]["samples"]


class Recorder:
    """A patch, replacement or wrapper that notes each call and changes nothing."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if args and isinstance(args[0], dict):  # a block patch: hands its arguments back
            return args[0]
        if args and callable(args[0]) and not isinstance(args[0], dict):  # a wrapper: runs what it wraps
            return args[0](*args[1:], **kwargs)
        return args[0] if args else None


def add_noise_refiner_patch(host, patched, fn):
    patched.set_model_noise_refiner_patch(fn)
    return "patches['noise_refiner']"


def add_double_block_patch(host, patched, fn):
    patched.set_model_double_block_patch(fn)
    return "patches['double_block']"


def add_block_replacement(host, patched, fn):
    patched.set_model_patch_replace(fn, "dit", "double_block", 0)
    return "patches_replace['dit']"


def add_diffusion_model_wrapper(host, patched, fn):
    patched.add_wrapper_with_key(host["extension"].WrappersMP.DIFFUSION_MODEL, "test", fn)
    return "diffusion-model wrapper 'test'"


FORWARD_PATCHES = [add_noise_refiner_patch, add_double_block_patch, add_block_replacement, add_diffusion_model_wrapper]


@pytest.mark.parametrize("add", FORWARD_PATCHES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("sampler", ["KSampler", "ZImageSampler"])
def test_block_patches_are_refused_by_both_samplers(host, model, add, sampler):
    patched = model.clone()
    fn = Recorder()
    what = add(host, patched, fn)
    with pytest.raises(ValueError, match="does not apply") as error:
        ksample(host, patched) if sampler == "KSampler" else zsample(host, patched)
    assert what in str(error.value) and sampler in str(error.value)
    assert fn.calls == 0
    # the model without them samples as before: the refusal is about the patch, not the model
    assert torch.isfinite(ksample(host, model) if sampler == "KSampler" else zsample(host, model)).all()


def test_zimage_sampler_refuses_sampler_options_that_ksampler_applies(host, model):
    patched = model.clone()
    seen = []

    def cfg_function(args):
        seen.append(args["cond_scale"])
        return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]

    patched.set_model_sampler_cfg_function(cfg_function)
    with pytest.raises(ValueError, match="model option 'sampler_cfg_function'.*sample with KSampler"):
        zsample(host, patched)
    ksample(host, patched, cfg=2.0)  # KSampler runs it
    assert seen


def test_model_sampling_aura_flow_must_agree_with_the_zimage_sampler_shift(host, model):
    aura = host["native"]["ModelSamplingAuraFlow"]()
    (same,) = aura.patch_aura(model, 3.0)
    torch.testing.assert_close(zsample(host, same, shift=3.0), zsample(host, model, shift=3.0), rtol=0, atol=0)
    (other,) = aura.patch_aura(model, 6.0)
    with pytest.raises(ValueError, match="shift of 6 .*uses shift 3"):
        zsample(host, other, shift=3.0)


@pytest.mark.parametrize("widget", ["cfg", "shift", "denoise", "cfg_normalization", "cfg_truncation"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_zimage_sampler_refuses_non_finite_widgets_by_name(host, model, widget, value):
    with pytest.raises(ValueError, match=f"ZImageSampler: {widget} = {value!r} is not a finite number"):
        zsample(host, model, **{widget: value})


def test_a_nan_from_the_api_is_an_error_naming_the_widget_and_the_server_keeps_serving(comfy_server):
    prompt = shrink(load_workflow("zimage_turbo_t2i.api.json"))
    prompt["6"]["inputs"].update(preset="custom", cfg=float("nan"))
    # ComfyUI's JSON reader accepts a bare NaN, as Python's json.dumps writes it
    assert "NaN" in json.dumps(prompt)
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_type"] == "ZImageSampler" and "cfg = nan is not a finite number" in error["exception_message"]
    assert comfy_server.run(shrink(load_workflow("zimage_turbo_t2i.api.json")))["status"]["status_str"] == "success"
