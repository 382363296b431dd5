"""comfyui-zimage's standalone Z-Image engine: plain PyTorch, safetensors and einops.

The whole public API:
    ZImageConfig, S3DiT                  the transformer's shape, and the network (parameters and math)
    Runner                               how its forwards run: layouts, CUDA graphs, streaming, compile, buffers
    SequenceShare, BatchShare            a process's share of a forward split across a torch.distributed group:
                                         of its tokens (sequence parallel), of its samples (CFG parallel)
    WorkerRunner, WorkerError            a model across devices: worker processes, one per device, that this process
                                         starts (torch.multiprocessing) and feeds
    load_transformer, inspect_checkpoint the files users have (ComfyUI single file, diffusers folder, fp8)
    convert_state_dict, CheckpointError  key mapping, and the error every refused file raises
    read_safetensors_header              any safetensors file's tensors, its header checked first
    source_keys, engine_key              the names files and LoRAs give an engine weight, and back (keys.RENAMES)
    flow_sigmas, make_noise, sample,     the flow-matching sampler and
    PRESETS                              its Turbo and Base settings
    CHAT_TEMPLATE, omni_prompt_chunks    the text the text encoder reads: the chat template, an Omni prompt's chunks
    Reference                            an Omni-Base / Edit reference image
    ControlNet, ControlConfig, ControlHints  the Fun ControlNets: the network, its shape, one forward's hints
    VAEDecoder, DecoderConfig            the FLUX VAE's decoder, run channels_last with fused GroupNorm + SiLU
    load_controlnet                      a Fun ControlNet file
For hosts that manage weights themselves (nodes/comfy_model.py):
    Ops, RMSNorm, Fp8Linear, E4M3, E4M3_MAX   the layer classes a network is built from, to subclass and give
    QuantizedLinear                           (a GGUF file's block-quantized matrices, dequantized at each use)
    ATTENTION_BACKENDS, scaled_mm_supported   the attention kernels to choose from; whether FP8 GEMMs run here
    fp8_attention_blocker                     why FP8 attention (load_transformer's fp8_attention) cannot run here
"""

from .attention import BACKENDS as ATTENTION_BACKENDS
from .blocks import Ops, RMSNorm
from .checkpoint import convert_state_dict, inspect_checkpoint, load_controlnet, load_transformer
from .config import ZImageConfig
from .control import ControlConfig, ControlHints, ControlNet
from .files import CheckpointError, read_safetensors_header
from .fp8 import E4M3, E4M3_MAX, Fp8Linear, scaled_mm_supported
from .fp8_attention import fp8_attention_blocker
from .keys import engine_key, source_keys
from .model import S3DiT
from .omni import Reference
from .quantized import QuantizedLinear
from .prompt import CHAT_TEMPLATE, omni_prompt_chunks
from .parallel import BatchShare, SequenceShare
from .runner import Runner
from .sampler import PRESETS, flow_sigmas, make_noise, sample
from .vae_decoder import DecoderConfig, VAEDecoder
from .workers import WorkerError, WorkerRunner

__all__ = ["ZImageConfig", "S3DiT", "Runner", "load_transformer", "inspect_checkpoint", "convert_state_dict",
           "CheckpointError", "read_safetensors_header", "source_keys", "flow_sigmas", "make_noise", "sample",
           "PRESETS", "CHAT_TEMPLATE", "omni_prompt_chunks", "Reference", "Ops", "RMSNorm", "Fp8Linear", "E4M3",
           "E4M3_MAX", "ATTENTION_BACKENDS", "scaled_mm_supported", "ControlNet", "ControlConfig", "ControlHints",
           "engine_key", "load_controlnet", "QuantizedLinear", "SequenceShare", "BatchShare", "WorkerRunner", "WorkerError",
           "fp8_attention_blocker", "VAEDecoder", "DecoderConfig"]
