"""Test-only ComfyUI custom node (never shipped with the pack): tiny Fun ControlNets for ModelPatchLoader.

ComfyUI's ModelPatchLoader tells the Fun ControlNet versions apart by their keys (its own rules, unchanged here)
and builds the control module at the released width (3840, 30 heads, FFN rounded to multiples of 256) whatever
the file holds. The test server's files are tiny: it builds the module at the tiny transformer's shape instead
(tests/comfy_host.py TINY_DIT: width 64, 4 heads, an FFN of int(64 * 8 / 3) = 170, not rounded).
"""

import comfy.ldm.lumina.controlnet

TINY = dict(dim=64, n_heads=4, n_kv_heads=4, multiple_of=1)


def install():
    control = comfy.ldm.lumina.controlnet.ZImage_Control
    if getattr(control, "tiny", False):
        return

    class TinyZImageControl(control):  # a subclass: ComfyUI's nodes check isinstance(..., ZImage_Control)
        tiny = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, **TINY})

    comfy.ldm.lumina.controlnet.ZImage_Control = TinyZImageControl


install()
NODE_CLASS_MAPPINGS = {}
