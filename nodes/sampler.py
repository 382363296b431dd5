"""ZImageSampler: the engine's flow-matching sampler with ComfyUI's progress bar, previews and interruption."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import comfy.model_management as mm
import latent_preview

from ..zimage import PRESETS, flow_sigmas, make_noise, sample
from ..zimage.sampler import SAMPLERS, check_mask
from .checks import require_finite
from .comfy_model import caption_features, engine_of, refuse_unhonoured, unhonoured_in_forward, wrapper_name
from .controlnet import control_patches, engine_hints
from .reference_images import omni_inputs, reference_conds

PRESET_CHOICES = [*PRESETS, "custom"]
# what choosing a preset writes into the widgets (the graph editor does it, web/zimage.js)
PRESET_WIDGETS = {name: {"steps": p.steps, "cfg": p.guidance, "shift": p.shift, "cfg_normalization": p.cfg_normalization,
                         "cfg_truncation": p.cfg_truncation} for name, p in PRESETS.items()}


# what sampler-level nodes put into a MODEL's options for ComfyUI's own samplers (CFG functions from guidance
# nodes, model wrappers, inpainting mask functions): ZImageSampler runs the engine's loop, which applies none of them
SAMPLER_OPTIONS = ("sampler_cfg_function", "sampler_pre_cfg_function", "sampler_post_cfg_function",
                   "sampler_calc_cond_batch_function", "model_function_wrapper", "denoise_mask_function")


def unhonoured_by_engine_loop(model, shift: float) -> list[str]:
    """What a MODEL asks of a sampler that ZImageSampler does not do; empty when it carries nothing of the kind.
    LoRA weight patches are honoured (ComfyUI merges them when it loads the model); so is a ModelSamplingAuraFlow
    whose shift is the sampler's own."""
    options = model.model_options
    found = unhonoured_in_forward(options.get("transformer_options") or {})
    found += [f"model option {key!r}" for key in SAMPLER_OPTIONS if options.get(key)]
    found += [wrapper_name(kind, key) for kind, by_key in model.wrappers.items()
              for key, functions in by_key.items() if functions]
    for name, patch in model.object_patches.items():
        patched_shift = getattr(patch, "shift", None) if name == "model_sampling" else None
        if patched_shift is None:
            found.append(f"a replaced {name!r}")
        elif abs(patched_shift - shift) > 1e-6:
            found.append(f"a model sampling shift of {patched_shift:g} (ModelSamplingAuraFlow) where this sampler "
                         f"uses shift {shift:g}; set the same shift in both")
    return found


def prompt_inputs(conditioning, batch: int, width: int, what: str, process_latent_in):
    """CONDITIONING -> (one caption per latent, one reference list per latent or None). A caption is a [L, width]
    tensor; with reference images (ZImageEdit, TextEncodeZImageOmni) it is the list of chunks around them."""
    captions = conditioning_captions(conditioning, batch, width, what)
    try:
        conds = reference_conds(conditioning[0][1], process_latent_in)
    except ValueError as e:
        raise ValueError(f"ZImageSampler: the {what} conditioning's reference images: {e}") from None
    return omni_inputs(captions, conds) if conds else (captions, None)


def same_references(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x.latent, y.latent) and torch.equal(x.siglip, y.siglip)
                                    for x, y in zip(a, b))


def conditioning_captions(conditioning, batch: int, width: int, what: str) -> list[torch.Tensor]:
    """CONDITIONING (from ZImageTextEncode or CLIPTextEncode) -> one [L, width] caption per latent in the batch."""
    if not conditioning:
        raise ValueError(f"the {what} conditioning is empty")
    if len(conditioning) != 1:
        raise ValueError(f"the {what} conditioning holds {len(conditioning)} entries (combined or area conditioning); "
                         f"ZImageSampler takes one prompt per side. Use KSampler for combined conditioning.")
    context, extras = conditioning[0]
    if context.shape[-1] != width:
        raise ValueError(f"the {what} conditioning is {context.shape[-1]} wide, Z-Image needs {width} (Qwen3-4B). "
                         f"Encode the prompt with qwen_3_4b.safetensors (CLIPLoader, type lumina2).")
    captions = caption_features(context, extras.get("attention_mask"))
    if len(captions) == batch:
        return captions
    if len(captions) == 1:
        return captions * batch
    raise ValueError(f"the {what} conditioning has {len(captions)} prompts for a batch of {batch} latents")


def latent_mask(noise_mask: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A LATENT's noise_mask (SetLatentNoiseMask, VAEEncodeForInpaint, InpaintModelConditioning: [H, W], [B, H, W]
    or [B, 1, H, W], at pixel or latent size) -> the engine's mask for latents of `shape`: [B, 1, h, w], resized
    bilinearly to the latent and repeated over the batch, as KSampler does. One mask serves every latent, or one
    per latent; a batch of latents that is a whole number of repeats of the masks' batch gets them tiled (what
    KSampler does); other counts are refused, as are masks of another layout."""
    if not isinstance(noise_mask, torch.Tensor) or noise_mask.ndim not in (2, 3, 4) or (
            noise_mask.ndim == 4 and noise_mask.shape[1] != 1) or 0 in noise_mask.shape:
        layout = list(noise_mask.shape) if isinstance(noise_mask, torch.Tensor) else type(noise_mask).__name__
        raise ValueError(f"ZImageSampler: the latent's noise_mask is {layout}; it must be a MASK: [height, width], "
                         f"[batch, height, width] or [batch, 1, height, width]. Set it with SetLatentNoiseMask from a "
                         f"MASK (LoadImage's mask output, or a mask node).")
    masks = noise_mask.reshape(-1, 1, *noise_mask.shape[-2:]).float().cpu()
    batch = shape[0]
    if batch % masks.shape[0]:
        raise ValueError(f"ZImageSampler: the latent's noise_mask holds {masks.shape[0]} masks for {batch} latents; "
                         f"give one mask for all, or one per latent.")
    masks = F.interpolate(masks, size=tuple(shape[2:]), mode="bilinear")
    return masks.repeat(batch // masks.shape[0], 1, 1, 1)


def batch_indices(latent: dict, batch: int) -> list[int] | None:
    """A LATENT's batch_index (LatentFromBatch, RepeatLatentBatch, ...): which entries of the batch it came from its
    latents are, so that each gets the noise KSampler gives that entry. None when it has none."""
    indices = latent.get("batch_index")
    if indices is None:
        return None
    indices = list(indices)
    if len(indices) != batch or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise ValueError(f"ZImageSampler: the latent's batch_index is {indices} for {batch} latents; it must hold one "
                         f"whole number >= 0 per latent. Make the batch with LatentFromBatch or RepeatLatentBatch, "
                         f"or drop the entry.")
    return indices


class ZImageSampler:
    DESCRIPTION = ("Samples Z-Image with the engine's flow-matching sampler (euler or res_multistep), with the steps, "
                   "cfg and shift its widgets show. Choosing a preset fills them in: turbo (the official recipe: 8 "
                   "evaluations, shift 3, no CFG) or base (50 steps, CFG 4 with a negative prompt). Inpaints where the "
                   "latent carries a noise mask, as KSampler does, and runs the Fun ControlNets that ZImageFunControlnet or "
                   "QwenImageDiffsynthControlnet put on the model. Returns a LATENT for ComfyUI's VAEDecode.")
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent; decode it with VAEDecode and the FLUX VAE.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Z-Image model from ZImageLoader (LoRAs applied or not, a Fun "
                                                "ControlNet applied or not)."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt, from ZImageTextEncode or CLIPTextEncode."}),
                "latent": ("LATENT", {"tooltip": "ZImageLatent for text-to-image, or VAEEncode of an image with "
                                                 "denoise below 1 for image-to-image. For inpainting, a latent with "
                                                 "a noise mask (SetLatentNoiseMask, VAEEncodeForInpaint, "
                                                 "InpaintModelConditioning): only the masked part is sampled, the "
                                                 "rest stays the input's, as with KSampler (the mask is resized to the "
                                                 "latent and repeated over the batch). A batch_index (LatentFromBatch) "
                                                 "gives each latent the noise KSampler gives that batch entry."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "Noise seed; draws the same noise as KSampler for the same latent."}),
                "preset": (PRESET_CHOICES, {"default": "turbo", "presets": PRESET_WIDGETS, "tooltip":
                           "Fills in steps, cfg, shift, cfg_normalization and cfg_truncation. turbo: 8 steps, shift 3, "
                           "cfg 0 (Z-Image-Turbo's official recipe, its 9 sigmas give 8 model evaluations). base: 50 "
                           "steps, shift 3, cfg 4. Changing one of those widgets makes it custom. The sampler always "
                           "uses the widgets' values."}),
                "steps": ("INT", {"default": 8, "min": 1, "max": 200,
                                  "tooltip": "Model evaluations (each doubled when cfg > 0)."}),
                "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 30.0, "step": 0.1, "round": 0.01, "tooltip":
                        "Guidance as the official pipelines define it: v_pos + cfg * (v_pos - v_neg); 0 turns it off "
                        "(one pass per step). KSampler's cfg is this + 1."}),
                "shift": ("FLOAT", {"default": 3.0, "min": 0.1, "max": 20.0, "step": 0.1,
                                    "tooltip": "Sigma schedule shift; higher spends more steps at high noise."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                            "1 starts from pure noise. Below 1 starts part way from the input latent (image-to-image), "
                            "running the last steps of a steps/denoise schedule, as KSampler does."}),
                "cfg_normalization": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
                                      "0 is off. k > 0 caps the guided prediction's norm at k times the positive "
                                      "prediction's (the official pipelines' cfg_normalization=True is 1)."}),
                "cfg_truncation": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                   "1 is off. Below 1, guidance stops once 1 - sigma exceeds this, saving the "
                                   "negative pass on the last steps."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt; needed when cfg > 0."}),
                # optional and last: saved workflows store widget values by position and predate it; they load
                # with the default, euler, which is what they ran with
                "sampler": (list(SAMPLERS), {"default": "euler", "tooltip":
                            "euler: first-order steps, as the official pipelines sample. res_multistep: a second-order "
                            "multistep method (the official ComfyUI templates' choice), at the same cost of one "
                            "evaluation per step. Each takes the same steps as KSampler's sampler of that name."}),
            },
        }

    def sample(self, model, positive, latent, seed, preset, steps, cfg, shift, denoise, cfg_normalization,
               cfg_truncation, negative=None, sampler="euler"):
        transformer = engine_of(model)
        require_finite("ZImageSampler", cfg=cfg, shift=shift, denoise=denoise, cfg_normalization=cfg_normalization,
                       cfg_truncation=cfg_truncation)
        # preset is the graph editor's shortcut (web/zimage.js fills the widgets from PRESET_WIDGETS): the values
        # run are the widgets', as the user sees them
        refuse_unhonoured(unhonoured_by_engine_loop(model, shift), "ZImageSampler",
                          "sample with KSampler, which applies sampler options and wrappers (not block patches)")
        samples = latent["samples"]
        if samples.ndim != 4 or samples.shape[1] != transformer.cfg.in_channels:
            raise ValueError(f"ZImageSampler: the latent is {list(samples.shape)}; Z-Image needs 16-channel latents "
                             f"(ZImageLatent, or VAEEncode with the FLUX VAE ae.safetensors).")
        if sampler not in SAMPLERS:
            raise ValueError(f"ZImageSampler: unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)} "
                             f"(use KSampler for ComfyUI's other samplers).")
        if samples.shape[2] % 2 or samples.shape[3] % 2:
            raise ValueError(f"ZImageSampler: the image is {samples.shape[3] * 8}x{samples.shape[2] * 8}; Z-Image needs "
                             f"sides that are multiples of 16. Resize or crop the image first.")
        if denoise == 0:
            return ({**latent, "samples": samples.clone()},)
        if cfg > 0 and negative is None:
            raise ValueError("ZImageSampler: cfg > 0 needs the negative input (ZImageTextEncode's negative output; an "
                             "empty negative prompt is the usual choice).")
        batch, width = samples.shape[0], transformer.cfg.cap_feat_dim
        noise = make_noise(seed, tuple(samples.shape), batch_indices(latent, batch))
        mask = latent_mask(latent["noise_mask"], samples.shape) if latent.get("noise_mask") is not None else None
        if mask is not None:
            try:
                check_mask(mask, noise, samples)
            except ValueError as e:
                raise ValueError(f"ZImageSampler: the latent's noise_mask: {e}") from None
        process_in = model.model.process_latent_in
        positive_caps, references = prompt_inputs(positive, batch, width, "positive", process_in)
        negative_caps = None
        if cfg > 0:
            negative_caps, negative_references = prompt_inputs(negative, batch, width, "negative", process_in)
            # the engine runs both passes with one set of references, as the official pipeline does
            if (references is None) != (negative_references is None) or (
                    references is not None and not same_references(references[0], negative_references[0])):
                raise ValueError("ZImageSampler: the positive and negative conditioning carry different reference "
                                 "images. Connect ZImageEdit's negative output with its positive (or encode the "
                                 "negative with TextEncodeZImageOmni and the same images, or ConditioningZeroOut of "
                                 "the positive).")
        sigmas = flow_sigmas(steps, shift, denoise)

        # room for the activations, as ComfyUI's own samplers ask for it (one forward of 2B when guided)
        evaluated = [batch * (2 if cfg > 0 else 1), *samples.shape[1:]]
        mm.load_models_gpu([model], memory_required=model.model.memory_required(evaluated),
                           minimum_memory_required=model.model.memory_required([batch, *samples.shape[1:]]))
        start = None
        if denoise < 1 or mask is not None:
            # an all-zero latent is an empty one, used as it is (KSampler does not shift it either)
            start = model.model.process_latent_in(samples.float()) if samples.any() else samples.float()
        # the Fun ControlNet nodes' patches (ModelPatchLoader's module, loaded above with the model): the engine runs
        # them in its loop as it does under KSampler (nodes/controlnet.py)
        patches = control_patches(model.model_options.get("transformer_options") or {})
        control = engine_hints(patches, transformer.cfg, samples.shape, model.load_device) if patches else None
        preview = latent_preview.prepare_callback(model, steps)

        def on_step(step, x0, x):
            preview(step, x0, x, steps)
            mm.throw_exception_if_processing_interrupted()

        out = sample(transformer, noise, sigmas, positive_caps, negative_caps, guidance=cfg,
                     cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation, latent=start,
                     callback=on_step, device=model.load_device, references=references, mask=mask, sampler=sampler,
                     control=control)
        out = model.model.process_latent_out(out.to(mm.intermediate_device()))
        return ({**latent, "samples": out},)
