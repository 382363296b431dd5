"""A real ComfyUI for the host tests: tiny random model files in the real layouts, and a server on 127.0.0.1.

The files carry the names users have (z_image_turbo_bf16.safetensors, qwen_3_4b.safetensors, ae.safetensors),
so the shipped workflows run unchanged:
- the transformer: the engine's tiny config (caption width 32), in ComfyUI's single-file layout, bf16;
- the text encoder: ComfyUI's own Qwen3 class with a shrunken config (tests/comfy_shim explains why);
- the VAE: ComfyUI's FLUX VAE encoder/decoder at full architecture, random weights, fp16.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from helpers import randomize_
from zimage import S3DiT, ZImageConfig

PACK_ROOT = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).resolve().parent / "comfy_shim" / "zimage_tiny_text_encoder.py"
VISION_SHIM = SHIM.parent / "zimage_tiny_vision.py"
CONTROL_SHIM = SHIM.parent / "zimage_tiny_controlnet.py"
TINY_DIT = ZImageConfig.tiny(cap_feat_dim=32)
TRANSFORMER_FILES = ("z_image_turbo_bf16.safetensors", "z_image_bf16.safetensors")
# Omni-Base / Edit: the tiny model with a SigLIP embedder as wide as the tiny vision encoder (the shim's)
TINY_OMNI = ZImageConfig.tiny(cap_feat_dim=32, siglip_feat_dim=24)
OMNI_FILE = "z_image_edit_bf16.safetensors"
VISION_FILE = "sigclip_vision_patch14_384.safetensors"
NAFLEX_FILE = "siglip2_so400m_patch16_naflex.safetensors"  # written where the host has NaFlex (0.14 and later)
# Fun ControlNets in models/model_patches: the name ComfyUI's official template loads (version 1.0's layout), and an
# inpainting one (2.0's: 15 control layers, 33 input channels, refiner hints; ComfyUI 0.8 knows no 2.1 lite)
CONTROL_FILES = {"Z-Image-Turbo-Fun-Controlnet-Union.safetensors": dict(n_control_layers=6),
                 "Z-Image-Turbo-Fun-Controlnet-Union-2.0.safetensors":
                     dict(n_control_layers=15, in_channels=33, refiner_control=True)}
# what ComfyUI's official Z-Image templates load besides the above (tests/test_templates.py): their input images
# (small: the ControlNet template samples at its image's size) and the 2K upscaler's ESRGAN, tiny
TEMPLATE_IMAGES = {"image_z_image_turbo_fun_union_controlnet_input_image.png": (192, 256), "fighter_jet.png": (96, 64)}
UPSCALE_FILE = "RealESRGAN_x4plus.safetensors"


def write_transformer(path: Path, seed: int = 0, cfg: ZImageConfig = TINY_DIT):
    model = randomize_(S3DiT(cfg), seed)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, str(path))


def write_text_encoder(path: Path):
    import comfy.ops
    import comfy.text_encoders.llama as llama

    sys.path.insert(0, str(SHIM.parent))
    import zimage_tiny_text_encoder  # noqa: F401  (installs the shrunken config in this process too)

    model = llama.Qwen3_4B({}, dtype=torch.float32, device="cpu", operations=comfy.ops.manual_cast)
    randomize_(model, seed=1, spread=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def write_vision_encoder(path: Path, naflex: bool = False):
    import comfy.clip_model
    import comfy.ops

    sys.path.insert(0, str(VISION_SHIM.parent))
    from zimage_tiny_vision import CONFIG, NAFLEX_CONFIG

    model = comfy.clip_model.CLIPVisionModelProjection(NAFLEX_CONFIG if naflex else CONFIG, torch.float32, "cpu",
                                                       comfy.ops.manual_cast)
    randomize_(model, seed=4, spread=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def write_vae(path: Path):
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    ddconfig = dict(double_z=True, z_channels=16, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    vae = torch.nn.ModuleDict({"encoder": Encoder(**ddconfig), "decoder": Decoder(**ddconfig)})
    randomize_(vae, seed=2, spread=False)
    save_file({k: v.to(torch.float16).contiguous() for k, v in vae.state_dict().items()}, str(path))


def write_controlnet(path: Path, seed: int, **control):
    """A tiny Fun ControlNet for the tiny transformer, in the released files' names."""
    from helpers import fun_file_format
    from zimage import ControlConfig, ControlNet

    net = randomize_(ControlNet(TINY_DIT, ControlConfig(**control)), seed)
    save_file({k: v.to(torch.bfloat16) for k, v in fun_file_format(net.state_dict()).items()}, str(path))


def write_upscaler(path: Path):
    """A tiny 4x ESRGAN (spandrel's, the library ComfyUI's UpscaleModelLoader reads it with)."""
    from spandrel.architectures.ESRGAN import ESRGAN

    model = randomize_(ESRGAN(num_filters=8, num_blocks=1, scale=4), seed=8, spread=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def write_image(path: Path, size: tuple[int, int], seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)


def build_base_directory(base: Path) -> Path:
    """A ComfyUI base directory: models, custom_nodes (this pack + the test shim), input, output."""
    models = base / "models"
    for sub in ("diffusion_models", "text_encoders", "vae", "loras", "clip_vision", "model_patches", "upscale_models"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    for name in TRANSFORMER_FILES:
        write_transformer(models / "diffusion_models" / name)
    write_transformer(models / "diffusion_models" / OMNI_FILE, seed=5, cfg=TINY_OMNI)
    write_vision_encoder(models / "clip_vision" / VISION_FILE)
    if host_has_naflex():
        write_vision_encoder(models / "clip_vision" / NAFLEX_FILE, naflex=True)
    write_text_encoder(models / "text_encoders" / "qwen_3_4b.safetensors")
    write_vae(models / "vae" / "ae.safetensors")
    for seed, (name, control) in enumerate(CONTROL_FILES.items(), start=6):
        write_controlnet(models / "model_patches" / name, seed, **control)
    write_upscaler(models / "upscale_models" / UPSCALE_FILE)
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(exist_ok=True)
    (custom_nodes / "comfyui-zimage").symlink_to(PACK_ROOT, target_is_directory=True)
    for shim in (SHIM, VISION_SHIM, CONTROL_SHIM):
        shutil.copy(shim, custom_nodes / shim.name)
    (base / "input").mkdir(exist_ok=True)
    (base / "output").mkdir(exist_ok=True)
    write_image(base / "input" / "example.png", (320, 256), seed=3)
    for seed, (name, size) in enumerate(TEMPLATE_IMAGES.items(), start=10):
        write_image(base / "input" / name, size, seed)
    return base


def host_has_naflex() -> bool:
    sys.path.insert(0, str(VISION_SHIM.parent))
    from zimage_tiny_vision import has_naflex

    return has_naflex()


def import_pack(name: str = "comfyui_zimage"):
    """The pack imported in-process as ComfyUI imports a custom node: a package (its relative imports work)
    under a module name of its own, registered in sys.modules. ComfyUI's folder must be on sys.path first."""
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "__init__.py",
                                                      submodule_search_locations=[str(PACK_ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI's main.py in a subprocess, bound to 127.0.0.1, with a small client for its HTTP API."""

    def __init__(self, comfyui: Path, base: Path, log_path: Path, extra_args=()):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        args = [sys.executable, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(base), "--preview-method", "latent2rgb", *extra_args]
        if not torch.cuda.is_available():
            args.append("--cpu")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(args, cwd=comfyui, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.client_id = uuid.uuid4().hex
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                self.get("/object_info/ZImageSampler")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not start in 180 s:\n{self.tail()}")

    def tail(self, n=60) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def request(self, path, data=None, timeout=60):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def get(self, path):
        status, body = self.request(path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {body}")
        return body

    def queue(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt; returns (HTTP status, response): 200 with prompt_id, or 400 with node_errors."""
        return self.request("/prompt", {"prompt": prompt, "client_id": self.client_id})

    def wait(self, prompt_id: str, timeout=600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.tail()}")

    def run(self, prompt: dict, timeout=600) -> dict:
        status, body = self.queue(prompt)
        if status != 200:
            raise AssertionError(f"prompt refused: {json.dumps(body)[:2000]}")
        return self.wait(body["prompt_id"], timeout)

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def output_images(entry: dict) -> list[dict]:
    return [img for out in entry.get("outputs", {}).values() for img in out.get("images", [])]


def load_workflow(name: str) -> dict:
    with open(PACK_ROOT / "workflows" / name) as f:
        return json.load(f)


def shrink(prompt: dict, side: int = 256) -> dict:
    """The same graph at a size a CPU decodes quickly (the transformer is tiny; the VAE is full size)."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        if node["class_type"] == "ZImageLatent":
            node["inputs"].update(width=side, height=side, aspect="custom")
    return prompt
