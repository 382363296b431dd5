#!/usr/bin/env python3
"""Run an API-format workflow on a running ComfyUI and say where its images went.

    python tools/run_workflow.py workflows/zimage_turbo_t2i.api.json --prompt "a lighthouse at night"

The workflow is queued through ComfyUI's HTTP API (POST /prompt), its progress is shown on stderr (the node that
runs, the sampler's step), and the path of every image it saved is printed on stdout, one a line, so that
`image=$(python tools/run_workflow.py ...)` works. Only the standard library is used: the tool runs with any
Python 3.10+, ComfyUI's own or not.

Exit status: 0 the workflow ran; 1 ComfyUI refused it or it failed (the node's error is printed); 2 a bad option
or workflow file; 3 no ComfyUI answered; 4 it did not finish within --timeout (it is then cancelled); 130 Ctrl-C
(also cancelled).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

DEFAULT_SERVER = "http://127.0.0.1:8188"

EXIT_FAILED, EXIT_USAGE, EXIT_NO_SERVER, EXIT_TIMEOUT, EXIT_CTRL_C = 1, 2, 3, 4, 130

# The inputs the options set, by node class. The pack's nodes and ComfyUI's native ones, so that a workflow built
# from either (or ComfyUI's own Z-Image template) takes the same options.
# --prompt: the text input of the node that makes the positive conditioning, and which output of it is positive
POSITIVE_TEXT = {"ZImageTextEncode": ("prompt", 0), "ZImageEdit": ("instruction", 0),
                 "CLIPTextEncode": ("text", 0), "TextEncodeZImageOmni": ("prompt", 0)}
SEED_INPUT = {"ZImageSampler": "seed", "KSampler": "seed", "KSamplerAdvanced": "noise_seed",
              "SamplerCustom": "noise_seed", "RandomNoise": "noise_seed"}
EMPTY_LATENTS = ("ZImageLatent", "EmptyLatentImage", "EmptySD3LatentImage")


class UsageError(Exception):
    """A bad option or workflow file: exit 2."""


class NoServer(Exception):
    """Nothing answered at --server: exit 3."""


class Failed(Exception):
    """ComfyUI refused the workflow or it failed while running: exit 1."""


# ---------------------------------------------------------------------------------------------------------------
# The workflow file and the options that edit it


def load_workflow(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            workflow = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"no workflow file at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a JSON file ({e})") from None
    # The UI format (what the canvas saves: "nodes" and "links") is a different graph language that only the
    # browser front end turns into the API format; /prompt would refuse it with a message that does not say why.
    if isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list) and "links" in workflow:
        twin = path[:-len(".json")] + ".api.json" if path.endswith(".json") else None
        hint = f" Use its API twin {twin}" if twin and os.path.exists(twin) else \
            " Export it from ComfyUI with Workflow > Export (API)"
        raise UsageError(f"{path} is a UI workflow (the canvas format), not the API format /prompt takes.{hint}.")
    if not isinstance(workflow, dict) or not workflow or not all(
            isinstance(node, dict) and "class_type" in node and isinstance(node.get("inputs"), dict)
            for node in workflow.values()):
        raise UsageError(f"{path} is not an API-format workflow: expected an object of nodes, "
                         '{"<id>": {"class_type": ..., "inputs": {...}}, ...}')
    return workflow


def describe(workflow: dict, node_id: str) -> str:
    node = workflow.get(node_id)
    if node is None:  # a node ComfyUI made while running (a subgraph's inner node, e.g. "57:27")
        return f"node #{node_id}"
    kind = node.get("class_type", "?")
    title = node.get("_meta", {}).get("title")
    return f"{title} ({kind} #{node_id})" if title and title != kind else f"{kind} #{node_id}"


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def positive_text_nodes(workflow: dict) -> list[tuple[str, str]]:
    """(node id, input name) of every text that makes a positive conditioning.

    Found by following the links into each sampler's (or guider's) `positive` input upstream until a text encoder
    is reached, through any node in between (conditioning combiners, ControlNet appliers): a negative prompt
    node (ZImageTextEncode's second output, a CLIPTextEncode wired to `negative`) is never reached that way."""
    found, seen = [], set()

    def walk(link):
        source, output = link[0], link[1]
        if (source, output) in seen or source not in workflow:
            return
        seen.add((source, output))
        node = workflow[source]
        text = POSITIVE_TEXT.get(node["class_type"])
        if text is not None:
            name, positive_output = text
            if output == positive_output and (source, name) not in found:
                found.append((source, name))
            return
        for value in node["inputs"].values():
            if is_link(value):
                walk(value)

    for node in workflow.values():
        inputs = node["inputs"]
        starts = [inputs.get("positive")]
        if node["class_type"] == "BasicGuider":  # its one conditioning is the positive one
            starts.append(inputs.get("conditioning"))
        for start in starts:
            if is_link(start):
                walk(start)
    return found


def set_prompt(workflow: dict, text: str) -> None:
    targets = positive_text_nodes(workflow)
    if not targets:
        kinds = ", ".join(sorted(POSITIVE_TEXT))
        raise UsageError(f"--prompt: no positive prompt node found (one of {kinds} wired into a sampler's "
                         "positive input); edit the prompt in the workflow file instead")
    for node_id, name in targets:
        if is_link(workflow[node_id]["inputs"].get(name)):
            raise UsageError(f"--prompt: the {name} of {describe(workflow, node_id)} comes from another node "
                             f"(#{workflow[node_id]['inputs'][name][0]}); set the text there in the workflow file")
        workflow[node_id]["inputs"][name] = text


def set_seed(workflow: dict, seed: int) -> None:
    if not 0 <= seed < 2 ** 64:
        raise UsageError(f"--seed {seed}: a seed is between 0 and {2 ** 64 - 1}")
    hits = 0
    for node in workflow.values():
        name = SEED_INPUT.get(node["class_type"])
        if name is not None and not is_link(node["inputs"].get(name)):
            node["inputs"][name] = seed
            hits += 1
    if not hits:
        raise UsageError(f"--seed: the workflow has no sampler whose seed can be set (one of "
                         f"{', '.join(sorted(SEED_INPUT))})")


def parse_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 768x1024") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive")
    return width, height


def set_size(workflow: dict, width: int, height: int) -> None:
    hits = 0
    for node in workflow.values():
        if node["class_type"] in EMPTY_LATENTS:
            node["inputs"].update(width=width, height=height)
            if node["class_type"] == "ZImageLatent":
                # the aspect names the preset width and height came from (older versions of the node let a
                # preset override them): after --size they are custom
                node["inputs"]["aspect"] = "custom"
            hits += 1
    if not hits:
        raise UsageError(f"--size: the workflow has no empty latent ({', '.join(EMPTY_LATENTS)}); its size comes "
                         "from elsewhere (an input image, for image-to-image and edit workflows)")


# ---------------------------------------------------------------------------------------------------------------
# HTTP


class Server:
    def __init__(self, url: str):
        if "://" not in url:
            url = "http://" + url
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--server {url}: expected http://HOST:PORT")
        self.url = url.rstrip("/")
        self.parts = parts
        self.local = is_local(parts.hostname)
        # A proxy from the environment (http_proxy) would swallow requests to this machine's own ComfyUI.
        handlers = [urllib.request.ProxyHandler({})] if self.local else []
        self.opener = urllib.request.build_opener(*handlers)

    def request(self, path: str, data=None, timeout: float = 30, raw: bool = False):
        """(HTTP status, JSON body, or bytes with raw=True). NoServer when nothing answers."""
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with self.opener.open(req, timeout=timeout) as r:
                content = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            content, status = e.read(), e.code
        except (urllib.error.URLError, ConnectionError, socket.timeout, OSError) as e:
            reason = getattr(e, "reason", e)
            raise NoServer(f"no ComfyUI answered at {self.url} ({reason})") from None
        if raw:
            return status, content
        try:
            return status, (json.loads(content) if content else None)
        except json.JSONDecodeError:
            return status, content.decode(errors="replace")

    def get(self, path: str):
        status, body = self.request(path)
        if status != 200:
            raise Failed(f"GET {path} answered {status}: {str(body)[:500]}")
        return body


def is_local(host: str) -> bool:
    """Whether the server runs on this machine, so that its folders are this machine's folders."""
    if host in ("localhost", socket.gethostname()):
        return True
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------------
# Progress: ComfyUI's /ws websocket, read with a small RFC 6455 client on a plain socket


class WebSocket:
    """Just enough of a websocket client for ComfyUI's /ws: the handshake, reading text frames (JSON messages),
    skipping binary ones (live previews), answering pings. ComfyUI sends a client's progress messages only to the
    socket opened with the client_id the prompt was queued with, so this connects before the prompt is queued."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's constant for Sec-WebSocket-Accept

    def __init__(self, server: Server, client_id: str):
        parts = server.parts
        port = parts.port or (443 if parts.scheme == "https" else 80)
        sock = socket.create_connection((parts.hostname, port), timeout=10)
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        self.sock = sock
        self.buffer = bytearray()
        self.fragments = bytearray()
        self.closed = False
        key = base64.b64encode(os.urandom(16)).decode()
        path = (parts.path.rstrip("/") or "") + "/ws?clientId=" + urllib.parse.quote(client_id)
        host = parts.netloc.rsplit("@", 1)[-1]
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buffer:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed the connection during the websocket handshake")
            self.buffer += chunk
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        if " 101 " not in lines[0] + " ":
            raise ConnectionError(f"no websocket at /ws: {lines[0]}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        expected = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            raise ConnectionError("the websocket handshake's accept key is wrong")

    def _send(self, opcode: int, payload: bytes = b""):
        # frames from a client are masked (RFC 6455 5.3)
        mask = os.urandom(4)
        n = len(payload)
        header = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else
                                           bytes([0x80 | 126]) + struct.pack("!H", n) if n < 1 << 16 else
                                           bytes([0x80 | 127]) + struct.pack("!Q", n))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _frames(self):
        """Complete frames in the buffer, as (fin, opcode, payload); a partial frame stays for the next read."""
        while len(self.buffer) >= 2:
            fin, opcode = self.buffer[0] & 0x80, self.buffer[0] & 0x0F
            masked, n = self.buffer[1] & 0x80, self.buffer[1] & 0x7F
            at = 2
            if n == 126:
                if len(self.buffer) < 4:
                    return
                n, at = struct.unpack("!H", self.buffer[2:4])[0], 4
            elif n == 127:
                if len(self.buffer) < 10:
                    return
                n, at = struct.unpack("!Q", self.buffer[2:10])[0], 10
            mask = b""
            if masked:
                mask, at = self.buffer[at:at + 4], at + 4
            if len(self.buffer) < at + n:
                return
            payload = bytes(self.buffer[at:at + n])
            del self.buffer[:at + n]
            if masked:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            yield fin, opcode, payload

    def receive(self, timeout: float) -> list[dict]:
        """The JSON messages that arrive within `timeout` seconds (maybe none)."""
        if self.closed:
            time.sleep(timeout)
            return []
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(1 << 16)
        except (socket.timeout, TimeoutError):
            return []
        except OSError:
            chunk = b""
        if not chunk:
            self.closed = True
            return []
        self.buffer += chunk
        messages = []
        for fin, opcode, payload in self._frames():
            if opcode == 0x9:  # ping
                self._send(0xA, payload)
            elif opcode == 0x8:  # close
                self.closed = True
            elif opcode in (0x1, 0x0):  # text, or a continuation of one
                self.fragments += payload
                if fin:
                    try:
                        messages.append(json.loads(self.fragments.decode()))
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        pass
                    self.fragments.clear()
            # 0x2, binary: a preview image; not shown
        return messages

    def close(self):
        try:
            self._send(0x8, struct.pack("!H", 1000))
            self.sock.close()
        except OSError:
            pass


class ProgressLine:
    """One line on stderr: the node that runs (its number among the workflow's nodes) and the sampler's step.
    On a terminal the line is redrawn in place; in a log, a line is written when the node changes and at every
    tenth of a node's steps."""

    def __init__(self, workflow: dict, stream=sys.stderr):
        self.workflow = workflow
        self.stream = stream
        self.tty = stream.isatty()
        self.done: set[str] = set()
        self.node: str | None = None
        self.shown = ""
        self.shown_key = None

    def _show(self, text: str, key):
        if self.tty:
            width = 120
            self.stream.write("\r\033[K" + text[:width])
        elif key != self.shown_key:
            self.stream.write(text + "\n")
        self.shown, self.shown_key = text, key
        self.stream.flush()

    def status(self, text: str):
        self._show(text, text)

    def cached(self, node_ids):
        self.done.update(str(n) for n in node_ids)

    def executing(self, node_id: str | None):
        if self.node is not None:
            self.done.add(self.node)
        self.node = node_id
        if node_id is not None:
            self._show(f"[{len(self.done) + 1}/{len(self.workflow)}] {describe(self.workflow, node_id)}",
                       (node_id, None))

    def progress(self, node_id: str, value: int, maximum: int):
        if maximum <= 0:
            return
        value = min(value, maximum)
        bar = "#" * round(20 * value / maximum)
        text = (f"[{len(self.done) + 1}/{len(self.workflow)}] {describe(self.workflow, node_id)} "
                f"|{bar:<20}| step {value}/{maximum}")
        self._show(text, (node_id, value * 10 // maximum))

    def end(self):
        if self.tty and self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
        self.shown = ""


# ---------------------------------------------------------------------------------------------------------------
# Queueing, waiting, and the answers


def start_comfyui_hint(server: Server) -> str:
    port = server.parts.port or 8188
    port_arg = "" if port == 8188 else f" --port {port}"
    return (f"start ComfyUI first: `comfy launch` (comfy-cli), or `python main.py{port_arg}` in the ComfyUI "
            f"folder, and wait for 'To see the GUI go to: ...'; then run this again (or point --server at a "
            f"running ComfyUI)")


def missing_node_types(server: Server, workflow: dict) -> list[str]:
    """The workflow's node classes this ComfyUI does not know (GET /object_info/<class> answers {} for those)."""
    missing = []
    for kind in sorted({node["class_type"] for node in workflow.values()}):
        status, info = server.request("/object_info/" + urllib.parse.quote(kind), timeout=30)
        if status == 200 and isinstance(info, dict) and kind not in info:
            missing.append(kind)
    return missing


def refused_message(body, missing: list[str]) -> str:
    """The text of a 400 from /prompt: the error, and each node's errors with what to do about the common ones."""
    if not isinstance(body, dict):
        return f"ComfyUI refused the workflow: {body}"
    error = body.get("error") or {}
    if isinstance(error, str):
        error = {"message": error}
    lines = [f"ComfyUI refused the workflow: {error.get('message', 'no message')}"
             + (f" ({error['details']})" if error.get("details") else "")]
    if missing:
        ours = [kind for kind in missing if kind.startswith("ZImage")]
        lines.append(f"  node types this ComfyUI does not have: {', '.join(missing)}; "
                     + ("install this pack into its custom_nodes (README, Install) and restart it" if ours else
                        "install the node pack that provides them, or update ComfyUI, and restart it"))
    for node_id, info in (body.get("node_errors") or {}).items():
        kind = info.get("class_type", "?")
        for e in info.get("errors", []):
            details = f": {e['details']}" if e.get("details") else ""
            lines.append(f"  node {node_id} ({kind}): {e.get('type', 'error')}: {e.get('message', '')}{details}")
            if e.get("type") == "value_not_in_list" and str(e.get("extra_info", {}).get("input_name", "")
                                                              ).endswith("_name"):
                lines.append("    the file is not in ComfyUI's models folders: download it into the folder the "
                             "README's Quick start names, then refresh ComfyUI (or restart it)")
    return "\n".join(lines)


def failure_message(workflow: dict, entry: dict) -> str:
    messages = entry.get("status", {}).get("messages", [])
    for event, data in messages:
        if event == "execution_error":
            node_id = str(data.get("node_id"))
            node = describe(workflow, node_id) if node_id in workflow else \
                f"node #{node_id} ({data.get('node_type', '?')})"
            text = (f"the workflow failed in {node}: "
                    f"{data.get('exception_type', 'error')}: {data.get('exception_message', '').strip()}")
            return text + "\n  (ComfyUI's console has the traceback)"
        if event == "execution_interrupted":
            return (f"the workflow was interrupted in node {data.get('node_id')} ({data.get('node_type', '?')}), "
                    "by the UI's cancel button or POST /interrupt")
    events = ", ".join(event for event, _ in messages) or "none"
    return f"the workflow failed without an error message (its events: {events}); ComfyUI's console says why"


def cancel(server: Server, prompt_id: str):
    """Take our prompt off the queue, or stop it if it runs (0.8+ interrupts only the prompt whose id it gets)."""
    try:
        server.request("/queue", {"delete": [prompt_id]}, timeout=5)
        server.request("/interrupt", {"prompt_id": prompt_id}, timeout=5)
    except NoServer:
        pass


def queue_position(server: Server, prompt_id: str) -> str | None:
    """'running', 'queued: N ahead', or None when the prompt is in neither list (finished)."""
    queue = server.get("/queue")
    if any(item[1] == prompt_id for item in queue.get("queue_running", [])):
        return "running"
    pending = queue.get("queue_pending", [])
    mine = [item[0] for item in pending if item[1] == prompt_id]
    if mine:
        ahead = sum(1 for item in pending if item[0] < mine[0]) + len(queue.get("queue_running", []))
        return f"queued: {ahead} prompt(s) ahead"
    return None


def wait(server: Server, workflow: dict, prompt_id: str, socket_: WebSocket | None, timeout: float,
         line: ProgressLine) -> tuple[dict, set[str]]:
    """Wait for the prompt's /history entry (the authority on how it ended), showing progress meanwhile.
    Returns the entry and the ids of the nodes ComfyUI took from its cache."""
    deadline = time.monotonic() + timeout
    cached: set[str] = set()
    next_check = 0.0
    while True:
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError
        ended = False
        if socket_ is not None and not socket_.closed:
            for message in socket_.receive(0.5):
                kind, data = message.get("type"), message.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if kind == "status" and line.node is None and not line.done:
                    remaining = data.get("status", {}).get("exec_info", {}).get("queue_remaining")
                    if remaining:
                        line.status(f"queued ({remaining} in ComfyUI's queue, this one included)")
                elif kind == "execution_start":
                    line.status("started")
                elif kind == "execution_cached":
                    cached.update(str(n) for n in data.get("nodes", []))
                    line.cached(cached)
                elif kind == "executing":
                    if data.get("node") is None:
                        ended = data.get("prompt_id") == prompt_id
                        line.executing(None)
                    else:
                        line.executing(str(data["node"]))
                elif kind == "progress" and data.get("node") is not None:
                    line.progress(str(data["node"]), int(data.get("value", 0)), int(data.get("max", 0)))
                elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                    ended = True
        else:
            time.sleep(0.5)
        if ended or time.monotonic() >= next_check:
            history = server.get(f"/history/{urllib.parse.quote(prompt_id)}")
            entry = history.get(prompt_id) if isinstance(history, dict) else None
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                # the entry's own messages say which nodes came from the cache, also when the prompt ended
                # before the socket delivered them
                for event, data in entry["status"].get("messages", []):
                    if event == "execution_cached":
                        cached.update(str(n) for n in data.get("nodes", []))
                return entry, cached
            if socket_ is None or socket_.closed:
                position = queue_position(server, prompt_id)
                if position:
                    line.status(position + ("" if position != "running" else
                                            " (no step progress: ComfyUI's websocket could not be opened)"))
            next_check = time.monotonic() + (2.0 if socket_ is not None and not socket_.closed else 1.0)


def output_files(entry: dict) -> list[tuple[str, dict]]:
    """(node id, {filename, subfolder, type}) of every file the outputs name: images, and the same records that
    video/audio nodes give."""
    files = []
    for node_id, output in (entry.get("outputs") or {}).items():
        for records in output.values():
            if isinstance(records, list):
                files += [(node_id, r) for r in records if isinstance(r, dict) and "filename" in r]
    return files


def server_folders(server: Server) -> dict[str, list[Path]]:
    """Where the server keeps output/temp/input, as far as it says: its command line (--output-directory,
    --base-directory, ...) from /system_stats and its base folder (the parent of its custom_nodes folder) from
    /internal/folder_paths; and, last, the ComfyUI this tool sits in (ComfyUI/custom_nodes/<pack>/tools/).
    Each is only a candidate: a file is reported there only when its bytes are the server's (see locate)."""
    folders: dict[str, list[Path]] = {"output": [], "temp": [], "input": []}
    try:
        argv = server.get("/system_stats").get("system", {}).get("argv", [])
    except (Failed, NoServer, AttributeError):
        argv = []
    options = {}
    for i, arg in enumerate(argv):
        name, eq, value = str(arg).partition("=")
        if name in ("--output-directory", "--temp-directory", "--input-directory", "--base-directory"):
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if value and os.path.isabs(value):
                options[name] = Path(value)
    if "--output-directory" in options:
        folders["output"].append(options["--output-directory"])
    if "--input-directory" in options:
        folders["input"].append(options["--input-directory"])
    if "--temp-directory" in options:
        folders["temp"].append(options["--temp-directory"] / "temp")  # ComfyUI appends "temp" to this one
    bases = []
    if "--base-directory" in options:
        bases.append(options["--base-directory"])
    try:
        status, paths = server.request("/internal/folder_paths", timeout=10)
        if status == 200 and isinstance(paths, dict) and paths.get("custom_nodes"):
            bases.append(Path(paths["custom_nodes"][0]).parent)
    except NoServer:
        pass
    here = Path(os.path.abspath(__file__)).parent.parent  # the pack, as the user named it (symlinks kept)
    for pack in (here, here.resolve()):
        if pack.parent.name == "custom_nodes":
            bases.append(pack.parent.parent)
    for base in bases:
        for kind in folders:
            folders[kind].append(base / kind)
    return folders


def locate(server: Server, record: dict, folders: dict[str, list[Path]]) -> Path | None:
    """The file on this machine, when the server runs here: the first candidate folder holding a file of that
    name with the same bytes that GET /view serves (so a same-named file of another ComfyUI is never named)."""
    if not server.local:
        return None
    relative = Path(record.get("subfolder") or "") / record["filename"]
    candidates = [folder / relative for folder in folders.get(record.get("type", "output"), [])]
    candidates = [c for c in dict.fromkeys(candidates) if c.is_file()]
    if not candidates:
        return None
    status, content = server.request("/view?" + view_query(record), timeout=120, raw=True)
    if status != 200:
        return None
    digest = hashlib.sha256(content).digest()
    for candidate in candidates:
        if candidate.stat().st_size == len(content) and hashlib.sha256(candidate.read_bytes()).digest() == digest:
            return candidate.resolve()
    return None


def view_query(record: dict) -> str:
    return urllib.parse.urlencode({"filename": record["filename"], "subfolder": record.get("subfolder", ""),
                                   "type": record.get("type", "output")})


def download(server: Server, record: dict, folder: Path) -> Path:
    status, content = server.request("/view?" + view_query(record), timeout=300, raw=True)
    if status != 200:
        raise Failed(f"GET /view for {record['filename']} answered {status}")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / Path(record["filename"]).name
    n = 1
    while target.exists():  # never overwrite: ComfyUI's counters are per output folder, not per download folder
        target = folder / f"{Path(record['filename']).stem}_{n}{Path(record['filename']).suffix}"
        n += 1
    target.write_bytes(content)
    return target.resolve()


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Run an API-format ComfyUI workflow on a running ComfyUI and print the paths of the images "
                    "it saves (one a line, on stdout); progress goes to stderr.",
        epilog="Exit status: 0 done; 1 refused or failed (the node's error is printed); 2 bad option or workflow "
               "file; 3 no ComfyUI at --server; 4 timed out (the prompt is cancelled); 130 Ctrl-C (cancelled).")
    parser.add_argument("workflow", help="an API-format workflow (.api.json; ComfyUI: Workflow > Export (API))")
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"ComfyUI's address (default {DEFAULT_SERVER})")
    parser.add_argument("--prompt", help="the positive prompt: sets the text of the ZImageTextEncode / "
                                         "CLIPTextEncode (or ZImageEdit instruction) node(s) feeding a sampler's "
                                         "positive input")
    parser.add_argument("--seed", type=int, help="the sampler's seed (ZImageSampler, KSampler, ...)")
    parser.add_argument("--size", type=parse_size, metavar="WxH",
                        help="image width and height, e.g. 768x1024 (sets ZImageLatent / EmptyLatentImage; "
                             "sides are multiples of 16 for Z-Image)")
    parser.add_argument("--download", type=Path, metavar="DIR",
                        help="also fetch each image through GET /view into DIR (for a ComfyUI on another machine)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds to wait for the result, queue time included (default 1800: a first run "
                             "loads ~20 GB of model files); past it the prompt is cancelled")
    return parser.parse_args(argv)


def run(args) -> int:
    workflow = load_workflow(args.workflow)
    if args.prompt is not None:
        set_prompt(workflow, args.prompt)
    if args.seed is not None:
        set_seed(workflow, args.seed)
    if args.size is not None:
        set_size(workflow, *args.size)
    if args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    server = Server(args.server)
    try:
        status, stats = server.request("/system_stats", timeout=10)
    except NoServer as e:
        raise NoServer(f"{e}.\n{start_comfyui_hint(server)}") from None
    if status != 200 or not isinstance(stats, dict) or "system" not in stats:
        raise NoServer(f"{server.url} answered, but not as ComfyUI does (GET /system_stats: {status}); "
                       "is --server the address ComfyUI printed at startup?")

    client_id = uuid.uuid4().hex
    try:
        socket_ = WebSocket(server, client_id)
    except (OSError, ConnectionError) as e:
        print(f"note: no progress messages ({e}); waiting on /history instead", file=sys.stderr)
        socket_ = None
    line = ProgressLine(workflow)
    prompt_id = None
    started = time.monotonic()
    try:
        status, body = server.request("/prompt", {"prompt": workflow, "client_id": client_id}, timeout=120)
        if status != 200:
            if status != 400:
                raise Failed(f"POST /prompt answered {status}: {body}")
            # ComfyUI 0.8 says only "Cannot execute because node X does not exist" for a node type it lacks
            unknown = [] if isinstance(body, dict) and body.get("node_errors") else missing_node_types(server, workflow)
            raise Failed(refused_message(body, unknown))
        prompt_id = body["prompt_id"]
        line.status(f"queued as {prompt_id}")
        try:
            entry, cached = wait(server, workflow, prompt_id, socket_, args.timeout, line)
        except TimeoutError:
            line.end()
            cancel(server, prompt_id)
            print(f"error: the workflow did not finish within --timeout {args.timeout:g} s, so it was cancelled; "
                  "give it longer (the first run loads the model files)", file=sys.stderr)
            return EXIT_TIMEOUT
        except KeyboardInterrupt:
            line.end()
            cancel(server, prompt_id)
            print("cancelled", file=sys.stderr)
            return EXIT_CTRL_C
        except NoServer as e:
            raise NoServer(f"lost ComfyUI while the workflow ran: {e}; its console says why") from None
        line.end()
        if entry["status"]["status_str"] != "success":
            raise Failed(failure_message(workflow, entry))
    finally:
        if socket_ is not None:
            socket_.close()

    files = output_files(entry)
    elapsed = time.monotonic() - started
    if not files:
        print(f"done in {elapsed:.1f} s; the workflow saved no images", file=sys.stderr)
        return 0
    if files and all(node_id in cached for node_id, _ in files):
        print("note: ComfyUI had run this exact workflow before and reused its result; change --seed or "
              "--prompt for a new image", file=sys.stderr)
    print(f"done in {elapsed:.1f} s", file=sys.stderr)
    folders = server_folders(server) if server.local else {}
    for node_id, record in files:
        where = locate(server, record, folders)
        what = f"{describe(workflow, node_id)}: {record.get('type', 'output')}/" + \
               (f"{record['subfolder']}/" if record.get("subfolder") else "") + record["filename"]
        if args.download is not None:
            target = download(server, record, args.download)
            print(f"{what}" + (f" (on the server: {where})" if where else ""), file=sys.stderr)
            print(target)
        elif where is not None:
            print(where)
        else:
            # A server elsewhere (or one whose folders this machine cannot see): its own URL for the file
            print(f"{what} is on the server; fetch it with --download DIR or from:", file=sys.stderr)
            print(f"{server.url}/view?{view_query(record)}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except NoServer as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_SERVER
    except Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return EXIT_CTRL_C


if __name__ == "__main__":
    sys.exit(main())
