"""fxcache.bench.measure_speedup and the ``fxcache`` command line: fast CPU checks.

Speed *targets* (efficiency >= 0.97, measured speed-up > 1) are asserted in bench/, never
here: these tests only check that the figures are consistent with each other, so they
stay fast and cannot fail because the machine is busy.
"""

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

import fxcache
import fxcache.testing
from fxcache import cli
from fxcache.bench import SpeedReport, interleaved_times, measure_speedup


def _has_model(name: str) -> bool:
    try:
        from fxcache import models
    except ImportError:
        return False
    return name in models.available()


@pytest.fixture(scope="module")
def tiny_unet():
    return fxcache.testing.tiny("unet2d")


def _loop(tn):
    def run(m):
        for t in tn.timesteps:
            tn.call(m, t)

    return run


def _check_consistent(rep: SpeedReport, steps: int, repeats: int):
    assert rep.steps == steps
    assert rep.repeats == repeats
    assert rep.ideal_speedup >= 1.0
    assert rep.full_flops > 0 and 0 < rep.planned_flops <= rep.full_flops * steps
    assert math.isclose(rep.ideal_speedup, rep.full_flops * steps / rep.planned_flops)
    assert sum(rep.kind_steps) == steps
    assert len(rep.kind_step_s) == len(rep.kind_steps) == len(rep.kind_flops)
    assert rep.full_step_s > 0 and all(t > 0 for t, n in zip(rep.kind_step_s, rep.kind_steps) if n)
    assert rep.predicted_speedup > 0 and rep.measured_speedup > 0
    assert len(rep.pair_ratios) == repeats
    assert rep.measured_min <= rep.measured_speedup <= rep.measured_max
    assert rep.uncached_s > 0 and rep.cached_s > 0
    # the predicted figure is, by definition, steps x full time / sum of per-step kind times
    per_step = sum(n * t for n, t in zip(rep.kind_steps, rep.kind_step_s) if n)
    assert math.isclose(rep.predicted_speedup, steps * rep.full_step_s / per_step, rel_tol=1e-9)
    assert math.isclose(rep.efficiency, rep.measured_speedup / rep.predicted_speedup, rel_tol=1e-12)
    assert rep.predicted_min <= rep.predicted_max
    # the loop's own work, added to both arms of the prediction
    assert rep.loop_s is not None and rep.loop_s > 0
    kinds = sum(n * t for n, t in zip(rep.kind_steps, rep.kind_step_s) if n)
    with_loop = (steps * rep.full_step_s + rep.loop_s) / (kinds + rep.loop_s)
    assert math.isclose(rep.predicted_with_loop, with_loop, rel_tol=1e-9)
    assert math.isclose(rep.efficiency_excl_loop, rep.measured_speedup / with_loop, rel_tol=1e-12)


def test_measure_speedup_eager_tiny_unet(tiny_unet):
    threads = torch.get_num_threads()
    rep = measure_speedup(
        tiny_unet.model, fxcache.DeepCache(interval=2, branch=0), _loop(tiny_unet),
        repeats=2, warmup=0, threads=1, min_time=0.0,
    )
    _check_consistent(rep, steps=len(tiny_unet.timesteps), repeats=2)
    assert rep.ideal_speedup > 1.0  # branch 0 skips most of the U-Net at the partial steps
    assert rep.kind_steps == [3, 2]  # steps 0, 2, 4 full; 1, 3 partial
    assert rep.backend is None and rep.baseline_compile_s is None
    assert rep.graph_step_s is not None and rep.graph_step_s > 0
    assert rep.setup_s is not None
    assert rep.threads == 1
    assert torch.get_num_threads() == threads  # put back
    d = rep.to_dict()
    json.dumps(d)
    assert d["measured_speedup"] == rep.measured_speedup
    text = str(rep)
    for needle in ("(1) FLOP-ideal", "(2) predicted", "(3) measured", "runtime efficiency", "the runtime alone"):
        assert needle in text


def test_measure_speedup_reuses_a_cached_model(tiny_unet):
    schedule = fxcache.DeepCache(interval=2, branch=0)
    cm = fxcache.compile(tiny_unet.model, schedule, backend=None)
    run = _loop(tiny_unet)
    with torch.no_grad(), cm.generation():
        run(cm)
    plan = cm.plan
    rep = measure_speedup(cm, None, run, repeats=1, warmup=0, min_time=0.0, threads=1)
    _check_consistent(rep, steps=5, repeats=1)
    assert cm.plan is plan  # nothing rebuilt
    assert rep.setup_s is None  # built before measuring
    with pytest.raises(ValueError, match="already a CachedModel"):
        measure_speedup(cm, fxcache.DeepCache(interval=3, branch=0), run, repeats=1)


def test_measure_speedup_outputs_unchanged(tiny_unet):
    """Measuring replays steps on copies of their inputs: the cached model's own
    generation afterwards is the same as before."""
    schedule = fxcache.DeepCache(interval=2, branch=0)
    cm = fxcache.compile(tiny_unet.model, schedule, backend=None)

    def outputs():
        with torch.no_grad(), cm.generation():
            return [tiny_unet.output(tiny_unet.call(cm, t)).clone() for t in tiny_unet.timesteps]

    before = outputs()
    measure_speedup(cm, None, _loop(tiny_unet), repeats=1, warmup=0, min_time=0.0, threads=1)
    after = outputs()
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_measure_speedup_loop_needing_a_real_module(tiny_unet):
    """A run() that the stand-in cannot drive still gets figures (2)-(4), without the loop ones."""
    loop = _loop(tiny_unet)

    def run(m):
        if not isinstance(m, torch.nn.Module):
            raise TypeError("run() wants a module")
        loop(m)

    rep = measure_speedup(tiny_unet.model, fxcache.DeepCache(interval=2, branch=0), run,
                          repeats=1, warmup=0, min_time=0.0, threads=1)
    assert rep.loop_s is None and rep.efficiency_excl_loop is None and rep.predicted_with_loop is None
    assert math.isclose(rep.efficiency, rep.measured_speedup / rep.predicted_speedup, rel_tol=1e-12)
    assert "the runtime alone" not in str(rep)


def test_measure_speedup_bad_arguments(tiny_unet):
    sched = fxcache.DeepCache(interval=2, branch=0)
    with pytest.raises(ValueError, match="repeats"):
        measure_speedup(tiny_unet.model, sched, _loop(tiny_unet), repeats=0)
    with pytest.raises(ValueError, match="never called the model"):
        measure_speedup(tiny_unet.model, sched, lambda m: None, repeats=1, warmup=0)


def test_interleaved_times_shape():
    calls = []
    times = interleaved_times([lambda: calls.append("a"), lambda: calls.append("b")], 3, min_time=0.0)
    assert len(times) == 2 and all(len(t) == 3 for t in times)
    assert all(t >= 0 for ts in times for t in ts)
    assert calls[:2] == ["a", "b"]  # calibration call of each, then rounds with rotating order
    assert calls[2:4] == ["a", "b"] and calls[4:6] == ["b", "a"]


# ------------------------------------------------------------------ command line
@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--model", "resnet"], "invalid choice: 'resnet'"),
        (["bench", "--model", "unet", "--schedule", "deepcache"], "invalid schedule 'deepcache'"),
        (["bench", "--model", "unet", "--schedule", "fora:x"], "numbers expected"),
        (["bench", "--model", "unet", "--schedule", "fora:0"], "interval"),
        (["bench", "--model", "unet", "--schedule", "magic:3"], "deepcache:INTERVAL[:BRANCH]"),
        (["bench", "--model", "unet", "--backend", "tensorrt"], "invalid choice: 'tensorrt'"),
        (["demo", "--steps", "0"], "must be >= 1"),
        (["demo", "--branch", "-1"], "must be >= 0"),
        (["profile", "--model", "unet"], "--out"),
        (["profile", "--model", "unet", "--out", "x", "--seeds", "a,b"], "comma-separated"),
        ([], "required"),
    ],
)
def test_cli_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_schedule():
    assert cli.parse_schedule("deepcache:3:1") == fxcache.DeepCache(interval=3, branch=1)
    assert cli.parse_schedule("DeepCache:4") == fxcache.DeepCache(interval=4, branch=0)
    assert cli.parse_schedule("fora:2") == fxcache.FORA(interval=2)


def test_cli_deepcache_on_dit_is_refused(capsys):
    assert cli.main(["bench", "--model", "dit", "--schedule", "deepcache:3"]) == 2
    assert "DiT has none" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "fxcache", "bench", "--model", "nope"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "invalid choice: 'nope'" in proc.stderr


@pytest.mark.skipif(not _has_model("unet"), reason="the embedded trained U-Net (fxcache/models/unet.safetensors) is not present")
def test_cli_demo_writes_png(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "demo.png"
    threads = torch.get_num_threads()
    assert cli.main(["demo", "--steps", "4", "--samples", "4", "--repeats", "1", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the command's --threads does not leak
    text = capsys.readouterr().out
    for needle in ("fxcache plan", "SQNR", "PSNR", "(1) FLOP-ideal", "(2) predicted", "(3) measured", "wrote"):
        assert needle in text
    img = Image.open(out)
    assert img.format == "PNG" and img.width > 3 * img.height // 2  # three grids side by side


@pytest.mark.skipif(not _has_model("unet"), reason="the embedded trained U-Net is not present")
def test_cli_demo_bad_branch_is_a_clear_error(tmp_path, capsys):
    code = cli.main(["demo", "--steps", "2", "--samples", "1", "--branch", "99", "--no-bench", "--out", str(tmp_path / "x.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert "fxcache demo: error:" in err and "99" in err
    assert not (tmp_path / "x.png").exists()


def test_cli_profile_without_profiler_is_a_clear_error(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fxcache.calibrate.profiler" else real(name, *a)
    )
    assert cli.main(["profile", "--model", "unet", "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "needs fxcache.calibrate.profiler" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("fxcache.calibrate.profiler") is None or not _has_model("unet"),
    reason="fxcache.calibrate.profiler or the embedded U-Net is not present",
)
def test_cli_profile_writes_file(tmp_path, capsys):
    out, plot = tmp_path / "p.safetensors", tmp_path / "p.png"
    argv = ["profile", "--model", "unet", "--steps", "3", "--samples", "1", "--seeds", "0",
            "--units", "resnet", "--out", str(out)]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(plot)]
    assert cli.main(argv) == 0
    assert out.is_file()
    from fxcache.calibrate.profile_data import Profile

    prof = Profile.load(out)
    assert prof.num_steps == 3 and prof.num_units > 0
