"""ZImageVAEDecode: ComfyUI's VAE Decode for the FLUX VAE, run by the engine's decoder on the VAE's own weights.

The user's VAELoader output goes in as it is: ComfyUI loads and places the weights (its memory management, its
dtype choice), and the engine's decoder borrows the very Parameters of the loaded decoder, so nothing is held
twice. What the engine does not run (another VAE, a decoder left partly off the GPU, a batch that runs out of
memory) ComfyUI's own decode runs, which tiles where memory is short; the node says so in the log, once per VAE and reason.
"""

from __future__ import annotations

import logging
import weakref

import torch

import comfy.model_management as mm

from ..zimage import VAEDecoder

# ComfyUI's loaded autoencoder -> the engine's decoder on its Parameters, or why it has none
_DECODERS: "weakref.WeakKeyDictionary[torch.nn.Module, VAEDecoder | str]" = weakref.WeakKeyDictionary()
# each VAE's reasons already logged: once per reason, so that a second, different one is still said
_TOLD: "weakref.WeakKeyDictionary[torch.nn.Module, set[str]]" = weakref.WeakKeyDictionary()


def engine_decoder(vae) -> VAEDecoder | str:
    """The engine's decoder for ComfyUI's VAE object, or the reason ComfyUI's own decode runs it."""
    model = vae.first_stage_model
    if model not in _DECODERS:
        _DECODERS[model] = _build(model)
    return _DECODERS[model]


def _build(model: torch.nn.Module) -> VAEDecoder | str:
    # ComfyUI's AutoencodingEngine decodes as decoder(z); its other autoencoders add a post-quant convolution, a
    # latent batch norm or 3D convolutions, which the engine's decoder does not run
    if type(model).__name__ != "AutoencodingEngine" or not isinstance(getattr(model, "decoder", None), torch.nn.Module):
        return f"it is not a FLUX-type VAE ({type(model).__name__})"
    try:
        return VAEDecoder.lending(dict(model.decoder.named_parameters()))
    except ValueError as e:
        return str(e)


def _decode_natively(vae, latent: torch.Tensor, why: str) -> torch.Tensor:
    told = _TOLD.setdefault(vae.first_stage_model, set())
    if why not in told:
        told.add(why)
        logging.info(f"Z-Image VAE Decode: ComfyUI's own decoder runs this VAE, since {why}.")
    return vae.decode(latent)


class ZImageVAEDecode:
    DESCRIPTION = ("Decodes latents to images, as VAE Decode does, with the engine's faster decoder for the FLUX VAE "
                   "(ae.safetensors, Z-Image's): the same weights, channels_last convolutions and a fused GroupNorm "
                   "+ SiLU. Any other VAE, or one ComfyUI left partly in system memory, is decoded by ComfyUI itself.")
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded images.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "The latents to decode."}),
            "vae": ("VAE", {"tooltip": "The VAE from Load VAE: ae.safetensors for Z-Image."}),
        }}

    def decode(self, samples, vae):
        latent = samples["samples"]
        vae.throw_exception_if_invalid()
        decoder = engine_decoder(vae)
        if isinstance(decoder, str):
            return (_decode_natively(vae, latent, decoder),)
        if latent.ndim == 5:  # a one-frame video latent, as ComfyUI's decode takes it
            latent = latent[:, :, 0]
        if latent.ndim != 4 or latent.shape[1] != decoder.cfg.z_channels:
            raise ValueError(f"Z-Image VAE Decode: these latents have shape {tuple(latent.shape)}, where this VAE "
                             f"decodes [batch, {decoder.cfg.z_channels}, height, width]. Connect latents made for "
                             f"this VAE (a Z-Image or FLUX sampler's output).")
        memory = vae.memory_used_decode(latent.shape, vae.vae_dtype)
        mm.load_models_gpu([vae.patcher], memory_required=memory, force_full_load=vae.disable_offload)
        if any(p.device != vae.device for p in decoder.parameters()):
            return (_decode_natively(vae, latent, "ComfyUI left part of it off the GPU"),)
        per_pass = max(1, int(mm.get_free_memory(vae.device) / memory))
        try:
            images = torch.cat([
                # the output step ComfyUI's decode takes, in float32 as there, before leaving the GPU
                vae.process_output(decoder(latent[i:i + per_pass].to(vae.device, vae.vae_dtype)).float())
                .to(vae.output_device)
                for i in range(0, latent.shape[0], per_pass)])
        except mm.OOM_EXCEPTION:
            images = None  # decoded again below, once the exception no longer holds this attempt's tensors
        if images is None:
            return (_decode_natively(vae, latent, "it ran out of GPU memory (ComfyUI's decode tiles)"),)
        return (images.movedim(1, -1),)
