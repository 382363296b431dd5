"""Write the UI-format twin (the LiteGraph "workflow" JSON a user drags onto the ComfyUI canvas) of every
API-format workflow in workflows/: workflows/NAME.api.json -> workflows/NAME.json.

What a node's inputs, widgets and outputs are comes from ComfyUI's /object_info, so the files match the
ComfyUI they were made with. It can come from
  --url http://127.0.0.1:8188      a running ComfyUI (with this pack installed),
  --object-info object_info.json   a saved copy of /object_info,
or, by default, from a throwaway ComfyUI that the test harness starts (tests/comfy_host.py: tiny model files
under the real names in a temporary base directory; needs the ComfyUI checkout the tests find).

The files follow what the ComfyUI frontend itself saves (workflow version 0.4):
- a node's `inputs` are its sockets (required, then optional, in input_order), then one entry per widget
  (`widget: {"name": ...}`); a link's target slot is the index in that list;
- `widgets_values` are the widgets in input order; a seed-like INT widget is followed by its
  control_after_generate value, written as "fixed" so the UI runs the same seed as the API file every time;
  a combo with image_upload gets the frontend's extra `upload` widget (value "image") after the required
  widgets;
- titles are the API file's _meta titles; nodes are laid out left to right by graph depth.

--check compares instead of writing, and exits 1 when a file is missing or differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = PACK_ROOT / "workflows"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
LOADER_OUTPUTS = {"MODEL", "CLIP", "VAE"}
COLUMN_GAP, ROW_GAP, LEFT, TOP = 80, 60, 40, 100  # a node's title bar (30 px) lies above its pos


# --- what the frontend makes of a node definition --------------------------------------------------------

def opts(spec: list) -> dict:
    """The options dict of an input spec from /object_info ({} when it has none)."""
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def input_kind(spec: list) -> str:
    """The widget type of an input spec from /object_info, or "" when it is a socket (a link only)."""
    kind, options = spec[0], opts(spec)
    if isinstance(kind, list):
        kind = "COMBO"
    if kind in WIDGET_TYPES and not options.get("forceInput"):
        return kind
    return ""


def control_values_after(name: str, spec: list) -> int:
    """How many extra widget values the frontend puts after this widget: 1 for control_after_generate on an
    INT or FLOAT (an INT named seed or noise_seed has one unless the spec says False), 2 on a COMBO (the
    control and its filter list)."""
    kind = input_kind(spec)
    flag = opts(spec).get("control_after_generate")
    if kind == "INT" and flag is None:
        flag = name in ("seed", "noise_seed")
    if not flag:
        return 0
    if kind == "COMBO":
        raise ValueError(f"input {name!r}: a combo with control_after_generate is not supported by this generator")
    return 1 if kind in ("INT", "FLOAT") else 0


def node_layout(info: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str, list]]]:
    """(sockets, widgets) of a node type as the frontend builds them: sockets as (name, type), widgets as
    (name, widget type, spec). An image_upload combo adds an `upload` widget after the required inputs."""
    sockets, widgets = [], []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(specs)):
            spec = specs[name]
            kind = input_kind(spec)
            if kind:
                widgets.append((name, kind, spec))
            else:
                sockets.append((name, spec[0], section == "optional"))
        if section == "required":
            uploads = [n for n, s in specs.items() if input_kind(s) == "COMBO" and opts(s).get("image_upload")]
            if uploads:
                widgets.append(("upload", "IMAGEUPLOAD", ["IMAGEUPLOAD", {"imageInputName": uploads[0]}]))
    return sockets, widgets


# --- the graph -------------------------------------------------------------------------------------------

def columns(prompt: dict, object_info: dict) -> dict[str, int]:
    """Left-to-right column of each node: its longest path from a source. A source that is not a model
    loader (an empty latent, an image) moves right, next to the first node that uses it."""
    depth: dict[str, int] = {}

    def visit(node_id: str, seen=()) -> int:
        if node_id in seen:
            raise ValueError(f"the workflow has a cycle through node {node_id}")
        if node_id not in depth:
            parents = [v[0] for v in prompt[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((visit(p, (*seen, node_id)) for p in parents), default=-1)
        return depth[node_id]

    for node_id in prompt:
        visit(node_id)
    for node_id, node in prompt.items():
        outputs = set(object_info[node["class_type"]]["output"])
        if depth[node_id] == 0 and not outputs <= LOADER_OUTPUTS:
            users = [depth[u] for u, other in prompt.items()
                     if any(isinstance(v, list) and v[0] == node_id for v in other["inputs"].values())]
            if users:
                depth[node_id] = min(users) - 1
    return depth


def node_size(widgets: list, sockets: list, outputs: list, class_type: str) -> list[int]:
    """A size the node's contents fit in (the frontend only ever grows a node to fit)."""
    multiline = sum(1 for _, kind, spec in widgets if kind == "STRING" and opts(spec).get("multiline"))
    width = 420 if multiline else 320 if widgets else 220
    shown = [w for w in widgets if w[1] != "IMAGEUPLOAD"]
    height = 16 + 22 * max(len(sockets), len(outputs)) + 24 * len(shown) + 110 * multiline
    height += sum(24 for name, _, spec in widgets if control_values_after(name, spec))
    if any(kind == "IMAGEUPLOAD" for _, kind, _ in widgets):
        height += 24 + 240  # the upload button and the image preview
    if class_type in ("SaveImage", "PreviewImage"):
        width, height = 420, max(height, 460)  # room for the result
    return [width, height]


def to_ui(name: str, prompt: dict, object_info: dict) -> dict:
    missing = sorted({n["class_type"] for n in prompt.values()} - set(object_info))
    if missing:
        raise ValueError(f"{name}: node types not in /object_info: {', '.join(missing)} (is this pack installed "
                         "in the ComfyUI that served it?)")
    ids = sorted(prompt, key=int)
    layouts = {i: node_layout(object_info[prompt[i]["class_type"]]) for i in ids}

    # links, numbered in node order then input slot order
    links, outgoing, incoming = [], {}, {}
    for i in ids:
        sockets, widgets = layouts[i]
        slot_names = [s[0] for s in sockets] + [w[0] for w in widgets]
        inputs = prompt[i]["inputs"]
        for slot, input_name in enumerate(slot_names):
            value = inputs.get(input_name)
            if not isinstance(value, list):
                continue
            src, src_slot = str(value[0]), int(value[1])
            src_info = object_info[prompt[src]["class_type"]]
            link_id = len(links) + 1
            links.append([link_id, int(src), src_slot, int(i), slot, src_info["output"][src_slot]])
            outgoing.setdefault((src, src_slot), []).append(link_id)
            incoming[(i, input_name)] = link_id
        unknown = set(inputs) - set(slot_names)
        if unknown:
            raise ValueError(f"{name}: node {i} ({prompt[i]['class_type']}) has inputs its definition lacks: "
                             f"{', '.join(sorted(unknown))}")

    # execution order (what the frontend stores as `order`): sources first
    depth = columns(prompt, object_info)
    order = {i: n for n, i in enumerate(sorted(ids, key=lambda i: (depth[i], int(i))))}

    nodes = []
    for i in ids:
        api_node = prompt[i]
        info = object_info[api_node["class_type"]]
        sockets, widgets = layouts[i]
        values = []
        for widget_name, kind, spec in widgets:
            if kind == "IMAGEUPLOAD":
                values.append("image")
                continue
            if widget_name not in api_node["inputs"]:
                raise ValueError(f"{name}: node {i} ({api_node['class_type']}) has no value for widget {widget_name!r}")
            value = api_node["inputs"][widget_name]
            values.append(opts(spec).get("default") if isinstance(value, list) else value)  # linked: value unused
            values.extend(["fixed"] * control_values_after(widget_name, spec))
        ui_inputs = []
        for socket_name, socket_type, optional in sockets:
            entry = {"name": socket_name, "type": socket_type, "link": incoming.get((i, socket_name))}
            if optional:
                entry["shape"] = 7  # the frontend's hollow dot for an optional socket
            ui_inputs.append(entry)
        for widget_name, kind, _ in widgets:
            ui_inputs.append({"name": widget_name, "type": kind, "widget": {"name": widget_name},
                              "link": incoming.get((i, widget_name))})
        ui_outputs = [{"name": out_name, "type": out_type, "links": outgoing.get((i, slot), []), "slot_index": slot}
                      for slot, (out_name, out_type) in enumerate(zip(info["output_name"], info["output"]))]
        node = {
            "id": int(i), "type": api_node["class_type"], "pos": [0, 0],
            "size": node_size(widgets, sockets, ui_outputs, api_node["class_type"]),
            "flags": {}, "order": order[i], "mode": 0, "inputs": ui_inputs, "outputs": ui_outputs,
            "title": api_node.get("_meta", {}).get("title", info["display_name"]),
            "properties": {"Node name for S&R": api_node["class_type"]},
        }
        if values:
            node["widgets_values"] = values
        nodes.append(node)

    # left to right by column, top to bottom by id
    by_id = {str(n["id"]): n for n in nodes}
    x = LEFT
    for col in sorted(set(depth.values())):
        members = [by_id[i] for i in ids if depth[i] == col]
        y = TOP
        for node in members:
            node["pos"] = [x, y]
            y += node["size"][1] + ROW_GAP
        x += max(n["size"][0] for n in members) + COLUMN_GAP

    groups = []
    loaders = [n for n in nodes if all("widget" in s for s in n["inputs"])
               and n["outputs"] and {o["type"] for o in n["outputs"]} <= LOADER_OUTPUTS]
    if loaders:
        x0 = min(n["pos"][0] for n in loaders) - 10
        y0 = min(n["pos"][1] for n in loaders) - 75
        x1 = max(n["pos"][0] + n["size"][0] for n in loaders) + 10
        y1 = max(n["pos"][1] + n["size"][1] for n in loaders) + 10
        groups.append({"id": 1, "title": "Models",
                       "bounding": [x0, y0, x1 - x0, y1 - y0], "color": "#3f789e", "font_size": 20, "flags": {}})

    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-zimage/workflows/{name}")),
        "revision": 0,
        "last_node_id": max(int(i) for i in ids),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"comfyui-zimage": {"api_twin": f"{name}.api.json",
                                     "made_by": "tools/make_ui_workflows.py from the API twin and /object_info"}},
        "version": 0.4,
    }


# --- where /object_info comes from -----------------------------------------------------------------------

def fetch_object_info(url: str) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as r:
        return json.loads(r.read())


def object_info_from_test_host() -> dict:
    sys.path[:0] = [str(PACK_ROOT / "tests"), str(PACK_ROOT)]
    from conftest import COMFYUI_PATH, COMFYUI_WHERE  # the tests' way of finding the ComfyUI checkout

    if COMFYUI_PATH is None:
        raise SystemExit(f"no ComfyUI to ask for /object_info: {COMFYUI_WHERE}. Pass --url or --object-info.")
    sys.path.insert(0, str(COMFYUI_PATH))
    import torch
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    from comfy_host import ComfyServer, build_base_directory

    with tempfile.TemporaryDirectory() as tmp:
        base = build_base_directory(Path(tmp) / "base")
        server = ComfyServer(COMFYUI_PATH, base, Path(tmp) / "comfyui.log")
        try:
            return server.get("/object_info")
        finally:
            server.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", help="a running ComfyUI with this pack installed")
    source.add_argument("--object-info", type=Path, help="a saved /object_info JSON")
    parser.add_argument("--check", action="store_true", help="compare with the files in workflows/, write nothing")
    args = parser.parse_args(argv)

    if args.url:
        object_info = fetch_object_info(args.url)
    elif args.object_info:
        object_info = json.loads(args.object_info.read_text())
    else:
        object_info = object_info_from_test_host()

    stale = []
    for api_path in sorted(WORKFLOWS.glob("*.api.json")):
        name = api_path.name.removesuffix(".api.json")
        ui = to_ui(name, json.loads(api_path.read_text()), object_info)
        text = json.dumps(ui, indent=2, ensure_ascii=False) + "\n"
        out = WORKFLOWS / f"{name}.json"
        if args.check:
            if not out.is_file() or out.read_text() != text:
                stale.append(out.name)
            continue
        out.write_text(text)
        print(f"wrote {out.relative_to(PACK_ROOT)} ({len(ui['nodes'])} nodes, {len(ui['links'])} links)")
    if stale:
        print(f"out of date: {', '.join(stale)}; run python tools/make_ui_workflows.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
