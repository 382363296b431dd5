"""GGUF transformers: GGML blocks dequantized as gguf-py dequantizes them, files in city96's ComfyUI-GGUF layout
(tests/gguf_files.py) loading with their matrices kept quantized, the forward equal to the model built from the
dequantized weights and close to the original, and every file that is not one refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

from gguf_files import GGML_PACKAGE_QUANTIZES, PRESETS, block_type, dequantize, quantize, write_gguf
from helpers import randomize_, rel_err
from zimage import CheckpointError, S3DiT, ZImageConfig, inspect_checkpoint, load_transformer
from zimage.ggml import FORMATS, dequantize as engine_dequantize
from zimage.quantized import QuantizedLinear

# the smallest model whose matrices hold whole 256-element K-quant blocks (dim, ffn_hidden, t_embed_dim)
CFG = ZImageConfig.tiny(dim=256, n_heads=4, ffn_hidden=512, t_embed_dim=256, rope_axes=(16, 24, 24))
# relative error of each type's reference quantization of a random matrix, with room
TYPE_ERROR = {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.06, "Q5_0": 0.06, "Q5_1": 0.06, "Q4_K": 0.11, "Q4_0": 0.11,
              "Q4_1": 0.11, "Q3_K": 0.2, "Q2_K": 0.4}


@pytest.fixture(scope="module")
def original():
    return randomize_(S3DiT(CFG), seed=5).eval()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 8, 12, generator=g), torch.tensor([0.9, 0.4]),
            [torch.randn(n, CFG.cap_feat_dim, generator=g) for n in (7, 12)])


def valid_random_blocks(qtype: str, n: int, seed: int = 0) -> np.ndarray:
    """n random blocks of qtype whose float16 scales are finite: any bytes are codes, only the scales can be NaN."""
    fmt = FORMATS[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, fmt.nbytes), dtype=np.uint8)
    scales = dequantize(blocks, qtype)
    while not np.isfinite(scales).all():
        bad = ~np.isfinite(scales).reshape(n, -1).all(axis=1)
        blocks[bad] = rng.integers(0, 256, size=(int(bad.sum()), fmt.nbytes), dtype=np.uint8)
        scales = dequantize(blocks, qtype)
    return blocks


@pytest.mark.parametrize("qtype", list(FORMATS))
def test_dequantization_equals_the_gguf_package(qtype):
    """Every code and scale position of every supported type, from random valid blocks: bit for bit."""
    blocks = valid_random_blocks(qtype, 64).reshape(4, -1)
    expected = dequantize(blocks, qtype)
    got = engine_dequantize(torch.from_numpy(blocks), qtype)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, torch.from_numpy(expected))
    # to a compute dtype: the float32 values rounded once
    assert torch.equal(engine_dequantize(torch.from_numpy(blocks), qtype, torch.bfloat16),
                       torch.from_numpy(expected).to(torch.bfloat16))


@pytest.mark.parametrize("qtype", list(FORMATS))
def test_quantized_matrices_read_back_to_their_quantization_error(qtype):
    """The writer's input, quantized (gguf-py's quantizer, or the tests' K-quantizers) and read back by the engine:
    gguf-py's values exactly, within the type's error of the input."""
    x = torch.randn(48, 512, generator=torch.Generator().manual_seed(1)) * 0.05
    raw = quantize(x.numpy(), qtype)
    got = engine_dequantize(torch.from_numpy(raw), qtype)
    assert torch.equal(got, torch.from_numpy(dequantize(raw, qtype)))
    assert rel_err(got, x) < TYPE_ERROR[qtype]


@pytest.mark.parametrize("preset", list(PRESETS))
def test_gguf_loads_with_its_matrices_quantized(tmp_path, original, preset):
    path = write_gguf(tmp_path / f"z_image_turbo-{preset}.gguf", original.state_dict(), preset)
    info = inspect_checkpoint(str(path))
    assert (info.format, info.variant, info.config) == ("gguf", "z-image", CFG)
    model = load_transformer(str(path), dtype=torch.float32)

    written = {n: block_type(n, p.shape, preset) for n, p in original.state_dict().items()}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    # city96's quantize tool quantizes the main layers' matrices; the refiners and embedders stay BF16
    assert {n + ".weight" for n in quantized} == {n for n, t in written.items() if t in FORMATS}
    assert quantized and all(n.startswith("layers.") for n in quantized)
    for name, module in quantized.items():
        assert module.qtype == written[name + ".weight"]
        assert module.weight.dtype == torch.uint8  # the blocks' bytes, as in the file
        source = original.get_submodule(name).weight.detach()
        got = module.dequantized(torch.float32)
        assert torch.equal(got, torch.from_numpy(dequantize(quantize(source.numpy(), module.qtype), module.qtype)))
        assert rel_err(got, source) < TYPE_ERROR[module.qtype]
    # the memory of a quantized matrix is its blocks'
    module = quantized["layers.0.feed_forward.w1"]
    assert module.weight.nbytes == 512 * 256 // FORMATS[module.qtype].elements * FORMATS[module.qtype].nbytes

    # the forward: the same model built from the dequantized weights gives it exactly; the original, within the
    # quantization's error
    dense = S3DiT(CFG).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".weight") or k[:-7] not in quantized}
    state.update({n + ".weight": m.dequantized(torch.float32) for n, m in quantized.items()})
    dense.load_state_dict(state)
    with torch.no_grad():
        got, exact, reference = model(*inputs()), dense(*inputs()), original(*inputs())
    assert torch.equal(got, exact)
    # BF16 embedders and refiners bound it below; the main layers' quantization above
    assert rel_err(got, reference) < {"Q8_0": 0.02, "Q6_K": 0.04, "Q3_K_M": 0.3}.get(preset, 0.15)


def test_q4_k_m_stays_under_a_third_of_bf16_memory(tmp_path, original):
    path = write_gguf(tmp_path / "q4.gguf", original.state_dict(), "Q4_K_M")
    model = load_transformer(str(path), dtype=torch.bfloat16)
    layers = sum(p.nbytes for p in model.layers.parameters())
    assert layers < 0.33 * sum(p.numel() * 2 for p in original.layers.parameters())


@pytest.mark.parametrize("variant", ["prefixed", "no architecture", "pad tokens as written"])
def test_other_writers_layouts_load(tmp_path, original, variant):
    """stable-diffusion.cpp keeps the model.diffusion_model. prefix and writes no architecture; a file written
    straight from the converter keeps the [1, dim] pad tokens."""
    kwargs = {"prefixed": dict(prefix="model.diffusion_model."), "no architecture": dict(arch=None),
              "pad tokens as written": dict(squeeze_pad_tokens=False)}[variant]
    path = write_gguf(tmp_path / "z.gguf", original.state_dict(), "Q8_0", **kwargs)
    model = load_transformer(str(path), dtype=torch.float32)
    assert model.x_pad_token.shape == (1, CFG.dim)
    written = original.x_pad_token.detach()
    if block_type("x_pad_token", written.shape, "Q8_0") == "BF16":
        written = written.bfloat16().float()
    assert torch.equal(model.x_pad_token, written)
    assert isinstance(model.layers[0].attention.qkv, QuantizedLinear)


def diffusers_named(state: dict) -> dict:
    """ComfyUI names -> diffusers' (q, k and v apart), written here apart from zimage's table."""
    out = {}
    for key, value in state.items():
        if ".attention.qkv." in key:
            for part, name in zip(value.chunk(3), ("to_q", "to_k", "to_v")):
                out[key.replace(".qkv.", f".{name}.")] = part
            continue
        out[key.replace(".attention.out.", ".attention.to_out.0.").replace(".q_norm.", ".norm_q.")
               .replace(".k_norm.", ".norm_k.").replace("x_embedder.", "all_x_embedder.2-1.")
               .replace("final_layer.", "all_final_layer.2-1.")] = value
    return out


def test_separate_q_k_v_of_one_type_stack_into_a_quantized_qkv(tmp_path, original):
    """Blocks run along a row, so the rows of q, k and v stacked are the fused matrix's: the same bytes, the same
    values as the parts dequantized and stacked."""
    state = diffusers_named(original.state_dict())
    path = write_gguf(tmp_path / "diffusers.gguf", state, "Q5_0")
    model = load_transformer(str(path), dtype=torch.float32)
    qkv = model.layers[1].attention.qkv
    assert isinstance(qkv, QuantizedLinear) and qkv.qtype == "Q5_0" and qkv.weight_shape == (3 * CFG.dim, CFG.dim)
    parts = [dequantize(quantize(state[f"layers.1.attention.{p}.weight"].detach().numpy(), "Q5_0"), "Q5_0")
             for p in ("to_q", "to_k", "to_v")]
    assert torch.equal(qkv.dequantized(torch.float32), torch.from_numpy(np.concatenate(parts)))


def test_q_k_v_of_different_types_load_dequantized(tmp_path, original):
    """The quantize tool's rules give to_v its own type: such parts cannot share rows of blocks, so the fused
    matrix is dequantized at load (the model the file describes, in more memory)."""
    state = diffusers_named(original.state_dict())
    types = {k: block_type(k, v.shape, "Q4_0") for k, v in state.items()}
    types.update({k: "Q8_0" for k in state if ".to_v." in k})
    path = write_gguf(tmp_path / "mixed.gguf", state, types)
    model = load_transformer(str(path), dtype=torch.float32)
    qkv = model.layers[0].attention.qkv
    assert not isinstance(qkv, QuantizedLinear) and qkv.weight.dtype == torch.float32
    expected = [dequantize(quantize(state[f"layers.0.attention.{p}.weight"].detach().numpy(), types[
        f"layers.0.attention.{p}.weight"]), types[f"layers.0.attention.{p}.weight"]) for p in ("to_q", "to_k", "to_v")]
    assert torch.equal(qkv.weight, torch.from_numpy(np.concatenate(expected)))
    assert isinstance(model.layers[0].feed_forward.w1, QuantizedLinear)


def test_another_architecture_is_refused_by_name(tmp_path, original):
    path = write_gguf(tmp_path / "flux1-dev-Q4_0.gguf", original.state_dict(), "Q4_0", arch="flux")
    with pytest.raises(CheckpointError, match="flux1-dev-Q4_0.gguf is a GGUF of architecture 'flux'"):
        inspect_checkpoint(str(path))
    path = write_gguf(tmp_path / "Qwen3-4B-Q4_K_M.gguf", original.state_dict(), "Q4_0", arch="qwen3")
    with pytest.raises(CheckpointError, match="a text encoder: load it with a GGUF CLIP loader"):
        inspect_checkpoint(str(path))


def test_a_lumina2_gguf_of_another_model_is_refused(tmp_path):
    """Lumina Image 2.0 GGUFs share the architecture name: their tensors tell them apart."""
    lumina = randomize_(S3DiT(ZImageConfig.tiny(dim=2304, n_heads=24, ffn_hidden=64, rope_axes=(24, 36, 36))), 0)
    path = write_gguf(tmp_path / "lumina2-Q8_0.gguf", lumina.state_dict(), "Q8_0")
    with pytest.raises(CheckpointError, match="Lumina Image 2.0 transformer, not Z-Image"):
        inspect_checkpoint(str(path))


def test_an_unsupported_block_type_is_refused_by_name(tmp_path, original):
    state = original.state_dict()
    types = {k: block_type(k, v.shape, "Q8_0") for k, v in state.items()}
    types["layers.0.feed_forward.w2.weight"] = "TQ2_0"
    path = write_gguf(tmp_path / "z-TQ2_0.gguf", state, types)
    with pytest.raises(CheckpointError, match=r"stores layers.0.feed_forward.w2.weight as TQ2_0, a GGML type "
                                              r"comfyui-zimage does not dequantize \(it reads Q8_0, .*Q6_K, F32"):
        inspect_checkpoint(str(path))


def test_a_truncated_gguf_is_refused(tmp_path, original):
    path = write_gguf(tmp_path / "z.gguf", original.state_dict(), "Q8_0")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="z.gguf is (truncated|damaged or truncated)"):
        inspect_checkpoint(str(path))


def test_a_gguf_missing_a_tensor_is_refused(tmp_path, original):
    state = {k: v for k, v in original.state_dict().items() if k != "layers.1.feed_forward.w3.weight"}
    path = write_gguf(tmp_path / "z.gguf", state, "Q4_K_M")
    with pytest.raises(CheckpointError, match="missing layers.1.feed_forward.w3.weight"):
        inspect_checkpoint(str(path))


def test_fp8_matmuls_are_refused_for_a_quantized_gguf(tmp_path, original):
    path = write_gguf(tmp_path / "z.gguf", original.state_dict(), "Q4_0")
    with pytest.raises(ValueError, match="quantized GGUF: its matrices keep their own quantization"):
        load_transformer(str(path), fp8_matmuls=True)


def test_a_quantized_linear_takes_only_its_own_layout():
    with pytest.raises(ValueError, match=r"a Q4_K matrix of 256 columns is uint8 \[rows, 144\]"):
        QuantizedLinear(torch.zeros(4, 160, dtype=torch.uint8), "Q4_K", 256)
    with pytest.raises(ValueError, match="IQ4_NL is not a block quantization"):
        QuantizedLinear(torch.zeros(4, 144, dtype=torch.uint8), "IQ4_NL", 256)
