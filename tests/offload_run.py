"""Run by test_gpu_host.py, in a process of its own because ComfyUI reads its flags when it is imported:
ZImageLoader and ZImageSampler on the tiny transformer under ComfyUI's model management, fully loaded (and
compiled), or with --novram (every weight left in host memory). Saves the sampled latent, the bytes of weights the
transformer found off the GPU at its first forward, and how many forwards were CUDA-graph replays.

    python tests/offload_run.py COMFYUI MODELS_DIR OUT.safetensors full|novram|compiled
"""

import os
import sys

import torch

comfyui, models, out, mode = sys.argv[1:5]
sys.path.insert(0, comfyui)
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.novram = mode == "novram"
import folder_paths  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the engine, for comfy_host
from comfy_host import import_pack  # noqa: E402

nodes = import_pack().NODE_CLASS_MAPPINGS
from comfyui_zimage.zimage.cuda_graphs import CapturedForward  # noqa: E402

replays = []  # how many evaluations were CUDA-graph replays
replay = CapturedForward.replay
CapturedForward.replay = lambda graph, inputs: replays.append(1) or replay(graph, inputs)

folder_paths.add_model_folder_path("diffusion_models", models)
(model,) = nodes["ZImageLoader"]().load("z_image_turbo_bf16.safetensors", "default", "auto", mode == "compiled",
                                        True)["result"]
off_gpu = []
model.model.diffusion_model.register_forward_pre_hook(
    lambda module, args: off_gpu.append(sum(p.nbytes for p in module.parameters() if not p.is_cuda)))
g = torch.Generator().manual_seed(0)
positive = [[torch.randn(1, 40, model.model.diffusion_model.cfg.cap_feat_dim, generator=g), {}]]
(latent,) = nodes["ZImageLatent"]().generate(256, 256, 1, "custom")
(sampled,) = nodes["ZImageSampler"]().sample(model, positive, latent, 7, "turbo", 8, 0.0, 3.0, 1.0, 0.0, 1.0)
save_file({"samples": sampled["samples"].cpu().contiguous(), "off_gpu_bytes": torch.tensor(off_gpu[0]),
           "graph_replays": torch.tensor(len(replays))}, out)
