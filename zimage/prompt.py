"""What the text encoder reads: Z-Image's chat template, and an Omni prompt's chunks around its images.

The template is what diffusers builds with Qwen3's chat template (add_generation_prompt, enable_thinking=True)
and what ComfyUI writes by hand: a user turn and the assistant's opening, no think block.
"""

from __future__ import annotations

CHAT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


def omni_prompt_chunks(prompt: str, n_references: int) -> list[str]:
    """The caption chunks, as text, of a prompt with n_references reference images (omni.py shows them): the
    chat template cut where the images stand. Each is encoded on its own (second-to-last hidden state, padding
    dropped) to make one caption chunk; with no references, the one chunk is the plain template."""
    if n_references == 0:
        return [CHAT_TEMPLATE.format(prompt)]
    user, assistant = CHAT_TEMPLATE.split("{}")  # "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
    closing = assistant.split("\n")[0]  # "<|im_end|>"
    return ([user + VISION_START] + [VISION_END + VISION_START] * (n_references - 1)
            + [VISION_END + prompt + assistant + VISION_START, VISION_END + closing])
