"""One forward on one GPU against the same forward split across the GPUs of a host (zimage/parallel.py over NCCL),
on random full-size weights: times, speed-up, and how far the split result is from the one-GPU result. --split
sequence: Ulysses sequence parallelism, each GPU a share of the tokens. --split cfg: a guided step's batch (the
positive and negative samples, 2 x --batch) split by samples, each GPU a whole forward of its share.

Started by torchrun, one process per GPU; every process holds the whole model (rank 0's random weights, broadcast).
Each size: the one-GPU forward is timed in every process at once (each on its own GPU), then the split forward;
rank 0 writes the table (device, date, command) to --out.

On a machine with two GPUs:
    torchrun --nproc-per-node 2 bench/bench_sequence_parallel.py --sizes 1024 2048 --out bench/results
    torchrun --nproc-per-node 2 bench/bench_sequence_parallel.py --split cfg --sizes 1024 --out bench/results
A dry run on the CPU (gloo, a tiny model):
    torchrun --nproc-per-node 2 bench/bench_sequence_parallel.py --tiny --out /tmp/bench-out
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from common import provenance, provenance_line, random_engine, random_inputs, rel_err, shared_copy, time_cuda, write_json
from zimage import BatchShare, Runner, SequenceShare, ZImageConfig


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024], help="image sizes in pixels")
    parser.add_argument("--caption", type=int, default=128, help="caption tokens")
    parser.add_argument("--batch", type=int, default=1, help="images (with --split cfg: each a positive and a "
                                                                 "negative sample)")
    parser.add_argument("--split", choices=["sequence", "cfg"], default="sequence")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="dry run on the CPU with gloo: a tiny model")
    parser.add_argument("--out", default="bench/results")
    return parser.parse_args()


def main():
    args = arguments()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.tiny:
        device, dtype, backend = torch.device("cpu"), torch.float32, "gloo"
        cfg = ZImageConfig.tiny(dim=96, n_heads=6, ffn_hidden=256)
        args.sizes = [s // 8 for s in args.sizes]  # 1024 -> 128 pixels: 64 image tokens
    else:
        device, dtype, backend = torch.device("cuda", int(os.environ["LOCAL_RANK"])), torch.bfloat16, "nccl"
        torch.cuda.set_device(device)
        cfg = ZImageConfig()
    dist.init_process_group(backend, timeout=timedelta(minutes=5), device_id=device if backend == "nccl" else None)
    share = SequenceShare.of() if args.split == "sequence" else BatchShare.of()
    batch = args.batch * (2 if args.split == "cfg" else 1)

    model = random_engine(cfg, device, dtype)
    with torch.no_grad():
        for p in model.parameters():  # every process: rank 0's weights
            dist.broadcast(p, src=0)
    one = Runner(model)
    split = Runner(shared_copy(model), share=share)  # the twin's attention is swapped; the original stays as it is

    rows = []
    for size in args.sizes:
        g = torch.Generator().manual_seed(size)
        inputs = random_inputs(cfg, size, batch, args.caption, device, dtype, g)
        with torch.inference_mode():
            expected = one(*inputs)
            got = split(*inputs)
            one_ms, one_spread = time_cuda(lambda: one(*inputs), args.warmup, args.iters)
            dist.barrier()
            split_ms, split_spread = time_cuda(lambda: split(*inputs), args.warmup, args.iters)
        error = rel_err(got.float(), expected.float())
        errors = [None] * world
        dist.all_gather_object(errors, error)
        rows.append(dict(size=size, one_gpu_ms=one_ms, one_gpu_spread_ms=one_spread, split_ms=split_ms,
                         split_spread_ms=split_spread, speedup=one_ms / split_ms, max_rel_err=max(errors)))
        if rank == 0:
            print(f"{size}: one GPU {one_ms:.1f} ms, {world} processes {split_ms:.1f} ms "
                  f"({one_ms / split_ms:.2f}x), relative error {max(errors):.2e}", flush=True)

    if rank == 0:
        info = provenance(device)
        info["command"] = f"torchrun --nproc-per-node {world} " + info["command"]
        result = dict(**info, processes=world, split=args.split, batch=batch,
                      caption=args.caption, dtype=str(dtype), rows=rows)
        name = f"{args.split}-parallel-{world}x{'-tiny' if args.tiny else ''}"
        print("wrote", write_json(result, args.out, name + ".json"))
        how = "Ulysses, by tokens" if args.split == "sequence" else "CFG parallel, by samples"
        lines = [f"# One forward on one GPU vs split across {world} processes ({how}, zimage/parallel.py)", "",
                 provenance_line(info), "",
                 f"{world} processes, one per GPU; batch {batch}, {args.caption} caption "
                 f"tokens, {dtype}, eager (no CUDA graphs on either side); medians of {args.iters} after "
                 f"{args.warmup} warm-up calls, spread = max - min.", "",
                 "| size | one GPU ms | split ms | speed-up | relative error (largest over processes) |",
                 "|---|---|---|---|---|"]
        lines += [f"| {r['size']} | {r['one_gpu_ms']:.1f} ± {r['one_gpu_spread_ms']:.1f} | {r['split_ms']:.1f} ± "
                  f"{r['split_spread_ms']:.1f} | {r['speedup']:.2f}x | {r['max_rel_err']:.2e} |" for r in rows]
        path = os.path.join(args.out, name + ".md")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print("wrote", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
