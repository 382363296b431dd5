"""End to end, what a user waits for: ComfyUI's official Z-Image Turbo template graph on native nodes against the
pack's Turbo workflow, both through ComfyUI's executor (execution.PromptExecutor, as its prompt worker runs them)
in one process, on the same random full-size files (transformer, Qwen3-4B text encoder, FLUX VAE).

Variants (--variants picks some):
- native, native_fp8: the template graph (UNETLoader default / fp8_e4m3fn_fast, ModelSamplingAuraFlow 3, KSampler
  cfg 1 res_multistep simple, CLIPLoader qwen_3_4b lumina2, CLIPTextEncode, ConditioningZeroOut,
  EmptySD3LatentImage, VAEDecode, SaveImage);
- pack, pack_fp8: workflows/zimage_turbo_t2i.api.json as shipped (ZImageLoader default / fp8_e4m3fn_fast).
Both sample --steps evaluations (8: the pack's Turbo preset). Every run has a new prompt, so the text encoder, the
sampler, the decode and the save run each time; the loaders' outputs stay in ComfyUI's cache (its LRU cache, as
--cache-lru gives it, so that the variants can run in turns) and the models stay loaded: a timed run that loads
a model or runs a loader is an error. The first run of each variant is a warm-up (kernel compilation, CUDA graph
capture). Node times come from the executor's own "executing" events (the GPU is synchronised there, between
nodes, never inside the sampling); total is the executor's execute() call.

On the GPU machine:
    python bench/bench_e2e.py --models /tmp/zimage-bench --out bench/results
A dry run on the CPU (tiny random files, 64x64, 2 steps):
    python bench/bench_e2e.py --tiny --models /tmp/zimage-bench-tiny --out /tmp/bench-out

ComfyUI's folder comes from --comfyui or $COMFYUI_PATH. The prompt's words are tokenized by ComfyUI's own Qwen
tokenizer files (comfy/text_encoders/qwen25_tokenizer), as ComfyUI does for qwen_3_4b.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid

import comfy_process

VARIANTS = ("native", "native_fp8", "pack", "pack_fp8")
# what each node's time is reported as
STAGES = {"CLIPTextEncode": "text_encode", "ZImageTextEncode": "text_encode", "ConditioningZeroOut": "text_encode",
          "KSampler": "sampling", "ZImageSampler": "sampling", "ModelSamplingAuraFlow": "sampling",
          "VAEDecode": "decode", "ZImageVAEDecode": "decode", "SaveImage": "save", "EmptySD3LatentImage": "latent", "ZImageLatent": "latent"}
LOADERS = ("UNETLoader", "ZImageLoader", "CLIPLoader", "VAELoader")


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant, after one warm-up run each")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    return comfy_process.parse_arguments(parser)


# ComfyUI's flags and allocator are set before torch is imported, as its main.py does
ARGS = arguments()
comfy_process.start_from(ARGS)

import torch  # noqa: E402

from common import MODEL_FILES, provenance, provenance_line, write_json  # noqa: E402


def native_graph(prompt: str, weight_dtype: str, size: int, steps: int, seed: int, prefix: str) -> dict:
    """ComfyUI's official Z-Image Turbo template (image_z_image_turbo.json) in API form, its node ids kept."""
    return {
        "28": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL_FILES["diffusion_models"],
                                                      "weight_dtype": weight_dtype}},
        "30": {"class_type": "CLIPLoader", "inputs": {"clip_name": MODEL_FILES["text_encoders"], "type": "lumina2",
                                                      "device": "default"}},
        "29": {"class_type": "VAELoader", "inputs": {"vae_name": MODEL_FILES["vae"]}},
        "27": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["30", 0]}},
        "33": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["27", 0]}},
        "13": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "11": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["28", 0], "shift": 3.0}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["11", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "res_multistep",
            "scheduler": "simple", "positive": ["27", 0], "negative": ["33", 0], "latent_image": ["13", 0],
            "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["29", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


def pack_graph(prompt: str, weight_dtype: str, size: int, steps: int, seed: int, prefix: str) -> dict:
    """The pack's Turbo workflow as shipped, with this run's prompt, size, steps, weight dtype and seed."""
    from comfy_host import load_workflow

    graph = load_workflow("zimage_turbo_t2i.api.json")
    by_class = {spec["class_type"]: spec["inputs"] for spec in graph.values()}
    by_class["ZImageLoader"]["weight_dtype"] = weight_dtype
    by_class["ZImageTextEncode"]["prompt"] = prompt
    by_class["ZImageLatent"].update(width=size, height=size)
    by_class["ZImageSampler"].update(steps=steps, seed=seed)
    by_class["SaveImage"]["filename_prefix"] = prefix
    return graph


GRAPHS = {"native": (native_graph, "default"), "native_fp8": (native_graph, "fp8_e4m3fn_fast"),
          "pack": (pack_graph, "default"), "pack_fp8": (pack_graph, "fp8_e4m3fn_fast")}


class Server:
    """What the executor asks of ComfyUI's server, with nobody connected; it notes when each node starts (the
    executor's "executing" event), after waiting for the GPU: node boundaries, never inside a node."""

    client_id = None
    last_node_id = None
    sockets_metadata = {}

    def __init__(self):
        self.marks: list[tuple[str | None, float]] = []
        self.cached: list[str] = []

    def send_sync(self, event, data, sid=None):
        if event == "executing" and isinstance(data, dict):
            self.mark(data.get("node"))
        elif event == "execution_cached":
            self.cached = list(data["nodes"])
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            self.mark(None)

    def mark(self, node):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((node, time.perf_counter()))

    def queue_updated(self, *args, **kwargs):
        pass


def main():
    import comfy.model_management as mm
    import comfy.model_patcher
    import execution
    import folder_paths

    allocator, device, _, _ = comfy_process.prepare(ARGS)
    output = os.path.join(ARGS.models, "output")
    folder_paths.set_output_directory(output)

    # a timed run must find every model loaded: count what ComfyUI's model management unloads (wholly or in part)
    # after the warm-up round, and which models it asks to load (a no-op for one already loaded)
    loads, unloads = [], []

    def counted(method, record):
        def run(self, *args, **kwargs):
            inner = self.model  # a LoadedModel's patcher, or a patcher's model
            record.append(type(getattr(inner, "model", inner)).__name__)
            return method(self, *args, **kwargs)
        return run

    mm.LoadedModel.model_load = counted(mm.LoadedModel.model_load, loads)
    mm.LoadedModel.model_unload = counted(mm.LoadedModel.model_unload, unloads)
    comfy.model_patcher.ModelPatcher.partially_unload = counted(comfy.model_patcher.ModelPatcher.partially_unload,
                                                                unloads)

    server = Server()
    # ComfyUI's LRU cache (--cache-lru) large enough for every run's outputs: the loaders' never fall out of it
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.LRU, cache_args={"lru": 4096, "ram": 0})
    runs = {v: [] for v in ARGS.variants}
    first = {}
    for round_ in range(ARGS.runs + 1):  # round 0: warm-up
        if round_ == 1:
            unloads.clear()
        for variant in ARGS.variants:
            build, weight_dtype = GRAPHS[variant]
            prompt = f"a lighthouse on a cliff at dusk, storm clouds, run {round_} of {variant} {uuid.uuid4().hex[:6]}"
            graph = build(prompt, weight_dtype, ARGS.size, ARGS.steps, seed=round_, prefix=f"bench_{variant}")
            outputs = [n for n, spec in graph.items() if spec["class_type"] == "SaveImage"]
            server.marks.clear()
            loads.clear()
            t = time.perf_counter()
            executor.execute(graph, str(uuid.uuid4()), {"client_id": "bench"}, outputs)
            total = time.perf_counter() - t
            if not executor.success:
                raise SystemExit(f"{variant}: {json.dumps(executor.status_messages[-1], default=str)[:3000]}")
            times = node_times(server.marks, graph)
            run = {"total_s": total, "nodes": times, "loaded": list(loads),
                   **{stage: sum(s for n, s in times.items() if STAGES.get(graph[n]["class_type"]) == stage)
                      for stage in ("text_encode", "sampling", "decode", "save")}}
            if round_ == 0:
                first[variant] = run
            else:
                ran_loaders = [graph[n]["class_type"] for n in times if graph[n]["class_type"] in LOADERS]
                if unloads or ran_loaders:
                    raise SystemExit(f"{variant}, run {round_}: not warm: models unloaded since the warm-up "
                                     f"{unloads}, loaders run {ran_loaders} (ComfyUI made room for another model); "
                                     f"time fewer --variants per process")
                runs[variant].append(run)
            print(variant, round_, {k: round(v, 3) for k, v in run.items() if k.endswith("_s") or k in (
                "text_encode", "sampling", "decode", "save")}, flush=True)

    summary = {}
    for variant, rs in runs.items():
        summary[variant] = {stage: {"median": statistics.median(r[stage] for r in rs),
                                    "min": min(r[stage] for r in rs), "max": max(r[stage] for r in rs)}
                            for stage in ("text_encode", "sampling", "decode", "save", "total_s")}
    result = {"what": f"Turbo {ARGS.size}x{ARGS.size}, {ARGS.steps} evaluations, batch 1, through ComfyUI's executor, "
                      f"random {'tiny' if ARGS.tiny else 'full-size'} weights (transformer bf16 file, Qwen3-4B, FLUX "
                      f"VAE), a new prompt each run, warm",
              **provenance(str(device)), **comfy_process.comfy_versions(), "allocator": allocator,
              "loaded_models": [type(m.model).__name__ for m in mm.current_loaded_models],
              "vram_state": mm.vram_state.name, "summary": summary, "warmup": first, "runs": runs}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(result, ARGS.out, f"e2e-{stamp}.json")
    write_table(result, os.path.join(ARGS.out, f"e2e-{stamp}.md"))


def node_times(marks: list[tuple[str | None, float]], graph: dict) -> dict[str, float]:
    """{node id: seconds} from the start marks (a node runs until the next mark); nodes served from the cache have
    no mark."""
    times = {}
    for (node, start), (_, end) in zip(marks, marks[1:]):
        if node is not None:
            if node not in graph:
                raise SystemExit(f"the executor ran node {node!r}, which is not in the graph")
            times[node] = times.get(node, 0.0) + end - start
    return times


LABELS = {"native": "native template, bf16 default", "native_fp8": "native template, fp8_e4m3fn_fast",
          "pack": "pack workflow, default", "pack_fp8": "pack workflow, fp8_e4m3fn_fast"}
PAIRS = (("pack", "native"), ("pack_fp8", "native_fp8"), ("pack_fp8", "native"))


def write_table(result: dict, path: str) -> None:
    s = result["summary"]
    lines = ["# Z-Image Turbo end to end: native template graph vs the pack's workflow, through ComfyUI's executor", "",
             provenance_line(result), "",
             f"ComfyUI {result['comfyui']}, comfy-kitchen {result['comfy_kitchen'] or 'not installed'}, cuDNN frontend "
             f"{result['cudnn_frontend'] or 'not installed (engine attention in bf16)'}, allocator "
             f"{result['allocator']}, VRAM state {result['vram_state']}.", "",
             result["what"] + ". Seconds, median (min-max) of the timed runs; node times between the executor's "
             "events, the GPU synchronised at each.", "",
             "| variant | text encode | sampling | decode | save | total |", "|---|---|---|---|---|---|"]
    for variant, stages in s.items():
        lines.append(f"| {LABELS[variant]} | " + " | ".join(
            f"{stages[k]['median']:.3f} ({stages[k]['min']:.3f}-{stages[k]['max']:.3f})"
            for k in ("text_encode", "sampling", "decode", "save", "total_s")) + " |")
    ratios = [(a, b) for a, b in PAIRS if a in s and b in s]
    if ratios:
        lines += ["", "Ratios of medians:", "", "| | text encode | sampling | decode | total |", "|---|---|---|---|---|"]
        for a, b in ratios:
            lines.append(f"| {a} / {b} | " + " | ".join(
                f"{s[a][k]['median'] / s[b][k]['median']:.2f}" for k in ("text_encode", "sampling", "decode", "total_s"))
                + " |")
    lines += ["", "First (warm-up) run of each variant, total seconds: "
              + ", ".join(f"{v} {r['total_s']:.2f}" for v, r in result["warmup"].items()) + "."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
