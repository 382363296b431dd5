"""The transformer files users have load to the model their weights describe, and every other file is refused
with a message that says what it is.

One set of random weights (a diffusers reference model's) is written in each format; each file must load to the
same engine parameters (up to the precision it stores) and give the reference's velocities.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
from collections import Counter

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

from helpers import (comfy_header_spec, diffusers_omni_velocity, diffusers_reference, diffusers_to_comfy,
                     diffusers_velocity, rel_err, save_comfy_file, save_diffusers_folder, save_fp8_file,
                     write_safetensors_by_hand)
import zimage.files
from zimage import (CheckpointError, Reference, S3DiT, ZImageConfig, convert_state_dict, inspect_checkpoint,
                    load_transformer, read_safetensors_header)

TINY = ZImageConfig.tiny()
# test_model_parity.py's MID: the released head (128) and RoPE split (32, 48, 48); fewer, narrower layers
MID = ZImageConfig(dim=384, n_heads=3, n_layers=2, n_refiner_layers=1, ffn_hidden=1024, cap_feat_dim=96,
                   t_embed_dim=256)
# Omni-Base / Edit: the same model with SigLIP embedder, refiner and pad token
TINY_OMNI = ZImageConfig.tiny(siglip_feat_dim=24)
PREFIX = "model.diffusion_model."
BLOCK_STACKS = ("layers", "noise_refiner", "context_refiner", "siglip_refiner")

# format -> (stored dtype, format inspect_checkpoint reports)
FORMATS = {
    "comfy_bf16": (torch.bfloat16, "comfyui"),
    "comfy_bf16_prefixed": (torch.bfloat16, "comfyui"),
    "diffusers_folder": (torch.float32, "diffusers"),
    "diffusers_transformer_subfolder": (torch.float32, "diffusers"),
    "fp8": (torch.float8_e4m3fn, "comfyui"),
    "fp8_scaled": (torch.float8_e4m3fn, "comfyui"),
    "fp8_scaled_prefixed": (torch.float8_e4m3fn, "comfyui"),
}
# velocity relative error to the float32 diffusers reference, loaded as float32
VELOCITY_TOLERANCE = {"comfy_bf16": 2e-2, "comfy_bf16_prefixed": 2e-2, "diffusers_folder": 1e-5,
                      "diffusers_transformer_subfolder": 1e-5, "fp8": 0.15, "fp8_scaled": 0.15,
                      "fp8_scaled_prefixed": 0.15}


def write_all_formats(sd: dict[str, torch.Tensor], root, config: dict) -> dict[str, str]:
    """Each format's file, the diffusers folder with the config.json diffusers writes (`config`, the reference's)."""
    root = str(root)
    folder = save_diffusers_folder(sd, os.path.join(root, "Z-Image-Turbo"), shards=3, config=config)
    return {
        "comfy_bf16": save_comfy_file(sd, os.path.join(root, "z_image_turbo_bf16.safetensors")),
        "comfy_bf16_prefixed": save_comfy_file(sd, os.path.join(root, "prefixed_bf16.safetensors"), prefix=PREFIX),
        "diffusers_folder": folder,
        "diffusers_transformer_subfolder": os.path.join(folder, "transformer"),
        "fp8": save_fp8_file(sd, os.path.join(root, "z_image_fp8_e4m3fn.safetensors"), scaled=False),
        "fp8_scaled": save_fp8_file(sd, os.path.join(root, "z_image_fp8_scaled.safetensors"), scaled=True),
        "fp8_scaled_prefixed": save_fp8_file(sd, os.path.join(root, "prefixed_fp8_scaled.safetensors"), scaled=True,
                                             prefix=PREFIX),
    }


def velocity_inputs(cfg: ZImageConfig):
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(2, cfg.in_channels, 8, 10, generator=g)
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in (7, 40)]  # padded to 32 and 64: masked
    return latents, torch.tensor([0.8, 0.3]), captions


def omni_velocity_inputs(cfg: ZImageConfig):
    """A batch of two with one and two reference images, captions in chunks."""
    g = torch.Generator().manual_seed(12)
    latents = torch.randn(2, cfg.in_channels, 6, 8, generator=g)
    captions = [[torch.randn(n, cfg.cap_feat_dim, generator=g) for n in lens] for lens in ((4, 20, 3), (4, 2, 40, 3))]
    references = [[Reference(torch.randn(cfg.in_channels, h, w, generator=g),
                             torch.randn(rows, cols, cfg.siglip_feat_dim, generator=g)) for h, w, rows, cols in refs]
                  for refs in ([(8, 6, 4, 3)], [(6, 6, 2, 2), (4, 10, 2, 5)])]
    return latents, torch.tensor([0.6, 0.2]), captions, references


class Saved:
    def __init__(self, cfg, seed, root, scale_blocks: float = 1.0):
        self.cfg = cfg
        self.reference = diffusers_reference(cfg, seed=seed)
        if scale_blocks != 1.0:
            with torch.no_grad():
                for name, p in self.reference.named_parameters():
                    if p.ndim == 2 and name.split(".")[0] in BLOCK_STACKS:
                        p.mul_(scale_blocks)
        self.sd = {k: v.detach().clone() for k, v in self.reference.state_dict().items()}
        self.expected = convert_state_dict(self.sd)  # float32, engine names
        self.paths = write_all_formats(self.sd, root, dict(self.reference.config))
        self.inputs = velocity_inputs(cfg)
        with torch.no_grad():
            self.velocity = diffusers_velocity(self.reference, *self.inputs)
        self.omni = None  # Omni models: (latents, sigma, captions, references) and the velocity with references
        if cfg.siglip_feat_dim is not None:
            inputs = omni_velocity_inputs(cfg)
            with torch.no_grad():
                self.omni = (inputs, diffusers_omni_velocity(self.reference, *inputs))


@pytest.fixture(scope="module", params=[TINY, MID, TINY_OMNI], ids=["tiny", "mid", "tiny-omni"])
def saved(request, tmp_path_factory):
    return Saved(request.param, seed=5, root=tmp_path_factory.mktemp("formats"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Saved(TINY, seed=6, root=tmp_path_factory.mktemp("tiny_refusals"))


def params(model) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def dequantized_file(path: str) -> dict[str, torch.Tensor]:
    """The file's tensors as the numbers they stand for (fp8 times its per-tensor scale), read with the
    safetensors library and converted here, independently of the engine's loader."""
    raw = load_file(path)
    out = {}
    for key, value in raw.items():
        if key.endswith(".scale_weight") or key.endswith("scaled_fp8"):
            continue
        value = value.float()
        scale_key = key.removesuffix(".weight") + ".scale_weight"
        if scale_key in raw:
            value = value * raw[scale_key].float()
        out[key] = value
    return out


# --- 1. every format loads to the same model ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_parameters_equal_reference(saved, fmt):
    model = load_transformer(saved.paths[fmt], dtype=torch.float32)
    got = params(model)
    assert set(got) == set(saved.expected)
    stored = FORMATS[fmt][0]
    if stored == torch.float32:
        for name, value in saved.expected.items():
            assert torch.equal(got[name], value), name
    elif stored == torch.bfloat16:
        for name, value in saved.expected.items():
            assert torch.equal(got[name], value.to(torch.bfloat16).float()), name
    else:
        # exactly what the file stores (read and dequantized here), and that within e4m3 rounding of the weights
        from_file = convert_state_dict(dequantized_file(saved.paths[fmt]))
        assert set(from_file) == set(saved.expected)
        n_fp8 = 0
        for name, value in saved.expected.items():
            assert torch.equal(got[name], from_file[name]), name
            err = rel_err(got[name], value)
            assert err < 0.07, (name, err)
            n_fp8 += err > 5e-3  # more than bf16 rounding: this tensor really was stored in fp8
        assert n_fp8 >= 4 * (saved.cfg.n_layers + 2 * saved.cfg.n_refiner_layers)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_velocity_matches_reference(saved, fmt):
    model = load_transformer(saved.paths[fmt], dtype=torch.float32)
    with torch.no_grad():
        velocity = model(*saved.inputs)
    err = rel_err(velocity, saved.velocity)
    assert err <= VELOCITY_TOLERANCE[fmt], err
    if FORMATS[fmt][0] != torch.float32:
        assert err > 1e-6  # the stored precision is really in effect (a float32 side path would hide here)
    if saved.omni is not None:  # an Omni file: its SigLIP weights too, through reference images
        (latents, sigma, captions, references), expected = saved.omni
        with torch.no_grad():
            err = rel_err(model(latents, sigma, captions, references=references), expected)
        assert err <= VELOCITY_TOLERANCE[fmt], err


def test_scaled_fp8_beats_plain_fp8_on_small_weights(tmp_path):
    """Per-tensor scales matter when the weights are small, as in the released 6B model, where plain e4m3
    spends them in its subnormal range. (On the standard random weights, ~0.1 in size, both formats round
    alike and neither is reliably better; there both are only bounded, above.)"""
    small = Saved(MID, seed=7, root=tmp_path, scale_blocks=0.15)
    errors = {}
    for fmt in ("fp8", "fp8_scaled"):
        model = load_transformer(small.paths[fmt], dtype=torch.float32)
        with torch.no_grad():
            errors[fmt] = rel_err(model(*small.inputs), small.velocity)
    assert errors["fp8"] < 0.15 and errors["fp8_scaled"] <= 0.5 * errors["fp8"], errors


def test_streaming_reads_each_tensor_once(saved, monkeypatch):
    """load_transformer never loads a whole file (load_file / load): it reads tensor by tensor, each once."""

    def refuse(*args, **kwargs):
        raise AssertionError("a whole file was loaded into memory")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(safetensors.torch, "load", refuse)
    reads = Counter()
    real_safe_open = safetensors.safe_open

    class CountingHandle:
        def __init__(self, *args, **kwargs):
            self.handle = real_safe_open(*args, **kwargs)

        def get_tensor(self, key):
            reads[key] += 1
            return self.handle.get_tensor(key)

        def get_slice(self, key):
            reads[key] += 1
            return self.handle.get_slice(key)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    monkeypatch.setattr(safetensors, "safe_open", CountingHandle)
    for fmt in ("comfy_bf16", "diffusers_folder", "fp8_scaled_prefixed"):
        reads.clear()
        model = load_transformer(saved.paths[fmt], dtype=torch.float32)
        assert set(params(model)) == set(saved.expected)
        keys = set()
        for file in inspect_checkpoint(saved.paths[fmt]).files:
            with real_safe_open(file, framework="pt") as f:
                keys.update(f.keys())
        assert set(reads) == {k for k in keys if not k.endswith("scaled_fp8")}, fmt
        assert set(reads.values()) == {1}, fmt


# --- 2. detection from headers ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", list(FORMATS))
def test_inspect_detects_format_and_config(saved, fmt):
    info = inspect_checkpoint(saved.paths[fmt])
    stored, file_format = FORMATS[fmt]
    assert info.format == file_format
    assert info.variant == ("z-image-omni" if saved.cfg.siglip_feat_dim else "z-image")
    assert info.stored_dtype == stored
    assert info.config == saved.cfg
    assert len(info.files) == (3 if file_format == "diffusers" else 1)
    assert all(os.path.isfile(f) for f in info.files)


@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_full_size_detected_from_header_alone(tmp_path, prefix):
    """A header listing every tensor of the 6B model (bf16), its 12 GB of data a hole in a sparse file."""
    spec = comfy_header_spec(ZImageConfig(), "BF16", prefix)
    assert any(".feed_forward.w1." in k for k in spec) and any(".feed_forward.w3." in k for k in spec)
    assert not any(".w13." in k for k in spec)
    path = str(tmp_path / "z_image_turbo_bf16.safetensors")
    write_safetensors_by_hand(path, spec)
    n_params = sum(torch.Size(shape).numel() for _, shape in spec.values())
    assert n_params == 6_154_908_736
    assert os.path.getsize(path) > 2 * n_params
    with safetensors.safe_open(path, framework="pt") as f:  # the real library accepts the hand-written header
        assert set(f.keys()) == set(spec)
        assert f.get_slice(prefix + "x_embedder.weight").get_shape() == [3840, 64]

    info = inspect_checkpoint(path)
    assert info.config == ZImageConfig()
    assert info.stored_dtype == torch.bfloat16
    assert (info.format, info.variant) == ("comfyui", "z-image")
    with torch.device("meta"):
        model = S3DiT(ZImageConfig())
    assert set(info.plan) == set(params(model))


@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_full_size_omni_detected_from_header_alone(tmp_path, prefix):
    """Omni-Base / Edit at full size: the SigLIP width (1152) comes from siglip_embedder's weight."""
    omni = ZImageConfig(siglip_feat_dim=1152)
    spec = comfy_header_spec(omni, "BF16", prefix)
    assert spec[prefix + "siglip_embedder.1.weight"] == ("BF16", [3840, 1152])
    assert prefix + "siglip_refiner.1.attention.qkv.weight" in spec and prefix + "siglip_pad_token" in spec
    path = str(tmp_path / "z_image_omni_base_bf16.safetensors")
    write_safetensors_by_hand(path, spec)
    info = inspect_checkpoint(path)
    assert info.config == omni
    assert (info.format, info.variant) == ("comfyui", "z-image-omni")
    with torch.device("meta"):
        model = S3DiT(omni)
    assert set(info.plan) == set(params(model))
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("siglip_")) == (
        1152 + 1152 * 3840 + 3840 + 3840 + 2 * (4 * 3840 * 3840 + 3 * 3840 * 10240 + 2 * 128 + 4 * 3840))


def test_hand_written_file_loads(tmp_path):
    """The hand writer used above makes files that both safetensors and the engine read back exactly."""
    reference = diffusers_reference(TINY, seed=8)
    tensors = {k: v.to(torch.bfloat16) for k, v in diffusers_to_comfy(reference.state_dict()).items()}
    path = str(tmp_path / "by_hand.safetensors")
    write_safetensors_by_hand(path, tensors)
    back = load_file(path)
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    model = load_transformer(path)
    expected = convert_state_dict(tensors)
    assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("header_len_mod,modulus", [(0x80, 256), (0x4B50, 65536)], ids=["0x80", "PK"])
def test_header_length_that_looks_like_a_magic_number(tmp_path, header_len_mod, modulus):
    """The first bytes of a safetensors file are its header length: 0x80... (a pickle's first byte) or "PK"
    (a zip's) must not get a valid file refused. One in 32 padded headers starts with 0x80."""
    reference = diffusers_reference(TINY, seed=9)
    tensors = {k: v.to(torch.bfloat16) for k, v in diffusers_to_comfy(reference.state_dict()).items()}
    path = str(tmp_path / "valid.safetensors")
    natural = write_safetensors_by_hand(path, tensors)
    header_len = natural + (header_len_mod - natural) % modulus
    write_safetensors_by_hand(path, tensors, header_len=header_len)
    with open(path, "rb") as f:
        first = f.read(2)
    assert first[:1] == b"\x80" if modulus == 256 else first == b"PK"
    assert set(load_file(path)) == set(tensors)  # a valid file for the safetensors library
    model = load_transformer(path)
    assert model.cfg == TINY


# --- 4. dtype, device, inference mode ----------------------------------------------------------------------

@pytest.mark.parametrize("fmt,dtype,expected", [
    ("comfy_bf16", None, torch.bfloat16),
    ("comfy_bf16", torch.bfloat16, torch.bfloat16),
    ("comfy_bf16", torch.float32, torch.float32),
    ("diffusers_folder", None, torch.float32),
    ("diffusers_folder", torch.bfloat16, torch.bfloat16),
    ("fp8", None, torch.bfloat16),
    ("fp8_scaled", None, torch.bfloat16),
    ("fp8_scaled", torch.float32, torch.float32),
])
def test_dtype_device_and_eval(tiny, fmt, dtype, expected):
    model = load_transformer(tiny.paths[fmt], device="cpu", dtype=dtype)
    assert set(params(model)) == set(tiny.expected)
    for name, p in model.named_parameters():
        assert p.dtype == expected, name
        assert p.device == torch.device("cpu"), name
        assert not p.requires_grad, name
    assert not any(m.training for m in model.modules())
    assert model.dtype == expected
    if fmt == "comfy_bf16" and dtype is None:  # kept exactly as stored
        stored = load_file(tiny.paths[fmt])
        assert all(torch.equal(p, stored[n]) for n, p in model.named_parameters() if n in stored)
    with torch.no_grad():
        velocity = model(*tiny.inputs)
    assert velocity.dtype == expected and torch.isfinite(velocity).all()
    assert rel_err(velocity.float(), tiny.velocity) < 0.15


# --- 5. refusals ---------------------------------------------------------------------------------------------

def _pickle_zip(tmp_path, tiny):
    path = tmp_path / "model.safetensors"  # the name does not matter: the bytes do
    torch.save({"a": torch.zeros(1)}, path)
    return path


def _pickle_legacy(tmp_path, tiny):
    path = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, path, _use_new_zipfile_serialization=False)
    return path


def _truncated(tmp_path, tiny):
    data = open(tiny.paths["comfy_bf16"], "rb").read()
    path = tmp_path / "z_image_turbo_bf16.safetensors"
    path.write_bytes(data[:-100])
    return path


def _truncated_in_header(tmp_path, tiny):
    data = open(tiny.paths["comfy_bf16"], "rb").read()
    path = tmp_path / "z_image_turbo_bf16.safetensors"
    path.write_bytes(data[:500])
    return path


def _random_bytes(tmp_path, tiny):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "noise.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).numpy().tobytes())
    return path


def _empty(tmp_path, tiny):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    return path


def _gguf(tmp_path, tiny):  # a GGUF header without tensors
    path = tmp_path / "z_image_turbo-Q8_0.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(256))
    return path


def _keys_file(name, keys):
    def build(tmp_path, tiny):
        path = tmp_path / name
        save_file({k: torch.zeros(shape, dtype=torch.bfloat16) for k, shape in keys.items()}, path)
        return path
    return build


_flux = _keys_file("flux1-dev.safetensors", {
    "double_blocks.0.img_attn.qkv.weight": (24, 8), "single_blocks.0.linear1.weight": (40, 8),
    "img_in.weight": (8, 64)})
_sdxl = _keys_file("sd_xl_base_1.0.safetensors", {
    "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
    "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3)})
_text_encoder = _keys_file("qwen_3_4b.safetensors", {
    "model.layers.0.self_attn.q_proj.weight": (8, 8), "model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,)})
_siglip = _keys_file("sigclip_vision_patch14_384.safetensors", {
    "vision_model.embeddings.patch_embedding.weight": (8, 3, 14, 14),
    "vision_model.encoder.layers.0.self_attn.q_proj.weight": (8, 8), "vision_model.post_layernorm.weight": (8,)})
_vae = _keys_file("ae.safetensors", {
    "decoder.conv_in.weight": (8, 16, 3, 3), "encoder.conv_in.weight": (8, 3, 3, 3), "decoder.conv_out.bias": (3,)})
_lora = _keys_file("z_image_style_lora.safetensors", {
    "diffusion_model.layers.0.attention.to_q.lora_A.weight": (4, 64),
    "diffusion_model.layers.0.attention.to_q.lora_B.weight": (64, 4)})


def _lumina(tmp_path, tiny):
    """Lumina Image 2.0's NextDiT, ComfyUI's key names: Z-Image's layout at dim 2304 (header only, sparse)."""
    spec = {"x_embedder.weight": ("BF16", [2304, 64]), "x_embedder.bias": ("BF16", [2304]),
            "cap_embedder.0.weight": ("BF16", [2304]), "cap_embedder.1.weight": ("BF16", [2304, 2304]),
            "t_embedder.mlp.0.weight": ("BF16", [1024, 256]), "t_embedder.mlp.2.weight": ("BF16", [1024, 1024])}
    for i in range(2):
        spec.update({f"layers.{i}.attention.qkv.weight": ("BF16", [3840, 2304]),
                     f"layers.{i}.attention.out.weight": ("BF16", [2304, 2304]),
                     f"layers.{i}.attention.q_norm.weight": ("BF16", [96]),
                     f"layers.{i}.attention.k_norm.weight": ("BF16", [96]),
                     f"layers.{i}.feed_forward.w1.weight": ("BF16", [6144, 2304]),
                     f"layers.{i}.feed_forward.w2.weight": ("BF16", [2304, 6144]),
                     f"layers.{i}.feed_forward.w3.weight": ("BF16", [6144, 2304])})
    path = tmp_path / "lumina_2.safetensors"
    write_safetensors_by_hand(str(path), spec)
    return path


def _without(name, *removed):
    def build(tmp_path, tiny):
        sd = {k: v.to(torch.bfloat16) for k, v in diffusers_to_comfy(tiny.sd).items() if k not in removed}
        assert len(sd) == len(diffusers_to_comfy(tiny.sd)) - len(removed)
        path = tmp_path / name
        save_file(sd, path)
        return path
    return build


def _folder_without_to_k(tmp_path, tiny):
    sd = {k: v for k, v in tiny.sd.items() if k != "layers.1.attention.to_k.weight"}
    assert len(sd) == len(tiny.sd) - 1
    return save_diffusers_folder(sd, str(tmp_path / "Z-Image-Turbo"))


def _folder_missing_shard(tmp_path, tiny):
    folder = save_diffusers_folder(tiny.sd, str(tmp_path / "Z-Image-Turbo"), shards=3)
    os.remove(os.path.join(folder, "transformer", "diffusion_pytorch_model-00002-of-00003.safetensors"))
    return folder


def _empty_folder(tmp_path, tiny):
    (tmp_path / "transformer").mkdir()
    return tmp_path


def _nonexistent(tmp_path, tiny):
    return tmp_path / "z_image_turbo_bf16.safetensors"


REFUSALS = {
    "pickle": (_pickle_zip, ["pickle"]),
    "pickle_legacy": (_pickle_legacy, ["pickle"]),
    "truncated": (_truncated, ["truncated"]),
    "truncated_in_header": (_truncated_in_header, ["truncated"]),
    "random_bytes": (_random_bytes, ["not a safetensors file"]),
    "empty": (_empty, ["0 bytes"]),
    "gguf": (_gguf, ["holds no tensors"]),  # an empty GGUF: test_gguf.py has the real ones
    "flux": (_flux, ["FLUX"]),
    "sdxl": (_sdxl, ["SDXL"]),
    "text_encoder": (_text_encoder, ["text encoder"]),
    "siglip": (_siglip, ["CLIP/SigLIP vision encoder", "models/clip_vision"]),
    "vae": (_vae, ["VAE"]),
    "lora": (_lora, ["LoRA"]),
    "lumina": (_lumina, ["Lumina"]),
    "missing_norm": (_without("z_image_turbo_bf16.safetensors", "layers.1.attention_norm2.weight"),
                     ["missing", "layers.1.attention_norm2.weight"]),
    "missing_q_norm": (_without("z_image_turbo_bf16.safetensors", "layers.0.attention.q_norm.weight"),
                       ["missing", "layers.0.attention.q_norm.weight"]),
    "folder_missing_to_k": (_folder_without_to_k, ["incomplete", "layers.1.attention.qkv.weight",
                                                   "layers.1.attention.to_q.weight"]),
    "folder_missing_shard": (_folder_missing_shard, ["diffusion_pytorch_model-00002-of-00003.safetensors"]),
    "folder_without_files": (_empty_folder, ["no .safetensors"]),
    "nonexistent": (_nonexistent, ["does not exist"]),
}


@pytest.fixture
def nothing_unpickled(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_says_what_the_file_is(tiny, tmp_path, case, nothing_unpickled):
    build, words = REFUSALS[case]
    path = str(build(tmp_path, tiny))
    with pytest.raises(CheckpointError) as refused:
        load_transformer(path, dtype=torch.float32)
    message = str(refused.value)
    for word in words:
        assert word in message, (word, message)
    assert os.path.basename(path.rstrip("/")) in message, message


@pytest.fixture(scope="module")
def tiny_omni(tmp_path_factory):
    return Saved(TINY_OMNI, seed=13, root=tmp_path_factory.mktemp("omni_refusals"))


def _omni_file_without(*removed):
    def build(tmp_path, omni):
        sd = {k: v.to(torch.bfloat16) for k, v in diffusers_to_comfy(omni.sd).items()
              if not any(k.startswith(r) for r in removed)}
        path = tmp_path / "z_image_omni_base_bf16.safetensors"
        save_file(sd, path)
        return path
    return build


def _omni_folder_without_to_v(tmp_path, omni):
    sd = {k: v for k, v in omni.sd.items() if k != "siglip_refiner.0.attention.to_v.weight"}
    return save_diffusers_folder(sd, str(tmp_path / "Z-Image-Omni-Base"))


OMNI_REFUSALS = {
    "no SigLIP embedder weight": (_omni_file_without("siglip_embedder.1.weight"),
                                  ["not a complete Z-Image transformer", "siglip_embedder.1.weight is missing"]),
    "no SigLIP refiner": (_omni_file_without("siglip_refiner."), ["incomplete Z-Image Omni/Edit", "0 blocks"]),
    "no SigLIP pad token": (_omni_file_without("siglip_pad_token"), ["missing", "siglip_pad_token"]),
    "folder missing to_v": (_omni_folder_without_to_v, ["incomplete", "siglip_refiner.0.attention.qkv.weight"]),
}


@pytest.mark.parametrize("case", list(OMNI_REFUSALS))
def test_broken_omni_files_are_refused(tiny_omni, tmp_path, case):
    build, words = OMNI_REFUSALS[case]
    path = str(build(tmp_path, tiny_omni))
    with pytest.raises(CheckpointError) as refused:
        load_transformer(path, dtype=torch.float32)
    for word in words:
        assert word in str(refused.value), (word, str(refused.value))


def test_refusals_are_value_errors():
    assert issubclass(CheckpointError, ValueError)


# --- 6. key conversion ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [TINY, MID, TINY_OMNI], ids=["tiny", "mid", "tiny-omni"])
def test_convert_state_dict_formats_agree(cfg):
    sd = diffusers_reference(cfg, seed=10).state_dict()
    comfy = diffusers_to_comfy(sd)
    from_diffusers = convert_state_dict(sd)
    from_comfy = convert_state_dict(comfy)
    from_prefixed = convert_state_dict({PREFIX + k: v for k, v in comfy.items()})
    engine_keys = set(S3DiT(cfg).state_dict())
    assert set(from_diffusers) == set(from_comfy) == set(from_prefixed) == engine_keys
    for name in engine_keys:
        assert torch.equal(from_diffusers[name], from_comfy[name]), name
        assert torch.equal(from_prefixed[name], from_comfy[name]), name
    # the fused attention input is q, k, v in that order, from the diffusers side's separate matrices
    qkv = from_diffusers["layers.1.attention.qkv.weight"]
    assert torch.equal(qkv, torch.cat([sd[f"layers.1.attention.to_{p}.weight"] for p in "qkv"]))
    assert torch.equal(from_diffusers["x_embedder.weight"], sd["all_x_embedder.2-1.weight"])
    assert torch.equal(from_diffusers["layers.0.attention.k_norm.weight"], sd["layers.0.attention.norm_k.weight"])


def test_convert_state_dict_dequantizes_scaled_fp8(tiny):
    """convert_state_dict on a scaled-fp8 state dict (in memory) gives what load_transformer loads from it."""
    raw = load_file(tiny.paths["fp8_scaled"])
    assert any(k.endswith(".scale_weight") for k in raw)
    converted = convert_state_dict(raw)
    model = load_transformer(tiny.paths["fp8_scaled"], dtype=torch.float32)
    assert set(converted) == set(params(model))
    for name, p in model.named_parameters():
        assert torch.equal(converted[name].float(), p), name


# --- 7. malformed files: each refused with a CheckpointError naming the file --------------------------------

X_EMBEDDER, Q_NORM, K_NORM = "x_embedder.weight", "layers.0.attention.q_norm.weight", "layers.0.attention.k_norm.weight"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def _header_edit(edit):
    """A tiny model's ComfyUI file, header only (its data a hole), with `edit` applied to its header: the
    safetensors format itself is broken, so read_safetensors_header refuses it before anything else."""
    def build(tmp_path, tiny):
        path = str(tmp_path / "z_image_turbo_bf16.safetensors")
        write_safetensors_by_hand(path, comfy_header_spec(TINY), edit=edit)
        return path, os.path.basename(path)
    return build


def _set(key, field, value):
    def edit(header):
        header[key][field] = value
        return header
    return _header_edit(edit)


def _drop(key, field):
    def edit(header):
        del header[key][field]
        return header
    return _header_edit(edit)


def _overlapping(header):
    assert header[Q_NORM]["shape"] == header[K_NORM]["shape"]
    header[K_NORM]["data_offsets"] = header[Q_NORM]["data_offsets"]
    return header


def _bytes_after_last_tensor(tmp_path, tiny):
    path, name = _header_edit(lambda header: header)(tmp_path, tiny)
    with open(path, "ab") as f:
        f.write(bytes(16))
    return path, name


def _spec_change(**changes):
    """A tiny model's file that the safetensors format allows, with some tensors' (dtype, shape) changed (key
    "<name>": spec, dots written as __) or added: the model it describes is broken."""
    def build(tmp_path, tiny):
        spec = comfy_header_spec(TINY)
        spec.update({k.replace("__", "."): v for k, v in changes.items()})
        path = str(tmp_path / "z_image_turbo_bf16.safetensors")
        write_safetensors_by_hand(path, spec)
        return path, os.path.basename(path)
    return build


def _index(content):
    """A diffusers folder of the tiny model whose index json is replaced by `content` (text, or a function of
    the parsed index returning the JSON value to write)."""
    def build(tmp_path, tiny):
        folder = save_diffusers_folder(tiny.sd, str(tmp_path / "Z-Image-Turbo"))
        path = os.path.join(folder, "transformer", INDEX)
        text = content if isinstance(content, str) else json.dumps(content(json.load(open(path))))
        with open(path, "w") as f:
            f.write(text)
        return folder, INDEX
    return build


def _config(content):
    """A diffusers folder of the tiny model with its full config.json, then changed: `content` is the text to
    write, or a function of the parsed config returning the JSON value to write."""
    def build(tmp_path, tiny):
        folder = save_diffusers_folder(tiny.sd, str(tmp_path / "Z-Image-Turbo"), config=dict(tiny.reference.config))
        path = os.path.join(folder, "transformer", "config.json")
        text = content if isinstance(content, str) else json.dumps(content(json.load(open(path))))
        with open(path, "w") as f:
            f.write(text)
        return folder, "config.json"
    return build


def _with(key, value):
    return lambda config: config | {key: value}


def _folder_to_k_narrow(tmp_path, tiny):
    """to_q, to_k and to_v are stacked into one qkv: a to_k of another width cannot be."""
    sd = dict(tiny.sd)
    sd["layers.1.attention.to_k.weight"] = sd["layers.1.attention.to_k.weight"][:, :32].contiguous()
    folder = save_diffusers_folder(sd, str(tmp_path / "Z-Image-Turbo"))
    return folder, "Z-Image-Turbo"


# case -> (build(tmp_path, tiny) -> (path to load, file name the message must hold), words the message must hold)
MALFORMED = {
    # the safetensors header itself
    "header_is_a_list": (_header_edit(lambda header: list(header.values())), ["JSON list"]),
    "metadata_not_strings": (_header_edit(lambda header: header | {"__metadata__": {"format": 1}}), ["__metadata__"]),
    "entry_not_an_object": (_header_edit(lambda header: header | {X_EMBEDDER: [1, 2]}), [X_EMBEDDER]),
    "no_data_offsets": (_drop(X_EMBEDDER, "data_offsets"), [X_EMBEDDER, "no data_offsets"]),
    "no_dtype": (_drop(X_EMBEDDER, "dtype"), [X_EMBEDDER, "no dtype"]),
    "no_shape": (_drop(X_EMBEDDER, "shape"), [X_EMBEDDER, "no shape"]),
    "unknown_dtype": (_set(X_EMBEDDER, "dtype", "F42"), [X_EMBEDDER, "'F42'"]),
    "dtype_not_a_string": (_set(X_EMBEDDER, "dtype", 16), [X_EMBEDDER, "dtype 16"]),
    "shape_not_a_list": (_set(X_EMBEDDER, "shape", "64x64"), [X_EMBEDDER, "'64x64'"]),
    "negative_size": (_set(X_EMBEDDER, "shape", [-64, 64]), [X_EMBEDDER, "[-64, 64]"]),
    "fractional_size": (_set(X_EMBEDDER, "shape", [64.0, 64]), [X_EMBEDDER, "[64.0, 64]"]),
    "boolean_size": (_set(X_EMBEDDER, "shape", [True, 64]), [X_EMBEDDER, "[True, 64]"]),
    "offsets_disagree_with_shape": (_set(X_EMBEDDER, "shape", [64, 63]), [X_EMBEDDER, "need 8064"]),
    "offsets_reversed": (_header_edit(lambda header: header | {X_EMBEDDER: header[X_EMBEDDER] | {
        "data_offsets": header[X_EMBEDDER]["data_offsets"][::-1]}}), [X_EMBEDDER, "data_offsets"]),
    "offsets_overlap": (_header_edit(_overlapping), ["starts at byte"]),
    "bytes_after_last_tensor": (_bytes_after_last_tensor, ["16 bytes follow"]),
    # tensors the config is read from, in a valid safetensors file
    "q_norm_empty": (_spec_change(layers__0__attention__q_norm__weight=("BF16", [0])), [Q_NORM, "[0]"]),
    "x_embedder_1d": (_spec_change(x_embedder__weight=("BF16", [64])), [X_EMBEDDER, "[64]"]),
    "cap_embedder_empty": (_spec_change(cap_embedder__1__weight=("BF16", [64, 0])), ["cap_embedder.1.weight"]),
    "t_embedder_3d": (_spec_change(t_embedder__mlp__0__weight=("BF16", [1024, 256, 1])), ["t_embedder.mlp.0.weight"]),
    "head_size_not_dividing": (_spec_change(layers__0__attention__q_norm__weight=("BF16", [24])), ["head size 24"]),
    "head_too_small_for_rope": (_spec_change(layers__0__attention__q_norm__weight=("BF16", [2])), ["rope_axes"]),
    # other tensors whose shapes do not fit the model the config describes
    "block_weight_wrong_shape": (_spec_change(layers__1__feed_forward__w2__weight=("BF16", [64, 100])),
                                 ["layers.1.feed_forward.w2.weight [64, 100]", "needed [64, 170]"]),
    "fp8_scale_not_broadcasting": (_spec_change(layers__0__attention__qkv__weight=("F8_E4M3", [192, 64]),
                                                layers__0__attention__qkv__scale_weight=("F32", [3])),
                                   ["layers.0.attention.qkv.scale_weight [3]"]),
    "folder_to_k_narrower": (_folder_to_k_narrow, ["layers.1.attention.to_k.weight [64, 32]"]),
    # a diffusers folder's index
    "index_not_json": (_index("{\"weight_map\": {"), ["not valid JSON"]),
    "index_is_a_list": (_index(lambda index: [index]), ["weight_map"]),
    "index_without_weight_map": (_index(lambda index: {"metadata": {}}), ["weight_map"]),
    "weight_map_is_a_list": (_index(lambda index: {"weight_map": sorted(index["weight_map"].values())}),
                             ["weight_map"]),
    "weight_map_not_strings": (_index(lambda index: {"weight_map": {k: 3 for k in index["weight_map"]}}),
                               ["weight_map"]),
    # a diffusers folder's config.json
    "config_not_json": (_config("{\"axes_dims\": [4, 6,"), ["not valid JSON"]),
    "config_is_a_list": (_config(lambda config: [config]), ["JSON list"]),
    "config_disagrees_on_dim": (_config(_with("dim", 128)), ["dim is 128", "64"]),
    "config_disagrees_on_layers": (_config(_with("n_layers", 30)), ["n_layers is 30"]),
    "config_more_kv_heads": (_config(_with("n_kv_heads", 2)), ["n_kv_heads is 2"]),
    "config_odd_rope_axes": (_config(_with("axes_dims", [5, 5, 6])), ["rope_axes"]),
    "config_two_rope_axes": (_config(_with("axes_dims", [8, 8])), ["axes_dims [8, 8]"]),
    "config_rope_theta_text": (_config(_with("rope_theta", "256")), ["rope_theta '256'"]),
    "config_patch_size_1": (_config(_with("all_patch_size", [1])), ["all_patch_size is [1]", "another model"]),
}
HEADER_CASES = list(MALFORMED)[:list(MALFORMED).index("bytes_after_last_tensor") + 1]


def test_unbroken_hand_written_header_is_accepted(tmp_path):
    """The builders above break one thing each: unedited, the same header-only file is a valid tiny model."""
    path, _ = _header_edit(lambda header: header)(tmp_path, None)
    assert inspect_checkpoint(path).config == TINY
    path, _ = _spec_change()(tmp_path, None)
    assert inspect_checkpoint(path).config == TINY


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_file_is_refused(tiny, tmp_path, case, nothing_unpickled):
    build, words = MALFORMED[case]
    path, file_name = build(tmp_path, tiny)
    with pytest.raises(CheckpointError) as refused:
        load_transformer(path, dtype=torch.float32)
    message = str(refused.value)
    assert file_name in message, message
    for word in words:
        assert word in message, (word, message)
    assert "re-download" in message.lower() or "another model" in message, message
    if case in HEADER_CASES:  # the same refusal for any safetensors file, a LoRA's too: nothing about transformers
        with pytest.raises(CheckpointError) as refused:
            read_safetensors_header(path)
        assert str(refused.value) in message
        assert "transformer" not in str(refused.value) and "Z-Image" not in str(refused.value)


# --- 8. a diffusers index that points outside its folder ------------------------------------------------------

@pytest.mark.parametrize("shard", ["/etc/hostname", "../../x.safetensors", "transformer/x.safetensors",
                                   "x.bin", "C:x.safetensors"])
def test_index_pointing_outside_the_folder_is_refused_unread(tiny, tmp_path, monkeypatch, shard):
    """An index that sends a shard's tensors elsewhere is refused before any shard is opened. Where the target
    can be made, it is a valid copy of the shard it replaces: followed, the folder would load."""
    folder = save_diffusers_folder(tiny.sd, str(tmp_path / "Z-Image-Turbo"))
    tdir = os.path.join(folder, "transformer")
    index_path = os.path.join(tdir, INDEX)
    index = json.load(open(index_path))
    first = sorted(set(index["weight_map"].values()))[0]
    target = os.path.realpath(os.path.join(tdir, shard))
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy(os.path.join(tdir, first), target)
    os.remove(os.path.join(tdir, first))
    index["weight_map"] = {k: shard if v == first else v for k, v in index["weight_map"].items()}
    with open(index_path, "w") as f:
        json.dump(index, f)

    opened = []

    def spy_open(file, *args, **kwargs):
        opened.append(os.path.realpath(file))
        return builtins.open(file, *args, **kwargs)

    real_safe_open = safetensors.safe_open

    def spy_safe_open(file, *args, **kwargs):
        opened.append(os.path.realpath(file))
        return real_safe_open(file, *args, **kwargs)

    monkeypatch.setattr(zimage.files, "open", spy_open, raising=False)  # the module's open, not builtins'
    monkeypatch.setattr(safetensors, "safe_open", spy_safe_open)
    with pytest.raises(CheckpointError) as refused:
        load_transformer(folder, dtype=torch.float32)
    message = str(refused.value)
    assert "broken or malicious" in message and INDEX in message and repr(shard) in message, message
    assert opened == [os.path.realpath(index_path)]  # the index, and nothing it names


def test_symlinked_shard_inside_the_folder_loads(tiny, tmp_path):
    """A shard the user keeps elsewhere and links into the folder under its own name is followed."""
    folder = save_diffusers_folder(tiny.sd, str(tmp_path / "Z-Image-Turbo"))
    tdir = os.path.join(folder, "transformer")
    shard = sorted(f for f in os.listdir(tdir) if f.endswith(".safetensors"))[0]
    os.rename(os.path.join(tdir, shard), str(tmp_path / "elsewhere.safetensors"))
    os.symlink(str(tmp_path / "elsewhere.safetensors"), os.path.join(tdir, shard))
    model = load_transformer(folder, dtype=torch.float32)
    assert all(torch.equal(p, tiny.expected[n]) for n, p in model.named_parameters())


# --- 9. keys known to be unused are skipped, every other unknown key refused ---------------------------------

def _comfy_with(tiny, path, prefix, extra: dict[str, torch.Tensor]) -> str:
    sd = {prefix + k: v.to(torch.bfloat16).contiguous() for k, v in diffusers_to_comfy(tiny.sd).items()}
    save_file(sd | extra, path)
    return path


@pytest.mark.parametrize("prefix", [PREFIX, ""], ids=["prefixed", "unprefixed"])
def test_stray_norm_final_is_ignored(tiny, tmp_path, prefix):
    """Community fine-tunes saved with the Lumina trainer code carry an unused [dim] norm_final.weight."""
    clean = _comfy_with(tiny, str(tmp_path / "clean.safetensors"), prefix, {})
    stray = _comfy_with(tiny, str(tmp_path / "finetune.safetensors"), prefix,
                        {prefix + "norm_final.weight": torch.randn(TINY.dim).to(torch.bfloat16)})
    assert prefix + "norm_final.weight" in load_file(stray)
    model, reference = load_transformer(stray, dtype=torch.float32), load_transformer(clean, dtype=torch.float32)
    assert model.cfg == reference.cfg == TINY
    with torch.no_grad():
        assert torch.equal(model(*tiny.inputs), reference(*tiny.inputs))


# case -> (the file's prefix, the one extra key)
UNKNOWN_KEYS = {
    "prefixed": (PREFIX, PREFIX + "layers.0.attention.adapter.weight"),
    "unprefixed_in_prefixed_file": (PREFIX, "norm_out.weight"),
    "engine_name_outside_the_prefix": (PREFIX, "x_embedder.bias"),
    "norm_final_under_another_prefix": (PREFIX, "diffusion_model.norm_final.weight"),
    "unprefixed_file": ("", "layers.0.attention.adapter.weight"),
    "scale_without_its_weight": ("", "layers.0.attention.adapter.scale_weight"),
}


@pytest.mark.parametrize("case", list(UNKNOWN_KEYS))
def test_unknown_key_is_refused(tiny, tmp_path, case):
    prefix, key = UNKNOWN_KEYS[case]
    path = _comfy_with(tiny, str(tmp_path / "z_image_turbo_bf16.safetensors"), prefix,
                       {key: torch.zeros(TINY.dim, dtype=torch.bfloat16)})
    with pytest.raises(CheckpointError) as refused:
        load_transformer(path, dtype=torch.float32)
    message = str(refused.value)
    assert "z_image_turbo_bf16.safetensors" in message and f" {key}." in message, message
    assert "does not have" in message, message


# --- 10. a diffusers folder's config.json ---------------------------------------------------------------------

def test_diffusers_config_sets_what_the_headers_cannot(tmp_path):
    """RoPE split, RoPE theta and lengths, norm eps and time scale come from config.json: the tiny model's
    head (16) split (8, 4, 4), where the guess from the head size is (4, 6, 6)."""
    cfg = ZImageConfig.tiny(rope_axes=(8, 4, 4), rope_theta=100.0, rope_lengths=(1024, 128, 128), norm_eps=1e-6,
                            t_scale=500.0)
    assert ZImageConfig.rope_axes_for(cfg.head_dim) == (4, 6, 6)
    reference = diffusers_reference(cfg, seed=14)
    folder = save_diffusers_folder(reference.state_dict(), str(tmp_path / "Z-Image-Custom"),
                                   config=dict(reference.config))
    inputs = velocity_inputs(cfg)
    with torch.no_grad():
        expected = diffusers_velocity(reference, *inputs)
    assert inspect_checkpoint(folder).config == cfg
    model = load_transformer(folder, dtype=torch.float32)
    assert model.cfg.rope_axes == (8, 4, 4)
    with torch.no_grad():
        assert rel_err(model(*inputs), expected) < 1e-5
    # without config.json the split is guessed, and the model computes something else
    os.remove(os.path.join(folder, "transformer", "config.json"))
    guessed = load_transformer(folder, dtype=torch.float32)
    assert guessed.cfg.rope_axes == (4, 6, 6)
    with torch.no_grad():
        assert rel_err(guessed(*inputs), expected) > 1e-2
