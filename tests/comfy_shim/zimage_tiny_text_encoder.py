"""Test-only ComfyUI custom node (never shipped with the pack): a tiny Qwen3 text encoder.

ComfyUI builds Qwen3-4B from a hard-coded config (hidden 2560, 36 layers, a 151936-token vocabulary) and
recognises its file by that hidden size. A random 4B file is 8 GB, so the test server shrinks the config
and recognises the shrunken file as Qwen3-4B. Everything else (CLIPLoader, tokenizer, chat template,
hidden-state selection, attention masks) is ComfyUI's own code, unchanged.
"""

import dataclasses

import comfy.sd
import comfy.text_encoders.llama as llama

TINY_HIDDEN = 32


@dataclasses.dataclass
class TinyQwen3Config(llama.Qwen3_4BConfig):
    hidden_size: int = TINY_HIDDEN
    intermediate_size: int = 64
    num_hidden_layers: int = 3
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    head_dim = 16


def install():
    if getattr(comfy.sd.detect_te_model, "tiny_qwen3", False):
        return
    original = comfy.sd.detect_te_model

    def detect_te_model(sd):
        norm = sd.get("model.layers.0.post_attention_layernorm.weight")
        if norm is not None and norm.shape[0] == TINY_HIDDEN and "model.layers.0.self_attn.q_norm.weight" in sd:
            return comfy.sd.TEModel.QWEN3_4B
        return original(sd)

    detect_te_model.tiny_qwen3 = True
    llama.Qwen3_4BConfig = TinyQwen3Config
    comfy.sd.detect_te_model = detect_te_model


install()
NODE_CLASS_MAPPINGS = {}
