"""The README's Quick start, as a user runs it: tools/run_workflow.py against a real ComfyUI (tiny model files under
the real names), in a subprocess, on the shipped workflow file changed only through the tool's own options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_host import PACK_ROOT, free_port, load_workflow

pytestmark = pytest.mark.host

TOOL = PACK_ROOT / "tools" / "run_workflow.py"
TURBO = "workflows/zimage_turbo_t2i.api.json"
SIZE = "256x256"  # the shipped 1024x1024 decodes slowly on a CPU with the full-size VAE (comfy_host.shrink's size)


def run_tool(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=PACK_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def report(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"


def executed_prompt(png: Path) -> dict:
    """The workflow ComfyUI ran, as SaveImage stores it in the PNG's "prompt" text chunk."""
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (256, 256), image.size
        return json.loads(image.info["prompt"])


def test_the_turbo_workflow_runs_headless_and_prints_the_image(comfy_server, tmp_path):
    prompt = "a lighthouse on a cliff at night, quick start test"
    result = run_tool(TURBO, "--server", comfy_server.url, "--prompt", prompt, "--seed", 1234, "--size", SIZE)
    assert result.returncode == 0, report(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, report(result)
    image = Path(lines[0])
    output = (comfy_server.base / "output").resolve()
    assert image.is_absolute() and image.is_file() and image.parent == output, report(result)
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # what ran is the shipped workflow with exactly the three options applied
    expected = load_workflow("zimage_turbo_t2i.api.json")
    expected["4"]["inputs"]["prompt"] = prompt
    expected["6"]["inputs"]["seed"] = 1234
    expected["5"]["inputs"].update(width=256, height=256, aspect="custom")
    ran = executed_prompt(image)
    assert {k: v["inputs"] for k, v in ran.items()} == {k: v["inputs"] for k, v in expected.items()}

    # progress on stderr names the running node and the sampler's steps
    assert "Z-Image/Sampler (ZImageSampler #6)" in result.stderr and "step 8/8" in result.stderr, report(result)

    # the same command again: ComfyUI answers from its cache, and --download fetches the same bytes through /view
    again = run_tool(TURBO, "--server", comfy_server.url, "--prompt", prompt, "--seed", 1234, "--size", SIZE,
                     "--download", tmp_path / "downloads")
    assert again.returncode == 0, report(again)
    (downloaded,) = [Path(line) for line in again.stdout.splitlines()]
    assert downloaded.parent == (tmp_path / "downloads").resolve() and downloaded.name == image.name
    assert downloaded.read_bytes() == image.read_bytes()
    assert "reused its result" in again.stderr, report(again)


def test_a_refused_workflow_exits_with_the_node_error(comfy_server, tmp_path):
    workflow = load_workflow("zimage_turbo_t2i.api.json")
    workflow["1"]["inputs"]["model_name"] = "z_image_missing.safetensors"
    path = tmp_path / "missing_model.api.json"
    path.write_text(json.dumps(workflow))
    result = run_tool(path, "--server", comfy_server.url, "--size", SIZE)
    assert result.returncode == 1, report(result)
    assert result.stdout == ""
    assert "refused" in result.stderr and "node 1 (ZImageLoader)" in result.stderr, report(result)
    assert "z_image_missing.safetensors" in result.stderr and "models folders" in result.stderr, report(result)

    # a node type the server lacks (the pack not installed, or its import failed) is named, with what to do
    workflow = load_workflow("zimage_turbo_t2i.api.json")
    workflow["6"]["class_type"] = "ZImageSamplerNotInstalled"
    path = tmp_path / "unknown_node.api.json"
    path.write_text(json.dumps(workflow))
    result = run_tool(path, "--server", comfy_server.url)
    assert result.returncode == 1, report(result)
    assert "node types this ComfyUI does not have: ZImageSamplerNotInstalled" in result.stderr, report(result)
    assert "install this pack" in result.stderr, report(result)


def test_a_workflow_that_fails_while_running_exits_with_the_node_error(comfy_server, tmp_path):
    workflow = load_workflow("zimage_turbo_t2i.api.json")
    del workflow["6"]["inputs"]["negative"]  # cfg > 0 without a negative: the sampler raises when it runs
    workflow["6"]["inputs"].update(preset="custom", cfg=3.0)
    path = tmp_path / "no_negative.api.json"
    path.write_text(json.dumps(workflow))
    result = run_tool(path, "--server", comfy_server.url, "--size", SIZE)
    assert result.returncode == 1, report(result)
    assert result.stdout == ""
    assert "failed in Z-Image/Sampler (ZImageSampler #6)" in result.stderr, report(result)
    assert "ValueError" in result.stderr and "needs the negative input" in result.stderr, report(result)


def test_no_server_says_to_start_comfyui():
    result = run_tool(TURBO, "--server", f"http://127.0.0.1:{free_port()}", timeout=60)
    assert result.returncode == 3, report(result)
    assert result.stdout == ""
    assert "no ComfyUI answered" in result.stderr and "start ComfyUI first" in result.stderr, report(result)


def test_a_ui_workflow_is_pointed_to_its_api_twin():
    result = run_tool("workflows/zimage_turbo_t2i.json", "--server", f"http://127.0.0.1:{free_port()}", timeout=60)
    assert result.returncode == 2, report(result)
    assert "UI workflow" in result.stderr and "workflows/zimage_turbo_t2i.api.json" in result.stderr, report(result)
