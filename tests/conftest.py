"""Shared fixtures: the ComfyUI host (found, never faked) and a count of the host tests that really ran."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[1]


def find_comfyui() -> tuple[Path | None, str]:
    """COMFYUI_PATH, else the grandparent when the pack sits in ComfyUI/custom_nodes/, else ~/comfy/ComfyUI."""
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(("COMFYUI_PATH", Path(os.environ["COMFYUI_PATH"])))
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append(("custom_nodes parent", PACK_ROOT.parent.parent))
    candidates.append(("~/comfy/ComfyUI", Path.home() / "comfy" / "ComfyUI"))
    tried = []
    for source, path in candidates:
        if (path / "comfy" / "model_patcher.py").is_file() and (path / "nodes.py").is_file():
            return path.resolve(), f"{source}: {path}"
        tried.append(f"{source} ({path})")
    return None, "ComfyUI checkout not found; looked at " + ", ".join(tried)


COMFYUI_PATH, COMFYUI_WHERE = find_comfyui()
_host_results: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": [], "needs_gpu": [],
                                       "newer_host": []}
NEWER_HOST = "NOT IN THIS COMFYUI VERSION:"  # the skip reason of a test of a feature the host predates


def skip_unless_host_has(present: bool, feature: str) -> None:
    """Skip a host test of a ComfyUI feature this host version lacks; counted apart from other skips."""
    if not present:
        import comfyui_version

        pytest.skip(f"{NEWER_HOST} ComfyUI {comfyui_version.__version__} has no {feature}")


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    if COMFYUI_PATH is None:
        pytest.skip(f"HOST TEST SKIPPED: {COMFYUI_WHERE}. Set COMFYUI_PATH to run it.")
    if str(COMFYUI_PATH) not in sys.path:
        sys.path.insert(0, str(COMFYUI_PATH))
    import torch
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # what `main.py --cpu` sets; read when comfy.model_management is imported
    return COMFYUI_PATH


@pytest.fixture(scope="session")
def zimage_pack(comfyui_path):
    """The pack imported in-process as ComfyUI imports a custom node (comfy_host.import_pack).
    Submodules: f"{zimage_pack.__name__}.nodes.lora"."""
    from comfy_host import import_pack

    return import_pack()


def pytest_runtest_logreport(report):
    if "host" not in report.keywords:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        # a host test that also needs CUDA is counted apart when it is skipped on a machine without one
        import torch

        gpu_skip = report.outcome == "skipped" and "gpu" in report.keywords and not torch.cuda.is_available()
        newer = report.outcome == "skipped" and NEWER_HOST in str(report.longrepr)
        _host_results["needs_gpu" if gpu_skip else "newer_host" if newer else report.outcome].append(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    ran = len(_host_results["passed"]) + len(_host_results["failed"])
    skipped = len(_host_results["skipped"])
    where = COMFYUI_WHERE if COMFYUI_PATH else f"not found ({COMFYUI_WHERE})"
    needs_gpu = len(_host_results["needs_gpu"])
    gpu_note = f" ({needs_gpu} more need a GPU: run `python -m pytest tests -m gpu` on one)" if needs_gpu else ""
    newer = len(_host_results["newer_host"])
    newer_note = f", {newer} test features this host version lacks" if newer else ""
    terminalreporter.write_sep("=", f"ComfyUI host tests: {ran} ran, {skipped} skipped{gpu_note}{newer_note}; "
                                    f"host {where}")
    if skipped:
        terminalreporter.write_line("A skipped host test is not a pass: the nodes were not checked inside ComfyUI.")


def pytest_generate_tests(metafunc):
    """A module that tests parity declares PARITY_CONFIGS ({id: ZImageConfig}); its tests that take `pair` run once
    per config, the pair built once per module and config."""
    if "pair" in metafunc.fixturenames:
        configs = metafunc.module.PARITY_CONFIGS
        metafunc.parametrize("pair", list(configs.values()), ids=list(configs), indirect=True, scope="module")


@pytest.fixture(scope="module")
def pair(request):
    """(cfg, diffusers' transformer, the engine) on the same random weights, both float32 (helpers.reference_pair)."""
    from helpers import reference_pair

    return (request.param, *reference_pair(request.param, seed=1))


@pytest.fixture(scope="session")
def comfy_base(comfyui_path, tmp_path_factory):
    """A ComfyUI base directory with tiny model files under the real names, this pack and the test shim."""
    from comfy_host import build_base_directory

    return build_base_directory(tmp_path_factory.mktemp("comfy_base"))


@pytest.fixture(scope="session")
def comfy_server(comfyui_path, comfy_base, tmp_path_factory):
    """ComfyUI's own server (main.py) on 127.0.0.1 with the pack installed in its custom_nodes."""
    from comfy_host import ComfyServer

    server = ComfyServer(comfyui_path, comfy_base, tmp_path_factory.mktemp("logs") / "comfyui.log")
    yield server
    server.close()


@pytest.fixture(scope="session")  # session, as comfy_server: so a skip here comes before a server starts
def browser():
    """Debian's chromium driven by Playwright (tests/test_browser.py says how), one for the whole session: a thread
    holds one Playwright, so every test module that opens the app shares this one."""
    import test_browser

    if test_browser.sync_playwright is None:
        pytest.skip(f"BROWSER TEST SKIPPED: the Python package playwright is missing "
                    f"({test_browser.PLAYWRIGHT_MISSING}). pip install playwright; the browser is Debian's chromium, "
                    f"never `playwright install`.")
    if not (os.path.isfile(test_browser.CHROMIUM) and os.access(test_browser.CHROMIUM, os.X_OK)):
        pytest.skip(f"BROWSER TEST SKIPPED: no chromium at {test_browser.CHROMIUM} (apt-get install chromium, "
                    "or set CHROMIUM_PATH).")
    with test_browser.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=test_browser.CHROMIUM, args=test_browser.CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def app_page(browser, comfy_server):
    """The ComfyUI app in a page of the session's chromium, for a returning user (a first visit opens the template
    browser over the canvas instead of the default graph)."""
    from test_browser import AppPage

    status, body = comfy_server.request("/settings/Comfy.TutorialCompleted", True)
    assert status == 200, body
    page = AppPage(browser, comfy_server.url)
    yield page
    page.close()
