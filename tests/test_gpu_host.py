"""The nodes on a GPU under ComfyUI's model management when it offloads: with --novram every weight stays in
host memory, so the engine streams all blocks in (zimage/streaming.py) and ComfyUI casts the rest per use;
the sampled latent must be the one the fully loaded model (with its CUDA graphs) makes, bit for bit.
Skipped without CUDA; run on the GPU with `python -m pytest tests -m gpu`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfy_host import build_base_directory, write_transformer
from conftest import skip_unless_host_has

pytestmark = [pytest.mark.gpu, pytest.mark.host,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: no CUDA device on this machine")]


MODEL_FILE = "z_image_turbo_bf16.safetensors"


def run_script(name: str, comfyui_path: Path, folder: Path, out: Path, mode: str) -> dict:
    """tests/<name> in a process of its own (ComfyUI reads its flags when it is imported); what it saved."""
    script = Path(__file__).with_name(name)
    result = subprocess.run([sys.executable, str(script), str(comfyui_path), str(folder), str(out), mode],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return load_file(str(out))


def sample_in_comfyui(comfyui_path: Path, tmp_path: Path, mode: str) -> dict:
    """offload_run.py on the tiny transformer (written once per test)."""
    models = tmp_path / "diffusion_models"
    if not models.exists():
        models.mkdir()
        write_transformer(models / MODEL_FILE)
    return run_script("offload_run.py", comfyui_path, models, tmp_path / f"{mode}.safetensors", mode)


def test_novram_streaming_samples_what_the_fully_loaded_model_samples(comfyui_path, tmp_path):
    full = sample_in_comfyui(comfyui_path, tmp_path, "full")
    offloaded = sample_in_comfyui(comfyui_path, tmp_path, "novram")
    assert full["off_gpu_bytes"] == 0
    assert full["graph_replays"] == 7  # 8 evaluations: the first captures, the others replay
    assert offloaded["graph_replays"] == 0  # weights in host memory: no graphs
    assert offloaded["off_gpu_bytes"] > 0.9 * (tmp_path / "diffusion_models" / MODEL_FILE).stat().st_size
    assert torch.isfinite(full["samples"]).all()
    assert torch.equal(offloaded["samples"], full["samples"])


def test_compiled_blocks_inside_comfyui_sample_close_to_eager_without_graphs(comfyui_path, tmp_path):
    """ZImageLoader's compile with cuda_graphs on: the compiled blocks run, without graphs (zimage.Runner
    says why), and sample what the eager blocks sample up to bf16 rounding."""
    full = sample_in_comfyui(comfyui_path, tmp_path, "full")
    compiled = sample_in_comfyui(comfyui_path, tmp_path, "compiled")
    assert compiled["graph_replays"] == 0
    error = (compiled["samples"] - full["samples"]).norm() / full["samples"].norm()
    assert error < 2e-2  # compiled kernels round bf16 differently, nothing more


def test_executor_runs_the_workflows_alike_under_each_allocator_and_dynamic_vram(comfyui_path, tmp_path):
    """Through ComfyUI's own executor, in the three memory setups users run:
    - classic, ComfyUI's default: PyTorch's cudaMallocAsync allocator. The fused Triton kernels cannot be captured
      under it (an H100 run aborted), so the loader leaves CUDA graphs off and says why;
    - classic with --disable-cuda-malloc: the native allocator, graphs captured once and replayed;
    - 0.14's `--fast dynamic_vram`: each node runs inside a memory pool of comfy-aimdo's allocator and the text
      encoder and VAE get dynamic patchers. The pack's model keeps the classic patcher (the engine decides where
      its weights live: graphs when all are on the GPU, its own streaming otherwise) and its graphs are captured
      and replayed inside that pool.
    Every prompt samples the same latent bit for bit in all three: ZImageSampler, KSampler (ModelSamplingAuraFlow, euler,
    simple) and the official templates' other samplers (res_multistep; cfg 4; dpmpp_2m_sde / beta at denoise 0.33),
    and the Fun ControlNet under both samplers. With graphs possible, every evaluation after the first replays the
    graph: the samplers' steps, the guided batch and the ControlNet's inputs change nothing that needs a capture."""
    import comfy.cli_args

    skip_unless_host_has(hasattr(comfy.cli_args.PerformanceFeature, "DynamicVRAM"), "dynamic VRAM")
    base = build_base_directory(tmp_path / "base")
    runs = {mode: run_script("executor_run.py", comfyui_path, base, tmp_path / f"{mode}.safetensors", mode)
            for mode in ("classic", "classic-native-allocator", "dynamic_vram")}
    assert int(runs["classic"]["async_allocator"]) == 1  # what ComfyUI picks on this GPU, unless told otherwise
    assert int(runs["classic-native-allocator"]["async_allocator"]) == 0
    dynamic = runs["dynamic_vram"]
    assert int(dynamic["dynamic"]) == 1 and int(dynamic["async_allocator"]) == 0
    assert int(dynamic["text_encoder_patcher_is_dynamic"]) == 1 and int(dynamic["engine_patcher_is_dynamic"]) == 0
    prompts = [key[:-len("_replays")] for key in dynamic if key.endswith("_replays")]
    assert {"zimage", "ksampler", "res_multistep", "cfg4", "dpmpp_2m_sde_beta", "controlnet_zimage",
            "controlnet_ksampler"} <= set(prompts)
    for name in prompts:
        for mode, run in runs.items():
            assert int(run[f"{name}_evaluations"]) == int(run[f"{name}_expected_evaluations"]), (name, mode)
        assert int(runs["classic"][f"{name}_replays"]) + int(runs["classic"][f"{name}_captures"]) == 0, name
        for mode in ("classic-native-allocator", "dynamic_vram"):
            run = runs[mode]
            if mode == "dynamic_vram" and name.startswith("controlnet"):
                # ModelPatchLoader's patcher is dynamic there: the control weights stay in host memory, cast in per use
                # by ComfyUI's own layers, so that prompt runs without graphs
                assert int(run[f"{name}_most_weights_off_device"]) > 0, name
                assert int(run[f"{name}_replays"]) + int(run[f"{name}_captures"]) == 0, name
                continue
            # the first evaluation at each input shape captures, every other replays
            assert int(run[f"{name}_most_weights_off_device"]) == 0, (name, mode)
            assert int(run[f"{name}_captures"]) == int(run[f"{name}_shapes"]), (name, mode)
            assert int(run[f"{name}_replays"]) == int(run[f"{name}_evaluations"]) - int(run[f"{name}_captures"]), name
        reference = runs["classic-native-allocator"][f"{name}_samples"]
        assert torch.isfinite(reference).all()
        for mode, run in runs.items():
            assert torch.equal(run[f"{name}_samples"], reference), (name, mode)
