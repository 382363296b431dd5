"""The Z-Image Fun ControlNets in the engine against ComfyUI's own: the same velocity on the same random weights.

ComfyUI runs them as a model patch (ZImageControlPatch, comfy_extras/nodes_model_patch.py) on its NextDiT, with
a ZImage_Control module (comfy/ldm/lumina/controlnet.py) configured as ModelPatchLoader detects each version:
- 1.0: 6 control layers, a control latent of 16 channels, two plain refiner blocks for the control tokens;
- 2.0: 15 control layers, 33 channels (control latent, mask, masked image's latent), hints in the refiner too;
  one released 2.0 file has an all-zero refiner after_proj, which ComfyUI reads as "broken";
- 2.1 lite: 3 control layers, 33 channels, hints in the refiner.
The engine's ControlNet shares the native module's weights (their names map through zimage's one table), and
its hints, run by the Runner beside the engine's blocks, must give native's velocity.
"""

from __future__ import annotations

import pytest
import torch

from conftest import skip_unless_host_has
from helpers import fun_file_format, randomize_, rel_err
from test_comfyui_parity import CFG as PARITY_CFG
from zimage import Runner, S3DiT, convert_state_dict
from zimage.control import ControlConfig, ControlHints, ControlNet

pytestmark = pytest.mark.host

# the parity model, deep enough for hints at several main blocks (15 layers: 0, 2, ..., 10; 6: 0, 5, 10; 3: 0, 10)
CFG = PARITY_CFG.__class__(**{**PARITY_CFG.__dict__, "n_layers": 11, "n_refiner_layers": 2})
VERSIONS = {
    "1.0": dict(n_control_layers=6),
    "2.0": dict(n_control_layers=15, additional_in_dim=17, refiner_control=True),
    "2.0-broken": dict(n_control_layers=15, additional_in_dim=17, refiner_control=True, broken=True),
    "2.1-lite": dict(n_control_layers=3, additional_in_dim=17, refiner_control=True),
}


def native_models(comfyui_path, version: str):
    import comfy.ops
    from comfy.ldm.lumina.controlnet import ZImage_Control
    from comfy.ldm.lumina.model import NextDiT

    main = NextDiT(patch_size=2, in_channels=16, dim=CFG.dim, n_layers=CFG.n_layers,
                   n_refiner_layers=CFG.n_refiner_layers, n_heads=CFG.n_heads, n_kv_heads=CFG.n_heads,
                   multiple_of=256, ffn_dim_multiplier=8.0 / 3.0, norm_eps=1e-5, qk_norm=True,
                   cap_feat_dim=CFG.cap_feat_dim, axes_dims=list(CFG.rope_axes), axes_lens=[1536, 512, 512],
                   rope_theta=256.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
                   operations=comfy.ops.disable_weight_init)
    control = ZImage_Control(dim=CFG.dim, n_heads=CFG.n_heads, n_kv_heads=CFG.n_heads,
                             operations=comfy.ops.disable_weight_init, **VERSIONS[version])
    randomize_(main, seed=11).eval()
    randomize_(control, seed=12).eval()
    if VERSIONS[version].get("broken"):
        with torch.no_grad():
            control.control_noise_refiner[0].after_proj.weight.zero_()
    for module in (*main.modules(), *control.modules()):
        if hasattr(module, "eps") and type(module).__name__ == "RMSNorm" and module.eps is None:
            module.eps = 1e-5  # ComfyUI builds q/k norms without an eps (test_comfyui_parity says why)
    return main, control


def engine_models(main, control, version: str):
    model = S3DiT(CFG).eval()
    model.load_state_dict(convert_state_dict(main.state_dict()), strict=True)
    options = VERSIONS[version]
    net = ControlNet(CFG, ControlConfig(n_control_layers=options["n_control_layers"],
                                        in_channels=16 + options.get("additional_in_dim", 0),
                                        refiner_control=options.get("refiner_control", False),
                                        broken=options.get("broken", False))).eval()
    net.load_state_dict(convert_state_dict(control.state_dict()), strict=True)
    return model, net


class FakeVAE:
    def spacial_compression_encode(self):
        return 8


def native_patch(control, latent, strength):
    """ComfyUI's ZImageControlPatch with the control latent already encoded (its VAE is not under test here)."""
    from types import SimpleNamespace

    from comfy_extras.nodes_model_patch import ZImageControlPatch

    patch = ZImageControlPatch.__new__(ZImageControlPatch)
    patch.model_patch = SimpleNamespace(model=control)
    patch.vae, patch.image, patch.inpaint_image, patch.mask = FakeVAE(), None, None, None
    patch.strength, patch.is_inpaint = strength, control.additional_in_dim > 0
    patch.encoded_image = latent
    patch.encoded_image_size = (latent.shape[2] * 8, latent.shape[3] * 8)
    patch.temp_data = None
    return patch


@pytest.mark.parametrize("version", list(VERSIONS))
@pytest.mark.parametrize("height,width,batch", [(8, 12, 1), (6, 6, 2)])
def test_control_hints_give_comfyuis_velocity(comfyui_path, version, height, width, batch):
    main, control = native_models(comfyui_path, version)
    model, net = engine_models(main, control, version)
    g = torch.Generator().manual_seed(height * width + batch)
    latents = torch.randn(batch, 16, height, width, generator=g)
    context = torch.randn(batch, 20, CFG.cap_feat_dim, generator=g)
    sigma = torch.linspace(0.9, 0.3, batch)
    hint_latent = torch.randn(1, control.control_in_dim + control.additional_in_dim, height, width, generator=g)
    patch = native_patch(control, hint_latent, 0.75)
    options = {"patches": {"noise_refiner": [patch], "double_block": [patch]}}
    with torch.no_grad():
        expected = main(latents, sigma, context, num_tokens=context.shape[1], transformer_options=options)
        without = main(latents, sigma, context, num_tokens=context.shape[1])
        got = Runner(model)(latents, sigma, list(context), control=[ControlHints(net, hint_latent, 0.75)])
    assert rel_err(expected, without) > 1e-3  # the control changes native's velocity
    assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("version", list(VERSIONS))
def test_a_fun_controlnet_file_loads_as_comfyuis_model_patch_loader_reads_it(comfyui_path, tmp_path, version,
                                                                             monkeypatch):
    """The file in its released names: ComfyUI's ModelPatchLoader and zimage.load_controlnet see the same version
    (control layers, input channels, refiner hints, the broken 2.0 refiner) and give the same velocity. ComfyUI
    builds the control module at the released width whatever the file holds; the test has it build the tiny
    width (its version rules, read from the file, are ComfyUI's own)."""
    import functools

    import comfy.ldm.lumina.controlnet
    import comfy.model_patcher  # noqa: F401  (the loader reaches it as comfy.model_patcher)
    import folder_paths
    from comfy_extras.nodes_model_patch import ModelPatchLoader
    from safetensors.torch import save_file

    monkeypatch.setattr(comfy.ldm.lumina.controlnet, "ZImage_Control", functools.partial(
        comfy.ldm.lumina.controlnet.ZImage_Control, dim=CFG.dim, n_heads=CFG.n_heads, n_kv_heads=CFG.n_heads))

    from zimage import load_controlnet
    from zimage.checkpoint import inspect_controlnet

    if version == "2.1-lite":
        import inspect

        from comfy_extras.nodes_model_patch import ModelPatchLoader as loader
        skip_unless_host_has("control_layers.4." in inspect.getsource(loader.load_model_patch),
                             "rule for the 3-layer Fun ControlNet 2.1 lite in ModelPatchLoader")
    main, control = native_models(comfyui_path, version)
    name = f"Z-Image-Turbo-Fun-Controlnet-Union-{version}.safetensors"
    save_file(fun_file_format(control.state_dict()), str(tmp_path / name))
    folder_paths.add_model_folder_path("model_patches", str(tmp_path))
    try:
        (patcher,) = ModelPatchLoader().load_model_patch(name)
    finally:
        folder_paths.folder_names_and_paths["model_patches"][0].remove(str(tmp_path))
    theirs = patcher.model
    _, ours, _, _ = inspect_controlnet(str(tmp_path / name))
    assert (ours.n_control_layers, ours.in_channels, ours.refiner_control, ours.broken) == (
        theirs.n_control_layers, theirs.control_in_dim + theirs.additional_in_dim, theirs.refiner_control,
        theirs.broken)
    for module in theirs.modules():
        if type(module).__name__ == "RMSNorm" and module.eps is None:
            module.eps = 1e-5

    model, _ = engine_models(main, control, version)
    net = load_controlnet(str(tmp_path / name))
    g = torch.Generator().manual_seed(5)
    latents, context = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 12, CFG.cap_feat_dim, generator=g)
    hint_latent = torch.randn(1, ours.in_channels, 8, 8, generator=g)
    patch = native_patch(theirs, hint_latent, 1.0)
    with torch.no_grad():
        expected = main(latents, torch.tensor([0.5]), context, num_tokens=12,
                        transformer_options={"patches": {"noise_refiner": [patch], "double_block": [patch]}})
        got = Runner(model)(latents, torch.tensor([0.5]), list(context), control=[ControlHints(net, hint_latent, 1.0)])
    assert rel_err(got, expected) <= 1e-5


# --- the native nodes on ZImageLoader's MODEL, sampled by KSampler, against the same on ComfyUI's own model -------

class FakeVAE:
    """A stand-in for the FLUX VAE's encode that the ControlNet nodes call: a deterministic 16-channel latent of the
    image (8x8 cell means, repeated), the same for both models."""

    def encode(self, image):
        cells = torch.nn.functional.avg_pool2d(image.movedim(-1, 1), 8)  # [B, 3, H / 8, W / 8]
        return cells.repeat(1, 6, 1, 1)[:, :16] * 2 - 1

    def spacial_compression_encode(self):
        return 8


def comfy_native_model(main):
    """ComfyUI's own Z-Image model (model_base.Lumina2 around NextDiT) with main's weights, as UNETLoader builds it
    for the released size (its detection only knows width 3840, so the tiny shape is given here)."""
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": CFG.dim,
                   "cap_feat_dim": CFG.cap_feat_dim, "n_layers": CFG.n_layers, "n_refiner_layers": CFG.n_refiner_layers,
                   "qk_norm": True, "n_heads": CFG.n_heads, "n_kv_heads": CFG.n_heads, "axes_dims": list(CFG.rope_axes),
                   "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
                   "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}
    model_config = comfy.supported_models.ZImage(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    model.diffusion_model.load_state_dict(main.state_dict())
    for module in model.diffusion_model.modules():
        if type(module).__name__ == "RMSNorm" and module.eps is None:
            module.eps = 1e-5
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def pack_model(zimage_pack, main):
    import importlib

    comfy_model = importlib.import_module(f"{zimage_pack.__name__}.nodes.comfy_model")
    S3DiT_ = importlib.import_module(f"{zimage_pack.__name__}.zimage").S3DiT
    network = S3DiT_(CFG, ops=comfy_model.comfy_ops(None, torch.float32)).eval()
    network.load_state_dict(convert_state_dict(main.state_dict()))
    return comfy_model.comfy_model(network)


def with_control(model, node: str, control, image, mask=None):
    """model with the Fun ControlNet node applied (strength 0.8) and ModelSamplingAuraFlow 3, as the template wires
    them."""
    import importlib

    import comfy.model_patcher

    native = importlib.import_module("comfy_extras.nodes_model_patch").NODE_CLASS_MAPPINGS
    aura = importlib.import_module("comfy_extras.nodes_model_advanced").NODE_CLASS_MAPPINGS["ModelSamplingAuraFlow"]
    cpu = torch.device("cpu")
    model_patch = comfy.model_patcher.ModelPatcher(control, load_device=cpu, offload_device=cpu)
    extra = {"inpaint_image": image, "mask": mask} if mask is not None else {}
    (patched,) = native[node]().diffsynth_controlnet(model, model_patch, FakeVAE(), image=image, strength=0.8, **extra)
    return aura().patch_aura(patched, 3.0)[0]


def prompts():
    g = torch.Generator().manual_seed(3)
    return [[torch.randn(1, 12, CFG.cap_feat_dim, generator=g), {}]], [[torch.randn(1, 7, CFG.cap_feat_dim, generator=g), {}]]


def sample_with_control(model, node: str, control, image, mask=None, sampler="euler", cfg=1.0):
    """KSampler (4 steps, simple) on model with the ControlNet: the latent."""
    import nodes as comfy_nodes

    positive, negative = prompts()
    return comfy_nodes.common_ksampler(with_control(model, node, control, image, mask), 4, 4, cfg, sampler, "simple",
                                       positive, negative, {"samples": torch.zeros(1, 16, 8, 8)})[0]["samples"]


@pytest.mark.parametrize("version, node, inpaint", [
    ("1.0", "QwenImageDiffsynthControlnet", False),
    ("2.0", "ZImageFunControlnet", True),
    ("2.1-lite", "ZImageFunControlnet", False),
])
def test_native_controlnet_nodes_on_the_packs_model_sample_what_comfyuis_model_samples(
        comfyui_path, zimage_pack, version, node, inpaint):
    """The official template's wiring (ModelPatchLoader's module, the Fun ControlNet node, KSampler) on ZImageLoader's
    MODEL gives ComfyUI's own model's latent: the engine runs the patch the node registers."""
    main, control = native_models(comfyui_path, version)
    g = torch.Generator().manual_seed(9)
    image = torch.rand(1, 64, 64, 3, generator=g)
    mask = (torch.rand(1, 64, 64, generator=g) > 0.5).float() if inpaint else None
    ours = sample_with_control(pack_model(zimage_pack, main), node, control, image, mask)
    theirs = sample_with_control(comfy_native_model(main), node, control, image, mask)
    plain = sample_with_control(pack_model(zimage_pack, main), node, control, image * 0 + 0.5, mask)
    assert rel_err(ours, theirs) <= 1e-4
    assert rel_err(ours, plain) > 1e-3  # the control image steers the result


@pytest.mark.parametrize("version, node, inpaint", [
    ("1.0", "QwenImageDiffsynthControlnet", False),
    ("2.0", "ZImageFunControlnet", True),
    ("2.1-lite", "ZImageFunControlnet", False),
])
@pytest.mark.parametrize("sampler, guidance", [("euler", 0.0), ("res_multistep", 0.0), ("euler", 2.0)])
def test_zimage_sampler_runs_the_fun_controlnet_as_ksampler_does(comfyui_path, zimage_pack, version, node, inpaint,
                                                                  sampler, guidance):
    """ZImageSampler on the same patched MODEL: KSampler's latent (KSampler's cfg is ZImageSampler's + 1), with the
    control image steering it."""
    import importlib

    main, control = native_models(comfyui_path, version)
    g = torch.Generator().manual_seed(9)
    image = torch.rand(1, 64, 64, 3, generator=g)
    mask = (torch.rand(1, 64, 64, generator=g) > 0.5).float() if inpaint else None
    zimage_sampler = importlib.import_module(f"{zimage_pack.__name__}.nodes.sampler").ZImageSampler()
    positive, negative = prompts()

    def ours(picture):
        model = with_control(pack_model(zimage_pack, main), node, control, picture, mask)
        return zimage_sampler.sample(model, positive, {"samples": torch.zeros(1, 16, 8, 8)}, 4, "custom", 4, guidance,
                                     3.0, 1.0, 0.0, 1.0, negative=negative, sampler=sampler)[0]["samples"]

    theirs = sample_with_control(pack_model(zimage_pack, main), node, control, image, mask, sampler, guidance + 1.0)
    got = ours(image)
    assert rel_err(got, theirs) <= 1e-4
    assert rel_err(got, ours(image * 0 + 0.5)) > 1e-3  # the control image steers the result


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_the_engine_sampler_gives_each_sample_its_control_latent(guidance):
    """zimage.sample with a ControlNet outside ComfyUI: the engine's Euler steps written out here, each sample's
    velocity from a forward of that sample alone with its own control latent (and with guidance its negative pass
    too)."""
    from zimage import sample
    from zimage.sampler import flow_sigmas

    model = randomize_(S3DiT(CFG), 21).eval()
    net = randomize_(ControlNet(CFG, ControlConfig(n_control_layers=3, in_channels=33, refiner_control=True)), 22).eval()
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 16, 6, 8, generator=g)
    positive = [torch.randn(9, CFG.cap_feat_dim, generator=g), torch.randn(5, CFG.cap_feat_dim, generator=g)]
    negative = [torch.randn(4, CFG.cap_feat_dim, generator=g) for _ in range(2)]
    hint_latents = torch.randn(2, 33, 6, 8, generator=g)
    sigmas = flow_sigmas(3, 3.0)
    with torch.no_grad():
        got = sample(model, noise, sigmas, positive, negative, guidance=guidance,
                     control=[ControlHints(net, hint_latents, 0.6)])
        expected = []
        runner = Runner(model)
        for i in range(2):
            x = noise[i:i + 1] * sigmas[0]
            hints = [ControlHints(net, hint_latents[i:i + 1], 0.6)]
            for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
                s = torch.tensor([sigma])
                v = runner(x, s, positive[i:i + 1], control=hints)
                if guidance > 0:
                    v = v + guidance * (v - runner(x, s, negative[i:i + 1], control=hints))
                x = x + (sigma_next - sigma) * v
            expected.append(x)
        plain = sample(model, noise, sigmas, positive, negative, guidance=guidance)
    assert rel_err(got, torch.cat(expected)) <= 1e-5
    assert rel_err(got, plain) > 1e-3


def test_a_control_latent_of_another_size_is_refused():
    from zimage import sample
    from zimage.sampler import flow_sigmas

    model = S3DiT(CFG).eval()
    net = ControlNet(CFG, ControlConfig(n_control_layers=3))
    with pytest.raises(ValueError, match=r"control latent is \[1, 16, 4, 4\].*encode the control image at the size"):
        sample(model, torch.zeros(1, 16, 6, 8), flow_sigmas(2, 3.0), [torch.zeros(3, CFG.cap_feat_dim)],
               control=[ControlHints(net, torch.zeros(1, 16, 4, 4), 1.0)])
