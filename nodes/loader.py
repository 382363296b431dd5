"""ZImageLoader: a Z-Image transformer file (or diffusers folder) from ComfyUI's diffusion_models list."""

from __future__ import annotations

import logging
import os

import torch

import comfy.model_management as mm
import folder_paths

from ..zimage import (ATTENTION_BACKENDS, CheckpointError, inspect_checkpoint, load_transformer,
                      scaled_mm_supported)
from ..zimage.gguf_file import describe_types
from .comfy_model import comfy_model, comfy_ops

WEIGHT_DTYPES = ["default", "bf16", "fp32", "fp8_e4m3fn", "fp8_e4m3fn_fast"]


def diffusers_folders() -> list[str]:
    """Diffusers model folders (or bare transformer folders) inside the diffusion_models folders."""
    found = []
    for root in folder_paths.get_folder_paths("diffusion_models"):
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            folder = os.path.join(root, name)
            for inner in (os.path.join(folder, "transformer"), folder):
                if os.path.isdir(inner) and any(f.endswith(".safetensors.index.json") for f in os.listdir(inner)):
                    found.append(name + "/")
                    break
    return found


def gguf_files() -> list[str]:
    """GGUF transformers inside the diffusion_models folders, named relative to their folder as ComfyUI names files.

    ComfyUI lists diffusion_models with the extensions its own loaders read, and .gguf is not one: adding it to
    that folder's extensions would put GGUFs in UNETLoader's list (and every other pack's that reads the list),
    where they fail to load. ComfyUI-GGUF lists them under a folder name of its own, `unet_gguf`, over the same
    folders; that name is its to register (two packs registering it would overwrite each other's), so this
    loader scans the diffusion_models folders itself."""
    found = set()
    for root in folder_paths.get_folder_paths("diffusion_models"):
        files, _ = folder_paths.recursive_search(root, excluded_dir_names=[".git"])
        found.update(folder_paths.filter_files_extensions(files, {".gguf"}))
    return sorted(found)


def model_choices() -> list[str]:
    return folder_paths.get_filename_list("diffusion_models") + gguf_files() + diffusers_folders()


def resolve(model_name: str) -> str:
    """A name from the list -> its path. Names not in ComfyUI's lists are refused (no arbitrary paths)."""
    if model_name not in model_choices():
        raise ValueError(f"{model_name!r} is not in ComfyUI's diffusion_models folders; put the file in "
                         f"ComfyUI/models/diffusion_models/ and refresh.")
    if model_name.endswith("/"):
        for root in folder_paths.get_folder_paths("diffusion_models"):
            path = os.path.join(root, model_name.rstrip("/"))
            if os.path.isdir(path):
                return path
    return folder_paths.get_full_path_or_raise("diffusion_models", model_name)


def what_will_run(runner, device, attention: str, compute, storage, fp8_matmuls: bool, compile: bool) -> str:
    """What this load will run on this machine, for the log and the node: options that do nothing here say so."""
    cuda = device.type == "cuda"
    parts = [f"on {device}, computing in {str(compute).removeprefix('torch.')}"
             + (f", the blocks' matrices stored as {str(storage).removeprefix('torch.')}" if storage else "")
             + (", FP8 matrix multiplies" if fp8_matmuls and cuda else "")
             + (" (FP8 matrix multiplies emulated: no CUDA device)" if fp8_matmuls and not cuda else "")]
    if cuda:
        parts.append(f"attention: {attention} ({', '.join(k.name.lower() for k in ATTENTION_BACKENDS[attention])}, "
                     f"in that order)")
        parts.append("fused Triton kernels (checked at the first step; PyTorch's steps where Triton cannot run)")
    else:
        parts.append(f"attention: PyTorch's {device.type} kernel (the attention choice {attention!r} applies on CUDA "
                     f"GPUs); the blocks' elementwise steps in PyTorch (the fused kernels need CUDA)")
    if runner.graphs is not None and cuda:
        parts.append("CUDA graphs: on")
    elif runner.graphs is not None or runner.graphs_off is not None:
        parts.append(f"CUDA graphs: off, {'no CUDA device here' if not cuda else runner.graphs_off}")
    parts.append(f"compile: {'on' if compile else 'off'}")
    return "; ".join(parts) + "."


class ZImageLoader:
    DESCRIPTION = ("Loads a Z-Image transformer (Turbo or Base) onto the standalone S3-DiT engine and hands it to "
                   "ComfyUI's model management. Use ComfyUI's CLIPLoader (qwen_3_4b, type lumina2) and VAELoader (ae).")
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The Z-Image transformer, managed by ComfyUI (loading, offload, lowvram, LoRA patches).",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (model_choices(), {"tooltip": "A Z-Image transformer from models/diffusion_models: a ComfyUI "
                                             "single file (bf16, fp16, fp32, fp8), a GGUF (Q8_0 ... Q2_K: its "
                                             "matrices stay quantized, dequantized at each use) or a diffusers "
                                             "folder."}),
            "weight_dtype": (WEIGHT_DTYPES, {"default": "default", "tooltip":
                             "default: bf16 where the device supports it (fp8 files stay fp8 in memory); "
                             "fp8_e4m3fn: the blocks' matrices in fp8, computed in bf16, about half the memory. "
                             "fp8_e4m3fn_fast: fp8 matrix multiplies too (per-row weight scales, activations "
                             "per token) on Ada/Hopper GPUs: about 1.3x faster than bf16 on an H100; attention stays "
                             "bf16. The result moves a little. A quantized GGUF keeps its own quantization: default, bf16 or fp32 "
                             "(the dtype its matrices are dequantized to)."}),
            "attention": (list(ATTENTION_BACKENDS), {"default": "auto", "tooltip":
                          "Attention kernel, chosen once at load. auto prefers cuDNN, then flash, then the others."}),
        }, "optional": {  # optional, so that workflows saved before this option still load
            "compile": ("BOOLEAN", {"default": False, "tooltip":
                        "torch.compile each transformer block. Measured no faster than without it on an H100 "
                        "since the blocks' elementwise steps run as fused kernels anyway, and the first run at "
                        "each new image size spends 15-30 s compiling; the result is the same. Needs Triton."}),
            "cuda_graphs": ("BOOLEAN", {"default": True, "tooltip":
                            "Replay each sampling step as one CUDA graph (the same kernels, the same result) when "
                            "the whole model is on the GPU and compile is off: less launch overhead, most at small "
                            "sizes. Its memory is freed after sampling. Needs ComfyUI started with "
                            "--disable-cuda-malloc: under its default cudaMallocAsync allocator the fused kernels "
                            "cannot be captured, and graphs stay off with a warning. Off: launch kernel by kernel."}),
        }}

    def load(self, model_name, weight_dtype, attention, compile=False, cuda_graphs=True):
        path = resolve(model_name)
        try:
            info = inspect_checkpoint(path)
        except CheckpointError as e:
            raise ValueError(f"ZImageLoader: {e}") from None
        # a GGUF whose blocks' matrices are GGML blocks (not BF16/F16 ones): they stay as they are (quantized.py)
        quantized_gguf = info.format == "gguf" and info.stored_dtype == torch.uint8
        if quantized_gguf and weight_dtype.startswith("fp8"):
            raise ValueError(f"ZImageLoader: {model_name} is a quantized GGUF ({describe_types(info.entries)}): its "
                             f"matrices keep that quantization in memory and are dequantized at each use, so there "
                             f"is nothing to store or multiply in fp8 and weight_dtype {weight_dtype} cannot apply. "
                             f"Choose default, bf16 or fp32 (the dtype they are dequantized to), or load the bf16 "
                             f"safetensors model for fp8.")
        load_device = mm.get_torch_device()
        compute = mm.unet_dtype(device=load_device, model_params=0, supported_dtypes=[torch.bfloat16, torch.float32])
        # a plain fp8 file stays fp8 in memory (cast per use); a scaled one (ComfyUI's fp8 repacks) loads dequantized with
        # its scales and stays in the compute dtype: stored as plain fp8 again, its small weights would underflow
        storage = (info.stored_dtype if info.stored_dtype.itemsize == 1 and not quantized_gguf and not info.quantized
                   else None)
        if weight_dtype == "bf16":
            compute, storage = torch.bfloat16, None
        elif weight_dtype == "fp32":
            compute, storage = torch.float32, None
        elif weight_dtype == "fp8_e4m3fn":
            storage = torch.float8_e4m3fn
        fp8_matmuls = weight_dtype == "fp8_e4m3fn_fast"
        if fp8_matmuls:
            storage = None
            if load_device.type == "cuda" and not scaled_mm_supported(load_device):
                raise ValueError("ZImageLoader: fp8_e4m3fn_fast needs FP8 matrix multiplies, which this GPU lacks "
                                 "(Ada or Hopper and newer have them). Choose fp8_e4m3fn for fp8 storage instead.")
            if load_device.type == "cuda":
                compute = torch.bfloat16
        try:
            transformer = load_transformer(path, device=mm.unet_offload_device(), dtype=compute, attention=attention,
                                           fp8_matmuls=fp8_matmuls,
                                           ops=comfy_ops(storage, compute))
        except CheckpointError as e:
            raise ValueError(f"ZImageLoader: {e}") from None
        model = comfy_model(transformer, storage, cuda_graphs=cuda_graphs, compile=compile)
        quantized = f", quantized weights dequantized on load: {info.quantization}" if info.quantization else ""
        stored = f"GGML types {describe_types(info.entries)}" if info.format == "gguf" else info.stored_dtype
        if quantized_gguf:
            quantized = ", the blocks' quantized matrices kept as they are and dequantized at each use"
        summary = (f"Z-Image: loaded {model_name} ({info.format} format, {info.variant}, stored {stored}"
                   f"{quantized}); "
                   + what_will_run(model.model.runner, load_device, attention, compute, storage, fp8_matmuls, compile))
        logging.info(summary)
        return {"ui": {"text": [summary]}, "result": (model,)}
