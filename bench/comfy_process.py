"""ComfyUI inside a bench process, set up as its main.py sets itself up, so that what is timed runs as ComfyUI runs
it. Imports no torch: start() must run before torch is first imported, because the allocator ComfyUI chooses is
read by torch at import.

    start(comfyui, cpu=False, allocator="comfyui")   # before `import torch`
    ... import torch, ComfyUI's modules, the pack ...
    check_allocator(allocator)                        # fails if torch did not get the allocator asked for
"""

from __future__ import annotations

import argparse
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
PACK = os.path.dirname(BENCH)
SHIMS = os.path.join(PACK, "tests", "comfy_shim")

# ComfyUI's allocator choices: its default on NVIDIA GPUs (PyTorch's cudaMallocAsync backend), or PyTorch's own
# caching allocator (ComfyUI started with --disable-cuda-malloc), under which the pack's CUDA graphs can run
ALLOCATORS = {"comfyui": "cudaMallocAsync", "native": "native"}


def comfyui_path(given: str | None) -> str:
    """The ComfyUI folder: --comfyui, else $COMFYUI_PATH; an error naming both when neither is a ComfyUI."""
    path = given or os.environ.get("COMFYUI_PATH")
    if not path:
        raise SystemExit("no ComfyUI: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(os.path.join(path, "execution.py")):
        raise SystemExit(f"{path} is not a ComfyUI folder (no execution.py there)")
    return path


def parse_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """A ComfyUI bench's command line: its own arguments (already in `parser`) and the ones every such bench takes."""
    parser.add_argument("--comfyui", help="ComfyUI's folder (default: $COMFYUI_PATH)")
    parser.add_argument("--models", required=True, help="folder for the random model files (written once, reused)")
    parser.add_argument("--allocator", choices=sorted(ALLOCATORS), default="comfyui",
                        help="comfyui: ComfyUI's default (cudaMallocAsync; the engine's CUDA graphs stay off under "
                             "it); native: as ComfyUI started with --disable-cuda-malloc")
    parser.add_argument("--tiny", action="store_true", help="dry run on the CPU: tiny random files")
    parser.add_argument("--out", default="bench/results")
    return parser.parse_args()


def start_from(args) -> str:
    """start() as the command line asks; ComfyUI's folder."""
    comfyui = comfyui_path(args.comfyui)
    start(comfyui, cpu=args.tiny, allocator=args.allocator)
    return comfyui


def start(comfyui: str, cpu: bool, allocator: str) -> None:
    """ComfyUI's flags in this process: --cpu for a dry run of a bench on the CPU, and --disable-cuda-malloc for
    allocator 'native'; then ComfyUI's own cuda_malloc module, which main.py imports before torch."""
    if "torch" in sys.modules:
        raise RuntimeError("comfy_process.start() must run before torch is imported: the allocator is chosen then")
    if allocator not in ALLOCATORS:
        raise SystemExit(f"allocator {allocator!r}: choose one of {', '.join(ALLOCATORS)}")
    sys.path[:0] = [comfyui, PACK, os.path.join(PACK, "tests")]
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.disable_cuda_malloc = allocator == "native"
    import cuda_malloc  # noqa: F401  (sets PYTORCH_CUDA_ALLOC_CONF, read when torch is imported)


def check_allocator(allocator: str, cpu: bool) -> str:
    """The allocator torch runs; an error when it is not the one asked for (ComfyUI turns cudaMallocAsync on only
    where it judges the GPU supports it)."""
    import torch

    if cpu:
        return "cpu"
    backend = torch.cuda.get_allocator_backend()
    if backend != ALLOCATORS[allocator]:
        raise SystemExit(f"asked for allocator {allocator!r} ({ALLOCATORS[allocator]}), torch runs {backend!r}: "
                         f"ComfyUI's cuda_malloc did not choose it on this GPU; pass the other --allocator")
    return backend


def comfy_versions() -> dict:
    """ComfyUI's version, comfy-kitchen's (the kernels its native fp8 and RoPE use) and the cuDNN frontend's (the
    engine's FP8 attention, where installed), for the result files."""
    from importlib import metadata

    import comfyui_version

    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"comfyui": comfyui_version.__version__, "comfy_kitchen": version("comfy-kitchen"),
            "cudnn_frontend": version("nvidia-cudnn-frontend")}


def install_tiny_shims(tiny_dit) -> None:
    """For --tiny dry runs on the CPU only: ComfyUI recognises Z-Image and Qwen3-4B files by their released widths,
    so a tiny transformer (tiny_dit, a ZImageConfig) and the test suite's tiny Qwen3 (tests/comfy_shim) are made
    recognisable here. The loaders, models and nodes themselves are ComfyUI's, unchanged."""
    import comfy.model_detection

    sys.path.insert(0, SHIMS)
    import zimage_tiny_text_encoder  # noqa: F401  (installs the tiny Qwen3-4B on import)

    detect = comfy.model_detection.detect_unet_config
    if getattr(detect, "tiny_zimage", False):
        return

    def detect_unet_config(state_dict, key_prefix, metadata=None):
        config = detect(state_dict, key_prefix, metadata=metadata)
        if config and config.get("image_model") == "lumina2" and config.get("dim") == tiny_dit.dim:
            # what detection sets for the released width (3840), at the tiny one
            config.update(n_heads=tiny_dit.n_heads, n_kv_heads=tiny_dit.n_heads, axes_dims=list(tiny_dit.rope_axes),
                          axes_lens=list(tiny_dit.rope_lengths), rope_theta=tiny_dit.rope_theta,
                          ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=tiny_dit.t_scale,
                          pad_tokens_multiple=tiny_dit.seq_multiple)
        return config

    detect_unet_config.tiny_zimage = True
    comfy.model_detection.detect_unet_config = detect_unet_config


NEEDED_NODES = ("UNETLoader", "CLIPLoader", "VAELoader", "CLIPTextEncode", "ConditioningZeroOut", "EmptySD3LatentImage",
                "ModelSamplingAuraFlow", "KSampler", "VAEDecode", "SaveImage", "ZImageLoader", "ZImageTextEncode",
                "ZImageLatent", "ZImageSampler", "ZImageVAEDecode")


def load_nodes(models: str) -> dict:
    """ComfyUI's node classes, core and comfy_extras as main.py loads them, and the pack's (imported as ComfyUI
    imports a custom node), with models/<kind> first in ComfyUI's folder lists. An error if a node either graph
    needs is missing."""
    import asyncio

    import folder_paths
    import nodes
    from comfy_host import import_pack

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    nodes.NODE_CLASS_MAPPINGS.update(import_pack().NODE_CLASS_MAPPINGS)
    missing = [n for n in NEEDED_NODES if n not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise SystemExit(f"this ComfyUI lacks the nodes {missing} (comfy_extras failed to import? see the log above)")
    for kind in ("diffusion_models", "text_encoders", "vae"):
        folder_paths.add_model_folder_path(kind, os.path.join(models, kind), is_default=True)
    return nodes.NODE_CLASS_MAPPINGS


def prepare(args, kinds=("diffusion_models", "text_encoders", "vae")) -> tuple:
    """What a bench does first once ComfyUI is started: the allocator checked, the random model files written into
    args.models (tiny ones, with the tiny shims, under --tiny), the nodes loaded. (allocator, device, config, nodes)."""
    import comfy.model_management as mm
    from common import TINY_DIT, write_model_files
    from zimage import ZImageConfig

    allocator = check_allocator(args.allocator, args.tiny)
    device = mm.get_torch_device()
    cfg = TINY_DIT if args.tiny else ZImageConfig()
    if args.tiny:
        install_tiny_shims(cfg)
    write_model_files(args.models, cfg, device, kinds)
    return allocator, device, cfg, load_nodes(args.models)
