"""GGUF transformers through the nodes, inside a real ComfyUI: ZImageLoader lists the .gguf files of the
diffusion_models folders and loads them with their matrices quantized; a LoRA (the pack's ZImageLoraLoader or
ComfyUI's LoraLoaderModelOnly) applies to the quantized matrices at each use exactly once, whatever ComfyUI's
model management does (full load, lowvram, partial unload, forced patching), and gives what the same LoRA gives
on the model of the dequantized weights; fp8 weight_dtypes are refused for a quantized GGUF by name.

The GGUF is the tiny model written as city96's tools write a Q4_K_M (tests/gguf_files.py), at the smallest width
whose matrices hold whole K-quant blocks (test_gguf.CFG), with the caption width of the test server's text
encoder."""

from __future__ import annotations

import importlib
import inspect
import logging

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("gguf")

from conftest import skip_unless_host_has
from gguf_files import write_gguf
from helpers import randomize_, rel_err
from test_gguf import CFG
from test_lora import all_targets, linear_shapes
from zimage import S3DiT, ZImageConfig

pytestmark = pytest.mark.host

RANK = 4
# a module of each kind a LoRA reaches in the main layers (quantized there) and outside them (dense in the file)
LORA_MODULES = ("layers.0.attention.qkv", "layers.0.attention.out", "layers.1.feed_forward.w1",
                "layers.1.feed_forward.w2", "layers.0.adaLN_modulation.0", "noise_refiner.0.feed_forward.w3",
                "cap_embedder.1")
# the file names a LoRA module has in each naming: ComfyUI's (the fused qkv) and ai-toolkit's (diffusers' names:
# to_q, to_k and to_v land on row slices of the quantized qkv)
NAMINGS = {"comfyui": (True, lambda t: f"diffusion_model.{t.comfy}", "lora_up.weight", "lora_down.weight"),
           "ai-toolkit": (False, lambda t: f"diffusion_model.{t.diffusers}", "lora_B.weight", "lora_A.weight")}


@pytest.fixture(scope="module")
def comfy(zimage_pack):
    import comfy.model_management
    import comfy.model_patcher
    import folder_paths
    import nodes as comfy_nodes

    pack = zimage_pack.__name__
    comfy_model = importlib.import_module(f"{pack}.nodes.comfy_model")
    zimage = importlib.import_module(f"{pack}.zimage")
    return dict(mm=comfy.model_management, model_patcher=comfy.model_patcher, folder_paths=folder_paths,
                nodes=comfy_nodes, comfy_model=comfy_model, zimage=zimage,
                lora=importlib.import_module(f"{pack}.nodes.lora"),
                loader=importlib.import_module(f"{pack}.nodes.loader"))


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "z_image_turbo-Q4_K_M.gguf"
    return str(write_gguf(path, randomize_(S3DiT(CFG), seed=11).state_dict(), "Q4_K_M"))


@pytest.fixture(scope="module")
def loras(comfy, tmp_path_factory) -> dict[str, str]:
    """A rank-4 LoRA on LORA_MODULES in each naming, in a folder ComfyUI lists under "loras"."""
    folder = tmp_path_factory.mktemp("gguf_loras")
    shapes = linear_shapes(CFG)
    files = {}
    for seed, (naming, (fused, module, up, down)) in enumerate(NAMINGS.items(), start=20):
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for target in all_targets(CFG, fused):
            if target.comfy not in LORA_MODULES:
                continue
            out_features, in_features = shapes[target.comfy]
            out_features = target.rows[1] if target.rows else out_features
            sd[f"{module(target)}.{up}"] = (0.05 * torch.randn(out_features, RANK, generator=g)).to(torch.bfloat16)
            sd[f"{module(target)}.{down}"] = (torch.randn(RANK, in_features, generator=g) / in_features ** 0.5
                                              ).to(torch.bfloat16)
        files[naming] = f"zimage-gguf-test-{naming}.safetensors"
        save_file(sd, str(folder / files[naming]))
    fp = comfy["folder_paths"]
    fp.add_model_folder_path("loras", str(folder))
    yield files
    fp.folder_names_and_paths["loras"][0].remove(str(folder))


def gguf_model(comfy, path):
    """The GGUF as ZImageLoader loads it on this host (float32 on the CPU here), as a MODEL."""
    cm = comfy["comfy_model"]
    transformer = comfy["zimage"].load_transformer(path, dtype=torch.float32, ops=cm.comfy_ops(None, torch.float32))
    return cm.comfy_model(transformer)


def quantized_layers(patcher) -> dict:
    return {n: m for n, m in patcher.model.named_modules() if isinstance(m, comfy_quantized(patcher))}


def comfy_quantized(patcher):
    return type(patcher.model.diffusion_model.layers[0].attention.qkv)


def dense_model(comfy, patcher):
    """The same model with every quantized matrix dequantized to float32, built from ComfyUI's ordinary ops."""
    cm = comfy["comfy_model"]
    quantized = {n.removeprefix("diffusion_model."): m for n, m in quantized_layers(patcher).items()}
    state = patcher.model.diffusion_model.state_dict()
    state.update({n + ".weight": m.dequantized(torch.float32) for n, m in quantized.items()})
    transformer = comfy["zimage"].S3DiT(CFG, ops=cm.comfy_ops(None, torch.float32)).eval()
    transformer.load_state_dict(state)
    return cm.comfy_model(transformer)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, CFG.in_channels, 16, 16, generator=g), torch.tensor([0.7]),
            [torch.randn(11, CFG.cap_feat_dim, generator=g)])


def forward(patcher, seed=0) -> torch.Tensor:
    latents, sigma, captions = inputs(seed)
    device = patcher.model.diffusion_model.device
    with torch.no_grad():
        return patcher.model.runner(latents.to(device), sigma.to(device), [c.to(device) for c in captions]).cpu()


def with_lora(comfy, patcher, loader: str, name: str, strength: float = 1.0):
    if loader == "ours":
        out = comfy["lora"].ZImageLoraLoader().load(patcher, name, strength)
        assert out["ui"]["text"] == []
        return out["result"][0]
    return comfy["nodes"].LoraLoaderModelOnly().load_lora_model_only(patcher, name, strength)[0]


# --- listing and loading ------------------------------------------------------------------------------------

def test_the_loader_lists_gguf_files_and_names_their_types(comfy, gguf_path, tmp_path):
    import os
    import shutil

    fp = comfy["folder_paths"]
    folder = tmp_path / "diffusion_models"
    (folder / "quantized").mkdir(parents=True)
    shutil.copy(gguf_path, folder / "quantized" / "z-Q4_K_M.gguf")
    (folder / "notes.txt").write_text("not a model")
    fp.add_model_folder_path("diffusion_models", str(folder))
    try:
        name = os.path.join("quantized", "z-Q4_K_M.gguf")
        loader = comfy["loader"]
        assert name in loader.ZImageLoader.INPUT_TYPES()["required"]["model_name"][0]
        assert name not in fp.get_filename_list("diffusion_models"), "UNETLoader's list must stay as ComfyUI makes it"
        assert "notes.txt" not in loader.model_choices()
        out = loader.ZImageLoader().load(name, "default", "auto", cuda_graphs=False)
        (summary,) = out["ui"]["text"]
        assert "gguf format" in summary and "Q4_K" in summary and "Q6_K" in summary, summary
        assert "dequantized at each use" in summary, summary
        model = out["result"][0]
        qkv = model.model.diffusion_model.layers[0].attention.qkv
        assert qkv.qtype == "Q5_K" and qkv.weight.dtype == torch.uint8  # Q4_K_M's qkv, as the quantize tool does
        assert model.model.diffusion_model.noise_refiner[0].attention.qkv.weight.dtype == torch.float32

        for weight_dtype in ("fp8_e4m3fn", "fp8_e4m3fn_fast"):
            with pytest.raises(ValueError, match=rf"{name} is a quantized GGUF \(Q4_K .*weight_dtype "
                                                 rf"{weight_dtype} cannot apply. Choose default, bf16 or fp32"):
                loader.ZImageLoader().load(name, weight_dtype, "auto")
    finally:
        fp.folder_names_and_paths["diffusion_models"][0].remove(str(folder))
        comfy["mm"].unload_all_models()


# --- LoRA on the quantized matrices -------------------------------------------------------------------------

@pytest.mark.parametrize("naming", list(NAMINGS))
@pytest.mark.parametrize("loader", ["ours", "native"])
def test_lora_on_a_gguf_model_equals_lora_on_its_dequantized_model(comfy, gguf_path, loras, loader, naming):
    model = gguf_model(comfy, gguf_path)
    dense = dense_model(comfy, model)
    stored = {n: m.weight.detach().clone() for n, m in quantized_layers(model).items()}
    before = forward(model)
    assert rel_err(before, forward(dense)) < 1e-6

    patched, patched_dense = (with_lora(comfy, m, loader, loras[naming], 0.8) for m in (model, dense))
    # every module of the file found its weight, the quantized ones too (their logical shape, not their bytes')
    assert len(patched.patches) == len(patched_dense.patches) == len(LORA_MODULES)
    comfy["mm"].load_models_gpu([patched])
    got = forward(patched)
    comfy["mm"].load_models_gpu([patched_dense])
    expected = forward(patched_dense)
    assert rel_err(got, before) > 1e-3, "the LoRA had no visible effect"
    assert rel_err(got, expected) < 1e-5

    # the bytes stay the file's, and once the LoRA'd model is unloaded the plain one runs as before
    comfy["mm"].unload_all_models()
    for name, module in quantized_layers(model).items():
        assert torch.equal(module.weight.cpu(), stored[name]), name
    assert torch.equal(forward(model), before)


def test_the_patch_applies_once_under_every_kind_of_loading(comfy, gguf_path, loras):
    """Merged (a module loaded whole), lowvram (ComfyUI's own per-use patch), partially unloaded after a whole
    load (the merge undone, the per-use patch added), forced patching: each quantized weight patched once."""
    model = gguf_model(comfy, gguf_path)
    patched = with_lora(comfy, model, "ours", loras["comfyui"])
    patched_dense = with_lora(comfy, dense_model(comfy, model), "ours", loras["comfyui"])
    patched_dense.patch_model()
    expected = forward(patched_dense)
    patched_dense.unpatch_model()
    before = forward(model)
    lowvram_patch = comfy["model_patcher"].LowVramPatch
    qkv = patched.model.diffusion_model.layers[0].attention.qkv

    def check(what):
        assert rel_err(forward(patched), expected) < 1e-5, what
        assert len(qkv.patches_at_use()) == 1, what

    patched.patch_model()
    check("loaded whole")
    assert qkv.weight_function == []  # merged: the patcher's patch, not ComfyUI's per-use one
    patched.partially_unload(patched.offload_device, memory_to_free=10 ** 12)
    assert any(isinstance(f, lowvram_patch) for f in qkv.weight_function)
    check("partially unloaded")
    patched.unpatch_model()
    assert torch.equal(forward(model), before), "unpatch_model left a patch on"

    # lowvram over a whole load without an unpatch between (ComfyUI's own merged weights would take their patch
    # twice there): the quantized layer keeps ComfyUI's per-use patch only
    patched.patch_model()
    patched.load(lowvram_model_memory=1)
    assert any(isinstance(f, lowvram_patch) for f in qkv.weight_function)
    assert len(qkv.patches_at_use()) == 1
    patched.unpatch_model()

    patched.patch_model(lowvram_model_memory=1)
    assert any(isinstance(f, lowvram_patch) for f in qkv.weight_function)
    check("lowvram")
    patched.unpatch_model()
    patched.patch_model(lowvram_model_memory=1, force_patch_weights=True)
    check("lowvram with forced patching")
    patched.unpatch_model()
    assert torch.equal(forward(model), before)


def test_the_patched_weight_read_through_the_patcher_is_the_dequantized_weight_patched(comfy, gguf_path, loras):
    """ComfyUI 0.14 reads a patched weight without setting it (patch_weight_to_device(return_weight=True), as its
    model saving does): a quantized layer gives its dequantized matrix with the LoRA, and stays as it was."""
    from comfy.model_patcher import ModelPatcher

    skip_unless_host_has("return_weight" in inspect.signature(ModelPatcher.patch_weight_to_device).parameters,
                         "patch_weight_to_device(return_weight=True), the call that asks a weight hook for the weight")
    model = gguf_model(comfy, gguf_path)
    patched = with_lora(comfy, model, "native", loras["ai-toolkit"])
    patched_dense = with_lora(comfy, dense_model(comfy, model), "native", loras["ai-toolkit"])
    key = "diffusion_model.layers.0.attention.qkv.weight"
    layer = patched.model.get_submodule(key.removesuffix(".weight"))
    stored = layer.weight
    got = patched.patch_weight_to_device(key, return_weight=True)
    patched_dense.patch_model()
    try:
        expected = patched_dense.model.get_parameter(key)
        assert got.shape == expected.shape == (3 * CFG.dim, CFG.dim)
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=1e-6)
        assert rel_err(got.float(), layer.dequantized(torch.float32)) > 1e-3
    finally:
        patched_dense.unpatch_model()
    assert layer.weight is stored and layer.patches_at_use() == [] and patched.backup == {}


def test_a_lora_of_another_size_and_weight_hooks_are_refused(comfy, gguf_path, tmp_path):
    model = gguf_model(comfy, gguf_path)
    small = linear_shapes(ZImageConfig.tiny())["layers.0.attention.qkv"]  # [192, 64], the 64-wide model's
    name = "zimage-gguf-test-small.safetensors"
    save_file({"diffusion_model.layers.0.attention.qkv.lora_up.weight": torch.zeros(small[0], RANK),
               "diffusion_model.layers.0.attention.qkv.lora_down.weight": torch.zeros(RANK, small[1])},
              str(tmp_path / name))
    fp = comfy["folder_paths"]
    fp.add_model_folder_path("loras", str(tmp_path))
    try:
        with pytest.raises(ValueError, match=r"layers.0.attention.qkv.weight: lora \[192, 4\] \[4, 64\] cannot make "
                                             r"a change for the model's \[768, 256\] weight"):
            comfy["lora"].ZImageLoraLoader().load(model, name, 1.0)
    finally:
        fp.folder_names_and_paths["loras"][0].remove(str(tmp_path))
    layer = model.model.diffusion_model.layers[0].attention.qkv
    with pytest.raises(ValueError, match="a weight hook .* cannot hold"):
        layer.set_weight(layer.dequantized(torch.float32), inplace_update=True, seed=0)


# --- through ComfyUI's server -------------------------------------------------------------------------------

def test_a_gguf_loads_and_samples_in_comfyuis_server_and_fp8_is_refused(comfy_server, gguf_path):
    import shutil

    from comfy_host import load_workflow, shrink

    file = comfy_server.base / "models" / "diffusion_models" / "z_image_turbo-Q4_K_M.gguf"
    shutil.copy(gguf_path, file)
    try:
        listed = comfy_server.get("/object_info/ZImageLoader")["ZImageLoader"]["input"]["required"]["model_name"][0]
        assert file.name in listed
        unet = comfy_server.get("/object_info/UNETLoader")["UNETLoader"]["input"]["required"]["unet_name"][0]
        assert file.name not in unet

        prompt = shrink(load_workflow("zimage_turbo_t2i.api.json"))
        prompt["1"]["inputs"]["model_name"] = file.name
        entry = comfy_server.run(prompt)
        assert entry["status"]["status_str"] == "success", entry["status"]
        (summary,) = entry["outputs"]["1"]["text"]
        assert "gguf format" in summary and "Q4_K" in summary, summary

        prompt["1"]["inputs"]["weight_dtype"] = "fp8_e4m3fn_fast"
        entry = comfy_server.run(prompt)
        assert entry["status"]["status_str"] == "error"
        (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert error["node_type"] == "ZImageLoader"
        assert "is a quantized GGUF" in error["exception_message"], error["exception_message"]
        assert "Choose default, bf16 or fp32" in error["exception_message"]
    finally:
        file.unlink()


# --- on a GPU: the per-use patch inside CUDA graphs ---------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: no CUDA device on this machine")
def test_a_lora_on_a_gguf_model_replays_in_cuda_graphs(comfy, gguf_path, loras):
    """Loaded whole on the GPU, the LoRA's tensors sit there and its patch is captured with the dequantization:
    replays equal the eager forward, one capture per shape; a new strength drops the graphs and is honoured."""
    cm = comfy["comfy_model"]

    def load(graphs):
        transformer = comfy["zimage"].load_transformer(gguf_path, dtype=torch.bfloat16,
                                                       ops=cm.comfy_ops(None, torch.bfloat16))
        return cm.comfy_model(transformer, cuda_graphs=graphs)

    graphed, eager = load(True), load(False)
    for strength in (1.0, -0.5):
        patched_graphed = with_lora(comfy, graphed, "ours", loras["ai-toolkit"], strength)
        patched_eager = with_lora(comfy, eager, "ours", loras["ai-toolkit"], strength)
        comfy["mm"].load_models_gpu([patched_eager])
        expected = [forward(patched_eager, seed) for seed in range(3)]
        comfy["mm"].load_models_gpu([patched_graphed])
        runner = patched_graphed.model.runner
        assert runner.graphs is not None, runner.graphs_off
        got = [forward(patched_graphed, seed) for seed in range(3)]
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), strength
        assert len(runner.graphs.graphs) == 1 and None not in runner.graphs.graphs.values()
        qkv = patched_graphed.model.diffusion_model.layers[0].attention.qkv
        assert qkv.merged_patch is not None and qkv.weight.is_cuda
    comfy["mm"].unload_all_models()
