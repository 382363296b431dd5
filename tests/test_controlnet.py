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
from helpers import randomize_, rel_err
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


def fun_file_format(state_dict: dict) -> dict:
    """A ZImage_Control state dict (ComfyUI's names) in the released Fun ControlNet files' names: q, k and v apart
    (to_q, to_k, to_v), to_out.0, norm_q / norm_k. Written here, apart from zimage's table, to check that table."""
    out = {}
    for key, value in state_dict.items():
        if ".attention.qkv." in key:
            for part, name in zip(value.chunk(3), ("to_q", "to_k", "to_v")):
                out[key.replace(".qkv.", f".{name}.")] = part.contiguous()
            continue
        for ours, theirs in ((".attention.out.", ".attention.to_out.0."), (".attention.q_norm.", ".attention.norm_q."),
                             (".attention.k_norm.", ".attention.norm_k.")):
            key = key.replace(ours, theirs)
        out[key] = value.contiguous()
    return out


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
