"""Odd values a user or an API client sends get a clear answer: a refusal that says what to change, or a warning
when the value is legal but does something the user may not expect."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from comfy_host import load_workflow, shrink
from test_edit_node import saved_latent
from helpers import randomize_
from zimage import ZImageConfig

pytestmark = pytest.mark.host


def test_a_width_that_is_not_a_number_gets_a_validation_message(comfy_server):
    prompt = shrink(load_workflow("zimage_turbo_t2i.api.json"))
    prompt["5"]["inputs"]["width"] = "wide"
    status, body = comfy_server.queue(prompt)
    assert status == 400, body
    messages = " ".join(f"{e['message']} {e.get('details', '')}" for e in body["node_errors"]["5"]["errors"])
    assert "width 'wide' is not a whole number" in messages
    assert "string formatting" not in messages


def test_a_lone_surrogate_in_a_prompt_is_refused_by_position(comfy_server):
    prompt = shrink(load_workflow("zimage_turbo_t2i.api.json"))
    prompt["4"]["inputs"]["prompt"] = "a cat \ud83d on a mat"  # half of an emoji's surrogate pair
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    (error,) = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_type"] == "ZImageTextEncode"
    assert "the prompt holds a character that is not valid text" in error["exception_message"]
    assert "position 6" in error["exception_message"]
    assert comfy_server.run(shrink(load_workflow("zimage_turbo_t2i.api.json")))["status"]["status_str"] == "success"


def test_chat_markers_in_a_prompt_are_kept_as_qwen_reads_them_and_warned_about(comfy_server):
    prompt = shrink(load_workflow("zimage_turbo_t2i.api.json"))
    prompt["4"]["inputs"]["prompt"] = "a sign that reads <|im_end|> and <think>"
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (warning,) = entry["outputs"]["4"]["text"]
    assert "</think>" not in warning and "<think>, <|im_end|>" in warning and "chat-template token" in warning


def test_chat_markers_become_single_special_tokens_in_comfyui_and_in_qwen(comfyui_path):
    """What the warning says: ComfyUI's tokenizer, like the Qwen tokenizer the official pipeline uses, reads
    <|im_end|> inside a prompt as the one special token, not as text."""
    import os

    import comfy.text_encoders.z_image as z_image
    from transformers import Qwen2Tokenizer

    text = "a sign that reads <|im_end|> here"
    ours = [t for t, _ in z_image.ZImageTokenizer().tokenize_with_weights(text, llama_template="{}")["qwen3_4b"][0]]
    qwen = Qwen2Tokenizer.from_pretrained(os.path.join(os.path.dirname(z_image.__file__), "qwen25_tokenizer"))
    im_end = qwen.convert_tokens_to_ids("<|im_end|>")
    assert ours == qwen(text, add_special_tokens=False)["input_ids"]
    assert ours.count(im_end) == 1


@pytest.fixture
def edit_node(zimage_pack):
    pack = zimage_pack.__name__
    comfy_model = importlib.import_module(f"{pack}.nodes.comfy_model")
    S3DiT = importlib.import_module(f"{pack}.zimage").S3DiT
    network = S3DiT(ZImageConfig.tiny(siglip_feat_dim=24), ops=comfy_model.comfy_ops(None, torch.float32))
    model = comfy_model.comfy_model(randomize_(network, 0).eval())
    clip = SimpleNamespace(tokenizer=SimpleNamespace(clip_name="qwen3_4b"))
    edit = importlib.import_module(f"{pack}.nodes.edit").ZImageEdit()
    return lambda **inputs: edit.edit(**{"model": model, "clip": clip, "clip_vision": None, "vae": None,
                                         "instruction": "x", "negative_prompt": "", **inputs})


@pytest.mark.parametrize("empty", ["image", "image_2"])
def test_zimage_edit_refuses_an_empty_image_batch(edit_node, empty):
    images = {"image": torch.rand(1, 64, 64, 3), empty: torch.zeros(0, 64, 64, 3)}
    with pytest.raises(ValueError, match=f"ZImageEdit: the {empty} input holds no reference image"):
        edit_node(**images)


class NaFlexLikeOutput:
    """What ComfyUI 0.14's CLIPVisionLoader returns for a SigLIP2 NaFlex model: tokens on the image's own grid,
    and the size it encoded in image_sizes (channels, height, width)."""

    def __init__(self, rows, cols, patch=16, width=24):
        self.last_hidden_state = torch.arange(rows * cols * width, dtype=torch.float32).reshape(1, rows * cols, width)
        self.image_sizes = [torch.Size([3, rows * patch, cols * patch])]

    def __getitem__(self, key):
        return getattr(self, key)


def test_siglip_grid_follows_the_naflex_image_size(zimage_pack):
    siglip_grid = importlib.import_module(f"{zimage_pack.__name__}.nodes.edit").siglip_grid
    output = NaFlexLikeOutput(rows=3, cols=5)
    grid = siglip_grid(output)
    assert grid.shape == (3, 5, 24)
    # row-major, as the encoder lays its patches out
    assert torch.equal(grid[1, 0], output.last_hidden_state[0, 5])
    # without image_sizes (ComfyUI 0.8, fixed-size SigLIP) a square grid, and a clear refusal otherwise
    square = SimpleNamespace(last_hidden_state=torch.zeros(1, 16, 24))
    assert siglip_grid({"last_hidden_state": square.last_hidden_state}).shape == (4, 4, 24)
    with pytest.raises(ValueError, match="not a square grid"):
        siglip_grid({"last_hidden_state": torch.zeros(1, 15, 24)})
    broken = NaFlexLikeOutput(rows=3, cols=5)
    broken.image_sizes = [torch.Size([3, 48, 100])]
    with pytest.raises(ValueError, match="no patch grid"):
        siglip_grid(broken)


def test_zimage_sampler_runs_the_steps_its_widgets_show_whatever_the_preset_says(comfy_server):
    """The preset only fills in widgets (in the graph editor); a prompt that says preset turbo with 3 steps runs 3
    steps, as custom with 3 steps does, and not the preset's 8."""
    def latent(**widgets):
        graph = shrink(load_workflow("zimage_turbo_t2i.api.json"))
        del graph["7"], graph["8"]
        graph["6"]["inputs"].update(widgets)
        graph["20"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "widgets"}}
        return saved_latent(comfy_server, comfy_server.run(graph))

    turbo_3 = latent(preset="turbo", steps=3)
    assert torch.equal(turbo_3, latent(preset="custom", steps=3))
    assert (turbo_3 - latent(preset="turbo", steps=8)).norm() / turbo_3.norm() > 1e-3


def test_the_loader_says_what_will_run_here(comfy_server):
    """On a machine without CUDA the loader's cudnn attention and CUDA graphs do nothing: the node's output and the
    log say so, and what runs instead."""
    prompt = shrink(load_workflow("zimage_turbo_t2i.api.json"))
    prompt["1"]["inputs"].update(attention="cudnn", cuda_graphs=True)
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (summary,) = entry["outputs"]["1"]["text"]
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the summary names the kernels that run (tests/test_gpu_host.py)")
    assert "on cpu" in summary and "CUDA graphs: off, no CUDA device here" in summary, summary
    assert "the attention choice 'cudnn' applies on CUDA GPUs" in summary, summary
    assert summary in comfy_server.tail(400)


class CountingClip:
    """A CLIP as ZImageTextEncode uses it, counting its encodes (each encode's conditioning is a new object)."""

    def __init__(self, patches_uuid="a"):
        self.tokenizer = SimpleNamespace(clip_name="qwen3_4b")
        self.patcher = SimpleNamespace(patches_uuid=patches_uuid)
        self.layer_idx, self.use_clip_schedule, self.apply_hooks_to_conds = None, False, None
        self.encoded = []

    def tokenize(self, text, llama_template):
        return {"qwen3_4b": [[(ord(c), 1.0) for c in llama_template.format(text)]]}

    def encode_from_tokens_scheduled(self, tokens):
        self.encoded.append(tokens)
        return [[torch.full((1, 3, 4), float(len(self.encoded))), {}]]


def test_an_unchanged_negative_prompt_is_encoded_once_per_text_encoder(zimage_pack):
    """Queued again with a new prompt, the node encodes only what changed: the same negative prompt on the same CLIP
    (same layer, same patches) is the conditioning encoded before; a new text, template, patch set or CLIP is encoded."""
    node = importlib.import_module(f"{zimage_pack.__name__}.nodes.text_encode").ZImageTextEncode()
    clip = CountingClip()
    first = node.encode(clip, "a fox", "", "official")["result"]
    second = node.encode(clip, "a cat", "", "official")["result"]
    assert len(clip.encoded) == 3  # a fox, the empty negative, a cat
    assert second[1] is first[1] and not torch.equal(second[0][0][0], first[0][0][0])
    node.encode(clip, "a cat", "", "empty think block")
    assert len(clip.encoded) == 5  # another template: both anew
    clip.patcher.patches_uuid = "b"  # a patch added in place
    node.encode(clip, "a cat", "", "official")
    assert len(clip.encoded) == 7
    other = CountingClip()
    node.encode(other, "a cat", "", "official")
    assert len(other.encoded) == 2
    clip.use_clip_schedule = True  # hooks: scheduled conditioning, never reused
    node.encode(clip, "a cat", "", "official")
    node.encode(clip, "a cat", "", "official")
    assert len(clip.encoded) == 11
