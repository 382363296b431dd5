"""Sequence and batch (CFG) parallelism (zimage/parallel.py) on the CPU: several processes with the gloo backend, started by
torch.multiprocessing, give the one-process forward; which tokens and heads each process owns; a process that
fails or stalls makes the others fail with a clear error instead of hanging."""

from __future__ import annotations

import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from helpers import randomize_
from zimage import S3DiT, ZImageConfig, flow_sigmas, sample
from zimage.attention import Attention
from zimage.parallel import BatchShare, SequenceShare, UlyssesAttention, padded_heads
from zimage.runner import Runner
from zimage.sequence import plain_layout

# 4 heads (2 processes split them, 3 pad them to 6) and 6 heads (2 and 3 split them)
CONFIGS = {"heads4": ZImageConfig.tiny(), "heads6": ZImageConfig.tiny(dim=96, n_heads=6, ffn_hidden=256)}
CASES = {
    # name: (latent H, W, caption lengths, sigmas)
    "batch1": (8, 12, [7], [0.8]),
    "batch2": (6, 10, [5, 70], [0.9, 0.2]),  # captions padded to 32 and 96: masked keys
    "uneven": (14, 4, [1, 40], [0.75, 0.3]),  # 14 image tokens padded to 32: 3 processes pad the streams further
}
SLOW = 60  # seconds a spawned group may take before the test fails instead of hanging


def case_inputs(cfg: ZImageConfig, name: str):
    height, width, caption_lens, sigmas = CASES[name]
    g = torch.Generator().manual_seed(height * 100 + width)
    latents = torch.randn(len(sigmas), cfg.in_channels, height, width, generator=g)
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in caption_lens]
    return latents, torch.tensor(sigmas), captions


def make_model(cfg: ZImageConfig) -> S3DiT:
    return randomize_(S3DiT(cfg), seed=3).eval()


def attention_inputs(heads: int):
    g = torch.Generator().manual_seed(heads)
    q, k, v = torch.randn(3, 2, heads, 12, 16, generator=g)
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[1, ..., 7:] = False
    return q, k, v, mask


# ---------------------------------------------------------------------------------------------------
# what runs in each process


def _start(rank: int, world: int, rendezvous: str, timeout: float) -> SequenceShare:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout))
    return SequenceShare.of()


def _forwards(rank: int, world: int, rendezvous: str, out: str) -> None:
    share = _start(rank, world, rendezvous, timeout=30)
    results = {}
    with torch.no_grad():
        for heads in (4, 6):  # the attention alone: every process's tokens, its own share of q, k, v
            q, k, v, mask = attention_inputs(heads)
            part = share.tokens(q.shape[2])
            results[f"attention{heads}"] = UlyssesAttention(Attention(), share)(
                q[:, :, part], k[:, :, part], v[:, :, part], mask).contiguous()
        for cfg_name, cfg in CONFIGS.items():
            runner = Runner(make_model(cfg), share=share)
            for case in CASES:
                results[f"{cfg_name}/{case}"] = runner(*case_inputs(cfg, case)).contiguous()
    save_file(results, f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


def guided_sampling(runner, cfg: ZImageConfig) -> torch.Tensor:
    """Three Base steps with guidance on one image: every model call is the batch [positive, negative], whose
    captions differ in length."""
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(1, cfg.in_channels, 6, 10, generator=g)
    positive, negative = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in (9, 40)]
    return sample(runner, noise, flow_sigmas(3, 3.0), [positive], negative=[negative], guidance=4.0)


def _batch_forwards(rank: int, world: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    share = BatchShare.of()
    results = {}
    with torch.no_grad():
        for cfg_name, cfg in CONFIGS.items():
            runner = Runner(make_model(cfg), share=share)
            for case in CASES:  # batch1 does not split: each process computes it whole
                results[f"{cfg_name}/{case}"] = runner(*case_inputs(cfg, case)).contiguous()
            results[f"{cfg_name}/guided"] = guided_sampling(runner, cfg).contiguous()
    save_file(results, f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


def _fails(rank: int, world: int, rendezvous: str, out: str) -> None:
    share = _start(rank, world, rendezvous, timeout=30)
    if rank == 1:
        raise ValueError("process 1 fails on purpose")
    cfg = CONFIGS["heads6"]
    with torch.no_grad():
        Runner(make_model(cfg), share=share)(*case_inputs(cfg, "batch1"))


def _stalls(rank: int, world: int, rendezvous: str, out: str) -> None:
    share = _start(rank, world, rendezvous, timeout=2)
    report = Path(out, "error.txt")
    if rank == 1:  # never joins the forward's collectives; waits until process 0 has given up
        while not report.exists():
            time.sleep(0.1)
        return
    cfg = CONFIGS["heads6"]
    try:
        with torch.no_grad():
            Runner(make_model(cfg), share=share)(*case_inputs(cfg, "batch1"))
        report.write_text("the forward returned")
    except Exception:
        report.write_text(traceback.format_exc())


def spawn(fn, world: int, tmp_path: Path) -> None:
    """fn(rank, world, rendezvous file, output folder) in `world` processes; fails (instead of hanging) when they
    run past SLOW seconds, and raises what a process raised."""
    context = mp.start_processes(fn, args=(world, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + SLOW
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} processes still running after {SLOW} s")


# ---------------------------------------------------------------------------------------------------
# the tests


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}procs")
def parallel_results(request, tmp_path_factory):
    world = request.param
    tmp_path = tmp_path_factory.mktemp(f"sp{world}")
    spawn(_forwards, world, tmp_path)
    return world, [load_file(tmp_path / f"rank{r}.safetensors") for r in range(world)]


@pytest.mark.parametrize("cfg_name", CONFIGS)
@pytest.mark.parametrize("case", CASES)
def test_parallel_forward_equals_one_process(parallel_results, cfg_name, case):
    world, results = parallel_results
    cfg = CONFIGS[cfg_name]
    with torch.no_grad():
        expected = make_model(cfg)(*case_inputs(cfg, case))
    for rank, result in enumerate(results):  # every process returns the whole velocity
        got = result[f"{cfg_name}/{case}"]
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"process {rank}: {m}")


@pytest.mark.parametrize("heads", [4, 6])
def test_ulysses_attention_equals_attention(parallel_results, heads):
    world, results = parallel_results
    q, k, v, mask = attention_inputs(heads)
    expected = Attention()(q, k, v, mask)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result[f"attention{heads}"], expected[:, :, SequenceShare(rank, world).tokens(12)],
                                   rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def batch_results(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("bp2")
    spawn(_batch_forwards, 2, tmp_path)
    return [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]


@pytest.mark.parametrize("cfg_name", CONFIGS)
@pytest.mark.parametrize("case", [*CASES, "guided"])
def test_batch_parallel_forward_and_guided_sampling_equal_one_process(batch_results, cfg_name, case):
    """Two processes, one sample each (with guidance: the positive pass on one, the negative on the other)."""
    cfg = CONFIGS[cfg_name]
    with torch.no_grad():
        expected = (guided_sampling(Runner(make_model(cfg)), cfg) if case == "guided"
                    else make_model(cfg)(*case_inputs(cfg, case)))
    for rank, result in enumerate(batch_results):  # every process returns the whole batch
        got = result[f"{cfg_name}/{case}"]
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"process {rank}: {m}")


def test_batch_shares_cover_the_batch_in_order():
    assert [list(range(6))[BatchShare(i, 3).samples(6)] for i in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert BatchShare(2, 3).samples(2) is None  # a batch that does not split is computed whole by each


def test_a_failing_process_stops_the_others(tmp_path):
    start = time.monotonic()
    with pytest.raises(mp.ProcessRaisedException, match="process 1 fails on purpose"):
        spawn(_fails, 2, tmp_path)
    assert time.monotonic() - start < SLOW


def test_a_stalled_process_times_the_others_out(tmp_path):
    spawn(_stalls, 2, tmp_path)
    error = (tmp_path / "error.txt").read_text()
    assert "Z-Image sequence parallel: process 0 of 2 failed" in error
    assert "another process has failed or stalled" in error


# the partitioning, in one process


def test_token_shares_cover_each_stream_in_order():
    for count in (1, 2, 3, 5):
        for length in (count, 11 * count, 32 * count):
            covered = [i for index in range(count)
                       for i in range(length)[SequenceShare(index, count).tokens(length)]]
            assert covered == list(range(length))
    with pytest.raises(ValueError, match="does not split into 3 equal shares"):
        SequenceShare(0, 3).tokens(32)


def test_heads_split_or_padded():
    assert [padded_heads(30, n) for n in range(1, 9)] == [30, 30, 30, 32, 30, 30, 35, 32]
    assert padded_heads(4, 3) == 6
    with pytest.raises(ValueError, match="use at most 30 processes"):
        padded_heads(30, 31)


def test_shared_layout_pads_and_masks_each_stream():
    """14 image tokens (padded to 32) and captions of 5 and 40 tokens (padded to 32 and 64) over 3 processes: each
    stream padded further to a multiple of 3, the extra tokens masked; the unified keys in the order attention
    gathers them, [image share, caption share] per process."""
    cfg = ZImageConfig.tiny()
    whole = plain_layout(cfg, 7, 2, [5, 40], "cpu")
    layouts = [plain_layout(cfg, 7, 2, [5, 40], "cpu", SequenceShare(i, 3)) for i in range(3)]
    assert whole.image_mask is None and (whole.image_len, whole.caption_len) == (32, 64)
    for i, layout in enumerate(layouts):
        assert (layout.image_len, layout.caption_len) == (33, 66)
        assert layout.image_rope[0].shape[1] == 11 and layout.caption_rope[0].shape[1] == 22
        assert layout.unified_rope[0].shape[1] == 33
        # each process's image positions are its share of the one-process ones; the extra token at (0, 0, 0)
        for mine, all_of_them, extra in zip(layout.image_rope, whole.image_rope, (1.0, 0.0)):
            padded = torch.cat((all_of_them, torch.full_like(all_of_them[:, :1], extra)), dim=1)
            torch.testing.assert_close(mine, padded[:, i * 11:(i + 1) * 11])
        image_keys = [True] * 32 + [False]
        caption_keys = [[True] * 32 + [False] * 34, [True] * 64 + [False] * 2]
        expected_image = torch.tensor(image_keys).expand(2, -1)
        assert torch.equal(layout.image_mask[:, 0, 0], expected_image)
        assert torch.equal(layout.caption_mask[:, 0, 0], torch.tensor(caption_keys))
        expected_unified = [sum((image_keys[j * 11:(j + 1) * 11] + sample[j * 22:(j + 1) * 22] for j in range(3)), [])
                            for sample in caption_keys]
        assert torch.equal(layout.unified_mask[:, 0, 0], torch.tensor(expected_unified))
    # the caption positions go on past the padding: the same as the one-process positions on the shared tokens
    torch.testing.assert_close(torch.cat([lay.caption_rope[1] for lay in layouts], dim=1)[:, :64], whole.caption_rope[1])
