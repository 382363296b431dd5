"""ComfyUI's quantized repacks (Comfy-Org's z_image_turbo_nvfp4 / _int8_convrot, fp8 files with comfy_quant markers
or _quantization_metadata): each written here in its exact layout, with the real key names, dtypes and markers.
A format the engine reads loads as the numbers it stands for: the expected weights are computed in this file from
the format's definition (code tables, the blocked scale layout and the Hadamard matrix written out by index), and on
the ComfyUI hosts compared with what ComfyUI itself (comfy.ops.mixed_precision_ops, comfy-kitchen) makes of the same
file. Every other format is refused with a message that names it and the file to use instead."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import diffusers_reference, diffusers_to_comfy
from zimage import CheckpointError, ZImageConfig, inspect_checkpoint, load_transformer
from zimage.keys import PREFIXES

CFG = ZImageConfig.tiny()
BLOCK_STACKS = ("layers", "noise_refiner", "context_refiner")
FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]  # E2M1 by code
CONVROT_GROUP = 64  # the tiny model's width: its 64-column matrices rotate, w2 (170 columns) cannot


def marker(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


def blocked_position(row: int, col: int, cols: int) -> int:
    """Where cuBLAS's block-scale layout puts scale (row, col) of a matrix with `cols` scales a row: tiles of 128 rows
    x 4 columns, row tiles first, each tile stored as 32 rows of 16 bytes, byte 4*i + j of row r holding the tile's
    scale (32*i + r, j)."""
    col_tiles = -(-cols // 4)
    tile = (row // 128) * col_tiles + col // 4
    r, i, j = row % 128 % 32, row % 128 // 32, col % 4
    return tile * 512 + r * 16 + 4 * i + j


def hadamard_by_index(size: int) -> torch.Tensor:
    """Entry (a, b) of the regular Hadamard matrix of order 4^n: the product over the base-4 digits of a and b of
    the order-4 matrix's entry, -1 where the two digits sum to 3 (its antidiagonal), +1 elsewhere; over sqrt(size)."""
    h = torch.empty(size, size)
    for a in range(size):
        for b in range(size):
            sign, x, y = 1.0, a, b
            for _ in range(round(math.log(size, 4))):
                sign *= -1.0 if x % 4 + y % 4 == 3 else 1.0
                x, y = x // 4, y // 4
            h[a, b] = sign
    return h / math.sqrt(size)


def quantize_layer(fmt: str, weight: torch.Tensor, gen: torch.Generator, conf_extra: dict | None = None):
    """Random stored tensors of one layer in `fmt` (the weight's shape), and the float32 weight they stand for by
    the format's definition. Returns ({suffix: tensor}, comfy_quant settings, expected weight)."""
    n, k = weight.shape
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        dtype = torch.float8_e4m3fn if fmt == "float8_e4m3fn" else torch.float8_e5m2
        codes = (torch.randn(n, k, generator=gen) * 100).to(dtype)
        scale = torch.tensor(0.003, dtype=torch.float32)
        return {"weight": codes, "weight_scale": scale}, {"format": fmt}, codes.float() * scale
    if fmt == "nvfp4":
        nibbles = torch.randint(0, 16, (n, k), generator=gen)
        packed = (nibbles[:, 0::2] * 16 + nibbles[:, 1::2]).to(torch.uint8)
        block = (torch.rand(n, k // 16, generator=gen) * 50 + 1).to(torch.float8_e4m3fn)
        rows, cols = -(-n // 128) * 128, -(-(k // 16) // 4) * 4
        stored = torch.zeros(rows * cols, dtype=torch.float8_e4m3fn)
        for r in range(n):
            for c in range(k // 16):
                stored[blocked_position(r, c, k // 16)] = block[r, c]
        tensor_scale = torch.tensor(0.0007, dtype=torch.float32)
        values = torch.tensor(FP4)[nibbles]
        expected = values * (tensor_scale * block.float().repeat_interleave(16, dim=1))
        return ({"weight": packed, "weight_scale": stored.reshape(rows, cols), "weight_scale_2": tensor_scale,
                 "input_scale": torch.tensor(0.01)}, {"format": "nvfp4"}, expected)
    codes = torch.randint(-128, 128, (n, k), generator=gen).to(torch.int8)
    scale = torch.rand(n, 1, generator=gen) * 0.01
    expected = codes.float() * scale
    conf = {"format": "int8_tensorwise"}
    if fmt == "int8_convrot" and k % CONVROT_GROUP == 0:
        conf |= conf_extra or {"convrot": True, "convrot_groupsize": CONVROT_GROUP}
        h = hadamard_by_index(CONVROT_GROUP)
        # stored rows are the weight rotated: W_rot = W H^T per run of G columns, so W = W_rot H (H orthogonal)
        expected = torch.cat([expected[:, g:g + CONVROT_GROUP] @ h for g in range(0, k, CONVROT_GROUP)], dim=1)
    return {"weight": codes, "weight_scale": scale}, conf, expected


def quantizable(fmt: str, key: str, value: torch.Tensor) -> bool:
    if not (value.ndim == 2 and key.endswith(".weight") and key.split(".")[0] in BLOCK_STACKS):
        return False
    return fmt != "nvfp4" or (value.shape[1] % 16 == 0 and value.shape[0] % 16 == 0)


def write_quantized(path: str, fmt: str, markers: str = "tensors", prefix: str = "", seed: int = 0):
    """A tiny Z-Image in ComfyUI's quantized layout `fmt` (float8_e4m3fn, float8_e5m2, nvfp4, int8, int8_convrot):
    its block matrices quantized (those the format can hold), the rest bf16; the layers marked by `comfy_quant`
    tensors (markers="tensors") or in the header's _quantization_metadata ("metadata"; layer names as the file's
    keys, or "bare_metadata": without the file's prefix). Returns {engine key: expected float32 tensor}."""
    gen = torch.Generator().manual_seed(seed)
    comfy = diffusers_to_comfy(diffusers_reference(CFG, seed=seed).state_dict())
    tensors, layers, expected = {}, {}, {}
    for key, value in comfy.items():
        if not quantizable(fmt, key, value):
            tensors[prefix + key] = value.to(torch.bfloat16).contiguous()
            expected[key] = tensors[prefix + key].float()
            continue
        layer = key.removesuffix(".weight")
        stored, conf, expected[key] = quantize_layer("int8_tensorwise" if fmt == "int8" else fmt, value, gen)
        for suffix, tensor in stored.items():
            tensors[f"{prefix}{layer}.{suffix}"] = tensor
        layers[layer] = conf
    metadata = None
    if markers == "tensors":
        tensors.update({f"{prefix}{layer}.comfy_quant": marker(conf) for layer, conf in layers.items()})
    else:
        named = prefix if markers == "metadata" else ""
        metadata = {"_quantization_metadata": json.dumps(
            {"format_version": "1.0", "layers": {named + layer: conf for layer, conf in layers.items()}})}
    save_file(tensors, path, metadata=metadata)
    return expected


def assert_loads_as(path: str, expected: dict[str, torch.Tensor]):
    model = load_transformer(path, dtype=torch.float32)
    loaded = dict(model.named_parameters())
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=1e-6, atol=1e-7, msg=key)
    return model


LOADED = ["float8_e4m3fn", "float8_e5m2", "nvfp4", "int8", "int8_convrot"]


@pytest.mark.parametrize("fmt", LOADED)
def test_quantized_file_loads_as_its_format_defines(tmp_path, fmt):
    path = str(tmp_path / f"z_image_turbo_{fmt}.safetensors")
    expected = write_quantized(path, fmt)
    info = inspect_checkpoint(path)
    assert info.config == CFG
    assert fmt.split("_")[0] in info.quantization, info.quantization
    if fmt in ("nvfp4", "int8", "int8_convrot"):
        assert info.stored_dtype == torch.bfloat16  # loads dequantized
    model = assert_loads_as(path, expected)
    assert any(not torch.equal(expected[k], torch.zeros_like(expected[k])) for k in expected)
    if fmt == "int8_convrot":  # the rotation is undone: the stored codes times their scales are not the weights
        raw = load_file(path)
        assert not torch.allclose(raw["layers.0.attention.qkv.weight"].float() * raw["layers.0.attention.qkv.weight_scale"],
                                  model.layers[0].attention.qkv.weight, atol=1e-4)


@pytest.mark.parametrize("markers,prefix", [("metadata", ""), ("metadata", PREFIXES[0]), ("bare_metadata", PREFIXES[0]),
                                            ("tensors", PREFIXES[0])],
                         ids=["metadata", "metadata-prefixed", "metadata-bare-names", "markers-prefixed"])
@pytest.mark.parametrize("fmt", ["nvfp4", "int8_convrot"])
def test_quantization_metadata_and_prefixes(tmp_path, fmt, markers, prefix):
    path = str(tmp_path / "z_image_turbo_quantized.safetensors")
    expected = write_quantized(path, fmt, markers=markers, prefix=prefix, seed=3)
    assert_loads_as(path, expected)


def test_nested_convrot_params_are_read(tmp_path):
    """Newer ComfyUI also reads convrot and its group size from a "params" object."""
    path = str(tmp_path / "z_image_turbo_int8_convrot.safetensors")
    expected = write_quantized(path, "int8_convrot")
    tensors = load_file(path)
    for key in [k for k in tensors if k.endswith(".comfy_quant")]:
        conf = json.loads(tensors[key].numpy().tobytes())
        if conf.pop("convrot", False):
            conf["params"] = {"convrot": True, "convrot_groupsize": conf.pop("convrot_groupsize")}
        tensors[key] = marker(conf)
    save_file(tensors, path)
    assert_loads_as(path, expected)


def _edit(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def _set_marker(layer, conf):
    return lambda t: t.__setitem__(layer + ".comfy_quant", marker(conf))


# case -> (base format, edit of the tensors, words the message must hold)
REFUSED = {
    "mxfp8": ("float8_e4m3fn", _set_marker("layers.0.attention.qkv", {"format": "mxfp8"}), ["'mxfp8' format"]),
    "convrot_w4a4": ("int8", _set_marker("layers.0.attention.qkv", {"format": "convrot_w4a4"}),
                     ["'convrot_w4a4' format"]),
    "unknown_setting": ("int8", _set_marker("layers.0.attention.qkv", {"format": "int8_tensorwise", "zero_point": 3}),
                        ["zero_point"]),
    "nvfp4_pre_quant_scale": ("nvfp4", lambda t: t.__setitem__("layers.0.attention.qkv.pre_quant_scale",
                                                                 torch.ones(64)), ["pre_quant_scale"]),
    "convrot_group_not_power_of_4": ("int8", _set_marker("layers.0.attention.qkv", {
        "format": "int8_tensorwise", "convrot": True, "convrot_groupsize": 32}), ["convrot_groupsize 32"]),
    "int8_scale_without_marker": ("int8", lambda t: t.pop("layers.0.attention.qkv.comfy_quant"),
                                  ["layers.0.attention.qkv.weight_scale", "I8"]),
    "nvfp4_block_scales_wrong_shape": ("nvfp4", lambda t: t.__setitem__(
        "layers.0.attention.qkv.weight_scale", torch.zeros(192, 4, dtype=torch.float8_e4m3fn)),
        ["layers.0.attention.qkv.weight_scale", "[256, 4]"]),
    "nvfp4_without_tensor_scale": ("nvfp4", lambda t: t.pop("layers.0.attention.qkv.weight_scale_2"),
                                   ["weight_scale_2"]),
    "int8_scale_per_column": ("int8", lambda t: t.__setitem__("layers.0.attention.qkv.weight_scale",
                                                              torch.ones(1, 64)), ["[1, 64]", "[192, 1]"]),
    "marker_not_json": ("int8", lambda t: t.__setitem__("layers.0.attention.qkv.comfy_quant",
                                                         torch.tensor(list(b"{format"), dtype=torch.uint8)),
                        ["layers.0.attention.qkv.comfy_quant"]),
    "marker_without_weight": ("int8", lambda t: t.__setitem__("layers.0.attention.gate.comfy_quant",
                                                              marker({"format": "int8_tensorwise"})),
                              ["layers.0.attention.gate"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_other_formats_and_broken_layers_are_refused_by_name(tmp_path, case):
    fmt, change, words = REFUSED[case]
    path = str(tmp_path / "z_image_turbo_quantized.safetensors")
    write_quantized(path, fmt)
    _edit(path, change)
    with pytest.raises(CheckpointError) as refused:
        load_transformer(path, dtype=torch.float32)
    message = str(refused.value)
    assert "z_image_turbo_quantized.safetensors" in message, message
    for word in words:
        assert word in message, (word, message)
    if case in ("mxfp8", "convrot_w4a4", "unknown_setting", "nvfp4_pre_quant_scale", "convrot_group_not_power_of_4",
                "int8_scale_without_marker"):
        assert "z_image_turbo_bf16.safetensors" in message and "fp8_e4m3fn_fast" in message, message


def test_metadata_and_marker_must_agree(tmp_path):
    path = str(tmp_path / "z_image_turbo_quantized.safetensors")
    write_quantized(path, "int8_convrot")
    tensors = load_file(path)
    metadata = {"_quantization_metadata": json.dumps({"layers": {"layers.0.attention.qkv": {
        "format": "int8_tensorwise"}}})}
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match="layers.0.attention.qkv"):
        inspect_checkpoint(path)


# --- the same files in ComfyUI ------------------------------------------------------------------------------------

def comfyui_weights(path: str, fmt: str) -> dict[str, torch.Tensor]:
    """Each quantized layer's weight as ComfyUI reads the file: comfy.utils.load_torch_file and convert_old_quants,
    then mixed_precision_ops' Linear (float8, nvfp4) or comfy-kitchen's TensorWiseINT8Layout (int8_tensorwise, which
    these ComfyUI versions' QUANT_ALGOS do not list yet), dequantized to float32."""
    import comfy.ops
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(path, return_metadata=True)
    sd, _ = comfy.utils.convert_old_quants(sd, "", metadata=metadata)
    out = {}
    for key in [k for k in sd if k.endswith(".comfy_quant")]:
        layer = key.removesuffix(".comfy_quant")
        conf = json.loads(sd[key].numpy().tobytes())
        part = {s: sd[f"{layer}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2", "input_scale", "comfy_quant")
                if f"{layer}.{s}" in sd}
        if conf["format"] == "int8_tensorwise":
            from comfy_kitchen.tensor import TensorWiseINT8Layout

            n, k = part["weight"].shape
            params = TensorWiseINT8Layout.Params(scale=part["weight_scale"], orig_dtype=torch.float32, orig_shape=(n, k),
                                                 convrot=conf.get("convrot", False),
                                                 convrot_groupsize=conf.get("convrot_groupsize", 256))
            out[layer + ".weight"] = TensorWiseINT8Layout.dequantize(part["weight"], params)
            continue
        n, k = part["weight"].shape[0], part["weight"].shape[1] * (2 if conf["format"] == "nvfp4" else 1)
        linear = comfy.ops.mixed_precision_ops({}, torch.float32).Linear(k, n, bias=False)
        missing, unexpected = linear.load_state_dict(part, strict=False)
        assert not unexpected, unexpected
        out[layer + ".weight"] = linear.weight.dequantize().float()
    return out


@pytest.mark.host
@pytest.mark.parametrize("fmt,markers", [("float8_e4m3fn", "tensors"), ("float8_e5m2", "metadata"), ("nvfp4", "tensors"),
                                         ("nvfp4", "metadata"), ("int8", "tensors"), ("int8_convrot", "tensors")])
def test_loaded_weights_equal_comfyuis_dequantization(comfyui_path, tmp_path, fmt, markers):
    path = str(tmp_path / "z_image_turbo_quantized.safetensors")
    expected = write_quantized(path, fmt, markers=markers, seed=7)
    theirs = comfyui_weights(path, fmt)
    assert theirs
    ours = dict(load_transformer(path, dtype=torch.float32).named_parameters())
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(expected[key], value, rtol=1e-5, atol=1e-6, msg=key)


# --- through ZImageLoader in ComfyUI's server ----------------------------------------------------------------------

@pytest.mark.host
def test_the_loader_node_loads_a_repack_and_refuses_another_format_by_name(comfy_server):
    from comfy_host import TINY_DIT, load_workflow, shrink

    assert TINY_DIT == CFG
    folder = comfy_server.base / "models" / "diffusion_models"
    nvfp4, mxfp8 = folder / "z_image_turbo_nvfp4.safetensors", folder / "z_image_turbo_mxfp8.safetensors"
    write_quantized(str(nvfp4), "nvfp4")
    write_quantized(str(mxfp8), "float8_e4m3fn")
    _edit(str(mxfp8), _set_marker("layers.0.attention.qkv", {"format": "mxfp8"}))
    try:
        prompt = shrink(load_workflow("zimage_turbo_t2i.api.json"))
        prompt["1"]["inputs"]["model_name"] = nvfp4.name
        entry = comfy_server.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        (summary,) = entry["outputs"]["1"]["text"]
        assert "nvfp4" in summary and "dequantized on load" in summary, summary

        prompt["1"]["inputs"]["model_name"] = mxfp8.name
        entry = comfy_server.run(prompt)
        assert entry["status"]["status_str"] == "error"
        (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert error["node_type"] == "ZImageLoader"
        message = error["exception_message"]
        assert "'mxfp8' format" in message and "z_image_turbo_bf16.safetensors" in message, message
    finally:
        nvfp4.unlink()
        mxfp8.unlink()


@pytest.mark.host
def test_the_loader_keeps_what_a_scaled_fp8_file_holds(zimage_pack, tmp_path):
    """ZImageLoader's default on ComfyUI's scaled fp8 repack: the blocks' matrices stay the dequantized values (the
    compute dtype in memory), not plain fp8 again, which would drop their scales; a plain fp8 file stays fp8."""
    import importlib

    import comfy.model_management
    import folder_paths

    loader = importlib.import_module(f"{zimage_pack.__name__}.nodes.loader")
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    expected = write_quantized(str(folder / "z_image_turbo_fp8_scaled.safetensors"), "float8_e4m3fn")
    plain = {k: v.to(torch.float8_e4m3fn if v.ndim == 2 and k.startswith("layers.") else torch.bfloat16)
             for k, v in diffusers_to_comfy(diffusers_reference(CFG, seed=1).state_dict()).items()}
    save_file(plain, str(folder / "z_image_turbo_fp8_e4m3fn.safetensors"))
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    try:
        (model,) = loader.ZImageLoader().load("z_image_turbo_fp8_scaled.safetensors", "default", "auto",
                                              cuda_graphs=False)["result"]
        network = model.model.diffusion_model
        qkv = network.layers[0].attention.qkv.weight
        assert qkv.dtype == network.x_embedder.weight.dtype != torch.float8_e4m3fn
        torch.testing.assert_close(qkv.float(), expected["layers.0.attention.qkv.weight"].to(qkv.dtype).float())
        (model,) = loader.ZImageLoader().load("z_image_turbo_fp8_e4m3fn.safetensors", "default", "auto",
                                              cuda_graphs=False)["result"]
        assert model.model.diffusion_model.layers[0].attention.qkv.weight.dtype == torch.float8_e4m3fn
    finally:
        folder_paths.folder_names_and_paths["diffusion_models"][0].remove(str(folder))
        comfy.model_management.unload_all_models()
