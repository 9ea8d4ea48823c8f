"""Warm start (``cache_dir``): a second process loads the first one's compiled step
graphs instead of compiling them, and gets the same bits; a changed schedule or model
config is a miss; a damaged package is refused and compiled again.

Every run is a fresh subprocess on a tiny UNet2DModel under inductor (AOTInductor
packages); what happened is read from ``fxcache.rewrite.warm.stats``, never from timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fxcache
from fxcache.errors import OptionError, OptionTypeError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys, logging
import torch, diffusers, fxcache
from fxcache.rewrite import warm

logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
job = json.loads(sys.argv[1])
x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
for run in job["runs"]:
    before = dict(warm.stats)
    torch.manual_seed(0)
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=run["head"],
    ).eval()
    cm = fxcache.compile(model, fxcache.DeepCache(interval=run["interval"], branch=1), backend="inductor",
                         cache_dir=job["cache_dir"])
    outs = []
    with torch.no_grad():
        for t in (999, 749, 499, 249)[: run["steps"]]:
            outs.append(cm(x, torch.tensor([t])).sample)
    torch.save(torch.stack(outs), run["out"])
    if run.get("edit"):  # an in-place weight edit is seen: the weights are inputs of the package
        with torch.no_grad():
            model.conv_out.weight.mul_(0.5)
            cm.reset()
            edited = cm(x, torch.tensor([999])).sample
            torch.save(torch.stack([edited, model(x, torch.tensor([999])).sample]), run["out"] + ".edit")
    print("STATS " + json.dumps({k: v - before.get(k, 0) for k, v in warm.stats.items()}), flush=True)
"""


def _run(tmp_path, cache_dir, *runs):
    """One fresh process; per run (``name``, and ``interval``, ``head``, ``steps`` to
    change), what it compiled/loaded/refused, its outputs; and the process's log."""
    runs = [dict(dict(interval=2, head=8, steps=4), **r, out=str(tmp_path / f"{r['name']}.pt")) for r in runs]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    job = json.dumps(dict(cache_dir=str(cache_dir), runs=runs))
    proc = subprocess.run([sys.executable, "-c", CHILD, job], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stats = [json.loads(s[len("STATS "):]) for s in proc.stdout.splitlines() if s.startswith("STATS ")]
    return [(st, torch.load(r["out"])) for st, r in zip(stats, runs)], proc.stderr


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("warm")
    cache_dir = tmp / "cache"
    [(stats, out)], _ = _run(tmp, cache_dir, dict(name="first"))
    return tmp, cache_dir, stats, out, sorted(n for n in os.listdir(cache_dir) if not n.startswith("."))


def test_second_process_loads_and_gives_the_same_bits(first):
    tmp, cache_dir, stats, out, _ = first
    assert stats.get("compiled", 0) == 2 and stats.get("loaded", 0) == 0, stats  # two kinds of step
    [(stats2, out2)], _ = _run(tmp, cache_dir, dict(name="second", edit=True))
    assert stats2.get("compiled", 0) == 0 and stats2.get("loaded", 0) == 2, stats2
    assert torch.equal(out, out2)
    edited, eager = torch.load(tmp / "second.pt.edit")
    assert not torch.allclose(edited, out2[0])
    torch.testing.assert_close(edited, eager, rtol=1e-4, atol=1e-5)


def test_changed_schedule_or_model_config_is_a_miss(first):
    tmp, cache_dir, _, _, _ = first
    # one step each: the full step's graph, which both the schedule and the config change
    [(s_sched, _), (s_model, _)], log = _run(
        tmp, cache_dir, dict(name="interval3", interval=3, steps=1), dict(name="head4", head=4, steps=1))
    assert s_sched.get("compiled", 0) == 1 and s_sched.get("loaded", 0) == 0, s_sched
    assert s_model.get("compiled", 0) == 1 and s_model.get("loaded", 0) == 0, s_model
    # the same step graph under another schedule: the log says only the plan ('context') differs
    assert "differs in ['context']" in log, log[-2000:]


def test_damaged_package_is_refused_and_compiled_again(first, tmp_path):
    _, cache_dir, stats, out, names = first
    damaged = tmp_path / "cache"
    damaged.mkdir()
    for name in names:  # the first process's two packages and their headers
        (damaged / name).write_bytes((cache_dir / name).read_bytes())
    victim = sorted(p for p in damaged.iterdir() if p.suffix == ".pt2")[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    [(s, out2)], log = _run(tmp_path, damaged, dict(name="damaged"))
    assert s.get("refused", 0) == 1 and s.get("compiled", 0) == 1 and s.get("loaded", 0) == 1, s
    assert "refused the package" in log and "do not match the SHA-256" in log, log[-2000:]
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-5)
    # and the package written in its place is whole again: a later process loads both
    [(s3, out3)], _ = _run(tmp_path, damaged, dict(name="after"))
    assert s3.get("loaded", 0) == 2 and s3.get("compiled", 0) == 0, s3
    assert torch.equal(out3, out2)


def test_cache_dir_is_checked(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(OptionError, match="backend='inductor'"):
        fxcache.compile(model, fxcache.DeepCache(interval=2, branch=1), backend=None, cache_dir=tmp_path)
    with pytest.raises(OptionError, match="reduce-overhead"):
        fxcache.compile(model, fxcache.DeepCache(interval=2, branch=1), mode="reduce-overhead", cache_dir=tmp_path)
    with pytest.raises(OptionTypeError, match="cache_dir"):
        fxcache.compile(model, fxcache.DeepCache(interval=2, branch=1), cache_dir=3)
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(OptionError, match="not one"):
        fxcache.compile(model, fxcache.DeepCache(interval=2, branch=1), cache_dir=afile)
    cm = fxcache.compile(model, fxcache.DeepCache(interval=2, branch=1), cache_dir=tmp_path / "new")
    assert cm.options.cache_dir == str(tmp_path / "new")
    assert not (tmp_path / "new").exists()  # made at the first compile, not before
    home = fxcache.compile(model, fxcache.DeepCache(interval=2, branch=1), cache_dir="~/fxcache-packages")
    assert home.options.cache_dir == os.path.expanduser("~/fxcache-packages")
