"""A model across devices through worker processes (zimage/workers.py), on the CPU: two workers with gloo give
the one-process forward and guided sampling, split by samples (CFG parallel) and by tokens (Ulysses); a worker
that dies or fails stops the model with an error that names it, and the calling process goes on."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from helpers import randomize_
from zimage import CheckpointError, Runner, S3DiT, ZImageConfig, flow_sigmas, load_transformer, sample
from zimage.workers import WorkerError, WorkerRunner

CFG = ZImageConfig.tiny(dim=96, n_heads=6, ffn_hidden=256)  # 6 heads: 2 workers split them


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("workers") / "z_image_turbo_bf16.safetensors"
    save_file(randomize_(S3DiT(CFG), seed=12).state_dict(), str(path))
    return str(path)


def inputs():
    g = torch.Generator().manual_seed(13)
    latents = torch.randn(2, CFG.in_channels, 6, 10, generator=g)
    captions = [torch.randn(n, CFG.cap_feat_dim, generator=g) for n in (9, 40)]
    return latents, torch.tensor([0.7, 0.4]), captions


def guided(runner):
    g = torch.Generator().manual_seed(14)
    noise = torch.randn(1, CFG.in_channels, 6, 10, generator=g)
    positive, negative = [torch.randn(n, CFG.cap_feat_dim, generator=g) for n in (7, 30)]
    return sample(runner, noise, flow_sigmas(3, 3.0), [positive], negative=[negative], guidance=4.0)


@pytest.fixture(scope="module")
def one_process(model_file):
    runner = Runner(load_transformer(model_file, dtype=torch.float32))
    with torch.no_grad():
        return runner(*inputs()), guided(runner)


@pytest.mark.parametrize("mode", ["batch", "sequence"])
def test_two_workers_give_the_one_process_forward_and_sampling(model_file, one_process, mode):
    forward, sampled = one_process
    workers = WorkerRunner(model_file, ["cpu", "cpu"], mode=mode, load={"dtype": torch.float32}, timeout=60)
    try:
        torch.testing.assert_close(workers(*inputs()), forward, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(guided(workers), sampled, rtol=1e-5, atol=1e-5)
        assert all(p.is_alive() for p in workers.processes)
    finally:
        workers.close()
    assert not any(p.is_alive() for p in workers.processes)


def test_a_dead_worker_stops_the_model_with_an_error_that_names_it(model_file, one_process):
    workers = WorkerRunner(model_file, ["cpu", "cpu"], load={"dtype": torch.float32}, timeout=60)
    try:
        workers(*inputs())
        workers.processes[1].kill()
        workers.processes[1].join(10)
        start = time.monotonic()
        with pytest.raises(WorkerError, match=r"worker 1 on cpu exited \(exit code -9: killed by signal 9\)"):
            workers(*inputs())
        assert time.monotonic() - start < 5  # at once, not after the collectives' timeout
        time.sleep(0.5)
        assert not workers.processes[0].is_alive()  # the other worker is stopped too
        with pytest.raises(WorkerError, match="stopped earlier.*load the model again"):
            workers(*inputs())
    finally:
        workers.close()
    # the calling process goes on: a model in this process still runs
    torch.testing.assert_close(Runner(load_transformer(model_file, dtype=torch.float32))(*inputs()),
                               one_process[0], rtol=1e-5, atol=1e-5)


def test_a_broken_file_is_refused_before_any_worker_starts(tmp_path):
    broken = tmp_path / "z_image_turbo_bf16.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="z_image_turbo_bf16.safetensors"):
        WorkerRunner(str(broken), ["cpu", "cpu"], timeout=60)


def test_a_worker_that_cannot_start_says_why(model_file):
    missing = [f"cuda:{torch.cuda.device_count() + n}" for n in (7, 8)]  # devices this machine does not have
    with pytest.raises(WorkerError, match=r"worker \d on cuda:\d+ failed loading the model:(.|\n)*"):
        WorkerRunner(model_file, missing, timeout=60)


def test_what_a_model_across_devices_refuses(model_file):
    with pytest.raises(ValueError, match="at least 2"):
        WorkerRunner(model_file, ["cpu"])
    with pytest.raises(ValueError, match="distinct devices of one kind"):
        WorkerRunner(model_file, ["cuda:0", "cuda:0"])
    with pytest.raises(ValueError, match="unknown split 'pipeline'"):
        WorkerRunner(model_file, ["cpu", "cpu"], mode="pipeline")
