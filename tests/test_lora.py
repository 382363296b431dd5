"""LoRAs on the Z-Image MODEL inside a real ComfyUI: every naming trainers write, every key applied, the math
checked independently, a LoRA for another model refused, and the weights merged once (no per-step cost).

Random rank-4 LoRAs are written as .safetensors in each naming (one file per naming) into a temporary
`loras` folder registered with ComfyUI's folder_paths, and loaded by file name as a workflow would:
- ai-toolkit               diffusion_model.layers.0.attention.to_q.lora_A.weight / .lora_B.weight
- diffusers PEFT           transformer.layers.0.attention.to_q.lora_A.weight / .lora_B.weight
- PEFT base_model          base_model.model.layers.0.attention.to_q.lora_A.weight / .lora_B.weight / .alpha
- kohya / Musubi Tuner     lora_unet_layers_0_attention_to_q.lora_down.weight / .lora_up.weight / .alpha
- OneTrainer               lora_transformer_layers_0_attention_to_q.lora_down.weight / ... / .alpha
- ComfyUI                  diffusion_model.layers.0.attention.qkv.lora_up.weight / .lora_down.weight / .alpha
- ComfyUI, kohya-style     lora_unet_layers_0_attention_qkv.lora_down.weight / ... / .alpha
- DiffSynth-Studio         layers.0.attention.to_q.lora_A.default.weight / .lora_B.default.weight
- VideoX-Fun (kohya, "__") lora_unet__layers_0_attention_to_q.lora_down.weight / ... / .alpha
- InvokeAI's prefixes      base_model.model.transformer.layers.0.attention.to_q.lora_A.weight / .lora_B.weight
                           base_model.model.transformer.layers.0.attention.qkv.lora_A.weight / ...
                           transformer.diffusion_model.layers.0.attention.to_q.lora_down.weight / ... / .alpha
                           transformer.diffusion_model.layers.0.attention.qkv.lora_down.weight / ... / .alpha
                           base_model.model.transformer.diffusion_model.layers.0.attention.qkv.lora_A.weight / ...
The diffusers module names (separate to_q / to_k / to_v, to_out.0, all_x_embedder.2-1, ...) must land on row
slices of ComfyUI's fused qkv; the ComfyUI namings and three of InvokeAI's use ComfyUI's own names.

Where trainers write these: DiffSynth-Studio (diffsynth/diffusion/training_module.py) injects PEFT adapters
into its ZImageDiT, whose modules have diffusers' names (diffsynth/models/z_image_dit.py: to_q, to_out,
all_x_embedder), and saves the trainable parameters with "pipe.dit." removed: no prefix, PEFT's in-memory
".lora_A.default.weight", and no alpha (lora_alpha defaults to the rank: scale 1). ComfyUI 0.14.1 maps exactly
these names for Z-Image ("DiffSynth lora format" in comfy/lora.py); diffusers' Z-Image LoRA conversion drops
"default.". "lora_unet__" is the naming of VideoX-Fun's distilled Z-Image LoRAs, as InvokeAI's and diffusers'
Z-Image conversions (and diffusers' tests) read it. InvokeAI's Z-Image LoRA conversion strips
base_model.model.transformer.[diffusion_model.] and transformer.diffusion_model. before the module name.

Some files carry a text-encoder (Qwen3) part beside the transformer's, in the naming of the same trainer
(TEXT_ENCODER_NAMINGS): lora_te_model_layers_0_self_attn_q_proj, lora_te1_layers_0_..., text_encoder.layers.0...,
base_model.model.text_encoder.layers.0..., base_model.model.model.layers.0..., te.model.layers.0...,
text_encoders.qwen3_4b.transformer.model.layers.0... (ComfyUI's), model.layers.0....lora_A.default.weight
(DiffSynth-Studio's). The transformer part is applied and the node names the text-encoder part and where it goes
(the CLIP); a file of nothing else is refused with that advice.

LyCORIS LoHa (.hada_w1_a / .hada_w1_b / .hada_w2_a / .hada_w2_b / .alpha) and LoKr (.lokr_w1 / .lokr_w2_a /
.lokr_w2_b / .alpha) files are written with each naming's module names too.

The expected weights are computed here, from the tensors written to the files:
    W' = W + strength * (alpha / rank) * (up @ down)          (alpha / rank = 1 where the file has no alpha)
on the whole weight, or on rows [j * dim, (j + 1) * dim) of qkv for q, k, v (j = 0, 1, 2).

ComfyUI's own LoraLoaderModelOnly (0.8.0 and 0.14.1) loads ai-toolkit, diffusers PEFT and both ComfyUI
namings completely, and DiffSynth-Studio's too from 0.14 (not 0.8). It cannot load every key of kohya / Musubi
Tuner (to_q / to_k / to_v / to_out_0 / all_x_embedder / all_final_layer names), OneTrainer
(lora_transformer_*), PEFT base_model.model.*, VideoX-Fun's lora_unet__* or InvokeAI's prefixed files; for
those the test checks only that what native does apply is right, and that ZImageLoraLoader applies everything.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from conftest import skip_unless_host_has
from helpers import randomize_, rel_err
from zimage import S3DiT, ZImageConfig, flow_sigmas, make_noise, sample

pytestmark = pytest.mark.host

CFG = ZImageConfig.tiny()
RANK = 4
MODEL_SEED = 0
NOT_LOADED = "lora key not loaded"
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight",
                 ".lora_down.weight", ".lora_up.weight", ".alpha", ".hada_w1_a", ".hada_w1_b", ".hada_w2_a",
                 ".hada_w2_b", ".lokr_w1", ".lokr_w2_a", ".lokr_w2_b")


# --- what a LoRA can target: ComfyUI weight name, rows of it, and the diffusers module name ---------------

@dataclass(frozen=True)
class Target:
    comfy: str  # module in ComfyUI's Z-Image names (the engine's), without "diffusion_model."
    rows: tuple[int, int] | None  # (start, size) of a slice of the weight's rows, or None for all of it
    diffusers: str  # the same module in diffusers' ZImageTransformer2DModel names


def all_targets(cfg: ZImageConfig, fused: bool) -> list[Target]:
    """Every Linear a Z-Image LoRA may address; q, k, v separately (fused=False) or as qkv (fused=True)."""
    d = cfg.dim
    out = []
    blocks = [("layers", i, True) for i in range(cfg.n_layers)]
    blocks += [("noise_refiner", i, True) for i in range(cfg.n_refiner_layers)]
    blocks += [("context_refiner", i, False) for i in range(cfg.n_refiner_layers)]
    for block, i, modulated in blocks:
        p = f"{block}.{i}"
        if fused:
            out.append(Target(f"{p}.attention.qkv", None, f"{p}.attention.qkv"))
        else:
            out += [Target(f"{p}.attention.qkv", (j * d, d), f"{p}.attention.to_{x}") for j, x in enumerate("qkv")]
        out.append(Target(f"{p}.attention.out", None, f"{p}.attention.to_out.0"))
        out += [Target(f"{p}.feed_forward.{w}", None, f"{p}.feed_forward.{w}") for w in ("w1", "w2", "w3")]
        if modulated:
            out.append(Target(f"{p}.adaLN_modulation.0", None, f"{p}.adaLN_modulation.0"))
    out += [
        Target("x_embedder", None, "all_x_embedder.2-1"),
        Target("final_layer.linear", None, "all_final_layer.2-1.linear"),
        Target("final_layer.adaLN_modulation.1", None, "all_final_layer.2-1.adaLN_modulation.1"),
        Target("cap_embedder.1", None, "cap_embedder.1"),
        Target("t_embedder.mlp.0", None, "t_embedder.mlp.0"),
        Target("t_embedder.mlp.2", None, "t_embedder.mlp.2"),
    ]
    return out


@dataclass(frozen=True)
class Naming:
    fused: bool  # names ComfyUI's modules (fused qkv) rather than diffusers' (to_q, to_k, to_v)
    module: Callable[[Target], str]
    up: str
    down: str
    alpha: bool
    native: bool  # LoraLoaderModelOnly applies every key of this naming, on ComfyUI 0.8.0 and 0.14.1


def _kohya(prefix, attr):
    return lambda t: prefix + getattr(t, attr).replace(".", "_")


def _dotted(prefix, attr):
    return lambda t: prefix + getattr(t, attr)


NAMINGS = {
    "ai-toolkit": Naming(False, _dotted("diffusion_model.", "diffusers"), "lora_B.weight", "lora_A.weight", False, True),
    "diffusers-peft": Naming(False, _dotted("transformer.", "diffusers"), "lora_B.weight", "lora_A.weight", False, True),
    "peft-base-model": Naming(False, _dotted("base_model.model.", "diffusers"), "lora_B.weight", "lora_A.weight", True,
                              False),
    "kohya-musubi": Naming(False, _kohya("lora_unet_", "diffusers"), "lora_up.weight", "lora_down.weight", True, False),
    "onetrainer": Naming(False, _kohya("lora_transformer_", "diffusers"), "lora_up.weight", "lora_down.weight", True,
                         False),
    "comfyui": Naming(True, _dotted("diffusion_model.", "comfy"), "lora_up.weight", "lora_down.weight", True, True),
    "comfyui-kohya": Naming(True, _kohya("lora_unet_", "comfy"), "lora_up.weight", "lora_down.weight", True, True),
    "diffsynth": Naming(False, _dotted("", "diffusers"), "lora_B.default.weight", "lora_A.default.weight", False,
                        False),
    "videox-fun": Naming(False, _kohya("lora_unet__", "diffusers"), "lora_up.weight", "lora_down.weight", True,
                         False),
    "invokeai-peft": Naming(False, _dotted("base_model.model.transformer.", "diffusers"), "lora_B.weight",
                            "lora_A.weight", False, False),
    "invokeai-peft-comfyui": Naming(True, _dotted("base_model.model.transformer.", "comfy"), "lora_B.weight",
                                    "lora_A.weight", False, False),
    "invokeai-diffusion-model": Naming(False, _dotted("transformer.diffusion_model.", "diffusers"), "lora_up.weight",
                                       "lora_down.weight", True, False),
    "invokeai-diffusion-model-comfyui": Naming(True, _dotted("transformer.diffusion_model.", "comfy"),
                                               "lora_up.weight", "lora_down.weight", True, False),
    "invokeai-peft-diffusion-model": Naming(True, _dotted("base_model.model.transformer.diffusion_model.", "comfy"),
                                            "lora_B.weight", "lora_A.weight", True, False),
}
NATIVE_FULL = [n for n, spec in NAMINGS.items() if spec.native]
# namings native loads fully only on hosts whose Z-Image LoRA key map has (the module name it lacks before)
NATIVE_SINCE = {"diffsynth": ("layers.0.attention.to_q", "diffusers' module names without a prefix "
                                                        "(DiffSynth-Studio's) in its Z-Image LoRA key map")}


@dataclass
class Entry:
    module: str  # the LoRA's module name in the file
    target: Target
    up: torch.Tensor  # float32 values of what the file holds (bf16-rounded)
    down: torch.Tensor
    scale: float  # alpha / rank, or 1 without alpha

    def delta(self) -> torch.Tensor:
        """The change to the target at strength 1, in float64."""
        return self.scale * (self.up.double() @ self.down.double())


@dataclass
class LycorisEntry:
    module: str
    target: Target
    change: torch.Tensor  # the change to the target at strength 1, float64, computed here from the file's tensors

    def delta(self) -> torch.Tensor:
        return self.change


@dataclass
class LoraFile:
    name: str  # file name in the loras folder
    entries: list[Entry]


def linear_shapes(cfg: ZImageConfig) -> dict[str, tuple[int, int]]:
    with torch.device("meta"):
        model = S3DiT(cfg)
    return {k[: -len(".weight")]: tuple(v.shape) for k, v in model.state_dict().items() if v.ndim == 2}


def make_lora(naming: str, seed: int) -> tuple[dict[str, torch.Tensor], list[Entry]]:
    spec = NAMINGS[naming]
    shapes = linear_shapes(CFG)
    g = torch.Generator().manual_seed(seed)
    sd, entries = {}, []
    for i, target in enumerate(all_targets(CFG, spec.fused)):
        out_features, in_features = shapes[target.comfy]
        if target.rows is not None:
            out_features = target.rows[1]
        up = (0.05 * torch.randn(out_features, RANK, generator=g)).to(torch.bfloat16)
        down = (torch.randn(RANK, in_features, generator=g) / in_features ** 0.5).to(torch.bfloat16)
        module = spec.module(target)
        sd[f"{module}.{spec.up}"] = up
        sd[f"{module}.{spec.down}"] = down
        scale = 1.0
        if spec.alpha:
            alpha = float(1 + i % 6)  # a different alpha per module: a mix-up between modules shows
            sd[f"{module}.alpha"] = torch.tensor(alpha)
            scale = alpha / RANK
        entries.append(Entry(module, target, up.float(), down.float(), scale))
    assert len({e.module for e in entries}) == len(entries)
    return sd, entries


# the weights LyCORIS test files target: q, k, v as row slices of qkv in the namings with diffusers' names
LYCORIS_MODULES = ("layers.0.attention.qkv", "layers.1.feed_forward.w1", "layers.1.attention.out",
                   "context_refiner.0.feed_forward.w2")
BROKEN = Target("layers.0.feed_forward.w1", None, "layers.0.feed_forward.w1")  # [ffn_hidden, dim]: not square


def target_shape(target: Target) -> tuple[int, int]:
    out_features, in_features = linear_shapes(CFG)[target.comfy]
    return (target.rows[1] if target.rows else out_features), in_features


def lycoris_module(kind: str, out_features: int, in_features: int, g, broken: bool = False):
    """One module's tensors by suffix and, computed here in float64, the change it makes at strength 1 by its
    format's definition. broken=True spoils one dimension the way a file for another shape would."""
    def rand(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=g)).to(torch.bfloat16)

    extra = int(broken)
    alpha = 2.0
    if kind == "loha":
        # Hadamard product of two low-rank matrices: (alpha / rank) (w1_a w1_b) * (w2_a w2_b), elementwise
        t = {"hada_w1_a": rand(out_features, RANK, std=0.3), "hada_w1_b": rand(RANK, in_features + extra, std=0.3),
             "hada_w2_a": rand(out_features, RANK, std=0.3), "hada_w2_b": rand(RANK, in_features + extra, std=0.3)}
        d = t["hada_w1_a"].double() @ t["hada_w1_b"].double() * (t["hada_w2_a"].double() @ t["hada_w2_b"].double())
    elif kind == "lokr":
        # Kronecker product of a full 2x2 factor and a low-rank one: (alpha / rank) w1 (x) (w2_a w2_b)
        t = {"lokr_w1": rand(2, 2), "lokr_w2_a": rand(out_features // 2, RANK, std=0.1),
             "lokr_w2_b": rand(RANK, in_features // 2 + extra, std=0.1)}
        d = torch.kron(t["lokr_w1"].double(), t["lokr_w2_a"].double() @ t["lokr_w2_b"].double())
    elif kind == "lora-ranks":  # down's rank is not up's
        t = {"lora_up.weight": rand(out_features, RANK), "lora_down.weight": rand(RANK + extra, in_features)}
        d = None
    elif kind == "lora-transposed":  # for the transposed weight: same element count, rows and columns swapped
        if broken:
            out_features, in_features = in_features, out_features
        t = {"lora_up.weight": rand(out_features, RANK), "lora_down.weight": rand(RANK, in_features)}
        d = None
    elif kind == "dora":  # a LoRA with a magnitude per output row (DoRA): one too many when broken
        t = {"lora_up.weight": rand(out_features, RANK), "lora_down.weight": rand(RANK, in_features),
             "dora_scale": rand(out_features + extra, 1)}
        d = None
    elif kind == "diff":
        t = {"diff": rand(out_features, in_features + extra)}
        d = None
    elif kind in ("oft", "boft"):  # a rotation of each block of rows; blocks that do not tile the rows when broken
        size = 16 if out_features % 16 == 0 else 10
        blocks = (out_features // size + extra, size, size)
        t = {"oft_blocks": rand(*blocks, std=0.05) if kind == "oft" else rand(1, *blocks, std=0.05)}
        d = None
    elif kind == "glora":  # W (a1 a2) + b1 b2, with b1's rows the weight's
        t = {"a1.weight": rand(in_features, RANK), "a2.weight": rand(RANK, in_features),
             "b1.weight": rand(out_features + extra, RANK), "b2.weight": rand(RANK, in_features)}
        d = None
    else:
        raise AssertionError(kind)
    t["alpha"] = torch.tensor(alpha)
    return t, None if d is None else alpha / RANK * d


def make_lycoris(kind: str, seed: int, broken: Target | None = None, naming: str = "kohya-musubi"):
    """A file of `kind` modules on LYCORIS_MODULES (+ `broken`, spoilt) with `naming`'s module names (by default
    kohya's, as LyCORIS saves them), and its entries for expected_state."""
    spec = NAMINGS[naming]
    g = torch.Generator().manual_seed(seed)
    sd, entries = {}, []
    targets = [t for t in all_targets(CFG, spec.fused) if t.comfy in LYCORIS_MODULES]
    for target in targets + ([broken] if broken else []):
        module = spec.module(target)
        tensors, change = lycoris_module(kind, *target_shape(target), g, broken=target is broken)
        sd.update({f"{module}.{suffix}": v for suffix, v in tensors.items()})
        entries.append(LycorisEntry(module, target, change))
    return sd, entries


# --- text-encoder (Qwen3) parts, which some files carry beside the transformer's ------------------------------

# modules of Qwen3's decoder layers as transformers' Qwen3Model names them (ComfyUI's and DiffSynth-Studio's
# text encoders hold it as `model`)
QWEN3_MODULES = [f"layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
    "mlp.down_proj")]


@dataclass(frozen=True)
class TextEncoderNaming:
    module: Callable[[str], str]  # a QWEN3_MODULES name -> the file's module name
    up: str
    down: str
    transformer: str  # the NAMINGS entry the same trainer writes the transformer's part in


def _prefixed(prefix):
    return lambda m: prefix + m


TEXT_ENCODER_NAMINGS = {
    # kohya sd-scripts' lora_te (its Anima network, whose text encoder is a Qwen3, names them so)
    "kohya": TextEncoderNaming(lambda m: "lora_te_model_" + m.replace(".", "_"), "lora_up.weight",
                               "lora_down.weight", "kohya-musubi"),
    # OneTrainer's kohya-style files: lora_te1 for "text_encoder"
    "onetrainer": TextEncoderNaming(lambda m: "lora_te1_" + m.replace(".", "_"), "lora_up.weight",
                                    "lora_down.weight", "onetrainer"),
    # diffusers' pipeline component name; InvokeAI reads it and base_model.model.text_encoder.
    "diffusers": TextEncoderNaming(_prefixed("text_encoder."), "lora_B.weight", "lora_A.weight", "diffusers-peft"),
    "invokeai": TextEncoderNaming(_prefixed("base_model.model.text_encoder."), "lora_B.weight", "lora_A.weight",
                                  "invokeai-peft"),
    # PEFT on a Qwen3ForCausalLM: Qwen3's names under base_model.model.model.
    "peft-causal-lm": TextEncoderNaming(_prefixed("base_model.model.model."), "lora_B.weight", "lora_A.weight",
                                        "peft-base-model"),
    # ComfyUI's own: the naming its LoraLoader applies to Z-Image's CLIP
    "comfyui": TextEncoderNaming(_prefixed("text_encoders.qwen3_4b.transformer.model."), "lora_up.weight",
                                 "lora_down.weight", "comfyui"),
    # te. / te1. (read as text-encoder prefixes by stable-diffusion.cpp and other LoRA tools)
    "te": TextEncoderNaming(_prefixed("te.model."), "lora_B.weight", "lora_A.weight", "ai-toolkit"),
    # DiffSynth-Studio's ZImageTextEncoder (a Qwen3Model as `model`) with PEFT adapters, saved unprefixed
    "diffsynth": TextEncoderNaming(_prefixed("model."), "lora_B.default.weight", "lora_A.default.weight",
                                   "diffsynth"),
}


def text_encoder_lora(naming: str, seed: int) -> dict[str, torch.Tensor]:
    """Rank-4 LoRA tensors for QWEN3_MODULES in `naming` (with alpha where the naming has lora_up / lora_down).
    Their sizes are not Qwen3-4B's: nothing here applies them."""
    spec = TEXT_ENCODER_NAMINGS[naming]
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in QWEN3_MODULES:
        module = spec.module(m)
        sd[f"{module}.{spec.up}"] = torch.randn(16, RANK, generator=g)
        sd[f"{module}.{spec.down}"] = torch.randn(RANK, 16, generator=g)
        if spec.up == "lora_up.weight":
            sd[f"{module}.alpha"] = torch.tensor(float(RANK))
    return sd


def lora_with_text_encoder(comfy, naming: str, name: str) -> tuple[str, list[Entry], dict[str, torch.Tensor]]:
    """A file with a transformer part and a text-encoder part, both named as `naming`'s trainer names them: its
    name, the transformer part's entries, the text-encoder part's tensors."""
    sd, entries = make_lora(TEXT_ENCODER_NAMINGS[naming].transformer, 400)
    text_encoder = text_encoder_lora(naming, 401)
    return write_lora(comfy, sd | text_encoder, name), entries, text_encoder


# --- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def comfy(zimage_pack):
    import comfy.lora
    import comfy.model_management
    import folder_paths
    import nodes as comfy_nodes

    assert Path(comfy_nodes.__file__).resolve().parent == Path(folder_paths.__file__).resolve().parent, \
        f"`nodes` is not ComfyUI's nodes.py: {comfy_nodes.__file__}"
    pack = zimage_pack.__name__
    host_ops = importlib.import_module(f"{pack}.nodes.comfy_model").comfy_ops(None, torch.float32)
    return dict(
        lora=comfy.lora, mm=comfy.model_management, folder_paths=folder_paths, nodes=comfy_nodes,
        pack_lora=importlib.import_module(f"{pack}.nodes.lora"),
        comfy_model=importlib.import_module(f"{pack}.nodes.comfy_model").comfy_model,
        # the network as ZImageLoader builds it: with ComfyUI's layer classes (float32 on the CPU)
        S3DiT=lambda cfg: importlib.import_module(f"{pack}.zimage").S3DiT(cfg, ops=host_ops),
        use_fp8_matmuls=importlib.import_module(f"{pack}.zimage.fp8").use_fp8_matmuls,
    )


@pytest.fixture(scope="module")
def loras(comfy, tmp_path_factory) -> dict[str, LoraFile]:
    """One LoRA file per naming in a fresh folder that ComfyUI lists under "loras"."""
    folder = tmp_path_factory.mktemp("loras")
    files = {}
    for seed, naming in enumerate(NAMINGS, start=100):
        sd, entries = make_lora(naming, seed)
        name = f"zimage-test-{naming}.safetensors"
        save_file(sd, str(folder / name))
        files[naming] = LoraFile(name, entries)
    fp = comfy["folder_paths"]
    fp.add_model_folder_path("loras", str(folder))
    yield files
    fp.folder_names_and_paths["loras"][0].remove(str(folder))


@pytest.fixture
def base(comfy):
    """A fresh Z-Image MODEL (ModelPatcher) around a random tiny S3DiT, and a copy of its state dict."""
    transformer = randomize_(comfy["S3DiT"](CFG), MODEL_SEED).eval()
    patcher = comfy["comfy_model"](transformer)
    original = {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}
    yield patcher, original
    comfy["mm"].unload_all_models()


def write_lora(comfy, sd: dict, name: str) -> str:
    folder = Path(comfy["folder_paths"].get_folder_paths("loras")[-1])
    save_file(sd, str(folder / name))
    return name


def not_loaded(caplog) -> list[str]:
    return [r.getMessage().split(":", 1)[1].strip() for r in caplog.records if r.getMessage().startswith(NOT_LOADED)]


def module_of(key: str) -> str:
    for suffix in LORA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise AssertionError(f"unexpected LoRA key {key}")


def run_ours(comfy, model, name, strength, caplog) -> tuple[object, list[str]]:
    """ZImageLoraLoader as ComfyUI runs it: the MODEL, and the lines of text the node shows."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = comfy["pack_lora"].ZImageLoraLoader().load(model, name, strength)
    assert not_loaded(caplog) == [], f"ZImageLoraLoader left keys unloaded: {not_loaded(caplog)[:5]}"
    return out["result"][0], out["ui"]["text"]


def load_ours(comfy, model, name, strength, caplog):
    """The MODEL from ZImageLoraLoader, for a file of transformer weights only: the node has nothing to say."""
    patched, text = run_ours(comfy, model, name, strength, caplog)
    assert text == []
    return patched


def load_native(comfy, model, name, strength, caplog) -> tuple[object, set[str]]:
    """Native LoraLoaderModelOnly; returns the MODEL and the LoRA modules it did not load."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = comfy["nodes"].LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]
    return out, {module_of(k) for k in not_loaded(caplog)}


def native_gap(comfy, model, original, name, entries, caplog, others=frozenset()) -> set[str]:
    """The modules of the file `name` that native LoraLoaderModelOnly leaves out: of `entries` (printed, not
    failed on) or of `others` (the file's modules that are not the transformer's). What it does apply must merge
    as `entries` define it (no mis-mapping)."""
    patched, missed = load_native(comfy, model, name, 1.0, caplog)
    gap = missed - others
    assert gap <= {e.module for e in entries}
    assert_merged(patched, original, [e for e in entries if e.module not in gap], 1.0)
    if gap:
        print(f"\n[native gap] {name}: LoraLoaderModelOnly skips {len(gap)} of {len(entries)} modules, "
              f"e.g. {sorted(gap)[:3]}")
    return missed


def expected_state(original: dict, entries: list[Entry], strength: float) -> dict[str, torch.Tensor]:
    """The state dict after merging `entries` at `strength`, computed in float64 from the file's tensors."""
    out = {k: v.double() for k, v in original.items()}
    for e in entries:
        w = out[f"diffusion_model.{e.target.comfy}.weight"]
        rows = slice(None) if e.target.rows is None else slice(e.target.rows[0], sum(e.target.rows))
        w[rows] += strength * e.delta()
    return out


def assert_merged(patcher, original, entries, strength):
    """patch_model() gives exactly the expected weights (targets) and the original ones (everything else);
    unpatch_model() restores every weight bit for bit."""
    targeted = {f"diffusion_model.{e.target.comfy}.weight" for e in entries}
    expected = expected_state(original, entries, strength)
    patcher.patch_model()
    try:
        state = patcher.model.state_dict()
        assert state.keys() == original.keys()
        for key, value in state.items():
            if key in targeted:
                assert value.dtype == original[key].dtype, key
                torch.testing.assert_close(value.double(), expected[key], rtol=0, atol=2e-6, msg=key)
                if strength != 0:
                    assert (value.double() - original[key].double()).abs().max() > 1e-3, f"{key} not patched"
            else:
                assert torch.equal(value, original[key]), f"{key} changed though no LoRA key targets it"
    finally:
        patcher.unpatch_model()
    for key, value in patcher.model.state_dict().items():
        assert torch.equal(value, original[key]), f"{key} not restored by unpatch_model"


# --- tests --------------------------------------------------------------------------------------------------

def test_lora_files_are_listed(comfy, loras):
    listed = comfy["pack_lora"].ZImageLoraLoader.INPUT_TYPES()["required"]["lora_name"][0]
    assert {f.name for f in loras.values()} <= set(listed)
    for naming, f in loras.items():
        n_targets = len(all_targets(CFG, NAMINGS[naming].fused))
        assert len(f.entries) == n_targets


@pytest.mark.parametrize("strength", [1.0, -1.0, 0.7])
@pytest.mark.parametrize("naming", list(NAMINGS))
def test_our_loader_applies_every_key(comfy, loras, base, naming, strength, caplog):
    model, original = base
    lora = loras[naming]
    patched = load_ours(comfy, model, lora.name, strength, caplog)
    assert patched is not model and model.patches == {}
    # every module of the file became a patch; q, k, v of one block are three patches on one fused weight
    n_patches = sum(len(p) for p in patched.patches.values())
    assert n_patches == len(lora.entries)
    assert_merged(patched, original, lora.entries, strength)


@pytest.mark.parametrize("strength", [1.0, -1.0])
@pytest.mark.parametrize("naming", NATIVE_FULL + list(NATIVE_SINCE))
def test_native_loader_applies_every_key(comfy, loras, base, naming, strength, caplog):
    model, original = base
    if naming in NATIVE_SINCE:
        module, feature = NATIVE_SINCE[naming]
        skip_unless_host_has(module in comfy["lora"].model_lora_keys_unet(model.model, {}), feature)
    lora = loras[naming]
    patched, missed = load_native(comfy, model, lora.name, strength, caplog)
    assert missed == set(), f"native LoraLoaderModelOnly did not load {sorted(missed)[:5]}"
    assert_merged(patched, original, lora.entries, strength)


@pytest.mark.parametrize("naming", [n for n in NAMINGS if n not in NATIVE_FULL])
def test_native_gap_is_filled_by_our_loader(comfy, loras, base, naming, caplog):
    """Namings native ComfyUI 0.8 cannot fully load: what native applies is right (no mis-mapping), and our
    loader applies all of it (test_our_loader_applies_every_key). Native's gap is reported, not failed on."""
    model, original = base
    lora = loras[naming]
    native_gap(comfy, model, original, lora.name, lora.entries, caplog)
    ours = load_ours(comfy, model, lora.name, 1.0, caplog)
    assert sum(len(p) for p in ours.patches.values()) == len(lora.entries)


@pytest.mark.parametrize("loader", ["ours", "native"])
def test_strength_zero_leaves_the_model_alone(comfy, loras, base, loader, caplog):
    model, original = base
    name = loras["ai-toolkit"].name
    if loader == "ours":
        out = load_ours(comfy, model, name, 0.0, caplog)
    else:
        out, _ = load_native(comfy, model, name, 0.0, caplog)
    assert out.patches == {}
    assert_merged(out, original, [], 0.0)


def test_strength_minus_one_undoes_strength_one(comfy, loras, base, caplog):
    """Stacking the same LoRA at +1 and -1 returns the original weights (up to float rounding)."""
    model, original = base
    name = loras["kohya-musubi"].name
    plus = load_ours(comfy, model, name, 1.0, caplog)
    both = load_ours(comfy, plus, name, -1.0, caplog)
    both.patch_model()
    try:
        for key, value in both.model.state_dict().items():
            torch.testing.assert_close(value, original[key], rtol=0, atol=1e-6, msg=key)
    finally:
        both.unpatch_model()


def test_lora_for_another_model_is_refused(comfy, loras, base, caplog):
    model, _ = base
    g = torch.Generator().manual_seed(7)
    flux = {}
    for module in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"):
        flux[f"{module}.lora_down.weight"] = torch.randn(RANK, 3072, generator=g)
        flux[f"{module}.lora_up.weight"] = torch.randn(3 * 3072, RANK, generator=g)
        flux[f"{module}.alpha"] = torch.tensor(float(RANK))
    name = write_lora(comfy, flux, "zimage-test-flux.safetensors")
    with pytest.raises(ValueError, match="lora_unet_double_blocks_0_img_attn_qkv") as err:
        comfy["pack_lora"].ZImageLoraLoader().load(model, name, 1.0)
    assert name in str(err.value)


def test_one_foreign_key_in_a_zimage_lora_is_refused(comfy, loras, base):
    """No key may go unapplied: a Z-Image LoRA with one extra module Z-Image lacks is an error, not a warning."""
    model, _ = base
    sd, _ = make_lora("ai-toolkit", 100)
    sd["diffusion_model.layers.0.attention.to_add_out.lora_A.weight"] = torch.zeros(RANK, CFG.dim)
    sd["diffusion_model.layers.0.attention.to_add_out.lora_B.weight"] = torch.zeros(CFG.dim, RANK)
    name = write_lora(comfy, sd, "zimage-test-extra-key.safetensors")
    with pytest.raises(ValueError, match="to_add_out"):
        comfy["pack_lora"].ZImageLoraLoader().load(model, name, 1.0)


def test_lora_of_another_size_is_refused(comfy, loras, base, caplog):
    """Lumina 2 LoRAs use the same module names (layers.N.attention.qkv, ...) at another width: their keys
    all match, but ComfyUI would skip every weight at load with only an error line in the log. Refused."""
    model, original = base
    wide = 2 * CFG.dim
    sd = {"diffusion_model.layers.0.attention.qkv.lora_down.weight": torch.zeros(RANK, wide),
          "diffusion_model.layers.0.attention.qkv.lora_up.weight": torch.zeros(3 * wide, RANK),
          "diffusion_model.layers.0.feed_forward.w1.lora_down.weight": torch.zeros(RANK, wide),
          "diffusion_model.layers.0.feed_forward.w1.lora_up.weight": torch.zeros(CFG.ffn_hidden, RANK)}
    name = write_lora(comfy, sd, "zimage-test-wrong-size.safetensors")
    with pytest.raises(ValueError, match="layers.0.attention.qkv") as err:
        comfy["pack_lora"].ZImageLoraLoader().load(model, name, 1.0)
    assert "feed_forward.w1" in str(err.value) and name in str(err.value)

    # what happens without the check: native accepts every key, and the merge silently changes nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        native = comfy["nodes"].LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
        assert not_loaded(caplog) == [] and len(native.patches) == 2
        assert_merged(native, original, [], 1.0)
    assert any(r.levelno >= logging.ERROR and "layers.0.attention.qkv" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("strength", [1.0, -0.5])
@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("naming", list(NAMINGS))
def test_lycoris_files_apply_every_key(comfy, base, naming, kind, strength, caplog):
    """LoHa and LoKr (LyCORIS) files, their modules named as in each LoRA naming, land as their formats define
    them, on whole weights and on qkv's rows."""
    model, original = base
    sd, entries = make_lycoris(kind, 300, naming=naming)
    name = write_lora(comfy, sd, f"zimage-test-{kind}-{naming}.safetensors")
    patched = load_ours(comfy, model, name, strength, caplog)
    assert sum(len(p) for p in patched.patches.values()) == len(entries)
    assert_merged(patched, original, entries, strength)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("naming", list(NAMINGS))
def test_native_loader_on_lycoris_files(comfy, base, naming, kind, caplog):
    """What LoraLoaderModelOnly makes of LoHa and LoKr in each naming: every module in the namings whose module
    names it knows (NATIVE_FULL), and only right merges in the others."""
    model, original = base
    sd, entries = make_lycoris(kind, 300, naming=naming)
    name = write_lora(comfy, sd, f"zimage-test-{kind}-{naming}-native.safetensors")
    missed = native_gap(comfy, model, original, name, entries, caplog)
    if NAMINGS[naming].native:
        assert missed == set()


@pytest.mark.parametrize("naming", list(TEXT_ENCODER_NAMINGS))
def test_a_text_encoder_part_is_named_and_the_transformer_part_applied(comfy, base, naming, caplog):
    """A file with a text-encoder part beside the transformer's: the transformer's lands as it would alone; the
    node's text and the log say how many keys are the text encoder's, name a few, and where they go: the CLIP,
    through a CLIP LoRA loader such as ComfyUI's LoraLoader, which takes them only in ComfyUI's naming."""
    model, original = base
    name, entries, text_encoder = lora_with_text_encoder(comfy, naming, f"zimage-test-with-te-{naming}.safetensors")
    patched, text = run_ours(comfy, model, name, 1.0, caplog)
    assert_merged(patched, original, entries, 1.0)
    assert len(text) == 1, text
    note = text[0]
    assert note.startswith(f"ZImageLoraLoader ({name}): applied its transformer part ({len(entries)} modules); "
                           f"{len(text_encoder)} of its keys are for a text encoder, not the transformer"), note
    assert len({module_of(k) for k in text_encoder if k in note}) == 3, "three examples, of three modules"
    assert "apply them to the CLIP with a CLIP LoRA loader, such as ComfyUI's LoraLoader on the CLIP" in note
    assert ("text_encoders.qwen3_4b.transformer.model.layers.N" in note) == (naming != "comfyui"), note
    assert [r.getMessage() for r in caplog.records] == [note], "the log must carry the note, and only it"


@pytest.mark.parametrize("naming", list(TEXT_ENCODER_NAMINGS))
def test_a_text_encoder_only_lora_is_refused_with_where_it_goes(comfy, base, naming):
    model, _ = base
    text_encoder = text_encoder_lora(naming, 402)
    name = write_lora(comfy, text_encoder, f"zimage-test-te-only-{naming}.safetensors")
    with pytest.raises(ValueError) as err:
        comfy["pack_lora"].ZImageLoraLoader().load(model, name, 1.0)
    message = str(err.value)
    assert message.startswith(f"ZImageLoraLoader ({name}): this LoRA holds no weights for the Z-Image transformer: "
                              f"{len(text_encoder)} of its keys are for a text encoder, not the transformer"), message
    assert sum(k in message for k in text_encoder) == 3 and "ComfyUI's LoraLoader on the CLIP" in message


def test_no_transformer_module_is_taken_for_the_text_encoder(comfy, base):
    """The loader sets aside the keys that look like a text encoder's before it matches the rest to the
    transformer: no module name it maps to the transformer may look so, or its weights would be dropped. Every
    text-encoder naming here does."""
    model, _ = base
    pattern = comfy["pack_lora"].TEXT_ENCODER_KEY
    key_map = comfy["pack_lora"].zimage_lora_key_map(model)
    assert [m for m in key_map if pattern.search(m + ".lora_A.weight")] == []
    assert all(pattern.search(k) for naming in TEXT_ENCODER_NAMINGS for k in text_encoder_lora(naming, 0))


def test_comfyui_lora_loader_takes_text_encoder_keys_only_in_comfyui_naming(comfy):
    """What the node's advice says of ComfyUI's LoraLoader, checked on this host: for Z-Image's CLIP (ComfyUI's
    Qwen3-4B text encoder, built on the meta device) its key map holds the modules of ComfyUI's naming, and of
    no other naming here."""
    z_image = importlib.import_module("comfy.text_encoders.z_image")
    with torch.device("meta"):
        encoder = z_image.te()(device="meta", dtype=torch.bfloat16)
    clip_keys = comfy["lora"].model_lora_keys_clip(encoder, {}).keys()
    for naming, spec in TEXT_ENCODER_NAMINGS.items():
        modules = {spec.module(m) for m in QWEN3_MODULES}
        assert modules & clip_keys == (modules if naming == "comfyui" else set()), naming


@pytest.mark.parametrize("naming", list(TEXT_ENCODER_NAMINGS))
def test_native_model_loader_skips_the_text_encoder_part(comfy, base, naming, caplog):
    """What LoraLoaderModelOnly makes of such a file: a 'lora key not loaded' line for each text-encoder key, and
    the transformer part as it makes of it alone."""
    model, original = base
    name, entries, text_encoder = lora_with_text_encoder(comfy, naming,
                                                         f"zimage-test-with-te-{naming}-native.safetensors")
    modules = {module_of(k) for k in text_encoder}
    assert modules <= native_gap(comfy, model, original, name, entries, caplog, others=modules)


def test_oft_with_a_norm_constraint_loads_and_rotates_each_block(comfy, base, caplog):
    """OFT's math branches on a value (its norm constraint, alpha), which the shape check cannot compute on the
    meta device: computed again in memory, a correct file loads. Each block of rows is rotated: the change
    keeps the norm of every column of every block."""
    model, original = base
    sd, entries = make_lycoris("oft", 302)
    name = write_lora(comfy, sd, "zimage-test-oft.safetensors")
    patched = load_ours(comfy, model, name, 1.0, caplog)
    assert sum(len(p) for p in patched.patches.values()) == len(entries)
    patched.patch_model()
    try:
        state = patched.model.state_dict()
        for e in entries:
            key = f"diffusion_model.{e.target.comfy}.weight"
            rows = slice(None) if e.target.rows is None else slice(e.target.rows[0], sum(e.target.rows))
            before, after = original[key][rows].double(), state[key][rows].double()
            size = sd[f"{e.module}.oft_blocks"].shape[1]
            norms = [w.unflatten(0, (-1, size)).norm(dim=1) for w in (before, after)]
            torch.testing.assert_close(norms[1], norms[0], rtol=1e-5, atol=0, msg=key)
            assert rel_err(after, before) > 1e-3, f"{key} not rotated"
    finally:
        patched.unpatch_model()


@pytest.mark.parametrize("kind", ["lora-ranks", "lora-transposed", "dora", "loha", "lokr", "glora", "oft", "boft",
                                  "diff"])
def test_a_module_that_does_not_fit_its_weight_is_refused_by_name(comfy, base, kind, caplog):
    """For every adapter type, one module whose tensors cannot make a change of its weight's shape (down and
    up ranks that differ, a LoRA for the transposed matrix, DoRA magnitudes, LyCORIS factors or (B)OFT blocks
    for another size, a diff of another shape) is refused by name among good modules of its type, which pass. ComfyUI would merge
    the file without it, or scramble it in, with at most an error line in the log."""
    model, _ = base
    sd, _ = make_lycoris(kind, 301, broken=BROKEN)
    name = write_lora(comfy, sd, f"zimage-test-broken-{kind}.safetensors")
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError) as err:
        comfy["pack_lora"].ZImageLoraLoader().load(model, name, 1.0)
    message = str(err.value)
    assert message.startswith(f"ZImageLoraLoader ({name}): 1 LoRA weights do not fit"), message
    assert f"diffusion_model.{BROKEN.comfy}.weight: " in message, message
    assert caplog.records == [], "the check's own trial computations must not log ComfyUI's errors"


def test_native_loading_takes_mismatched_ranks_and_merges_nothing(comfy, base, caplog):
    """Why a rank mismatch must be refused: ComfyUI's LoraLoaderModelOnly takes the module's keys, and the
    merge leaves the weight unchanged with only an error line in the log."""
    model, original = base
    sd, _ = make_lycoris("lora-ranks", 301, broken=BROKEN)
    name = write_lora(comfy, sd, "zimage-test-broken-ranks-native.safetensors")
    native, missed = load_native(comfy, model, name, 1.0, caplog)
    assert NAMINGS["kohya-musubi"].module(BROKEN) not in missed
    assert f"diffusion_model.{BROKEN.comfy}.weight" in native.patches
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        native.patch_model()
    try:
        key = f"diffusion_model.{BROKEN.comfy}.weight"
        assert torch.equal(native.model.state_dict()[key], original[key])
    finally:
        native.unpatch_model()
    assert any(r.levelno >= logging.ERROR and BROKEN.comfy in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_strength_is_refused(comfy, loras, base, strength):
    """An API prompt can carry NaN (ComfyUI's JSON reader takes it and its range check lets it through): it
    would merge NaN into every weight the LoRA touches and sample an all-NaN latent."""
    model, _ = base
    with pytest.raises(ValueError, match="ZImageLoraLoader: strength = .* is not a finite number"):
        comfy["pack_lora"].ZImageLoraLoader().load(model, loras["ai-toolkit"].name, strength)


def test_lora_holding_nan_or_inf_is_refused_by_name(comfy, base):
    model, _ = base
    sd, entries = make_lora("ai-toolkit", 100)
    nan_key = f"{entries[0].module}.lora_B.weight"
    inf_key = f"{entries[5].module}.lora_A.weight"
    sd[nan_key] = sd[nan_key].clone()
    sd[nan_key][1, 2] = float("nan")
    sd[inf_key] = sd[inf_key].clone()
    sd[inf_key][0, 0] = -float("inf")
    name = write_lora(comfy, sd, "zimage-test-nan.safetensors")
    with pytest.raises(ValueError, match="2 tensors of this LoRA hold NaN or infinite values") as err:
        comfy["pack_lora"].ZImageLoraLoader().load(model, name, 1.0)
    assert nan_key in str(err.value) and inf_key in str(err.value) and name in str(err.value)


def test_truncated_lora_file_is_refused_as_truncated(comfy, loras, base):
    """A download cut short gets the transformer loader's header checks: an error that says so, in the node."""
    model, _ = base
    folder = Path(comfy["folder_paths"].get_folder_paths("loras")[-1])
    whole = (folder / loras["kohya-musubi"].name).read_bytes()
    name = "zimage-test-truncated.safetensors"
    (folder / name).write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(ValueError, match=f"ZImageLoraLoader: {name} is truncated.*Re-download it"):
        comfy["pack_lora"].ZImageLoraLoader().load(model, name, 1.0)


def test_weights_are_patched_once_not_per_step(comfy, loras, base, caplog, monkeypatch):
    """After ComfyUI loads the MODEL (as ZImageSampler does), the LoRA lives in the weights themselves: no
    per-step weight functions on the ops modules, and forward passes never compute a LoRA weight."""
    model, original = base
    lora = loras["ai-toolkit"]
    patched = load_ours(comfy, model, lora.name, 1.0, caplog)
    calls = []
    real = comfy["lora"].calculate_weight

    def counting(patches, weight, key, *args, **kwargs):
        calls.append(key)
        return real(patches, weight, key, *args, **kwargs)

    monkeypatch.setattr(comfy["lora"], "calculate_weight", counting)
    comfy["mm"].load_models_gpu([patched])
    assert len(set(calls)) == len(patched.patches), "the merge at load did not go through calculate_weight"

    transformer = patched.model.diffusion_model
    ops_modules = [(n, m) for n, m in transformer.named_modules() if hasattr(m, "weight_function")]
    assert len(ops_modules) >= len(patched.patches)
    for name, m in ops_modules:
        assert m.weight_function == [] and m.bias_function == [], f"{name} recomputes its weight at each use"

    expected = expected_state(original, lora.entries, 1.0)
    device = transformer.device
    for key in patched.patches:
        live = transformer.get_parameter(key.removeprefix("diffusion_model."))
        torch.testing.assert_close(live.detach().cpu().double(), expected[key], rtol=0, atol=2e-6, msg=key)

    calls.clear()
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, CFG.in_channels, 8, 8, generator=g).to(device)
    captions = [torch.randn(7, CFG.cap_feat_dim, generator=g).to(device)]
    sigma = torch.tensor([0.6], device=device)
    with torch.no_grad():
        first = transformer(latents, sigma, captions)
        second = transformer(latents, sigma, captions)
    assert calls == [], f"forward recomputed LoRA weights for {sorted(set(calls))[:3]}"
    assert torch.equal(first, second)


def test_norm_weights_patched_per_use_reach_the_fused_norms(comfy, base):
    """Under lowvram ComfyUI patches an offloaded module's weight at each use (its weight_function) instead of
    in place. The norms run inside fused kernels (zimage/fused.py) that read their weight through weight_for:
    such a patch must apply there as it does in ComfyUI's own norms, for every kind of norm in a block."""
    model, original = base
    transformer = model.model.diffusion_model
    patched = ["layers.0.attention_norm1", "layers.0.attention_norm2", "layers.1.ffn_norm1", "layers.1.ffn_norm2",
               "layers.0.attention.q_norm", "context_refiner.0.attention.k_norm"]
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, CFG.in_channels, 8, 8, generator=g)
    captions = [torch.randn(9, CFG.cap_feat_dim, generator=g)]
    sigma = torch.tensor([0.6])
    reference = S3DiT(CFG).eval()
    reference.load_state_dict({k.removeprefix("diffusion_model."): v for k, v in original.items()
                               if k.startswith("diffusion_model.")})
    with torch.no_grad():
        for name in patched:
            transformer.get_submodule(name).weight_function = [lambda w: w * 1.5 - 0.25]
            reference.get_submodule(name).weight.mul_(1.5).sub_(0.25)
        try:
            got = transformer(latents, sigma, captions)
        finally:
            for name in patched:
                transformer.get_submodule(name).weight_function = []
        expected = reference(latents, sigma, captions)
        unpatched = transformer(latents, sigma, captions)
    assert rel_err(got, expected) < 1e-6
    assert rel_err(unpatched, expected) > 1e-3, "the patches had no visible effect"


def test_sampling_with_a_lora_changes_the_result_and_unpatch_restores(comfy, loras, base, caplog):
    model, original = base
    lora = loras["kohya-musubi"]
    g = torch.Generator().manual_seed(2)
    noise = make_noise(5, (1, CFG.in_channels, 8, 8))
    captions = [torch.randn(9, CFG.cap_feat_dim, generator=g)]
    sigmas = flow_sigmas(3, 3.0)

    before = sample(model.model.diffusion_model, noise, sigmas, captions)
    patched = load_ours(comfy, model, lora.name, 1.0, caplog)
    patched.patch_model()
    try:
        with_lora = sample(patched.model.diffusion_model, noise, sigmas, captions)
    finally:
        patched.unpatch_model()
    restored = sample(model.model.diffusion_model, noise, sigmas, captions)

    # an independent engine holding the expected merged weights samples the same thing
    reference = S3DiT(CFG).eval()
    expected = expected_state(original, lora.entries, 1.0)
    reference.load_state_dict({k.removeprefix("diffusion_model."): v.float() for k, v in expected.items()
                               if k.startswith("diffusion_model.")})
    by_reference = sample(reference, noise, sigmas, captions)

    assert rel_err(with_lora, before) > 1e-2, "the LoRA had no visible effect on sampling"
    assert rel_err(with_lora, by_reference) < 1e-5
    assert torch.equal(restored, before)
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, original[key]), key


@dataclass
class Fp8Model:
    patcher: object  # the MODEL, its blocks' linears in e4m3 codes with row scales (fp8_e4m3fn_fast)
    reference: dict[str, torch.Tensor]  # the float weights the codes were made from
    codes: dict[str, torch.Tensor]  # its state dict as loaded: codes and scales


def fp8_model(comfy) -> Fp8Model:
    transformer = randomize_(comfy["S3DiT"](CFG), MODEL_SEED).eval()
    reference = {f"diffusion_model.{k}": v.detach().clone() for k, v in transformer.state_dict().items()}
    comfy["use_fp8_matmuls"](transformer)
    model = comfy["comfy_model"](transformer)
    return Fp8Model(model, reference, {k: v.clone() for k, v in model.model.state_dict().items()})


def fp8_targets(fp8: Fp8Model, entries: list[Entry]) -> list[str]:
    targeted = {f"diffusion_model.{e.target.comfy}.weight" for e in entries}
    keys = sorted(k for k in targeted if k + "_scale" in fp8.codes)
    assert keys  # the blocks' linears are fp8 here
    return keys


def assert_fp8_merged(fp8: Fp8Model, key: str, codes: torch.Tensor, expected: dict):
    """e4m3 codes on the layer's unchanged row scales hold the merged weight `expected[key]`."""
    assert codes.dtype == torch.float8_e4m3fn, key
    scale = fp8.codes[key + "_scale"].double()
    change = (codes.double() - fp8.codes[key].double()) * scale
    delta = expected[key] - fp8.reference[key].double()
    # the LoRA's change is mostly below one e4m3 step; rounded stochastically, it arrives on average:
    # the least-squares slope of the weight's change on the LoRA's delta is 1
    slope = (change * delta).sum() / (delta * delta).sum()
    assert abs(slope.item() - 1) < 0.15, (key, slope.item())
    # and the layer is the merged weight up to e4m3 rounding
    assert rel_err(codes.double() * scale, expected[key]) < 0.08, key


@pytest.mark.parametrize("loader", ["ours", "native"])
def test_lora_on_fp8_matmul_weights_patches_the_real_weight_and_unpatch_restores(comfy, loras, loader, caplog):
    """fp8_e4m3fn_fast keeps e4m3 codes with per-row scales: a LoRA lands on codes x scales, in fp8 rounding,
    through our loader and ComfyUI's own LoraLoaderModelOnly alike (the patcher calls the layer's hooks)."""
    fp8 = fp8_model(comfy)
    lora = loras["comfyui"]
    if loader == "ours":
        patched = load_ours(comfy, fp8.patcher, lora.name, 1.0, caplog)
    else:
        patched, missed = load_native(comfy, fp8.patcher, lora.name, 1.0, caplog)
        assert missed == set()
    expected = expected_state(fp8.reference, lora.entries, 1.0)
    patched.patch_model()
    try:
        state = patched.model.state_dict()
        for key in fp8_targets(fp8, lora.entries):
            assert_fp8_merged(fp8, key, state[key], expected)
            assert torch.equal(state[key + "_scale"], fp8.codes[key + "_scale"]), "row scales must not move"
    finally:
        patched.unpatch_model()
    for key, value in patched.model.state_dict().items():
        assert torch.equal(value, fp8.codes[key]), f"{key} not restored by unpatch_model"
    comfy["mm"].unload_all_models()


def test_fp8_hooks_return_the_patched_weight_when_asked_and_take_new_keywords(comfy):
    """The protocol of ComfyUI's weight hooks on every host: set_weight(return_weight=True) gives the codes
    without touching the layer, and keywords a later ComfyUI may add do not break either hook."""
    fp8 = fp8_model(comfy)
    key = "diffusion_model.layers.0.feed_forward.w1.weight"
    layer = fp8.patcher.model.get_submodule(key.removesuffix(".weight"))
    weight = layer.convert_weight(layer.weight.float(), inplace=True, a_later_keyword=1)
    torch.testing.assert_close(weight, layer.weight.float() * layer.weight_scale)
    target = fp8.reference[key].double() + 0.01
    codes = layer.set_weight(target.float(), inplace_update=False, seed=3, return_weight=True, a_later_keyword=1)
    assert_fp8_merged(fp8, key, codes, {key: target})
    assert torch.equal(layer.weight, fp8.codes[key]), "return_weight=True must not set the weight"
    assert layer.set_weight(target.float(), seed=3, a_later_keyword=1) is None
    assert torch.equal(layer.weight, codes), "the same seed must give the same codes"


def test_fp8_patched_weight_read_through_the_patcher_leaves_the_model_alone(comfy, loras, caplog):
    """ComfyUI 0.14 reads a patched weight without setting it: patch_weight_to_device(return_weight=True) (what
    its model saving casts weights through). The LoRA'd codes come back; the model and its backups stay as
    they are. ComfyUI 0.8's patcher has no such call, so there is nothing to check there."""
    from comfy.model_patcher import ModelPatcher

    skip_unless_host_has("return_weight" in inspect.signature(ModelPatcher.patch_weight_to_device).parameters,
                         "patch_weight_to_device(return_weight=True), the call that asks a weight hook for the weight")
    fp8 = fp8_model(comfy)
    lora = loras["comfyui"]
    patched = load_ours(comfy, fp8.patcher, lora.name, 1.0, caplog)
    expected = expected_state(fp8.reference, lora.entries, 1.0)
    for key in fp8_targets(fp8, lora.entries):
        codes = patched.patch_weight_to_device(key, device_to=patched.load_device, return_weight=True)
        assert_fp8_merged(fp8, key, codes.cpu(), expected)
    assert patched.backup == {}
    for key, value in patched.model.state_dict().items():
        assert torch.equal(value, fp8.codes[key]), f"{key} changed by a read"
