"""Three 1024x1024 Turbo generations in a row under a ComfyUI VRAM budget, through the pack's nodes.

ComfyUI is told the budget (--reserve-vram = card - budget) and PyTorch is capped at it
(set_per_process_memory_fraction), so going over it is a real out-of-memory error, not a number. The text
encoder (Qwen3-4B), the transformer (6B, through ZImageLoader from a safetensors file) and the VAE are the
full-size architectures with random weights, all owned by ComfyUI's model management.

    python bench/memory_budget.py --comfyui /path/to/ComfyUI --budget-gb 16 --models /tmp/zimage-models --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from common import GiB, provenance, random_state, text_encoder_shapes, transformer_shapes, vae_shapes, write_json

PACK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--budget-gb", type=float, required=True)
    parser.add_argument("--models", required=True, help="folder for the random transformer file (reused)")
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--compile", action="store_true", help="ZImageLoader's compile option")
    parser.add_argument("--weight-dtype", default="default", help="ZImageLoader's weight_dtype")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="ZImageLoader's cuda_graphs option off")
    parser.add_argument("--comfy-casting", action="store_true",
                        help="for comparison: the engine's streaming off, so that ComfyUI's per-layer casting "
                             "copies the weights its partial load left in host memory")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    total_gb = torch.cuda.get_device_properties(0).total_memory / GiB
    torch.cuda.set_per_process_memory_fraction(args.budget_gb / total_gb)
    sys.path.insert(0, args.comfyui)
    import comfy.cli_args

    comfy.cli_args.args.reserve_vram = total_gb - args.budget_gb
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths
    from safetensors.torch import save_file

    sys.path[1:1] = [PACK, os.path.join(PACK, "tests")]  # the engine, and the tests' way of importing the pack
    from comfy_host import import_pack

    nodes = import_pack().NODE_CLASS_MAPPINGS
    # the pack's own engine modules (not the `zimage` that common imports): the loader's runner is their Runner
    from comfyui_zimage.zimage import Runner, ZImageConfig

    os.makedirs(args.models, exist_ok=True)
    folder_paths.add_model_folder_path("diffusion_models", args.models)
    name = "z_image_random_bf16.safetensors"
    path = os.path.join(args.models, name)
    t0 = time.time()
    if not os.path.exists(path):
        save_file(random_state(transformer_shapes(ZImageConfig()), torch.bfloat16, 0), path)
    clip = comfy.sd.load_text_encoder_state_dicts([random_state(text_encoder_shapes(), torch.bfloat16, 1)],
                                                  clip_type=comfy.sd.CLIPType.LUMINA2)
    vae = comfy.sd.VAE(sd=random_state(vae_shapes(), torch.float32, 2))
    setup_s = time.time() - t0

    (model,) = nodes["ZImageLoader"]().load(name, args.weight_dtype, "auto", args.compile,
                                            not args.no_cuda_graphs)["result"]

    # the transformer's forwards alone (the sampler's time less ComfyUI's model loading), and the bytes of
    # block weights it found in host memory and streamed in. Timed around the runner's calls, not the network's:
    # a CUDA graph replay never calls the network
    runner = model.model.runner
    if args.comfy_casting:
        runner._blocks = lambda device: iter  # the blocks run as they are: ComfyUI's ops cast what is off the GPU
    forwards = []

    class TimedRunner(Runner):
        def __call__(self, *inputs, **options):
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            streamed = sum(p.nbytes for p in self.model.parameters() if not p.is_cuda)
            forwards.append((start, torch.cuda.Event(enable_timing=True), streamed))
            out = super().__call__(*inputs, **options)
            forwards[-1][1].record()
            return out

    # the loader's runner itself, its class swapped: ZImageSampler and ComfyUI's model call that object, and a
    # new Runner would decide again what the loader decided (graphs, compile)
    runner.__class__ = TimedRunner

    def now():
        torch.cuda.synchronize()
        return time.time()

    runs = []
    for i in range(args.generations):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = now()
        positive, negative = nodes["ZImageTextEncode"]().encode(clip, f"a lighthouse at dusk, take {i}", "",
                                                                 "official")["result"]
        t_encoded = now()
        (latent,) = nodes["ZImageLatent"]().generate(args.size, args.size, 1, "custom")
        (samples,) = nodes["ZImageSampler"]().sample(model, positive, latent, i, "turbo", 8, 0.0, 3.0, 1.0, 0.0, 1.0,
                                                    negative)
        t_sampled = now()
        image = vae.decode(samples["samples"])
        t_done = now()
        steps = [(start.elapsed_time(end), streamed) for start, end, streamed in forwards]
        forwards.clear()
        runs.append({"generation": i + 1, "seconds": t_done - t, "text_encode_s": t_encoded - t,
                     "sampling_s": t_sampled - t_encoded, "vae_decode_s": t_done - t_sampled,
                     "forward_ms": [round(ms, 1) for ms, _ in steps],
                     "streamed_gib_per_forward": steps[0][1] / GiB if steps else None,
                     "peak_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
                     "peak_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
                     "image": list(image.shape), "finite": bool(torch.isfinite(image).all()),
                     "transformer_lowvram": bool(getattr(model.model, "model_lowvram", False)),
                     "loaded_models": [type(m.model).__name__ for m in mm.current_loaded_models]})
        print(json.dumps(runs[-1]), flush=True)

    result = {"what": f"{args.generations} Turbo generations {args.size}x{args.size} (text encode + 8 steps + VAE decode) "
                      f"under a {args.budget_gb:g} GiB ComfyUI VRAM budget",
              **provenance(),
              "budget_gib": args.budget_gb, "compile": args.compile,
              "cuda_graphs": not args.no_cuda_graphs, "comfy_casting": args.comfy_casting, "weight_dtype": args.weight_dtype, "setup_seconds": setup_s, "runs": runs}
    write_json(result, args.out, f"memory-{args.budget_gb:g}gb{'-compiled' if args.compile else ''}"
               f"{'' if args.weight_dtype == 'default' else '-' + args.weight_dtype}"
               f"{'-no-graphs' if args.no_cuda_graphs else ''}{'-comfy-casting' if args.comfy_casting else ''}.json")


if __name__ == "__main__":
    main()
