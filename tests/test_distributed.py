"""fxcache under torch.distributed: two CPU processes with gloo, launched by torchrun.

Drives ``examples/distributed.py`` (the commands in docs/devices.md) and checks what it reports:
data parallel equals the single-process run bit for bit; under diffusers' context
parallelism (Ulysses, Flux) the captured per-rank programs hold the collectives, the
compute-everything plan equals the uncached context-parallel run, FORA matches
single-process FORA within fp32 round-off and each rank caches half the bytes; an
adaptive schedule's statistic is all-reduced in the graph, so the ranks (each with its
own shard of the input) make the same decisions as one process would; a rank
whose capture fails stops every rank with its error instead of hanging.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "distributed.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "FXCACHE_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*TORCHRUN, str(EXAMPLE), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


def _why(run: subprocess.CompletedProcess) -> str:
    """Both streams' tails: where a rank stopped shows in its last printed line."""
    return f"rc={run.returncode}\n--- stdout ---\n{run.stdout[-2000:]}\n--- stderr ---\n{run.stderr[-4000:]}"


def _example():
    spec = importlib.util.spec_from_file_location("fxcache_distributed_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1)
    yield
    torch.set_num_threads(before)


def test_data_parallel_equals_the_single_process_run(tmp_path, one_thread):
    out = tmp_path / "samples.pt"
    common = ["--mode", "data", "--samples", "4", "--batch", "1", "--steps", "4"]
    run = _torchrun(*common, "--out", str(out), "--json", str(tmp_path / "r.json"), "--baseline")
    assert run.returncode == 0, _why(run)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["world"] == 2 and len(report["per_rank_seconds"]) == 2
    assert report["one_process_seconds"] > 0 and report["speedup_over_one_process"] > 0
    gathered = torch.load(out)

    example = _example()
    single = tmp_path / "single.pt"
    example.data_mode(SimpleNamespace(model="unet", samples=4, batch=1, steps=4, interval=2, seed=0, backend=None,
                                      out=str(single), fail_rank=-1, baseline=False), 0, 1, torch.device("cpu"))
    reference = torch.load(single)
    assert gathered.shape == reference.shape == (4, 1, 16, 16)
    assert torch.equal(gathered, reference)
    # the batches are not all alike (a gather that repeated one rank's part would fail)
    assert not torch.equal(gathered[0], gathered[1])


def test_context_parallel_flux_caches_each_ranks_shard(tmp_path):
    run = _torchrun("--mode", "context", "--steps", "6", "--json", str(tmp_path / "r.json"))
    assert run.returncode == 0, _why(run)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["world"] == 2 and len(report["ranks"]) == 2
    for rank in report["ranks"]:
        assert rank["collectives_captured"] > 0
        assert rank["full_equals_plain_cp"], rank
        assert rank["fora_cp_max_abs_vs_single_fora"] < 1e-5, rank
        assert rank["fora_cp_max_abs_vs_uncached"] > 1e-4, rank  # FORA really reused under CP
        assert 2 * rank["cache_bytes"] == rank["single_process_cache_bytes"], rank
        # adaptive: each rank sees only its shard, the all-reduced statistic is the whole tensor's
        assert rank["adaptive_decisions"] == rank["single_process_adaptive_decisions"], rank
        assert False in rank["adaptive_decisions"], rank  # it did reuse
        assert rank["adaptive_cp_max_abs_vs_single_adaptive"] < 1e-5, rank
        for a, b in zip(rank["adaptive_statistic"][1:], rank["single_process_adaptive_statistic"][1:]):
            assert abs(a - b) <= 1e-5 * abs(b), rank
    first, second = report["ranks"]
    assert first["adaptive_decisions"] == second["adaptive_decisions"]
    assert first["adaptive_statistic"] == second["adaptive_statistic"]


def test_a_rank_that_fails_to_capture_stops_every_rank(tmp_path):
    run = _torchrun("--mode", "data", "--samples", "2", "--batch", "1", "--steps", "2", "--fail-rank", "1",
                    timeout=180)
    assert run.returncode != 0
    text = run.stdout + run.stderr
    for rank in (0, 1):
        assert f"[rank{rank}]: RuntimeError: rank 1 failed during set-up, so every rank stops: CaptureError" in text
