"""Three 1024x1024 Turbo generations in a row under a ComfyUI VRAM budget, through the pack's nodes.

ComfyUI is told the budget (--reserve-vram = card - budget) and PyTorch is capped at it
(set_per_process_memory_fraction), so going over it is a real out-of-memory error, not a number. The text
encoder (Qwen3-4B), the transformer (6B, through ZImageLoader from a safetensors file, or with --gguf from a GGUF
of that llama-quantize preset) and the VAE are the full-size architectures with random weights, all owned by
ComfyUI's model management.

    python bench/memory_budget.py --comfyui /path/to/ComfyUI --budget-gb 16 --models /tmp/zimage-models --out DIR
    python bench/memory_budget.py --comfyui /path/to/ComfyUI --budget-gb 8 --gguf Q4_K_M --models DIR --out DIR

The GGUF is written once into --models as city96's tools lay one out (tests/gguf_files.py: the main layers'
matrices in the preset's block types, the rest BF16 and F32), from random bf16 weights drawn tensor by tensor,
and reused. A dry run of the script on the CPU (tiny random model, 64x64, 2 steps, no budget):

    python bench/memory_budget.py --comfyui /path/to/ComfyUI --tiny --gguf Q4_K_M --models /tmp/zm-tiny --out /tmp/o
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Mapping

import torch

from common import (GiB, TINY_DIT, provenance, provenance_line, random_state, text_encoder_shapes, transformer_shapes,
                    vae_shapes, write_json)

PACK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


class RandomState(Mapping):
    """random_state's tensors drawn one at a time as they are read (each with a seed of its own), so that a
    full-size file is written without the whole model in memory at once."""

    def __init__(self, shapes: dict[str, torch.Size], dtype, seed: int, device):
        self.shapes, self.dtype, self.seed, self.device = shapes, dtype, seed, device

    def __getitem__(self, name):
        index = list(self.shapes).index(name)
        return random_state({name: self.shapes[name]}, self.dtype, self.seed * 100_000 + index, self.device)[name]

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def write_gguf_once(models: str, cfg, preset: str, device) -> str:
    """The name of a random transformer GGUF of this llama-quantize preset in `models`, written there if missing
    (under a temporary name, renamed when complete)."""
    from gguf_files import write_gguf

    name = f"z_image_random-{'tiny-' if cfg == TINY_DIT else ''}{preset}.gguf"
    path = os.path.join(models, name)
    if not os.path.exists(path):
        t = time.time()
        write_gguf(path + ".partial", RandomState(transformer_shapes(cfg), torch.bfloat16, 0, device), preset)
        os.replace(path + ".partial", path)
        print(f"wrote {path} ({os.path.getsize(path) / GiB:.2f} GiB) in {time.time() - t:.0f} s", flush=True)
    return name


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--budget-gb", type=float, help="the VRAM budget (needed but with --tiny)")
    parser.add_argument("--models", required=True, help="folder for the random transformer file (reused)")
    parser.add_argument("--gguf", metavar="PRESET", help="the transformer as a GGUF of this llama-quantize preset "
                        "(Q4_K_M, Q4_0, Q8_0, ...: tests/gguf_files.py PRESETS) instead of the bf16 safetensors file")
    parser.add_argument("--tiny", action="store_true", help="dry run on the CPU: tiny random model, 64x64, 2 steps")
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--size", type=int, default=None, help="image side (default 1024; 64 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 8; 2 with --tiny)")
    parser.add_argument("--compile", action="store_true", help="ZImageLoader's compile option")
    parser.add_argument("--weight-dtype", default="default", help="ZImageLoader's weight_dtype")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="ZImageLoader's cuda_graphs option off")
    parser.add_argument("--comfy-casting", action="store_true",
                        help="for comparison: the engine's streaming off, so that ComfyUI's per-layer casting "
                             "copies the weights its partial load left in host memory")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    size, n_steps = args.size or (64 if args.tiny else 1024), args.steps or (2 if args.tiny else 8)
    if args.budget_gb is None and not args.tiny:
        parser.error("--budget-gb is needed (but for a --tiny dry run)")
    sys.path[0:0] = [args.comfyui, os.path.join(PACK, "tests")]  # ComfyUI; the tests' GGUF writer and pack import
    if args.gguf:
        from gguf_files import PRESETS

        if args.gguf not in PRESETS:
            parser.error(f"--gguf {args.gguf}: choose one of {', '.join(PRESETS)}")
    import comfy.cli_args

    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        comfy.cli_args.args.cpu = True
    else:
        total_gb = torch.cuda.get_device_properties(0).total_memory / GiB
        torch.cuda.set_per_process_memory_fraction(args.budget_gb / total_gb)
        comfy.cli_args.args.reserve_vram = total_gb - args.budget_gb
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths
    from safetensors.torch import save_file

    sys.path.insert(2, PACK)  # the engine, after ComfyUI (both have nodes/)
    from comfy_host import import_pack

    nodes = import_pack().NODE_CLASS_MAPPINGS
    # the pack's own engine modules (not the `zimage` that common imports): the loader's runner is their Runner
    from comfyui_zimage.zimage import Runner, ZImageConfig

    cfg = TINY_DIT if args.tiny else ZImageConfig()
    if args.tiny:
        from comfy_process import install_tiny_shims

        install_tiny_shims(cfg)  # the tiny Qwen3-4B, recognised by ComfyUI's text encoder loader
    os.makedirs(args.models, exist_ok=True)
    folder_paths.add_model_folder_path("diffusion_models", args.models)
    t0 = time.time()
    if args.gguf:
        name = write_gguf_once(args.models, cfg, args.gguf, device)
    else:
        name = f"z_image_random_{'tiny_' if args.tiny else ''}bf16.safetensors"
        path = os.path.join(args.models, name)
        if not os.path.exists(path):
            save_file(random_state(transformer_shapes(cfg), torch.bfloat16, 0, device), path)
    write_s = time.time() - t0
    clip = comfy.sd.load_text_encoder_state_dicts([random_state(text_encoder_shapes(), torch.bfloat16, 1, device)],
                                                  clip_type=comfy.sd.CLIPType.LUMINA2)
    vae = comfy.sd.VAE(sd=random_state(vae_shapes(), torch.float32, 2, device))
    setup_s = time.time() - t0

    loaded = nodes["ZImageLoader"]().load(name, args.weight_dtype, "auto", args.compile, not args.no_cuda_graphs)
    (model,), (summary,) = loaded["result"], loaded["ui"]["text"]

    # the transformer's forwards alone (the sampler's time less ComfyUI's model loading), and the bytes of
    # block weights it found in host memory and streamed in. Timed around the runner's calls, not the network's:
    # a CUDA graph replay never calls the network
    runner = model.model.runner
    if args.comfy_casting:
        runner._blocks = lambda device: iter  # the blocks run as they are: ComfyUI's ops cast what is off the GPU
    forwards = []

    class TimedRunner(Runner):
        def __call__(self, *inputs, **options):
            start = Clock()
            streamed = sum(p.nbytes for p in self.model.parameters() if not p.is_cuda)
            forwards.append((start, Clock(), streamed))
            out = super().__call__(*inputs, **options)
            forwards[-1][1].record()
            return out

    class Clock:
        """A CUDA event, or on the CPU (--tiny) the time it was recorded."""

        def __init__(self):
            self.event = torch.cuda.Event(enable_timing=True) if device == "cuda" else None
            self.record()

        def record(self):
            if self.event is not None:
                self.event.record()
            else:
                self.time = time.perf_counter()

        def elapsed_time(self, end) -> float:
            return self.event.elapsed_time(end.event) if self.event is not None else 1000 * (end.time - self.time)

    # the loader's runner itself, its class swapped: ZImageSampler and ComfyUI's model call that object, and a
    # new Runner would decide again what the loader decided (graphs, compile)
    runner.__class__ = TimedRunner

    def now():
        if device == "cuda":
            torch.cuda.synchronize()
        return time.time()

    runs = []
    for i in range(args.generations):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = now()
        positive, negative = nodes["ZImageTextEncode"]().encode(clip, f"a lighthouse at dusk, take {i}", "",
                                                                 "official")["result"]
        t_encoded = now()
        (latent,) = nodes["ZImageLatent"]().generate(size, size, 1, "custom")
        (samples,) = nodes["ZImageSampler"]().sample(model, positive, latent, i, "turbo", n_steps, 0.0, 3.0, 1.0, 0.0,
                                                    1.0, negative)
        t_sampled = now()
        image = vae.decode(samples["samples"])
        t_done = now()
        steps = [(start.elapsed_time(end), streamed) for start, end, streamed in forwards]
        forwards.clear()
        runs.append({"generation": i + 1, "seconds": t_done - t, "text_encode_s": t_encoded - t,
                     "sampling_s": t_sampled - t_encoded, "vae_decode_s": t_done - t_sampled,
                     "seconds_per_step": (t_sampled - t_encoded) / n_steps,
                     "forward_ms": [round(ms, 1) for ms, _ in steps],
                     "streamed_gib_per_forward": steps[0][1] / GiB if steps else None,
                     "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB if device == "cuda" else None,
                     "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB if device == "cuda" else None,
                     "image": list(image.shape), "finite": bool(torch.isfinite(image).all()),
                     "transformer_lowvram": bool(getattr(model.model, "model_lowvram", False)),
                     "loaded_models": [type(m.model).__name__ for m in mm.current_loaded_models]})
        print(json.dumps(runs[-1]), flush=True)

    budget = "no VRAM budget (a CPU dry run)" if args.tiny else f"a {args.budget_gb:g} GiB ComfyUI VRAM budget"
    result = {"what": f"{args.generations} Turbo generations {size}x{size} (text encode + {n_steps} steps + VAE decode) "
                      f"under {budget}",
              **provenance(device),
              "budget_gib": args.budget_gb, "transformer_file": name, "loader_summary": summary,
              "compile": args.compile, "cuda_graphs": not args.no_cuda_graphs, "comfy_casting": args.comfy_casting,
              "weight_dtype": args.weight_dtype, "file_write_seconds": write_s, "setup_seconds": setup_s, "runs": runs}
    stem = (f"memory-{'tiny' if args.tiny else f'{args.budget_gb:g}gb'}{'-' + args.gguf if args.gguf else ''}"
            f"{'-compiled' if args.compile else ''}{'' if args.weight_dtype == 'default' else '-' + args.weight_dtype}"
            f"{'-no-graphs' if args.no_cuda_graphs else ''}{'-comfy-casting' if args.comfy_casting else ''}")
    write_json(result, args.out, stem + ".json")
    path = os.path.join(args.out, stem + ".md")
    with open(path, "w") as f:
        f.write(markdown(result))
    print(f"wrote {path}")


def markdown(result: dict) -> str:
    """The result as a markdown table: a row per generation, peak memory and seconds per step."""
    def gib(value):
        return "-" if value is None else f"{value:.2f}"

    lines = [f"# {result['what']}", "", provenance_line(result), "",
             f"Transformer: `{result['transformer_file']}`; weight_dtype {result['weight_dtype']}, CUDA graphs "
             f"{'on' if result['cuda_graphs'] else 'off'}, compile {'on' if result['compile'] else 'off'}. "
             f"ZImageLoader: {result['loader_summary']}", "",
             "| generation | total s | text encode s | sampling s | s / step | median forward ms | streamed GiB / "
             "forward | peak allocated GiB | peak reserved GiB | transformer partly offloaded |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        forward = statistics.median(run["forward_ms"][1:] or run["forward_ms"]) if run["forward_ms"] else None
        streamed = run["streamed_gib_per_forward"]
        lines.append(f"| {run['generation']} | {run['seconds']:.2f} | {run['text_encode_s']:.2f} | "
                     f"{run['sampling_s']:.2f} | {run['seconds_per_step']:.3f} | "
                     f"{'-' if forward is None else f'{forward:.1f}'} | {gib(streamed)} | "
                     f"{gib(run['peak_allocated_gib'])} | {gib(run['peak_reserved_gib'])} | "
                     f"{'yes' if run['transformer_lowvram'] else 'no'} |")
    lines += ["", "The median forward leaves out each generation's first (the CUDA graph capture, the model's "
                  "loading). Random weights: the images are noise; the memory and times are the real model's.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
