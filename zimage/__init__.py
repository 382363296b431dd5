"""comfyui-zimage's standalone Z-Image engine: plain PyTorch, safetensors and einops.

The whole public API:
    ZImageConfig, S3DiT                  the transformer and its shape
    Reference, omni_prompt_chunks        Omni-Base / Edit inputs: a reference image, the caption's chunks
    load_transformer, inspect_checkpoint the files users have (ComfyUI single file, diffusers folder, fp8)
    convert_state_dict, CheckpointError  key mapping, and the error every refused file raises
    read_safetensors_header              any safetensors file's tensors, its header checked against its size
    flow_sigmas, make_noise, sample,     the flow-matching sampler and
    PRESETS                              its Turbo and Base settings
"""

from .checkpoint import (CheckpointError, convert_state_dict, inspect_checkpoint, load_transformer,
                         read_safetensors_header)
from .config import ZImageConfig
from .model import S3DiT
from .omni import Reference, omni_prompt_chunks
from .sampler import PRESETS, flow_sigmas, make_noise, sample

__all__ = ["ZImageConfig", "S3DiT", "Reference", "omni_prompt_chunks", "load_transformer", "inspect_checkpoint",
           "convert_state_dict", "CheckpointError", "read_safetensors_header", "flow_sigmas", "make_noise", "sample",
           "PRESETS"]
