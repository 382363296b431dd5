"""Test-side builders: reference models with random weights, and checkpoint files in the real formats.

The converters here are written independently of zimage/checkpoint.py on purpose: a test that used the
engine's own mapping to write its inputs could not catch a mistake in that mapping.
"""

from __future__ import annotations

import copy
import json
import os
import struct

import torch
from safetensors.torch import save_file

from zimage import ZImageConfig


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def randomize_(module: torch.nn.Module, seed: int = 0, spread: bool = True) -> torch.nn.Module:
    """The tests' one way to make random weights: every matrix (and convolution) random, scaled by its fan-in.
    spread: norm weights around 1 and every other parameter (biases, pad tokens) random too, so that no term can
    hide; without it, norms 1 and the rest 0, which keeps deep stacks of another model's layers (the test hosts'
    text encoder, vision encoder and VAE) finite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim >= 2 and "pad_token" not in name:
                p.copy_(noise * (0.8 / p[0].numel() ** 0.5))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise if spread else torch.ones_like(noise))
            else:
                p.copy_(0.3 * noise if spread else torch.zeros_like(noise))
    return module


def diffusers_reference(cfg: ZImageConfig, seed: int = 0):
    """diffusers' ZImageTransformer2DModel with cfg's shape and random weights (float32, eval)."""
    from diffusers import ZImageTransformer2DModel

    assert cfg.ffn_hidden == int(cfg.dim / 3 * 8) and cfg.t_embed_dim == min(cfg.dim, 256) and cfg.t_embed_mid == 1024
    model = ZImageTransformer2DModel(
        all_patch_size=(cfg.patch_size,), all_f_patch_size=(1,), in_channels=cfg.in_channels, dim=cfg.dim,
        n_layers=cfg.n_layers, n_refiner_layers=cfg.n_refiner_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
        norm_eps=cfg.norm_eps, qk_norm=True, cap_feat_dim=cfg.cap_feat_dim, rope_theta=cfg.rope_theta,
        t_scale=cfg.t_scale, axes_dims=list(cfg.rope_axes), axes_lens=list(cfg.rope_lengths),
        siglip_feat_dim=cfg.siglip_feat_dim)
    return randomize_(model, seed).eval()


def reference_pair(cfg: ZImageConfig, seed: int = 1):
    """(diffusers' transformer with random weights, the engine loaded from its state dict), both float32, eval."""
    from zimage import S3DiT, convert_state_dict

    reference = diffusers_reference(cfg, seed=seed)
    engine = S3DiT(cfg).eval()
    engine.load_state_dict(convert_state_dict(reference.state_dict()), strict=True)
    return reference, engine


def diffusers_velocity(model, latents, sigma, captions) -> torch.Tensor:
    """The flow velocity from diffusers' transformer: it takes t = 1 - sigma and its output is negated."""
    out = model(list(latents.unsqueeze(2).unbind(0)), 1 - sigma, list(captions), return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def diffusers_omni_inputs(latents, captions, references) -> dict:
    """The Omni transformer's keyword inputs as ZImageOmniPipeline builds them for one call: per sample the
    reference latents then the target (each [C, 1, H, W]), the caption chunks, the SigLIP features with None
    in the target's place (None for a sample without references), noise mask 0 for references, 1 for the target."""
    return dict(
        x=[[r.latent.unsqueeze(1) for r in refs] + [target.unsqueeze(1)] for refs, target in zip(references, latents)],
        cap_feats=[list(chunks) for chunks in captions],
        siglip_feats=[[r.siglip for r in refs] + [None] if refs else None for refs in references],
        image_noise_mask=[[0] * len(refs) + [1] for refs in references])


def diffusers_omni_velocity(model, latents, sigma, captions, references) -> torch.Tensor:
    """The flow velocity from diffusers' Omni transformer (t = 1 - sigma, output negated, as for the base)."""
    out = model(t=1 - sigma, return_dict=False, **diffusers_omni_inputs(latents, captions, references))[0]
    return -torch.stack(out).squeeze(2)


# --- diffusers names -> ComfyUI single-file names (fused qkv) --------------------------------------------

def diffusers_to_comfy(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            k, v = key.replace("to_q", "to_k"), key.replace("to_q", "to_v")
            out[key.replace("attention.to_q", "attention.qkv")] = torch.cat((value, sd[k], sd[v]))
            continue
        new = (key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
               .replace("attention.to_out.0.", "attention.out.").replace("attention.norm_q.", "attention.q_norm.")
               .replace("attention.norm_k.", "attention.k_norm."))
        out[new] = value
    return out


def save_comfy_file(sd_diffusers, path, dtype=torch.bfloat16, prefix=""):
    sd = {prefix + k: v.to(dtype).contiguous() for k, v in diffusers_to_comfy(sd_diffusers).items()}
    save_file(sd, path)
    return path


def save_diffusers_folder(sd_diffusers, folder, dtype=torch.float32, shards=3, config: dict | None = None):
    """A diffusers-style model folder: transformer/ with sharded safetensors and their index json, and a
    config.json with `config` (a diffusers model's .config, as save_pretrained writes it) or only the class name."""
    tdir = os.path.join(folder, "transformer")
    os.makedirs(tdir, exist_ok=True)
    keys = sorted(sd_diffusers)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd_diffusers[k].to(dtype).contiguous() for k in keys[i::shards]}
        save_file(part, os.path.join(tdir, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(tdir, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(tdir, "config.json"), "w") as f:
        json.dump({"_class_name": "ZImageTransformer2DModel", **(config or {})}, f)
    return folder


def save_fp8_file(sd_diffusers, path, scaled: bool, prefix=""):
    """ComfyUI-style fp8 file: 2-D weights of the blocks in e4m3fn, the rest in bf16. With scaled=True each
    fp8 weight carries a per-tensor `scale_weight` (ComfyUI's scaled-fp8 layout), and the file a `scaled_fp8`
    marker; every key, the marker included, gets `prefix`."""
    sd = {}
    for k, v in diffusers_to_comfy(sd_diffusers).items():
        if v.ndim == 2 and k.split(".")[0] in ("layers", "noise_refiner", "context_refiner", "siglip_refiner"):
            if scaled:
                scale = v.abs().max().float() / 448.0
                sd[k] = (v / scale).to(torch.float8_e4m3fn)
                sd[k.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
            else:
                sd[k] = v.to(torch.float8_e4m3fn)
        else:
            sd[k] = v.to(torch.bfloat16).contiguous()
    if scaled:
        sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file({prefix + k: v for k, v in sd.items()}, path)
    return path


# --- safetensors written by hand (format spec), for headers of files too big to make -------------------

SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}
SAFETENSORS_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1}


def write_safetensors_by_hand(path, tensors: dict, header_len: int | None = None, edit=None) -> int:
    """A safetensors file per its spec: 8-byte little-endian header length, the JSON header
    {name: {dtype, shape, data_offsets}} padded with spaces, then the data. A value is a tensor (its bytes
    are written) or a (dtype name, shape) pair, whose bytes are left a hole: the file is extended with
    truncate(), so a header-only file of any size costs no disk. header_len pads the header to exactly
    that many bytes. edit(header) -> the header to write instead (any JSON value), to break a file on
    purpose; the data stays where the unedited header put it. Returns the header length."""
    header, offset = {}, 0
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            dtype, shape = SAFETENSORS_NAMES[value.dtype], list(value.shape)
        else:
            dtype, shape = value[0], list(value[1])
        size = SAFETENSORS_ITEMSIZE[dtype]
        for n in shape:
            size *= n
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(edit(copy.deepcopy(header)) if edit else header, separators=(",", ":")).encode()
    if header_len is None:
        header_len = -(-len(text) // 8) * 8
    assert header_len >= len(text), (header_len, len(text))
    text += b" " * (header_len - len(text))
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", header_len))
        f.write(text)
        for name, value in tensors.items():
            if isinstance(value, torch.Tensor):
                f.seek(8 + header_len + header[name]["data_offsets"][0])
                f.write(value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        f.truncate(8 + header_len + offset)
    return header_len


def comfy_header_spec(cfg: ZImageConfig, dtype: str = "BF16", prefix: str = "") -> dict:
    """Every tensor of an S3DiT of shape cfg under its ComfyUI name, as (dtype name, shape), with no data:
    names and shapes come from the engine's model built on the meta device (a stacked w13, if the engine
    has one, split back into ComfyUI's w1 and w3)."""
    from zimage import S3DiT

    with torch.device("meta"):
        model = S3DiT(cfg)
    spec = {}
    for name, tensor in model.state_dict().items():
        shape = list(tensor.shape)
        if ".feed_forward.w13." in name:
            half = [shape[0] // 2] + shape[1:]
            spec[prefix + name.replace(".w13.", ".w1.")] = (dtype, half)
            spec[prefix + name.replace(".w13.", ".w3.")] = (dtype, half)
        else:
            spec[prefix + name] = (dtype, shape)
    return spec


def fun_file_format(state_dict: dict) -> dict:
    """A Fun ControlNet's state dict in ComfyUI's names (ZImage_Control's) or the engine's, in the released files'
    names: q, k and v apart (to_q, to_k, to_v), to_out.0, norm_q / norm_k, control_all_x_embedder.2-1. Written here,
    apart from zimage's table, to check that table."""
    out = {}
    for key, value in state_dict.items():
        if ".attention.qkv." in key:
            for part, name in zip(value.chunk(3), ("to_q", "to_k", "to_v")):
                out[key.replace(".qkv.", f".{name}.")] = part.contiguous()
            continue
        for ours, theirs in ((".attention.out.", ".attention.to_out.0."), (".attention.q_norm.", ".attention.norm_q."),
                             (".attention.k_norm.", ".attention.norm_k."),
                             ("control_x_embedder.", "control_all_x_embedder.2-1.")):
            key = key.replace(ours, theirs)
        out[key] = value.contiguous()
    return out
