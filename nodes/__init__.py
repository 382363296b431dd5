"""ComfyUI adapters for the zimage engine."""

from .across_gpus import ZImageLoaderAcrossGPUs
from .edit import ZImageEdit
from .latent import ZImageLatent
from .loader import ZImageLoader
from .lora import ZImageLoraLoader
from .sampler import ZImageSampler
from .text_encode import ZImageTextEncode
from .vae_decode import ZImageVAEDecode

NODE_CLASS_MAPPINGS = {
    "ZImageLoader": ZImageLoader,
    "ZImageLoaderAcrossGPUs": ZImageLoaderAcrossGPUs,
    "ZImageLoraLoader": ZImageLoraLoader,
    "ZImageTextEncode": ZImageTextEncode,
    "ZImageLatent": ZImageLatent,
    "ZImageSampler": ZImageSampler,
    "ZImageEdit": ZImageEdit,
    "ZImageVAEDecode": ZImageVAEDecode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "ZImageLoader": "Z-Image/Loader",
    "ZImageLoaderAcrossGPUs": "Z-Image/Loader Across GPUs",
    "ZImageLoraLoader": "Z-Image/LoRA Loader",
    "ZImageTextEncode": "Z-Image/Text Encode",
    "ZImageLatent": "Z-Image/Empty Latent",
    "ZImageSampler": "Z-Image/Sampler",
    "ZImageEdit": "Z-Image/Edit",
    "ZImageVAEDecode": "Z-Image/VAE Decode",
}
