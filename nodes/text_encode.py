"""ZImageTextEncode: prompt (+ negative) -> Z-Image conditioning through ComfyUI's Qwen3-4B text encoder."""

from __future__ import annotations

import logging
import re
import weakref
from collections import OrderedDict

from ..zimage import CHAT_TEMPLATE

MAX_TOKENS = 512  # the official pipelines truncate the templated prompt here

TEMPLATES = {
    "official": CHAT_TEMPLATE,  # the released pipelines' (zimage/prompt.py)
    # the variant some packs use; an explicit choice, never the default
    "empty think block": CHAT_TEMPLATE + "<think>\n\n</think>\n\n",
}


def require_qwen3(clip, node: str) -> None:
    """A clear error for a missing or wrong text encoder, before anything is encoded with it."""
    if clip is None:
        raise ValueError(f"{node}: the clip input is empty; load qwen_3_4b.safetensors with ComfyUI's CLIPLoader "
                         f"(type lumina2).")
    if getattr(clip.tokenizer, "clip_name", None) != "qwen3_4b":
        raise ValueError(f"{node}: this CLIP is not Qwen3-4B. Load qwen_3_4b.safetensors with CLIPLoader and type "
                         f"lumina2.")


# Qwen's special tokens, as text: the tokenizer turns each into its single token wherever it stands, so a prompt
# that contains one writes into the chat template itself. The official pipelines tokenize the same way (their
# tokenizer splits special tokens out of the prompt too), so they are kept, with a warning.
SPECIAL_TOKEN_TEXT = re.compile(r"<\|[a-z_]+\|>|</?think>")


def check_prompt(text: str, what: str, node: str) -> str | None:
    """Refuse a prompt the tokenizer cannot read; a warning when it carries chat-template markers."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # a lone UTF-16 surrogate (a broken copy-paste or API client): the tokenizer would fail with a TypeError
        raise ValueError(f"{node}: the {what} holds a character that is not valid text ({text[e.start]!r} at position "
                         f"{e.start}, a lone surrogate from a broken copy-paste or client). Remove it and queue "
                         f"again.") from None
    markers = sorted(set(SPECIAL_TOKEN_TEXT.findall(text)))
    if markers:
        return (f"the {what} contains {', '.join(markers)}: Qwen reads each as its chat-template token, not as text "
                f"(as the official pipeline does)")
    return None


# Each text encoder's last few encodings: a workflow queued again with a new prompt encodes its unchanged negative
# prompt (usually the empty one) once, not every run. Kept while the CLIP object lives; keyed by all that changes the
# result: the text, the template, the layer the CLIP reads and its patches (a CLIP LoRA comes as a new CLIP, patches
# added in place change patches_uuid). CLIPs with hooks (scheduled conditioning) are never cached.
_encodings: "weakref.WeakKeyDictionary[object, OrderedDict]" = weakref.WeakKeyDictionary()
KEPT_ENCODINGS = 4


def encode(clip, text: str, llama_template: str) -> tuple[list, str | None]:
    """CONDITIONING for one text in `llama_template` (a format string), and a warning when it had to be cut to
    MAX_TOKENS."""
    patcher = getattr(clip, "patcher", None)
    if getattr(clip, "use_clip_schedule", False) or getattr(clip, "apply_hooks_to_conds", None):
        return _encode(clip, text, llama_template)
    key = (text, llama_template, getattr(clip, "layer_idx", None), getattr(patcher, "patches_uuid", None))
    kept = _encodings.setdefault(clip, OrderedDict())
    if key not in kept:
        kept[key] = _encode(clip, text, llama_template)
        while len(kept) > KEPT_ENCODINGS:
            kept.popitem(last=False)
    kept.move_to_end(key)
    return kept[key]


def _encode(clip, text: str, llama_template: str) -> tuple[list, str | None]:
    tokens = clip.tokenize(text, llama_template=llama_template)
    warning = None
    for name, batches in tokens.items():
        if batches and len(batches[0]) > MAX_TOKENS:
            warning = (f"prompt is {len(batches[0])} tokens with the chat template; Z-Image reads at most "
                       f"{MAX_TOKENS}, so the rest was cut: {text[:60]!r}...")
            tokens[name] = [batches[0][:MAX_TOKENS]] + batches[1:]
    return clip.encode_from_tokens_scheduled(tokens), warning


class ZImageTextEncode:
    DESCRIPTION = ("Encodes a prompt (Chinese or English) and an optional negative prompt with Qwen3-4B in Z-Image's "
                   "chat template, using the text encoder's second-to-last hidden state. At most 512 tokens are read.")
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("The prompt's conditioning.", "The negative prompt's conditioning (used when cfg > 0).")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "Qwen3-4B from ComfyUI's CLIPLoader (qwen_3_4b.safetensors, type lumina2)."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "What to draw."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                           "tooltip": "What to steer away from; only used by the sampler when cfg > 0."}),
            "template": (list(TEMPLATES), {"default": "official", "tooltip":
                         "official: the chat template of the released pipelines. 'empty think block' adds an empty "
                         "<think></think> block after the assistant tag, as some packs do."}),
        }}

    def encode(self, clip, prompt, negative_prompt, template):
        require_qwen3(clip, "ZImageTextEncode")
        checks = [check_prompt(prompt, "prompt", "ZImageTextEncode"),
                  check_prompt(negative_prompt, "negative prompt", "ZImageTextEncode")]
        positive, w1 = encode(clip, prompt, TEMPLATES[template])
        negative, w2 = encode(clip, negative_prompt, TEMPLATES[template])
        warnings = [w for w in (*checks, w1, w2) if w]
        for w in warnings:
            logging.warning("ZImageTextEncode: " + w)
        return {"ui": {"text": warnings}, "result": (positive, negative)}
