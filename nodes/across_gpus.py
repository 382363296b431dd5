"""Z-Image/Loader Across GPUs: one transformer over several GPUs of this machine (zimage.WorkerRunner)."""

from __future__ import annotations

import torch

from ..zimage import CheckpointError, WorkerRunner, scaled_mm_supported
from .comfy_model import comfy_model_across
from .loader import model_choices, resolve

SPLITS = {"cfg": "batch", "sequence": "sequence"}


def parse_devices(gpus: str) -> list[str]:
    """"0,1" -> ["cuda:0", "cuda:1"]; "cpu,cpu" (a test run without GPUs) -> ["cpu", "cpu"]."""
    names = [g.strip() for g in gpus.split(",") if g.strip()]
    if all(n == "cpu" for n in names):
        return names
    if not all(n.isdigit() for n in names):
        raise ValueError(f"ZImageLoaderAcrossGPUs: gpus {gpus!r} is not a list of GPU numbers such as 0,1")
    count = torch.cuda.device_count()
    missing = [n for n in names if int(n) >= count]
    if missing:
        raise ValueError(f"ZImageLoaderAcrossGPUs: this machine has {count} GPU(s) (0 to {count - 1}); there is no "
                         f"GPU {', '.join(missing)}")
    return [f"cuda:{n}" for n in names]


class ZImageLoaderAcrossGPUs:
    DESCRIPTION = ("Loads a Z-Image transformer across several GPUs of this machine: one worker process per GPU, each "
                   "loading the file itself, and every step split across them. cfg: the positive and the negative "
                   "pass on different GPUs (Base with cfg > 1, two GPUs). sequence: each GPU computes a share of "
                   "the image and caption tokens. Prompts without LoRAs, ControlNets or reference images.")
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (model_choices(), {"tooltip": "A Z-Image transformer from models/diffusion_models."}),
            "gpus": ("STRING", {"default": "0,1", "tooltip": "The GPUs to use, by number (0,1)."}),
            "split": (list(SPLITS), {"default": "cfg", "tooltip":
                      "cfg: each GPU computes its share of the batch, so with guidance the positive and negative "
                      "passes run at once on two GPUs (CUDA graphs as on one GPU). sequence: each GPU computes a "
                      "share of the tokens and attention trades them (for Turbo, or more GPUs than passes)."}),
            "weight_dtype": (["default", "fp8_e4m3fn_fast"], {"default": "default", "tooltip":
                             "default: bf16. fp8_e4m3fn_fast: FP8 matrix multiplies and attention, as ZImageLoader's."}),
        }}

    def load(self, model_name, gpus, split, weight_dtype):
        if split not in SPLITS:
            raise ValueError(f"ZImageLoaderAcrossGPUs: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        devices = parse_devices(gpus)
        path = resolve(model_name)
        cuda = devices[0] != "cpu"
        fp8 = weight_dtype == "fp8_e4m3fn_fast"
        if fp8 and cuda and not all(scaled_mm_supported(torch.device(d)) for d in devices):
            raise ValueError("ZImageLoaderAcrossGPUs: fp8_e4m3fn_fast needs FP8 matrix multiplies on every GPU "
                             "(Ada or Hopper and newer); choose default.")
        compute = torch.bfloat16 if cuda else torch.float32
        try:
            runner = WorkerRunner(path, devices, mode=SPLITS[split], cuda_graphs=cuda and split == "cfg",
                                  load={"dtype": compute, "fp8_matmuls": fp8})
        except (CheckpointError, ValueError) as e:
            raise ValueError(f"ZImageLoaderAcrossGPUs: {e}") from None
        summary = (f"Z-Image: {model_name} across {', '.join(devices)} ({split} split, one worker process each, "
                   f"{'FP8' if fp8 else str(compute).removeprefix('torch.')}); sampling and previews run here.")
        return {"ui": {"text": [summary]}, "result": (comfy_model_across(runner, compute),)}
