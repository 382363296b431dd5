"""ZImageEdit: registered with its inputs; it refuses to run until instruction editing is implemented."""

from __future__ import annotations


class ZImageEdit:
    DESCRIPTION = ("Instruction editing with Z-Image-Edit / Omni-Base (source image + instruction). "
                   "Not implemented yet: running it raises an error instead of pretending.")
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("CONDITIONING", "LATENT")
    RETURN_NAMES = ("conditioning", "latent")
    OUTPUT_TOOLTIPS = ("Conditioning carrying the reference image.", "A latent of the reference image's size.")
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A Z-Image-Edit or Omni-Base model from ZImageLoader."}),
            "conditioning": ("CONDITIONING", {"tooltip": "The instruction, from ZImageTextEncode."}),
            "image": ("IMAGE", {"tooltip": "The image to edit (the reference)."}),
            "vae": ("VAE", {"tooltip": "The FLUX VAE (ae.safetensors) that encodes the reference image."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                   "tooltip": "How much the reference image guides the result."}),
        }}

    def edit(self, model, conditioning, image, vae, strength):
        raise NotImplementedError("ZImageEdit is not implemented yet: instruction editing with Z-Image-Edit / "
                                  "Omni-Base is coming in a later version. For image-to-image, encode the image "
                                  "with VAEEncode and use ZImageSampler with denoise below 1.")
