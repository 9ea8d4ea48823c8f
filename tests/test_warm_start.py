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

CHILD = r'''
import json, sys, logging
import torch, diffusers, fxcache
from fxcache.rewrite import warm

logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
cache_dir, out, interval, head = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = diffusers.UNet2DModel(
    sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4, attention_head_dim=head,
).eval()
cm = fxcache.compile(model, fxcache.DeepCache(interval=interval, branch=1), backend="inductor", cache_dir=cache_dir)
x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
outs = []
with torch.no_grad():
    for t in (999, 749, 499, 249):
        outs.append(cm(x, torch.tensor([t])).sample)
torch.save(torch.stack(outs), out)
print("STATS " + json.dumps(dict(warm.stats)))
'''


def _run(tmp_path, cache_dir, name, interval=2, head=8):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / f"{name}.pt"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script), str(cache_dir), str(out), str(interval), str(head)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("STATS ")][-1]
    stats = json.loads(line[len("STATS "):])
    return stats, torch.load(out), proc.stderr


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("warm")
    cache_dir = tmp / "cache"
    stats, out, _ = _run(tmp, cache_dir, "first")
    return tmp, cache_dir, stats, out


def test_second_process_loads_and_gives_the_same_bits(first):
    tmp, cache_dir, stats, out = first
    assert stats.get("compiled", 0) >= 2 and stats.get("loaded", 0) == 0, stats  # two kinds of step
    stats2, out2, _ = _run(tmp, cache_dir, "second")
    assert stats2.get("compiled", 0) == 0 and stats2.get("loaded", 0) == stats["compiled"], stats2
    assert torch.equal(out, out2)


def test_changed_schedule_or_model_config_is_a_miss(first):
    tmp, cache_dir, stats, out = first
    s_sched, _, log = _run(tmp, cache_dir, "interval3", interval=3)
    assert s_sched.get("compiled", 0) >= 1 and s_sched.get("refused", 0) == 0, s_sched
    assert "differs in" in log  # the miss says which fields of the key changed
    s_model, out_model, _ = _run(tmp, cache_dir, "head4", head=4)
    assert s_model.get("compiled", 0) >= 1 and s_model.get("loaded", 0) == 0, s_model
    assert out_model.shape == out.shape


def test_damaged_package_is_refused_and_compiled_again(first, tmp_path):
    _, cache_dir, stats, out = first
    damaged = tmp_path / "cache"
    damaged.mkdir()
    for name in os.listdir(cache_dir):
        if not name.startswith("."):
            (damaged / name).write_bytes((cache_dir / name).read_bytes())
    victim = sorted(p for p in damaged.iterdir() if p.suffix == ".pt2")[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    s, out2, log = _run(tmp_path, damaged, "damaged")
    assert s.get("refused", 0) == 1 and s.get("compiled", 0) == 1, s
    assert "refused the package" in log and "do not match the SHA-256" in log, log[-2000:]
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-5)


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
