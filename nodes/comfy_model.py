"""The engine's transformer as a ComfyUI model: model management, LoRA patching and native samplers apply.

ComfyUI manages a model through a ModelPatcher around a `comfy.model_base.BaseModel`. ZImageModel is a
BaseModel of ComfyUI's Lumina2/Z-Image family whose `diffusion_model` is the engine's S3DiT. Because the
engine's weight names are ComfyUI's own, ComfyUI's Z-Image LoRA key map, weight patching and lowvram
offloading address it exactly as they address the native model.
"""

from __future__ import annotations

import copy
import weakref

import torch

import comfy.conds
import comfy.float
import comfy.lora
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.ops
import comfy.supported_models
import comfy.weight_adapter

from ..zimage import E4M3, E4M3_MAX, Fp8Linear, Ops, QuantizedLinear, RMSNorm, Runner, S3DiT
from ..zimage.ggml import dequantize
from .controlnet import control_patches, engine_hints, is_control_patch
from .reference_images import REFERENCE_KEYS, omni_inputs, reference_conds


class ZImageModel(comfy.model_base.Lumina2):
    def __init__(self, model_config, runner: Runner, device=None):
        super().__init__(model_config, device=device)  # unet_config disables ComfyUI's own NextDiT
        # the network is the diffusion model ComfyUI manages (loads, offloads, patches); the runner runs it
        self.diffusion_model = runner.model
        self.runner = runner

    def extra_conds(self, **kwargs):
        # reference images (TextEncodeZImageOmni, ZImageEdit) are read here on every ComfyUI version, not by
        # Lumina2's own code (0.14 and later), whose SigLIP reshape assumes 16-pixel patches
        extras = {key: kwargs.pop(key) for key in REFERENCE_KEYS if key in kwargs}
        out = super().extra_conds(**kwargs)
        try:
            conds = reference_conds(extras, self.process_latent_in)
        except ValueError as e:
            raise ValueError(f"Z-Image reference images: {e}") from None
        out.update({name: comfy.conds.CONDList(tensors) for name, tensors in conds.items()})
        return out

    def memory_required(self, input_shape, cond_shapes={}):
        # under partial loading the engine streams the blocks ComfyUI left on the CPU through two buffers of
        # a block each (zimage/streaming.py): room for them besides the activations
        block = self.diffusion_model.layers[0]
        return super().memory_required(input_shape, cond_shapes) + 2 * sum(p.nbytes for p in block.parameters())

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        refuse_unhonoured(unhonoured_in_forward(transformer_options, control), "KSampler")
        # t is sigma here; the engine takes sigma itself, whatever timestep scaling a sampling patch sets
        sigma = t
        # the conditioning arrives where the text encoder left it (ComfyUI's own models cast it in _apply_model)
        captions = caption_features(c_crossattn.to(x.device), kwargs.get("attention_mask"))
        references = None
        if "ref_latents" in kwargs:  # Omni: extra_conds' lists, batched by ComfyUI
            conds = {k: [t.to(x.device) for t in kwargs[k]] for k in ("ref_latents", "siglip_feats", "ref_contexts")}
            captions, references = omni_inputs(captions, conds)
        # the Fun ControlNet nodes' patches: the engine runs them (nodes/controlnet.py)
        patches = control_patches(transformer_options)
        control = engine_hints(patches, self.runner.cfg, x.shape, x.device) if patches else None
        v = self.runner(self.model_sampling.calculate_input(sigma, x), sigma.float(), captions, references=references,
                        control=control)
        return self.model_sampling.calculate_denoised(sigma, v.float(), x)


def unhonoured_in_forward(transformer_options: dict, control=None) -> list[str]:
    """What a sampler hands the diffusion model that the engine does not apply: block patches and replacements
    other than the Fun ControlNets' (which the engine runs, nodes/controlnet.py), wrappers around the diffusion model
    itself, and a classic ControlNet's residuals. Empty when there is none."""
    found = []
    for kind in ("patches", "patches_replace"):
        for name, entries in (transformer_options.get(kind) or {}).items():
            if any(not is_control_patch(entry) for entry in entries):
                found.append(f"{kind}[{name!r}]")
    wrappers = (transformer_options.get("wrappers") or {}).get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL) or {}
    found += [wrapper_name(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, key)
              for key, functions in wrappers.items() if functions]
    if control is not None:
        found.append("ControlNet residuals (a ControlNet applied to the conditioning)")
    return found


def wrapper_name(kind: str, key: str) -> str:
    return f"a {kind.replace('_', '-')} wrapper {key!r}"


def refuse_unhonoured(found: list[str], sampler: str, alternative: str = "load the model with ComfyUI's own "
                      "UNETLoader to use them") -> None:
    if found:
        raise ValueError(f"{sampler}: this Z-Image model carries {'; '.join(found)}, which {sampler} on the "
                         f"comfyui-zimage engine does not apply: the result would silently ignore them. They come from "
                         f"nodes between the loader and the sampler (ControlNet or model-patch nodes such as "
                         f"ZImageFunControlnet, guidance, attention or caching nodes): remove them, or {alternative}.")


def caption_features(context: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """ComfyUI conditioning [B, L, D] (+ mask [B, L]) -> the engine's list of unpadded [L_i, D] captions."""
    if attention_mask is None:
        return list(context.unbind(0))
    mask = attention_mask.to(device=context.device, dtype=torch.bool)
    return [c[m] for c, m in zip(context, mask)]


class ComfyFp8Linear(Fp8Linear):
    """An Fp8Linear as ComfyUI's weight patcher sees it (its convert_/set_ hooks for quantized weights): a LoRA
    patch applies to the real weight, codes times row scales, and is written back on the same row scales, so
    that the patcher's backup of the codes alone restores the layer. A LoRA's change is often smaller than one
    e4m3 step, so it is rounded stochastically (as ComfyUI rounds its own fp8 weights): kept on average.

    The hooks take the keywords of ComfyUI's own quantized ops. Since 0.14 the patcher can be asked for a
    patched weight without setting it (patch_weight_to_device(return_weight=True), through which its model
    saving reads cast weights): set_weight then returns the codes on the unchanged row scales, as the state
    dict holds them, and leaves the layer alone. **kwargs: keywords later versions add."""

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        return weight * self.weight_scale.to(weight)

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False,
                   **kwargs) -> torch.Tensor | None:
        scaled = (weight / self.weight_scale.to(weight)).clamp(-E4M3_MAX, E4M3_MAX)
        codes = comfy.float.stochastic_rounding(scaled, E4M3, seed=seed or 0)
        if return_weight:
            return codes
        if inplace_update:
            self.weight.data.copy_(codes)
        else:
            self.weight = torch.nn.Parameter(codes, requires_grad=False)


class ComfyQuantizedLinear(QuantizedLinear, comfy.ops.CastWeightBiasOp):
    """A GGUF file's block-quantized matrix (zimage.QuantizedLinear) as ComfyUI's weight patcher sees it. Its bytes
    cannot hold a LoRA'd matrix, so a LoRA applies at each use instead: the matrix dequantized to float32, patched
    by ComfyUI's own calculate_weight, then cast to the compute dtype.

    Which patches apply follows the patcher's own bookkeeping, so that each applies exactly once:
    - when the patcher merges a patch (patch_weight_to_device, a module loaded whole), it computes the patched
      matrix through convert_weight and hands it to set_weight, the hooks of ComfyUI's quantized ops. set_weight
      keeps the bytes and marks the weight as merged: the weight Parameter is replaced by a new one on the same
      bytes, and the patch applies while that Parameter is the layer's. The patcher's unpatch (and its partial
      unload) restores its backup as another Parameter, which ends it. attach_quantized_patches (ON_LOAD) gives the
      merged layer the patcher's patches for its key, their tensors moved once to where its bytes are (on the GPU
      they are read in place, so a CUDA graph captures the patch with the matrix);
    - a module the patcher leaves in host memory (lowvram) gets ComfyUI's LowVramPatch in weight_function
      instead, computed per use as for every castable op; weight_function's other entries (weight wrappers)
      apply too, after the merged patch.
    0.14's patch_weight_to_device(return_weight=True) gets the patched float matrix from set_weight. Weight hooks
    (Create Hook LoRA), which write a patched weight into the layer in place, are refused."""

    merged_patch = None  # the merging patcher's patches of this weight (attach_quantized_patches), or None
    _merged = None  # weakref to the weight Parameter a merge left, whose presence says the patch applies

    def convert_weight(self, weight: torch.Tensor, inplace: bool = False, **kwargs) -> torch.Tensor:
        """The patcher's float copy of the stored bytes (each value exact in any float dtype) -> the matrix they
        stand for, float32 [out_features, in_features]."""
        return dequantize(weight.to(torch.uint8), self.qtype, torch.float32)

    def set_weight(self, weight: torch.Tensor, inplace_update: bool = False, seed=None, return_weight: bool = False,
                   **kwargs) -> torch.Tensor | None:
        if return_weight:
            return weight
        if inplace_update:
            raise ValueError("a weight hook (Create Hook LoRA and the hook nodes) patches weights in place, which a "
                             "GGUF model's quantized matrices cannot hold. Apply the LoRA with ZImageLoraLoader or "
                             "LoraLoaderModelOnly, or load the safetensors model for hooks.")
        self.weight = torch.nn.Parameter(self.weight.data, requires_grad=False)
        self._merged = weakref.ref(self.weight)

    def patches_at_use(self) -> list:
        """The callables that patch the float32 matrix at this use, in order."""
        functions = list(self.weight_function)
        merged = self._merged is not None and self._merged() is self.weight
        host_patched = any(isinstance(f, comfy.model_patcher.LowVramPatch) for f in functions)
        if merged and self.merged_patch is not None and not host_patched:
            functions.insert(0, self.merged_patch)
        return functions

    def weight_and_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        patches = self.patches_at_use()
        if not patches and not self.bias_function:
            return super().weight_and_bias(x)
        weight = self.dequantized(torch.float32, x.device)
        for patch in patches:
            weight = patch(weight)
        bias = None if self.bias is None else self.bias.to(x)
        for patch in self.bias_function:
            bias = patch(bias)
        return weight.to(x.dtype), bias


class QuantizedWeightPatch:
    """A patcher's patches of one quantized weight, applied to the dequantized matrix at each use as ComfyUI's
    LowVramPatch applies them, with their tensors on `device` (copied once, not at every use)."""

    def __init__(self, key: str, patches: list, device: torch.device):
        self.key = key
        self.patches = _on_device(patches, device)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return comfy.lora.calculate_weight(self.patches, weight, self.key, intermediate_dtype=weight.dtype)


def _on_device(value, device: torch.device):
    """A patch list (entries of tensors, weight adapters and nested tuples) with its tensors on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, comfy.weight_adapter.WeightAdapterBase):
        moved = copy.copy(value)
        moved.weights = _on_device(value.weights, device)
        return moved
    if isinstance(value, (list, tuple)):
        return type(value)(_on_device(v, device) for v in value)
    return value


def attach_quantized_patches(patcher, device_to=None, *args) -> None:
    """ON_LOAD: each quantized layer gets the loading patcher's patches of its weight (ComfyQuantizedLinear), or
    none; the CUDA graphs, captured with the patches before, are dropped."""
    for name, module in patcher.model.named_modules():
        if isinstance(module, ComfyQuantizedLinear):
            key = name + ".weight"
            patches = patcher.patches.get(key)
            module.merged_patch = QuantizedWeightPatch(key, patches, module.weight.device) if patches else None
    release_graphs(patcher)


def detach_quantized_patches(patcher, *args) -> None:
    """ON_DETACH: the patches' copies on the GPU go with the model's weights."""
    for module in patcher.model.modules():
        if isinstance(module, ComfyQuantizedLinear):
            module.merged_patch = None


class ComfyRMSNorm(RMSNorm, comfy.ops.CastWeightBiasOp):
    """The engine's RMSNorm, castable as ComfyUI's own norms are: lowvram may leave its weight in host memory,
    and a LoRA may patch it at each use. Its weight is cast and patched the way ComfyUI's ops do it, in
    weight_for, through which the engine's fused kernels read it too."""

    bias = None

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        if self.comfy_cast_weights or self.weight_function:
            return comfy.ops.cast_bias_weight(self, x)[0]
        return self.weight


def _manual_cast(storage_dtype: torch.dtype | None, compute_dtype: torch.dtype) -> torch.dtype | None:
    """ComfyUI's name for weights stored in one dtype and computed in another: the dtype they are cast to."""
    return compute_dtype if storage_dtype is not None and storage_dtype != compute_dtype else None


def comfy_ops(storage_dtype: torch.dtype | None, compute_dtype: torch.dtype) -> Ops:
    """The layer classes a transformer is built with to be managed by ComfyUI: its own castable Linear (cast at
    each use when lowvram partial loading leaves a weight in host memory, or when the weights are stored in
    storage_dtype and computed in compute_dtype), ComfyRMSNorm, ComfyFp8Linear and ComfyQuantizedLinear."""
    ops = comfy.ops.pick_operations(storage_dtype or compute_dtype, _manual_cast(storage_dtype, compute_dtype))
    return Ops(Linear=ops.Linear, RMSNorm=ComfyRMSNorm, Fp8Linear=ComfyFp8Linear, QuantizedLinear=ComfyQuantizedLinear)


def comfy_model(transformer: S3DiT, storage_dtype: torch.dtype | None = None, cuda_graphs: bool = False,
                compile: bool = False) -> comfy.model_patcher.ModelPatcher:
    """Hand a loaded S3DiT to ComfyUI's model management: built with comfy_ops(storage_dtype, its compute dtype),
    on the offload device, in its compute dtype. storage_dtype float8_e4m3fn then keeps the blocks' matrices in
    fp8, each cast to the compute dtype as it is used (ComfyUI's manual cast), halving their memory.
    cuda_graphs, compile: how its forwards run (zimage.Runner)."""
    cfg = transformer.cfg
    compute_dtype = transformer.dtype
    if transformer.ops != comfy_ops(storage_dtype, compute_dtype):
        raise ValueError("the transformer must be built with comfy_ops(storage_dtype, compute_dtype): ComfyUI casts, "
                         "offloads and patches its layers")
    manual_cast = _manual_cast(storage_dtype, compute_dtype)
    if manual_cast is not None:
        for stack in transformer.block_stacks():
            for module in stack.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight = torch.nn.Parameter(module.weight.data.to(storage_dtype), requires_grad=False)

    model = ZImageModel(model_config_of(cfg, storage_dtype or compute_dtype, manual_cast),
                        Runner(transformer, cuda_graphs=cuda_graphs, compile=compile), device=mm.unet_offload_device())
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    # ComfyUI's own samplers end with cleanup(): free the CUDA graphs and streaming buffers there, as
    # ZImageSampler does
    patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, release_buffers)
    if any(isinstance(m, ComfyQuantizedLinear) for m in transformer.modules()):
        patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_LOAD, attach_quantized_patches)
        patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH, detach_quantized_patches)
    return patcher


def model_config_of(cfg, dtype: torch.dtype, manual_cast: torch.dtype | None):
    """ComfyUI's Z-Image model config for a transformer of this shape (its own NextDiT never built)."""
    unet_config = {"image_model": "lumina2", "disable_unet_model_creation": True, "dim": cfg.dim,
                   "n_layers": cfg.n_layers, "n_refiner_layers": cfg.n_refiner_layers, "n_heads": cfg.n_heads,
                   "cap_feat_dim": cfg.cap_feat_dim}
    model_config = comfy.supported_models.ZImage(unet_config)
    model_config.set_inference_dtype(dtype, manual_cast)
    return model_config


class WeightsElsewhere(torch.nn.Module):
    """Stands in for the network ComfyUI expects a model to hold, where the weights live in worker processes:
    no parameters, and the dtype they compute in."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype


class ZImageAcrossModel(ZImageModel):
    """A Z-Image model whose forwards run in worker processes on other devices (zimage.WorkerRunner): ComfyUI's
    sampling, previews and interruption run here as for any model; this process holds none of its weights, so
    ComfyUI's model management has nothing of it to load or offload."""

    def __init__(self, model_config, runner, dtype: torch.dtype, device=None):
        comfy.model_base.Lumina2.__init__(self, model_config, device=device)
        self.diffusion_model = WeightsElsewhere(dtype)
        self.runner = runner

    def memory_required(self, input_shape, cond_shapes={}):
        return 0  # this process only hands the latents over

    def state_dict(self, *args, **kwargs):
        """The network's weight names, each with an empty tensor: LoRA loaders map a file's keys onto these names
        (ComfyUI's own through comfy.lora.model_lora_keys_unet), so that a LoRA reaches add_patches, which refuses
        it (AcrossGPUsPatcher), rather than its keys being dropped as not found."""
        with torch.device("meta"):
            names = [name for name, _ in S3DiT(self.runner.cfg).named_parameters()]
        return {f"diffusion_model.{name}": torch.empty(0) for name in names}


class AcrossGPUsPatcher(comfy.model_patcher.ModelPatcher):
    """The ModelPatcher of a model across GPUs: its weights live in the workers, so a weight patch (a LoRA from
    any loader, ComfyUI's own included) is refused where it is added, instead of ComfyUI dropping its keys as not
    found with a line in the log. Its clones (each LoRA node makes one) are of this class too."""

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        if patches:
            raise ValueError("LoRAs (and other weight patches) do not apply to a model across GPUs yet: its weights "
                             "live in its worker processes. Load the model with ZImageLoader on one GPU to use them.")
        return []


def comfy_model_across(runner, compute_dtype: torch.dtype) -> comfy.model_patcher.ModelPatcher:
    """Hand a model whose forwards run in worker processes (zimage.WorkerRunner) to ComfyUI as a MODEL."""
    model = ZImageAcrossModel(model_config_of(runner.cfg, compute_dtype, None), runner, compute_dtype,
                              device=mm.unet_offload_device())
    patcher = AcrossGPUsPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    patcher.add_callback(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, release_buffers)
    return patcher


def release_buffers(patcher) -> None:
    patcher.model.runner.release_buffers()


def release_graphs(patcher) -> None:
    graphs = patcher.model.runner.graphs
    if graphs is not None:
        graphs.clear()


def engine_of(model_patcher) -> Runner:
    """The engine that runs a MODEL from ZImageLoader (its network is .model), or a clear error for any other."""
    inner = getattr(model_patcher, "model", None)
    if not isinstance(inner, ZImageModel):
        raise ValueError(f"this node needs a Z-Image model from the ZImageLoader node, got "
                         f"{type(inner).__name__ if inner is not None else type(model_patcher).__name__}. "
                         f"For other models use ComfyUI's KSampler.")
    return inner.runner
