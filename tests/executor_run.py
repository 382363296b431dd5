"""Run by test_gpu_host.py, in a process of its own because ComfyUI reads its flags when it is imported: the Turbo
workflow (ZImageSampler) and the official template's sampling (ModelSamplingAuraFlow + KSampler) through ComfyUI's
own executor, execution.PromptExecutor, as its prompt worker runs them, with or without `--fast dynamic_vram`
(ComfyUI 0.14 and later). Under dynamic VRAM the executor runs every node inside a memory pool of its own
allocator, which is where the engine's CUDA graphs and streaming buffers are made.

    python tests/executor_run.py COMFYUI BASE_DIR OUT.safetensors classic|classic-native-allocator|dynamic_vram [--cpu]

BASE_DIR is a base directory from comfy_host.build_base_directory. Saves both latents, how many evaluations were
CUDA-graph replays, whether dynamic VRAM was on, and which patcher classes the models got.
"""

import os
import sys
import uuid

comfyui, base, out = (os.path.abspath(p) for p in sys.argv[1:4])
mode = sys.argv[4]
tests = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [comfyui, tests, os.path.dirname(tests), os.path.join(tests, "comfy_shim")]
os.chdir(comfyui)

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = "--cpu" in sys.argv[5:]  # a CPU run checks this script's own steps, nothing more
if mode == "dynamic_vram":
    comfy.cli_args.args.fast = {comfy.cli_args.PerformanceFeature.DynamicVRAM}
# ComfyUI's default on NVIDIA GPUs is PyTorch's cudaMallocAsync allocator; --disable-cuda-malloc keeps the native one
comfy.cli_args.args.disable_cuda_malloc = mode == "classic-native-allocator"
import cuda_malloc  # noqa: E402,F401  (as main.py: the allocator settings, read when torch is imported)
import torch  # noqa: E402

import comfy.memory_management  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import execution  # noqa: E402
import folder_paths  # noqa: E402
import nodes  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

dynamic = False
if mode == "dynamic_vram":
    # what main.py does when the flag is given and comfy-aimdo can drive the device
    import comfy_aimdo.control
    import comfy_aimdo.torch

    if comfy_aimdo.control.init_device(comfy.model_management.get_torch_device().index):
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_allocator = comfy_aimdo.torch.get_torch_allocator()
        dynamic = comfy.memory_management.aimdo_allocator is not None
    if not dynamic:
        raise SystemExit("comfy-aimdo could not drive this GPU: dynamic VRAM is off")

import zimage_tiny_controlnet  # noqa: E402,F401  (the test shims install themselves on import)
import zimage_tiny_text_encoder  # noqa: E402,F401
import zimage_tiny_vision  # noqa: E402,F401
from comfy_host import import_pack, load_workflow, shrink  # noqa: E402

import comfy_extras.nodes_model_advanced  # noqa: E402  (ModelSamplingAuraFlow; main.py loads comfy_extras)
import comfy_extras.nodes_model_patch  # noqa: E402  (ModelPatchLoader and the Fun ControlNet nodes)

pack = import_pack()
nodes.NODE_CLASS_MAPPINGS.update(pack.NODE_CLASS_MAPPINGS)
nodes.NODE_CLASS_MAPPINGS.update(comfy_extras.nodes_model_advanced.NODE_CLASS_MAPPINGS)
nodes.NODE_CLASS_MAPPINGS.update(comfy_extras.nodes_model_patch.NODE_CLASS_MAPPINGS)
folder_paths.set_input_directory(os.path.join(base, "input"))
for folder in ("diffusion_models", "text_encoders", "vae", "model_patches"):
    folder_paths.add_model_folder_path(folder, os.path.join(base, "models", folder))
folder_paths.set_output_directory(os.path.join(base, "output"))

from comfyui_zimage.zimage import Runner  # noqa: E402
from comfyui_zimage.zimage.cuda_graphs import CapturedForward  # noqa: E402

replays, captures, evaluations = [], [], []
replay = CapturedForward.replay
CapturedForward.replay = lambda graph, inputs: replays.append(1) or replay(graph, inputs)
capture = CapturedForward.__init__
CapturedForward.__init__ = lambda graph, *args, **kwargs: captures.append(1) or capture(graph, *args, **kwargs)
evaluate = Runner.__call__
Runner.__call__ = lambda runner, *args, **kwargs: evaluations.append(1) or evaluate(runner, *args, **kwargs)
off_device = []  # per evaluation: the weights (the ControlNets' too) not on the evaluation's device
graph_weights = Runner._graph_weights


def watched_graph_weights(runner, device, control):
    weights = list(runner.model.parameters()) + [p for hints in control for p in hints.net.parameters()]
    off_device.append(sum(w.device != device for w in weights))
    return graph_weights(runner, device, control)


Runner._graph_weights = watched_graph_weights

patchers = {}
load = comfy.model_management.load_models_gpu


def load_models_gpu(models, *args, **kwargs):
    for m in models:
        patchers[type(m.model).__name__] = type(m).__name__
    return load(models, *args, **kwargs)


comfy.model_management.load_models_gpu = load_models_gpu


class Server:
    """What the executor asks of ComfyUI's server when nobody is connected."""

    client_id = None
    last_node_id = None
    sockets_metadata = {}

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self, *args, **kwargs):
        pass


RUN = f"{mode}_{uuid.uuid4().hex[:8]}"  # this run's file names in the shared output folder


def saving(prompt: dict, name: str, sampler_node: str = "6") -> dict:
    prompt["20"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler_node, 0], "filename_prefix": f"{RUN}_{name}"}}
    return prompt


def with_ksampler(prompt: dict, sampler: str = "euler", scheduler: str = "simple", cfg: float = 1.0,
                  denoise: float = 1.0) -> dict:
    """The official templates' sampling in place of ZImageSampler: ModelSamplingAuraFlow 3 + KSampler, 8 steps."""
    model = prompt["6"]["inputs"]["model"]
    prompt["6"] = {"class_type": "KSampler", "inputs": {
        "model": ["30", 0], "positive": ["4", 0], "negative": ["4", 1], "latent_image": ["5", 0], "seed": 5, "steps": 8,
        "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler, "denoise": denoise}}
    prompt["30"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": model, "shift": 3.0}}
    return prompt


def controlnet() -> dict:
    """The shipped ControlNet workflow, its Canny step left out (the control image as it is): the engine's part."""
    prompt = shrink(load_workflow("zimage_turbo_controlnet.api.json"))
    del prompt["12"]
    prompt["14"]["inputs"]["image"] = ["11", 0]
    return prompt


turbo = lambda: shrink(load_workflow("zimage_turbo_t2i.api.json"))  # noqa: E731
# name: (prompt, model evaluations, input shapes among them). The first evaluation at each shape captures its graph,
# every other replays one.
PROMPTS = {
    "zimage": (saving(turbo(), "zimage"), 8, 1),
    "ksampler": (saving(with_ksampler(turbo()), "ksampler"), 8, 1),
    # the official templates' samplers: Turbo's res_multistep; Base's cfg 4 (a positive and a negative evaluation per
    # step: captions of different lengths, which ComfyUI does not batch); the 2K upscaler's dpmpp_2m_sde / beta at
    # denoise 0.33 (8 of 24 steps)
    "res_multistep": (saving(with_ksampler(turbo(), "res_multistep"), "res_multistep"), 8, 1),
    "cfg4": (saving(with_ksampler(turbo(), cfg=4.0), "cfg4"), 16, 2),
    "dpmpp_2m_sde_beta": (saving(with_ksampler(turbo(), "dpmpp_2m_sde", "beta", denoise=0.33), "dpmpp_2m_sde_beta"), 8, 1),
    "controlnet_zimage": (saving(controlnet(), "controlnet_zimage"), 8, 1),
    "controlnet_ksampler": (saving(with_ksampler(controlnet(), "res_multistep"), "controlnet_ksampler"), 8, 1),
}

executor = execution.PromptExecutor(Server(), cache_type=False, cache_args={"lru": 0, "ram": 0})
results = {}
for name, (prompt, expected_evaluations, shapes) in PROMPTS.items():
    for count in (replays, captures, evaluations, off_device):
        count.clear()
    outputs = [node for node, spec in prompt.items() if spec["class_type"] in ("SaveImage", "SaveLatent")]
    executor.execute(prompt, str(uuid.uuid4()), {}, outputs)
    if not executor.success:
        raise SystemExit(f"{name}: {executor.status_messages[-1]}")
    (latent,) = [f for f in os.listdir(os.path.join(base, "output")) if f.startswith(f"{RUN}_{name}_")]
    results[f"{name}_samples"] = load_file(os.path.join(base, "output", latent))["latent_tensor"]
    results[f"{name}_replays"] = torch.tensor(len(replays))
    results[f"{name}_captures"] = torch.tensor(len(captures))
    results[f"{name}_evaluations"] = torch.tensor(len(evaluations))
    results[f"{name}_expected_evaluations"] = torch.tensor(expected_evaluations)
    results[f"{name}_shapes"] = torch.tensor(shapes)
    results[f"{name}_most_weights_off_device"] = torch.tensor(max(off_device, default=0))

save_file({**results, "dynamic": torch.tensor(int(dynamic)),
           "async_allocator": torch.tensor(int(torch.cuda.get_allocator_backend() == "cudaMallocAsync")),
           "engine_patcher_is_dynamic": torch.tensor(int(patchers.get("ZImageModel") == "ModelPatcherDynamic")),
           "text_encoder_patcher_is_dynamic": torch.tensor(
               int(any(v == "ModelPatcherDynamic" for k, v in patchers.items() if k != "ZImageModel")))}, out)
print("patchers:", patchers)
