"""Checks every node makes on values ComfyUI's own validation lets through."""

from __future__ import annotations

import math


def require_finite(node: str, **values: float) -> None:
    """Refuse NaN and infinities by name. ComfyUI's range check passes NaN (every comparison with it is false),
    and an API prompt can carry one (its JSON reader accepts NaN), as can a FLOAT linked from another node;
    a NaN shift or strength would give an all-NaN latent (a black image), a NaN cfg would turn guidance off."""
    bad = [f"{name} = {value!r}" for name, value in values.items() if not math.isfinite(float(value))]
    if bad:
        raise ValueError(f"{node}: {', '.join(bad)} is not a finite number. Give a real value (the widget's "
                         f"default if unsure).")
