"""ComfyUI's Z-Image Fun ControlNet nodes on the engine: the patches they register, run by the engine.

ModelPatchLoader loads a Fun ControlNet file into ComfyUI's ZImage_Control module; ZImageFunControlnet and
QwenImageDiffsynthControlnet register a ZImageControlPatch (the control module, the encoded control image,
strength) as a `noise_refiner` and a `double_block` patch of the MODEL. With ZImageLoader's MODEL the engine
runs them itself (zimage/control.py): its ControlNet is built on the module's own layers (no copy; ComfyUI's model
management still loads, offloads and casts them, under dynamic VRAM too), and its hints go where ComfyUI's patch
puts them.
"""

from __future__ import annotations

import weakref

import torch

import comfy.model_management as mm
import comfy.ops
import comfy.utils

from ..zimage import ControlConfig, ControlHints, ControlNet, RMSNorm, ZImageConfig, engine_key

# the engine's ControlNet for each of ComfyUI's control modules (with the layers it was built on), kept as long as the
# module lives
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


class HostNorm(RMSNorm):
    """The engine's RMSNorm over a norm module ComfyUI manages: its weight as ComfyUI casts and patches it at each use
    (ComfyUI builds the Fun ControlNet with manual_cast ops; lowvram or dynamic VRAM may keep it in host memory)."""

    def __init__(self, source: torch.nn.Module, eps: float):
        torch.nn.Module.__init__(self)  # no weight of its own: the source's
        self.source, self.eps = source, eps

    @property
    def weight(self) -> torch.Tensor:
        return self.source.weight

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        return comfy.ops.cast_bias_weight(self.source, x)[0]


def engine_net(module: torch.nn.Module, cfg: ZImageConfig) -> ControlNet:
    """The engine's ControlNet run on ComfyUI's ZImage_Control module's own layers: its Linears as they are (their
    forward casts, offloads and patches as ComfyUI does, dynamic VRAM included), its norms read through HostNorm.
    Built once per module and kept while it lives."""
    layers = [(name, source) for name, source in module.named_modules() if source._parameters]
    cached = _nets.get(module)
    if cached is not None and len(cached[0]) == len(layers) and all(a is b for a, (_, b) in zip(cached[0], layers)):
        return cached[1]
    control = ControlConfig(n_control_layers=module.n_control_layers, n_refiner_layers=len(module.control_noise_refiner),
                            in_channels=module.control_in_dim + module.additional_in_dim,
                            refiner_control=module.refiner_control, broken=module.broken)
    with torch.device("meta"):
        net = ControlNet(cfg, control)
    expected = dict(net.named_parameters())
    for name, source in layers:
        path = None
        for param_name, param in source.named_parameters(recurse=False):
            engine_name, _, _ = engine_key(f"{name}.{param_name}")
            if engine_name not in expected or expected[engine_name].shape != param.shape:
                raise ValueError(f"this Fun ControlNet is for a Z-Image model of another shape: its {name}.{param_name} "
                                 f"is {list(param.shape)}, this model's is "
                                 f"{list(expected[engine_name].shape) if engine_name in expected else 'missing'}. Use "
                                 f"the ControlNet made for this model (Z-Image-Turbo's Fun ControlNet Union).")
            path = engine_name.rpartition(".")[0]
        ours = net.get_submodule(path)
        owner, _, attr = path.rpartition(".")
        setattr(net.get_submodule(owner), attr, HostNorm(source, ours.eps) if isinstance(ours, RMSNorm) else source)
    missing = [name for name, param in net.named_parameters() if param.is_meta]
    if missing:
        raise ValueError(f"this Fun ControlNet lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: "
                         f"the file is incomplete or of another kind; download it again")
    net.eval()
    _nets[module] = ([source for _, source in layers], net)
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


def engine_hints(patches: list, cfg: ZImageConfig, latent_shape, device) -> list[ControlHints]:
    hints = []
    for patch in patches:
        net = engine_net(patch.model_patch.model, cfg)
        hints.append(ControlHints(net, control_latent(patch, latent_shape).to(device), float(patch.strength)))
    return hints
