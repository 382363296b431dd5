"""The names tensors go by in the files users have, and the engine's own: the one table that loading files
(checkpoint.py) and mapping LoRA keys (the hosts) are both built from.

The engine's names are ComfyUI's: a ComfyUI single file needs no renaming, and LoRA keys written for ComfyUI
address the engine's weights directly. diffusers names a few modules otherwise and keeps q, k and v apart where
ComfyUI stacks them into one `attention.qkv`.
"""

from __future__ import annotations

import re
from typing import Iterable

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")

# (diffusers' name fragment, the engine's, part index, number of parts): a tensor of the engine's is `parts`
# diffusers tensors stacked along dim 0. A fragment starting with "." matches anywhere, any other at the start.
RENAMES = [
    ("all_x_embedder.2-1.", "x_embedder.", 0, 1),
    ("all_final_layer.2-1.", "final_layer.", 0, 1),
    ("control_all_x_embedder.2-1.", "control_x_embedder.", 0, 1),  # the Fun ControlNets' (control.py)
    (".attention.to_q.", ".attention.qkv.", 0, 3),
    (".attention.to_k.", ".attention.qkv.", 1, 3),
    (".attention.to_v.", ".attention.qkv.", 2, 3),
    (".attention.to_out.0.", ".attention.out.", 0, 1),
    (".attention.norm_q.", ".attention.q_norm.", 0, 1),
    (".attention.norm_k.", ".attention.k_norm.", 0, 1),
]

# the scales of quantized weights in ComfyUI's files (quant.py says which format has which); folded into the
# weight on load
SCALE_SUFFIXES = (".scale_weight", ".weight_scale", ".weight_scale_2")
IGNORED_KEYS = re.compile(r"(^scaled_fp8$|\.scale_input$|\.input_scale$|\.comfy_quant$)")

# Tensors that real Z-Image files carry and no Z-Image model uses, matched without the prefix: they are skipped on
# load. Every other key that the model does not explain is refused (checkpoint.check_layout), so that a file with
# weights this loader would drop is never run as if it were complete.
UNUSED_KEYS = frozenset({
    # Lumina-Image 2.0's NextDiT, which Z-Image's transformer descends from, builds a final RMSNorm(dim) that its
    # forward never calls (the final layer has its own norm). ComfyUI's NextDiT has that line commented out and
    # diffusers has no such key, but trainers built on the Lumina code save the whole module, so community
    # fine-tunes carry a [dim] norm_final.weight (under model.diffusion_model. like their other keys).
    "norm_final.weight",
})


def _renamed(name: str, old: str, new: str) -> str | None:
    """name with the fragment `old` replaced by `new` (see RENAMES), or None where `old` does not match."""
    if old.startswith("."):
        return name.replace(old, new, 1) if old in name else None
    return new + name[len(old):] if name.startswith(old) else None


def engine_key(source_key: str) -> tuple[str, int, int]:
    """A file's tensor name (prefix already stripped) -> (the engine's name, part index, number of parts)."""
    for source, engine, part, parts in RENAMES:
        renamed = _renamed(source_key, source, engine)
        if renamed is not None:
            return renamed, part, parts
    return source_key, 0, 1


def source_keys(key: str) -> list[tuple[str, int, int]]:
    """Every name a file or a LoRA may give the engine's tensor or module `key`: its own (ComfyUI's) and
    diffusers', each with (part index, number of parts) as engine_key gives them."""
    names = [(key, 0, 1)]
    for source, engine, part, parts in RENAMES:
        renamed = _renamed(key, engine, source)
        if renamed is not None:
            names.append((renamed, part, parts))
    return names


def skipped(key: str) -> bool:
    """True for a key (prefix stripped) that holds no weight of the engine's: an fp8 marker or input scale, or a
    tensor known to be unused."""
    return key in UNUSED_KEYS or IGNORED_KEYS.search(key) is not None


def strip_prefix(keys: Iterable[str]) -> str:
    """The prefix a file's keys carry (one of PREFIXES), or ""."""
    keys = list(keys)
    for prefix in PREFIXES:
        if any(k.startswith(prefix + "cap_embedder.") for k in keys):
            return prefix
    return ""
