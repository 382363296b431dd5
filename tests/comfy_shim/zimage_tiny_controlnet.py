"""Test-only ComfyUI custom node (never shipped with the pack): tiny Fun ControlNets for ModelPatchLoader.

ComfyUI's ModelPatchLoader tells the Fun ControlNet versions apart by their keys (its own rules, unchanged here)
and builds the control module at the released width (3840, 30 heads, FFN rounded to multiples of 256) whatever
the file holds. The test server's files are tiny: it builds the module at the tiny transformer's shape instead
(tests/comfy_host.py TINY_DIT: width 64, 4 heads, an FFN of int(64 * 8 / 3) = 170, not rounded).
"""

import functools

import comfy.ldm.lumina.controlnet

TINY = dict(dim=64, n_heads=4, n_kv_heads=4, multiple_of=1)


def install():
    control = comfy.ldm.lumina.controlnet.ZImage_Control
    if getattr(control, "tiny", False):
        return
    tiny = functools.partial(control, **TINY)
    tiny.tiny = True
    comfy.ldm.lumina.controlnet.ZImage_Control = tiny


install()
NODE_CLASS_MAPPINGS = {}
