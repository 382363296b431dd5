"""One model's forwards on several devices, run by worker processes that this process starts and feeds.

WorkerRunner starts one process per device with torch.multiprocessing (spawn), each loading the model from the
user's file itself (memory-mapped, read tensor by tensor: no weights cross processes) and joining a
torch.distributed group with the others (NCCL on GPUs, gloo on the CPU). Every forward's inputs go to every worker
through torch.multiprocessing queues (CPU tensors in shared memory); the workers split the forward as a Runner
with a share does (parallel.py: the samples, or the tokens), and the first returns the velocity. The calling
process joins no process group and holds no weights: a host such as ComfyUI keeps serving, and a worker that
fails or dies stops only this model.

The caller waits on the workers with their liveness in view: a worker that dies (killed, out of memory) makes the
waiting call raise at once with which worker and how it ended, and the other workers are stopped; a worker that
raises sends its error back. After a failure every call says so; load the model again to start new workers.
"""

from __future__ import annotations

import os
import queue
import runpy
import shutil
import sys
import tempfile
import traceback
import types
from contextlib import contextmanager
from datetime import timedelta
from itertools import count

import torch
import torch.multiprocessing as mp

MODES = ("batch", "sequence")  # parallel.BatchShare (CFG parallel), parallel.SequenceShare (Ulysses)


class WorkerError(RuntimeError):
    """The workers of a WorkerRunner failed; it runs no more forwards."""


class WorkerRunner:
    def __init__(self, path: str, devices: list[str], mode: str = "batch", load: dict | None = None,
                 cuda_graphs: bool = False, timeout: float = 300.0):
        """path: the model file (load_transformer's); devices: one worker per device ("cuda:0", "cuda:1"; "cpu"
        for tests); mode: how a forward is split (MODES); load: load_transformer's keywords (dtype, fp8_matmuls,
        fp8_attention, attention); cuda_graphs: each worker's Runner's (batch mode: each worker runs whole
        forwards of its own). timeout: seconds a collective or the start may take before it fails."""
        if mode not in MODES:
            raise ValueError(f"unknown split {mode!r}; choose one of {', '.join(MODES)}")
        if len(devices) < 2:
            raise ValueError(f"a model across devices needs at least 2 of them, got {devices}")
        kinds = {torch.device(d).type for d in devices}
        if len(kinds) > 1 or (kinds != {"cpu"} and len(set(devices)) < len(devices)):
            raise ValueError(f"the devices of a model across devices are distinct devices of one kind (GPUs; CPUs "
                             f"for tests), got {devices}")
        from .checkpoint import inspect_checkpoint

        self.cfg = inspect_checkpoint(path).config  # a file the workers cannot read is refused here, before any starts
        self.devices, self.mode, self.timeout = list(devices), mode, timeout
        self.failure: str | None = None
        self.ids = count()
        self.rendezvous = tempfile.mkdtemp(prefix="zimage-workers-")
        context = mp.get_context("spawn")
        self.results = context.Queue()
        self.requests = [context.Queue() for _ in devices]
        # each worker runs worker_main.py, which imports the engine afresh (a host's name for it may not import)
        self.processes = [
            context.Process(target=runpy.run_path, daemon=True, name=f"zimage-worker-{rank}",
                            args=(os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker_main.py"),),
                            kwargs={"run_name": "__zimage_worker__", "init_globals": {"work_arguments": (
                                rank, self.devices, os.path.join(self.rendezvous, "group"), path, mode, load or {},
                                cuda_graphs, timeout, self.requests[rank], self.results)}})
            for rank in range(len(devices))]
        with _main_left_alone():
            for process in self.processes:
                process.start()
        ready = set()
        while len(ready) < len(devices):
            kind, rank, _ = self._receive(deadline=timeout, doing="loading the model")
            if kind == "ready":
                ready.add(rank)

    def __call__(self, latents: torch.Tensor, sigma: torch.Tensor, caption_feats: list, references=None,
                 control=None) -> torch.Tensor:
        """Runner's call: the whole velocity, on latents' device."""
        if references is not None or control:
            raise ValueError("a model across GPUs takes prompts without reference images or ControlNets for now: "
                             "load it on one GPU for those")
        request = next(self.ids)
        self._send(("forward", request, latents.detach().cpu(), sigma.detach().cpu(),
                    [c.detach().cpu() for c in caption_feats]))
        while True:  # results of an earlier, abandoned call (an interruption while waiting) are dropped
            kind, answer, velocity = self._receive(deadline=self.timeout + 60, doing="a forward")
            if kind == "velocity" and answer == request:
                return velocity.to(latents.device)

    def release_buffers(self) -> None:
        """Each worker gives back the memory its forwards keep (Runner.release_buffers)."""
        if self.failure is None:
            self._send(("release",))

    def close(self) -> None:
        """Stop the workers (each ends its loop and leaves the group; those that do not, within 10 s, are ended)."""
        for requests in self.requests:
            try:
                requests.put(None)
            except (OSError, ValueError):
                pass
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        shutil.rmtree(self.rendezvous, ignore_errors=True)

    def __del__(self):
        if getattr(self, "processes", None):
            try:
                self.close()
            except Exception:  # at interpreter exit the queues may be gone already
                pass

    @property
    def device(self) -> torch.device:
        """Where a caller keeps its tensors for this runner: the workers' inputs and outputs pass through host
        memory (sample() makes its noise and latents here)."""
        return torch.device("cpu")

    def _send(self, message) -> None:
        self._check()
        for requests in self.requests:
            requests.put(message)

    def _receive(self, deadline: float, doing: str):
        """The next message of a worker; a dead worker or one's error raises WorkerError (and stops the others)."""
        waited = 0.0
        while True:
            self._check()
            try:
                kind, who, payload = self.results.get(timeout=0.2)
            except queue.Empty:
                waited += 0.2
                if waited > deadline:
                    self._fail(f"no answer from the workers after {deadline:.0f} s of {doing}")
                continue
            if kind == "error":
                self._fail(f"worker {who} on {self.devices[who]} failed {doing}:\n{payload}")
            return kind, who, payload

    def _check(self) -> None:
        if self.failure is not None:
            raise WorkerError(f"Z-Image: the model's workers stopped earlier ({self.failure.splitlines()[0]}); "
                              f"load the model again")
        for rank, process in enumerate(self.processes):
            if process.exitcode is not None:
                self._fail(f"worker {rank} on {self.devices[rank]} exited (exit code {process.exitcode}: "
                           f"{'killed by signal ' + str(-process.exitcode) if process.exitcode < 0 else 'ended'}) "
                           f"while the others were running")

    def _fail(self, reason: str):
        self.failure = reason
        for process in self.processes:
            if process.is_alive():
                process.kill()
        raise WorkerError(f"Z-Image: {reason}. The model across {len(self.devices)} devices has stopped; load it "
                          f"again")


@contextmanager
def _main_left_alone():
    """Start processes without their re-running this process's main script: a new process runs the caller's
    __main__ again before its target (spawn's rule), and a host's main script (ComfyUI's main.py) does far more
    than define things. With no main module in view while the processes start, they run only their target."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _work(rank: int, devices: list[str], rendezvous: str, path: str, mode: str, load: dict, cuda_graphs: bool,
          timeout: float, requests, results) -> None:
    """One worker: load the model on its device, join the group, run forwards until told to stop."""
    import torch.distributed as dist

    from .checkpoint import load_transformer
    from .parallel import BatchShare, SequenceShare
    from .runner import Runner

    device = torch.device(devices[rank])
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{rendezvous}",
                                rank=rank, world_size=len(devices), timeout=timedelta(seconds=timeout))
        share = (BatchShare if mode == "batch" else SequenceShare).of()
        runner = Runner(load_transformer(path, device=device, **load), share=share,
                        cuda_graphs=cuda_graphs and mode == "batch")
        results.put(("ready", rank, None))
        # no_grad, not inference_mode: the velocity handed back is moved into shared memory, an in-place change
        # that inference tensors refuse
        with torch.no_grad():
            while (message := requests.get()) is not None:
                if message[0] == "release":
                    runner.release_buffers()
                    continue
                _, request, latents, sigma, captions = message
                velocity = runner(latents.to(device), sigma.to(device), [c.to(device) for c in captions])
                if rank == 0:
                    results.put(("velocity", request, velocity.cpu()))
    except BaseException:  # what stopped this worker goes back to the caller, whatever it was
        results.put(("error", rank, traceback.format_exc(limit=6)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
