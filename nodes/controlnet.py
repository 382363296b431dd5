"""ComfyUI's Z-Image Fun ControlNet nodes on the engine: the patches they register, run by the engine.

ModelPatchLoader loads a Fun ControlNet file into ComfyUI's ZImage_Control module; ZImageFunControlnet and
QwenImageDiffsynthControlnet register a ZImageControlPatch (the control module, the encoded control image,
strength) as a `noise_refiner` and a `double_block` patch of the MODEL. With ZImageLoader's MODEL the engine
runs them itself (zimage/control.py): its ControlNet shares the module's weights (no copy; ComfyUI's model
management still loads and offloads them), and its hints go where ComfyUI's patch puts them.
"""

from __future__ import annotations

import weakref

import torch

import comfy.model_management as mm
import comfy.utils

from ..zimage import ControlConfig, ControlHints, ControlNet, Ops, ZImageConfig, engine_key

# the engine's ControlNet for each of ComfyUI's control modules, kept as long as the module lives
_nets: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[list, ControlNet]]" = weakref.WeakKeyDictionary()


def is_control_patch(patch) -> bool:
    """A ZImageControlPatch of ComfyUI's Fun ControlNet nodes (comfy_extras.nodes_model_patch)."""
    return type(patch).__name__ == "ZImageControlPatch" and type(patch).__module__.endswith("nodes_model_patch")


def control_patches(transformer_options: dict) -> list:
    """The Fun ControlNet patches a MODEL carries, in the order ComfyUI would run them after each block."""
    found = []
    for name in ("double_block", "noise_refiner"):
        for patch in (transformer_options.get("patches") or {}).get(name, []):
            if is_control_patch(patch) and all(patch is not p for p in found):
                found.append(patch)
    return found


def engine_net(module: torch.nn.Module, cfg: ZImageConfig, ops: Ops) -> ControlNet:
    """The engine's ControlNet, built with the host's layer classes `ops`, on the same parameters as ComfyUI's
    ZImage_Control module."""
    params = list(module.parameters())
    cached = _nets.get(module)
    if cached is not None and len(cached[0]) == len(params) and all(a is b for a, b in zip(cached[0], params)):
        return cached[1]
    control = ControlConfig(n_control_layers=module.n_control_layers, n_refiner_layers=len(module.control_noise_refiner),
                            in_channels=module.control_in_dim + module.additional_in_dim,
                            refiner_control=module.refiner_control, broken=module.broken)
    with torch.device("meta"):
        net = ControlNet(cfg, control, ops=ops)
    expected = dict(net.named_parameters())
    for name, param in module.named_parameters():
        engine_name, _, _ = engine_key(name)
        if engine_name not in expected or expected[engine_name].shape != param.shape:
            raise ValueError(f"this Fun ControlNet is for a Z-Image model of another shape: its {name} is "
                             f"{list(param.shape)}, this model's is "
                             f"{list(expected[engine_name].shape) if engine_name in expected else 'missing'}. Use the "
                             f"ControlNet made for this model (Z-Image-Turbo's Fun ControlNet Union).")
        owner, _, attr = engine_name.rpartition(".")
        setattr(net.get_submodule(owner), attr, param)  # the same Parameter: where ComfyUI moves it, it is
    net.eval()
    _nets[module] = (params, net)
    return net


def control_latent(patch, latent_shape) -> torch.Tensor:
    """The patch's encoded control image at the size of the latent being sampled: ComfyUI's patch encodes it
    when it is made, and again (its images resized to the latent's pixels) for another size."""
    scale = patch.vae.spacial_compression_encode()
    size = (latent_shape[-2] * scale, latent_shape[-1] * scale)
    if patch.encoded_image is None or tuple(patch.encoded_image_size) != size:
        def resized(image):
            if image is None:
                return None
            return comfy.utils.common_upscale(image.movedim(-1, 1), size[1], size[0], "area", "center").movedim(1, -1)

        loaded = mm.loaded_models(only_currently_used=True)
        patch.encoded_image = patch.encode_latent_cond(resized(patch.image), resized(patch.inpaint_image))
        patch.encoded_image_size = size
        mm.load_models_gpu(loaded)  # the VAE encode may have unloaded the models in use, as in ComfyUI's patch
    return patch.encoded_image


def engine_hints(patches: list, cfg: ZImageConfig, latent_shape, device, ops: Ops) -> list[ControlHints]:
    hints = []
    for patch in patches:
        net = engine_net(patch.model_patch.model, cfg, ops)
        hints.append(ControlHints(net, control_latent(patch, latent_shape).to(device), float(patch.strength)))
    return hints
