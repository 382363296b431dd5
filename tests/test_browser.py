"""The pack in ComfyUI's own web page, in a real browser: Debian's chromium driven by Playwright.

The page is the frontend ComfyUI serves (comfyui-frontend-package) from the test server. Each workflow file in
workflows/, UI format and API format, is opened the way a user opens one (the file input behind Workflow >
Open, which goes through the same handler as a drop on the canvas), then:
- every node of the loaded graph has a registered type and no error mark, and no dialog (the missing-nodes
  one above all) or error toast is shown;
- the prompt the frontend would queue (app.graphToPrompt) equals the API-format twin: the frontend reads the
  UI file's widget values, control_after_generate included, exactly as the twin says;
- no page error, no console error while loading, and no console message anywhere about our nodes or about
  the workflow failing validation.
A screenshot per workflow is kept in tests/artifacts/. A workflow with an unknown node type is opened too, to
show that these checks do see a missing node.

Needs the Python package playwright and a chromium binary (Debian's: apt-get install chromium); the browser
is never downloaded by Playwright. CHROMIUM_PATH overrides where chromium is looked for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from comfy_host import PACK_ROOT, load_workflow

pytestmark = pytest.mark.host

try:
    from playwright.sync_api import sync_playwright
except ImportError as e:  # the fixture below skips, saying why
    sync_playwright, PLAYWRIGHT_MISSING = None, str(e)

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
# Root in CI needs --no-sandbox. The page may only reach the test server: every other host name resolves
# to nothing (the frontend asks the internet for release notes), and chromium's own background fetches are off.
CHROMIUM_ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"]
ARTIFACTS = PACK_ROOT / "tests" / "artifacts"
WORKFLOW_DIR = PACK_ROOT / "workflows"
UI_FILES = sorted(p.name for p in WORKFLOW_DIR.glob("*.json") if not p.name.endswith(".api.json"))
API_FILES = sorted(p.name for p in WORKFLOW_DIR.glob("*.api.json"))
OUR_NODES = ["ZImageLoader", "ZImageLoraLoader", "ZImageTextEncode", "ZImageLatent", "ZImageSampler", "ZImageEdit"]
ABOUT_US = re.compile(r"z-?image|comfyui-zimage|invalid workflow|zod|missing node|node type", re.I)
TIMEOUT_MS = 120_000

# The app is ready once GraphCanvas has run app.setup() (node definitions from /object_info registered with
# LiteGraph) and assigned window.app, and the first workflow has been opened (the workflow store's active one).
APP_READY = """() => !!(window.app && window.app.canvas && window.LiteGraph
                     && window.app.extensionManager?.workflow?.activeWorkflow)"""
WORKFLOW_OPEN = """([stem, count]) => {
    const active = window.app.extensionManager.workflow.activeWorkflow
    return !!active && active.filename === stem && window.app.rootGraph.nodes.length === count }"""
GRAPH_STATE = """() => window.app.rootGraph.nodes.map(n => ({
    id: n.id, type: n.type, title: n.title, has_errors: !!n.has_errors,
    registered: Object.prototype.hasOwnProperty.call(LiteGraph.registered_node_types, n.type),
    widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value])) }))"""
SHOWN = """() => {
    const shown = el => el.getClientRects().length > 0
    return {
      dialogs: [...document.querySelectorAll('.p-dialog')].filter(shown)
                 .map(d => ({key: d.getAttribute('aria-labelledby'), text: d.innerText.slice(0, 500)})),
      error_toasts: [...document.querySelectorAll('.p-toast-message-error')].filter(shown)
                      .map(t => t.innerText.slice(0, 500)) } }"""
FRAMES = "() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"


class AppPage:
    """One browser page on the ComfyUI app, with every console message and page error it had."""

    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1600, "height": 900})
        self.page = self.context.new_page()
        self.log: list[tuple[str, str]] = []
        self.page.on("console", lambda m: self.log.append((m.type, f"{m.text} ({m.location.get('url', '')})")))
        self.page.on("pageerror", lambda e: self.log.append(("pageerror", str(e))))
        self.page.goto(url)
        self.page.wait_for_function(APP_READY, timeout=TIMEOUT_MS)

    def open_file(self, path: Path, node_count: int):
        """Opens a workflow file through the app's file input, as Workflow > Open does."""
        self.page.set_input_files("#comfy-file-input", str(path))
        self.page.wait_for_function(WORKFLOW_OPEN, arg=[path.name.removesuffix(".json"), node_count],
                                    timeout=TIMEOUT_MS)
        self.page.evaluate(FRAMES)

    def problems(self, since: int = 0) -> list[str]:
        """Page errors; console errors after `since` other than resources the server lacks (user.css,
        favicon) or the release check that cannot reach the internet; any message about us or validation."""
        found = []
        for n, (kind, text) in enumerate(self.log):
            if kind == "pageerror":
                found.append(f"page error: {text}")
            elif kind in ("error", "warning") and ABOUT_US.search(text):
                found.append(f"console {kind}: {text}")
            elif kind == "error" and n >= since and not text.startswith("Failed to load resource"):
                found.append(f"console error: {text}")
        return found

    def close(self):
        self.context.close()


def test_the_app_registers_our_nodes(app_page):
    registered = app_page.page.evaluate(
        "names => names.map(n => [n, LiteGraph.registered_node_types[n]?.title ?? null])", OUR_NODES)
    for name, title in registered:
        assert title and title.startswith("Z-Image/"), f"{name} is not a node type of the app (title {title!r})"
    assert not app_page.problems(), app_page.problems()


@pytest.mark.parametrize("name", UI_FILES + API_FILES)
def test_workflow_opens_in_the_app_as_its_api_twin(app_page, name):
    is_api = name.endswith(".api.json")
    twin_name = name if is_api else name.removesuffix(".json") + ".api.json"
    twin = load_workflow(twin_name)
    since = len(app_page.log)
    app_page.open_file(WORKFLOW_DIR / name, len(twin))
    page = app_page.page
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"browser_{name.removesuffix('.json')}.png"))

    nodes = page.evaluate(GRAPH_STATE)
    missing = [f"{n['id']} {n['type']}" for n in nodes if not n["registered"] or n["has_errors"]]
    assert not missing, f"{name}: nodes without a registered type or marked in error: {missing}"
    assert {str(n["id"]): n["type"] for n in nodes} == {i: n["class_type"] for i, n in twin.items()}
    shown = page.evaluate(SHOWN)
    assert not shown["dialogs"] and not shown["error_toasts"], f"{name}: {json.dumps(shown)[:2000]}"

    queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    assert sorted(queued, key=int) == sorted(twin, key=int), f"{name}: the app would queue other nodes"
    for node_id, node in twin.items():
        assert queued[node_id] == node, f"{name} node {node_id}:\napp  {json.dumps(queued[node_id])}\n" \
                                        f"twin {json.dumps(node)}"
    if not is_api:  # the UI files keep the seed fixed; an API file opened in the app gets the default
        for n in nodes:
            if n["type"] == "ZImageSampler":
                assert n["widgets"]["control_after_generate"] == "fixed", n["widgets"]
    problems = app_page.problems(since)
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_a_missing_node_type_is_seen(browser, comfy_server, tmp_path):
    """The checks above can fail: a workflow naming an unknown node type opens with the missing-nodes
    dialog and a node the graph marks unregistered."""
    workflow = load_workflow("zimage_turbo_t2i.json")
    for node in workflow["nodes"]:
        if node["type"] == "ZImageSampler":
            node["type"] = "ZImageSamplerNoSuchNode"
    path = tmp_path / "zimage_missing_node.json"
    path.write_text(json.dumps(workflow))
    app = AppPage(browser, comfy_server.url)
    try:
        app.open_file(path, len(workflow["nodes"]))
        app.page.wait_for_selector('[aria-labelledby="global-missing-nodes"]', state="visible", timeout=TIMEOUT_MS)
        ARTIFACTS.mkdir(exist_ok=True)
        app.page.screenshot(path=str(ARTIFACTS / "browser_missing_node.png"))
        dialogs = app.page.evaluate(SHOWN)["dialogs"]
        assert any("ZImageSamplerNoSuchNode" in d["text"] for d in dialogs), dialogs
        unregistered = [n["type"] for n in app.page.evaluate(GRAPH_STATE) if not n["registered"]]
        assert unregistered == ["ZImageSamplerNoSuchNode"], unregistered
    finally:
        app.close()


WIDGETS_OF = """type => Object.fromEntries(window.app.rootGraph.findNodesByType(type)[0].widgets.map(w => [w.name, w.value]))"""
# what a user's choice in a widget does: its value set, then its callback (the canvas calls it on every change)
SET_WIDGET = """([type, name, value]) => {
    const w = window.app.rootGraph.findNodesByType(type)[0].widgets.find(w => w.name === name)
    w.value = value
    w.callback(value) }"""


def test_presets_fill_in_the_widgets_and_the_widgets_are_what_is_queued(app_page, tmp_path):
    """ZImageSampler's preset and ZImageLatent's aspect fill in the widgets they govern (web/zimage.js); a widget
    changed by hand makes them custom; the queued prompt carries what the widgets show, which is what runs."""
    workflow = load_workflow("zimage_turbo_t2i.json")
    path = tmp_path / "zimage_presets.json"  # a name of its own: the app would not open a file already open again
    path.write_text(json.dumps(workflow))
    app_page.open_file(path, len(workflow["nodes"]))
    page = app_page.page
    since = len(app_page.log)

    page.evaluate(SET_WIDGET, ["ZImageSampler", "preset", "base"])
    sampler = page.evaluate(WIDGETS_OF, "ZImageSampler")
    assert (sampler["preset"], sampler["steps"], sampler["cfg"], sampler["shift"]) == ("base", 50, 4.0, 3.0), sampler
    page.evaluate(SET_WIDGET, ["ZImageSampler", "steps", 12])
    assert page.evaluate(WIDGETS_OF, "ZImageSampler")["preset"] == "custom"

    page.evaluate(SET_WIDGET, ["ZImageLatent", "aspect", "16:9 (1344x768)"])
    latent = page.evaluate(WIDGETS_OF, "ZImageLatent")
    assert (latent["width"], latent["height"]) == (1344, 768), latent
    page.evaluate(SET_WIDGET, ["ZImageLatent", "width", 1024])
    assert page.evaluate(WIDGETS_OF, "ZImageLatent")["aspect"] == "custom"

    queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    by_type = {node["class_type"]: node["inputs"] for node in queued.values()}
    assert by_type["ZImageSampler"]["steps"] == 12 and by_type["ZImageSampler"]["cfg"] == 4.0
    assert (by_type["ZImageLatent"]["width"], by_type["ZImageLatent"]["height"]) == (1024, 768)
    assert not app_page.problems(since), app_page.problems(since)
