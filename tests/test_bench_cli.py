"""fxcache.evaluation.speed.measure_speedup and the ``fxcache`` command line: fast CPU checks.

Speed *targets* (efficiency >= 0.97, measured speed-up > 1) are asserted in bench/, never
here: these tests only check that the figures are consistent with each other, so they
stay fast and cannot fail because the machine is busy.
"""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fxcache
import fxcache.testing
from fxcache import cli
from fxcache.evaluation.speed import SpeedReport, interleaved_times, measure_speedup


def _has_model(name: str) -> bool:
    from fxcache import models

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
    for needle in ("(1) FLOP-ideal, over the generation", "(2) predicted", "(3) measured", "runtime efficiency",
                   "the runtime alone", "target >= 0.97: "):
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


def test_measure_speedup_loop_stand_in_is_a_module(tiny_unet):
    """The stand-in that times the loop alone is a drop-in module like the cached model
    (parameters, attributes and calls of the model): a run() that wants a module is
    timed alone too."""
    loop = _loop(tiny_unet)

    def run(m):
        if not isinstance(m, torch.nn.Module):
            raise TypeError("run() wants a module")
        next(m.parameters())
        loop(m)

    rep = measure_speedup(tiny_unet.model, fxcache.DeepCache(interval=2, branch=0), run,
                          repeats=1, warmup=0, min_time=0.0, threads=1)
    assert rep.loop_s is not None and rep.efficiency_excl_loop is not None


def test_measure_speedup_loop_needing_the_model_itself(tiny_unet):
    """A run() that the stand-in cannot drive still gets figures (2)-(4), without the loop ones."""
    loop = _loop(tiny_unet)

    def run(m):
        if not isinstance(m, (type(tiny_unet.model), fxcache.CachedModel)):
            raise TypeError("run() wants the model or a CachedModel")
        loop(m)

    rep = measure_speedup(tiny_unet.model, fxcache.DeepCache(interval=2, branch=0), run,
                          repeats=1, warmup=0, min_time=0.0, threads=1)
    assert rep.loop_s is None and rep.efficiency_excl_loop is None and rep.predicted_with_loop is None
    assert math.isclose(rep.efficiency, rep.measured_speedup / rep.predicted_speedup, rel_tol=1e-12)
    assert "the runtime alone" not in str(rep)


def test_cli_progress_proxy_is_a_drop_in(tiny_unet):
    """The CLI's progress proxy is a DropIn: calls, attributes and state_dict are the
    model's, and each call ticks the bar once."""
    from fxcache.dropin import DropIn

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    proxy = cli._Ticking(tiny_unet.model, bar)
    assert isinstance(proxy, DropIn)
    assert proxy.config is tiny_unet.model.config and proxy.dtype == tiny_unet.model.dtype
    assert list(proxy.state_dict()) == list(tiny_unet.model.state_dict())
    with torch.no_grad():
        t = tiny_unet.timesteps[0]
        assert torch.equal(tiny_unet.output(tiny_unet.call(proxy, t)), tiny_unet.output(tiny_unet.call(tiny_unet.model, t)))
    assert bar.n == 1


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
    assert cli.parse_schedule("fbc:0.15") == fxcache.FirstBlockCache(0.15)
    assert cli.parse_schedule("teacache:0.2") == fxcache.TeaCache(0.2)
    assert cli.parse_schedule("adaptive-deepcache:0.05:1") == fxcache.AdaptiveDeepCache(0.05, branch=1)
    for bad in ("fora:2.5", "deepcache:3:0.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="whole numbers"):
            cli.parse_schedule(bad)


@pytest.mark.parametrize(
    "text, param",
    [
        ("fbc:nan", "threshold"), ("fbc:inf", "threshold"), ("fbc:-inf", "threshold"), ("fbc:1e400", "threshold"),
        ("teacache:nan", "threshold"), ("teacache:Infinity", "threshold"),
        ("fora:nan", "interval"), ("fora:inf", "interval"), ("fora:1e400", "interval"),
        ("deepcache:nan", "interval"), ("deepcache:inf:0", "interval"), ("deepcache:3:nan", "branch"),
        ("deepcache:3:inf", "branch"), ("adaptive-deepcache:nan", "threshold"),
        ("adaptive-deepcache:inf:1", "threshold"), ("adaptive-deepcache:0.1:nan", "branch"),
    ],
)
def test_parse_schedule_refuses_nan_and_inf_naming_the_parameter(text, param):
    """NaN and infinite values are refused in one clear line naming the parameter (not
    argparse's 'invalid parse_schedule value', nor an OverflowError traceback)."""
    with pytest.raises(argparse.ArgumentTypeError) as info:
        cli.parse_schedule(text)
    msg = str(info.value)
    assert msg.startswith(f"invalid schedule {text!r}: {param} = ") and "finite" in msg, msg


@pytest.mark.parametrize(
    "text, field",
    [
        ("fbc:-0.1", "FirstBlockCache.threshold = -0.1"), ("teacache:-1", "TeaCache.threshold = -1.0"),
        ("fora:-2", "FORA.interval = -2"), ("fora:0", "FORA.interval = 0"), ("deepcache:-3", "DeepCache.interval = -3"),
        ("deepcache:3:-1", "DeepCache.branch = -1"), ("adaptive-deepcache:-0.1", "AdaptiveDeepCache.threshold = -0.1"),
        ("adaptive-deepcache:0.1:-1", "AdaptiveDeepCache.branch = -1"),
    ],
)
def test_parse_schedule_refuses_negative_values_naming_the_field(text, field):
    with pytest.raises(argparse.ArgumentTypeError, match=f"invalid schedule {text!r}: {field} is not allowed"):
        cli.parse_schedule(text)


def test_parse_schedule_branch_of_adaptive_deepcache_is_a_whole_number():
    """It was truncated (0.1:1.5 gave branch 1) while deepcache:3:0.5 was refused."""
    with pytest.raises(argparse.ArgumentTypeError, match="whole numbers"):
        cli.parse_schedule("adaptive-deepcache:0.1:1.5")


@pytest.mark.parametrize("text", ["fbc:nan", "fora:inf", "deepcache:3:nan"])
def test_cli_nan_schedule_is_one_clear_line(text, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--model", "unet", "--schedule", text])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid parse_schedule value" not in err and "finite" in err and "Traceback" not in err


def test_cli_bench_adaptive_with_forecast(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--model", "dit", "--schedule", "fbc:0.15", "--forecast", "1", "--steps", "4",
                     "--samples", "1", "--repeats", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "FirstBlockCache" in report["schedule"] and report["measured_speedup"] > 0


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


def test_cli_profile_writes_file(tmp_path, capsys):
    out, plot = tmp_path / "p.safetensors", tmp_path / "p.png"
    argv = ["profile", "--model", "unet", "--steps", "3", "--samples", "1", "--seeds", "0",
            "--units", "resnet", "--out", str(out)]
    if importlib.util.find_spec("matplotlib") is not None:
        argv += ["--plot", str(plot)]
    assert cli.main(argv) == 0
    assert out.is_file()
    from fxcache.artefacts import Profile

    prof = Profile.load(out)
    assert prof.num_steps == 3 and prof.num_units > 0


# ------------------------------------------------- outputs checked before any work (issue 9)
@pytest.fixture
def no_model_work(monkeypatch):
    """Loading an embedded model fails the test: an output check must fire before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the command checked its outputs")

    from fxcache import models

    monkeypatch.setattr(models, "load", refuse)


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fxcache {command}: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    "command, argv",
    [
        ("demo", ["demo", "--steps", "1", "--samples", "1", "--no-bench", "--out", "{missing}/demo.png"]),
        ("profile", ["profile", "--model", "unet", "--steps", "1", "--samples", "1", "--seeds", "0",
                     "--out", "{missing}/p.safetensors"]),
        ("profile", ["profile", "--model", "unet", "--steps", "1", "--samples", "1", "--seeds", "0",
                     "--out", "{tmp}/p.safetensors", "--plot", "{missing}/p.png"]),
        ("bench", ["bench", "--model", "unet", "--steps", "1", "--samples", "1", "--repeats", "1",
                   "--json", "{missing}/report.json"]),
        ("search", ["search", "--model", "dit", "--speedup", "2", "--out", "{missing}/found.json"]),
    ],
)
def test_cli_output_into_missing_folder_is_refused_before_work(command, argv, tmp_path, capsys, no_model_work):
    """One rule for every output: the folder must exist (demo and profile alike); the
    command says so in one line, exits 2, and creates nothing."""
    missing = tmp_path / "no" / "such"
    argv = [a.format(missing=missing, tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    err = _one_line_error(capsys, command)
    assert str(missing) in err and "does not exist" in err and "create it" in err
    assert not (tmp_path / "no").exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_demo_unsupported_extension_is_refused_before_work(tmp_path, capsys, no_model_work):
    assert cli.main(["demo", "--steps", "1", "--samples", "1", "--no-bench", "--out", str(tmp_path / "demo.xyz")]) == 2
    err = _one_line_error(capsys, "demo")
    assert "'.xyz'" in err and ".png" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_profile_out_unwritable_is_refused_before_work(tmp_path, capsys, no_model_work):
    """A path under a regular file (unwritable for any user, root included) and a folder
    given as the output file are both refused before anything runs."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = ["profile", "--model", "unet", "--steps", "1", "--samples", "1", "--seeds", "0", "--out"]
    assert cli.main(argv + [str(blocker / "p.safetensors")]) == 2
    err = _one_line_error(capsys, "profile")
    assert str(blocker) in err and "not a folder" in err
    assert cli.main(argv + [str(tmp_path)]) == 2
    err = _one_line_error(capsys, "profile")
    assert "is a folder" in err
    assert cli.main(argv + [str(tmp_path / "p.npz")]) == 2
    assert "'.npz'" in _one_line_error(capsys, "profile")
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into any folder")
def test_cli_output_into_read_only_folder_is_refused_before_work(tmp_path, capsys, no_model_work):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert cli.main(["bench", "--model", "unet", "--json", str(ro / "r.json")]) == 2
        assert "cannot write" in _one_line_error(capsys, "bench")
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("folder", ["/proc", "/sys", "/proc/self"])
@pytest.mark.parametrize(
    "command, argv",
    [
        ("demo", ["demo", "--steps", "1", "--samples", "1", "--no-bench", "--out", "{folder}/demo.png"]),
        ("profile", ["profile", "--model", "unet", "--steps", "1", "--samples", "1", "--seeds", "0",
                     "--out", "{folder}/p.safetensors"]),
        ("bench", ["bench", "--model", "unet", "--steps", "1", "--samples", "1", "--repeats", "1",
                   "--json", "{folder}/r.json"]),
    ],
)
def test_cli_output_on_a_pseudo_filesystem_is_refused_before_work(folder, command, argv, capsys, no_model_work):
    """/proc and /sys pass os.access as root but hold no files: refused in one line before
    any work, not a traceback after the whole run."""
    if not os.path.isdir(folder):
        pytest.skip(f"no {folder} here")
    assert cli.main([a.format(folder=folder) for a in argv]) == 2
    err = _one_line_error(capsys, command)
    assert folder in err and "cannot write" in err


def test_cli_output_that_is_not_a_regular_file_is_refused_before_work(capsys, no_model_work):
    """Writing goes through a temporary file and a rename, which would replace a device
    node: an existing target that is not a regular file is refused."""
    if not os.path.exists(os.devnull) or os.path.isfile(os.devnull):
        pytest.skip("no device node to try")
    assert cli.main(["bench", "--model", "unet", "--json", os.devnull]) == 2
    err = _one_line_error(capsys, "bench")
    assert os.devnull in err and "not a regular file" in err
    assert not os.path.isfile(os.devnull)


def test_cli_output_folder_where_no_file_can_be_created_is_refused(tmp_path, capsys, monkeypatch, no_model_work):
    """The folder is tried by creating and removing a file in it, whatever os.access says."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert cli.main(["bench", "--model", "unet", "--json", str(tmp_path / "r.json")]) == 2
    err = _one_line_error(capsys, "bench")
    assert "cannot write" in err and "Read-only file system" in err


@pytest.mark.parametrize("mode", ["bogus", "Default", ""])
def test_cli_bench_bad_mode_is_refused_before_work(mode, capsys, no_model_work):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--model", "unet", "--backend", "inductor", "--mode", mode])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--mode" in err and "reduce-overhead" in err


def test_cli_bench_mode_without_inductor_is_refused_before_work(capsys, no_model_work):
    """--mode is a torch.compile mode: with --backend none nothing is compiled and it used
    to be ignored without a word."""
    assert cli.main(["bench", "--model", "unet", "--mode", "max-autotune"]) == 2
    err = _one_line_error(capsys, "bench")
    assert "--mode" in err and "--backend inductor" in err


@pytest.mark.skipif(not _has_model("unet"), reason="the embedded trained U-Net is not present")
def test_cli_demo_bad_branch_is_refused_before_any_generation(tmp_path, capsys, monkeypatch):
    """--branch is checked against the model's skip branches before the uncached (or
    any) generation runs."""

    def refuse(*args, **kwargs):
        raise AssertionError("a generation ran before --branch was checked")

    monkeypatch.setattr(cli, "_generate", refuse)
    code = cli.main(["demo", "--steps", "2", "--samples", "1", "--branch", "9", "--no-bench",
                     "--out", str(tmp_path / "x.png")])
    assert code == 2
    err = _one_line_error(capsys, "demo")
    assert "9" in err and "branch" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_profile_plot_without_matplotlib_is_refused_before_work(tmp_path, capsys, monkeypatch, no_model_work):
    for name in [m for m in sys.modules if m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # the import system's own "not installed"
    argv = ["profile", "--model", "unet", "--steps", "1", "--samples", "1", "--seeds", "0",
            "--out", str(tmp_path / "p.safetensors"), "--plot", str(tmp_path / "p.png")]
    assert cli.main(argv) == 2
    err = _one_line_error(capsys, "profile")
    assert "--plot" in err and "matplotlib" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_profile_plot_unsupported_extension_is_refused_before_work(tmp_path, capsys, no_model_work):
    pytest.importorskip("matplotlib")
    argv = ["profile", "--model", "unet", "--steps", "1", "--samples", "1", "--seeds", "0",
            "--out", str(tmp_path / "p.safetensors"), "--plot", str(tmp_path / "p.xyz")]
    assert cli.main(argv) == 2
    assert "'.xyz'" in _one_line_error(capsys, "profile")


# ------------------------------------------- results stamped with the commit that produced them
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(repo, *args) -> str:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A committed checkout-like tree: fxcache/, bench/, scripts/, docs and an ignore file."""
    r = tmp_path / "repo"
    for rel, text in {"fxcache/a.py": "a = 1\n", "bench/b.py": "b = 1\n", "scripts/c.sh": "echo c\n",
                      "README.md": "# r\n", ".gitignore": "__pycache__/\n"}.items():
        (r / rel).parent.mkdir(parents=True, exist_ok=True)
        (r / rel).write_text(text)
    _git(r, "init", "-q")
    _git(r, "add", "-A")
    _git(r, "commit", "-q", "-m", "init")
    return r


def test_source_stamp_clean_tree_is_head(repo):
    from fxcache.evaluation.provenance import source_stamp

    stamp = source_stamp(repo)
    assert stamp["commit"] == _git(repo, "rev-parse", "HEAD") and len(stamp["commit"]) == 40
    assert stamp["dirty"] == [] and stamp["allow_dirty"] is False
    # changes outside fxcache/, bench/, scripts/ and ignored files do not make results dirty
    (repo / "README.md").write_text("# changed\n")
    (repo / "docs").mkdir()
    (repo / "docs" / "new.md").write_text("x\n")
    (repo / "bench" / "results").mkdir()  # results are not code: writing one table does not block the next
    (repo / "bench" / "results" / "table1.json").write_text("{}\n")
    (repo / "fxcache" / "__pycache__").mkdir()
    (repo / "fxcache" / "__pycache__" / "a.pyc").write_bytes(b"\0")
    assert source_stamp(repo)["dirty"] == []


@pytest.mark.parametrize(
    "change, path",
    [
        ("untracked", "fxcache/new.py"),  # what `git describe --dirty` does not see
        ("modified", "bench/b.py"),
        ("staged", "scripts/c.sh"),
        ("deleted", "fxcache/a.py"),
    ],
)
def test_source_stamp_refuses_a_dirty_tree_unless_allowed(repo, change, path):
    from fxcache.evaluation.provenance import ProvenanceError, source_stamp

    head = _git(repo, "rev-parse", "HEAD")
    f = repo / path
    if change == "deleted":
        f.unlink()
    else:
        f.write_text("changed = True\n")
    if change == "staged":
        _git(repo, "add", path)
    with pytest.raises(ProvenanceError) as exc:
        source_stamp(repo)
    msg = str(exc.value)
    assert str(repo) in msg and path in msg and head[:12] in msg and "--allow-dirty" in msg
    stamp = source_stamp(repo, allow_dirty=True)
    assert stamp["commit"] == head and stamp["allow_dirty"] is True
    assert [d["path"] for d in stamp["dirty"]] == [path]
    # committed, the same code is clean and stamped with the new commit
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "change")
    stamp = source_stamp(repo)
    assert stamp["commit"] == _git(repo, "rev-parse", "HEAD") != head and stamp["dirty"] == []


def test_source_stamp_outside_a_checkout(tmp_path):
    from fxcache.evaluation.provenance import ProvenanceError, source_stamp

    with pytest.raises(ProvenanceError, match="not a git checkout"):
        source_stamp(tmp_path)
    stamp = source_stamp(tmp_path, allow_dirty=True)
    assert stamp["commit"] is None and stamp["allow_dirty"] is True


def test_tables_refuse_a_dirty_tree_before_measuring(repo):
    """bench/tables.py checks the tree first: one line, exit 2, nothing measured or written."""
    import glob
    import shutil

    for path in glob.glob(os.path.join(ROOT, "bench", "*.py")):  # the driver, its harness and table modules
        shutil.copy(path, repo / "bench")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "tables")
    (repo / "fxcache" / "untracked.py").write_text("x = 1\n")
    proc = subprocess.run([sys.executable, "bench/tables.py", "--table", "1", "--samples", "2", "--steps", "2"],
                          cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "\n" not in err and "fxcache/untracked.py" in err and "--allow-dirty" in err
    assert not (repo / "bench" / "results").exists()


def test_tables_render_reproduces_the_results_and_keeps_their_discussion(tmp_path):
    """bench/results/table{n}.md is what the driver renders from table{n}.json, followed by
    the hand-written discussion, which rendering keeps (edited or not); a table without a
    Markdown file yet gets the marker and a placeholder."""
    import shutil

    results = os.path.join(ROOT, "bench", "results")
    # tables 1-4 always; table 5 (and any later one) once its results are committed
    tables = [n for n in range(1, 10) if n <= 4 or os.path.exists(os.path.join(results, f"table{n}.json"))]
    for n in tables:
        for ext in ("json", "md"):
            shutil.copy(os.path.join(results, f"table{n}.{ext}"), tmp_path)
    edited = (tmp_path / "table2.md").read_text() + "\nA sentence added by hand.\n"
    (tmp_path / "table2.md").write_text(edited)
    (tmp_path / "new").mkdir()
    shutil.copy(tmp_path / "table4.json", tmp_path / "new")
    for out in (tmp_path, tmp_path / "new"):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "tables.py"), "--render", "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    for n in [n for n in tables if n != 2]:
        with open(os.path.join(results, f"table{n}.md")) as f:
            assert (tmp_path / f"table{n}.md").read_text() == f.read()
    assert (tmp_path / "table2.md").read_text() == edited.rstrip("\n") + "\n"
    fresh = (tmp_path / "new" / "table4.md").read_text()
    assert "<!-- Everything below this line is written by hand" in fresh and "(not written yet" in fresh
    assert fresh.split("<!--")[0] == (tmp_path / "table4.md").read_text().split("<!--")[0]


def test_tables_header_names_the_stamp(repo):
    """The Markdown header says which commit produced the figures, and loudly when the
    tree was dirty (written with --allow-dirty)."""
    import importlib.util as iu

    from fxcache.evaluation.provenance import source_stamp

    # bench/harness.py: the Markdown (and everything else) the tables share
    spec = iu.spec_from_file_location("_harness_under_test", os.path.join(ROOT, "bench", "harness.py"))
    harness = iu.module_from_spec(spec)
    sys.modules[spec.name] = harness  # dataclasses look their module up
    try:
        spec.loader.exec_module(harness)
        clean = source_stamp(repo)
        assert harness.md_code({"source": clean}) == (
            f"commit `{clean['commit']}` (no changes under fxcache/, bench/, scripts/ outside bench/results/)")
        (repo / "scripts" / "new.py").write_text("x = 1\n")
        text = harness.md_code({"source": source_stamp(repo, allow_dirty=True)})
        assert clean["commit"] in text and "plus uncommitted changes" in text and "scripts/new.py (untracked)" in text
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    """A user's own pipeline as fxcache sees it: a tiny DDPM pipeline saved in a local folder."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from fxcache.testing import tiny

    folder = tmp_path_factory.mktemp("ddpm") / "pipe"
    DDPMPipeline(unet=tiny("unet2d").model, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def test_bench_on_a_local_pipeline_folder(ddpm_folder, tmp_path, capsys):
    """fxcache bench --pipeline DIR: the user's own diffusers pipeline, saved in a folder
    (no Hub), measured like the embedded models: the three speed figures."""
    code = cli.main(["bench", "--pipeline", str(ddpm_folder), "--schedule", "deepcache:2:0", "--steps", "4",
                     "--samples", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    for needle in ("DDPMPipeline", "unet", "(1) FLOP-ideal", "(3) measured"):
        assert needle in out, needle
    assert cli.main(["bench", "--pipeline", str(tmp_path / "nothing"), "--schedule", "fora:2"]) == 2
    assert "not a diffusers pipeline folder" in capsys.readouterr().err


def test_profile_on_a_local_pipeline_folder(ddpm_folder, tmp_path, capsys):
    """fxcache profile --pipeline DIR (issue 20, item 6): the denoiser profiled inside the
    pipeline's own loop, one generation per seed, saved as for an embedded model."""
    from fxcache.artefacts import Profile

    out = tmp_path / "p.safetensors"
    code = cli.main(["profile", "--pipeline", str(ddpm_folder), "--steps", "3", "--samples", "1", "--seeds", "0,1",
                     "--units", "resnet", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "DDPMPipeline" in text and "'unet'" in text and "wrote" in text
    prof = Profile.load(out)
    assert prof.num_steps == 3 and prof.num_units > 0 and list(prof.meta["seeds"]) == [0, 1]


def test_profile_pipeline_errors_are_one_line_before_work(ddpm_folder, tmp_path, capsys, monkeypatch):
    """The same checks as bench --pipeline and profile --model: outputs first, then the
    folder, each one line; --model and --pipeline exclude each other."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pipeline was loaded before the command checked its arguments")

    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    missing = tmp_path / "no" / "such"
    assert cli.main(["profile", "--pipeline", str(ddpm_folder), "--out", str(missing / "p.safetensors")]) == 2
    assert "does not exist" in _one_line_error(capsys, "profile")
    assert cli.main(["profile", "--pipeline", str(tmp_path), "--out", str(tmp_path / "p.safetensors")]) == 2
    err = _one_line_error(capsys, "profile")
    assert "not a diffusers pipeline folder" in err and "model_index.json" in err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        cli.main(["profile", "--model", "unet", "--pipeline", str(ddpm_folder), "--out", str(tmp_path / "p.safetensors")])
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["profile", "--out", str(tmp_path / "p.safetensors")])
    assert "--model" in capsys.readouterr().err


# -------------------------------------------------- magcache: and taylorseer: (issue 20, item 6)
def test_parse_taylorseer_and_magcache():
    """taylorseer:N[:ORDER] is FORA(N) with a forecast order (default 1) and a warm-up of
    ORDER + 1 computed steps; magcache:THRESHOLD[:MAX_REUSE] is MagCache with its
    published limits (K = 3 by default, the first 20% of steps computed), its ratios
    calibrated when the model is known."""
    spec = cli.parse_spec("taylorseer:3")
    assert spec.schedule == fxcache.FORA(3) and spec.forecast == 1 and spec.warmup == 2
    spec = cli.parse_spec("TaylorSeer:4:2")
    assert spec.schedule == fxcache.FORA(4) and spec.forecast == 2 and spec.warmup == 3
    assert cli.parse_schedule("taylorseer:3:2") == fxcache.FORA(3)
    spec = cli.parse_spec("magcache:0.1")
    assert spec.schedule == fxcache.MagCache(0.1, max_reuse=3) and spec.forecast is None and spec.calibrate
    assert cli.parse_schedule("magcache:0.05:2") == fxcache.MagCache(0.05, max_reuse=2)
    assert cli.parse_spec("fora:2").forecast is None and not cli.parse_spec("fora:2").calibrate


@pytest.mark.parametrize(
    "text, message",
    [
        ("taylorseer:3:3", "order = 3 is not allowed"), ("taylorseer:3:0", "order = 0 is not allowed"),
        ("taylorseer:0", "FORA.interval = 0 is not allowed"), ("taylorseer:2.5", "whole numbers"),
        ("taylorseer:nan", "interval = nan is not a finite number"), ("taylorseer:2:inf", "order = inf"),
        ("magcache:-0.1", "MagCache.threshold = -0.1 is not allowed"), ("magcache:nan", "threshold = nan"),
        ("magcache:0.1:-1", "MagCache.max_reuse = -1 is not allowed"), ("magcache:0.1:1.5", "whole numbers"),
        ("magcache", "magcache:THRESHOLD[:MAX_REUSE]"), ("taylorseer:2:1:1", "taylorseer:INTERVAL[:ORDER]"),
    ],
)
def test_parse_taylorseer_and_magcache_errors(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        cli.parse_spec(text)
    msg = str(info.value)
    assert msg.startswith(f"invalid schedule {text!r}: ") and message in msg and "\n" not in msg, msg


def test_cli_bench_taylorseer(tmp_path, capsys):
    """One run: TaylorSeer's schedule (warm-up, then every N-th step) with forecast order
    ORDER, said before measuring and named in the report."""
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--model", "dit", "--schedule", "taylorseer:2:1", "--steps", "6", "--samples", "1",
                     "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    # 6 steps: 0 and 1 computed (warm-up), then (s - 3) % 2 == 0: 3 and 5; 2 and 4 forecast
    assert "steps 0-1 computed (warm-up), then every 2nd step (4 of 6 computed)" in text, text
    assert "forecast order 1" in text
    report = json.loads(out.read_text())
    assert report["schedule"].startswith("taylorseer:2:1 = Mask(") and report["schedule"].endswith("forecast order 1")
    assert sum(report["kind_steps"]) == 6 and 2 in report["kind_steps"]


def test_cli_bench_magcache_calibrates_first(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--model", "dit", "--schedule", "magcache:0.5:2", "--steps", "6", "--samples", "1",
                     "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if "MagCache" in ln and "calibrated" in ln)
    assert "seed 1" in line and " s" in line, line
    report = json.loads(out.read_text())
    assert report["schedule"].startswith("magcache:0.5:2") and "MagCache(" in report["schedule"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--model", "unet", "--schedule", "magcache:0.1"], "transformer blocks"),
        (["bench", "--model", "unet", "--schedule", "taylorseer:2"], "transformer blocks"),
        (["bench", "--model", "dit", "--schedule", "taylorseer:2:1", "--forecast", "2"], "--forecast 2"),
        (["bench", "--model", "dit", "--schedule", "taylorseer:2", "--forecast", "0"], "--forecast 0"),
        (["plan", "--config", "sd15", "--schedule", "magcache:0.1"], "weights"),
    ],
)
def test_cli_taylorseer_and_magcache_refusals_are_one_line_before_work(argv, message, capsys, no_model_work):
    assert cli.main(argv) == 2
    assert message in _one_line_error(capsys, argv[0])


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """A tiny DiT pipeline saved in a folder (1000 classes: DiTPipeline's guidance uses class
    1000 as its null class)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from fxcache.testing import tiny

    cfg = {k: v for k, v in tiny("dit").model.config.items() if not k.startswith("_")}
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8, layers_per_block=1)
    folder = tmp_path_factory.mktemp("dit") / "pipe"
    DiTPipeline(transformer=DiTTransformer2DModel(**{**cfg, "num_embeds_ada_norm": 1000}), vae=vae,
                scheduler=DDIMScheduler(num_train_timesteps=1000), id2label={i: str(i) for i in range(10)}
                ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("schedule, said", [("magcache:0.3", "calibrated in"),
                                            ("taylorseer:2:2", "steps 0-2 computed (warm-up)")])
def test_cli_bench_pipeline_magcache_and_taylorseer(dit_folder, schedule, said, tmp_path, capsys):
    """On a saved pipeline: MagCache calibrated inside the pipeline's own loop, TaylorSeer's
    mask on the units FORA finds in its transformer (planned through the pipeline)."""
    out = tmp_path / "r.json"
    code = cli.main(["bench", "--pipeline", str(dit_folder), "--schedule", schedule, "--steps", "6", "--samples", "1",
                     "--repeats", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert said in text and "DiTPipeline" in text, text
    assert json.loads(out.read_text())["schedule"].startswith(schedule + " = ")


def test_cli_magcache_on_a_pipeline_without_transformer_blocks(ddpm_folder, capsys):
    assert cli.main(["bench", "--pipeline", str(ddpm_folder), "--schedule", "magcache:0.1", "--steps", "3",
                     "--samples", "1", "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after diffusers' "Loading pipeline components" bar
    assert err.startswith("fxcache bench: error: ") and "MagCache" in err and "transformer blocks" in err, err


def test_cli_plan_taylorseer(capsys):
    """fxcache plan takes taylorseer: too: TaylorSeer's steps on FORA's units, and the
    forecast history its order keeps counted in the cache bytes."""
    assert cli.main(["plan", "--config", "sd15", "--height", "256", "--width", "256", "--steps", "6",
                     "--schedule", "taylorseer:3:2"]) == 0
    out = capsys.readouterr().out
    # warm-up 0-2, then (s - 4) % 3 == 0: step 4
    assert "steps 0-2 computed (warm-up), then every 3rd step (4 of 6 computed)" in out, out
    assert "kind 0: steps 0, 1, 2, 4;" in out and "kind 1: steps 3, 5;" in out, out
    assert "(forecast order 2: 3 values per slot)" in out, out


def test_cli_search_then_bench_the_searched_file(tmp_path, capsys):
    """fxcache search writes a schedule; bench --schedule FILE.json measures it (the forecast
    order travels with it); a file of another model is one line of error."""
    out = tmp_path / "found.json"
    assert cli.main(["search", "--model", "dit", "--speedup", "2", "--steps", "4", "--samples", "2", "--seeds",
                     "300", "--orders", "0,1", "--method", "anneal", "--iterations", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "searched schedule (anneal) on DiTTransformer2DModel" in text and f"wrote {out}" in text
    found = fxcache.SearchResult.load(out)
    assert found.ideal_speedup >= 2.0 and found.mask.num_steps == 4
    assert cli.main(["bench", "--model", "dit", "--schedule", str(out), "--steps", "4", "--samples", "2",
                     "--repeats", "1"]) == 0
    report = capsys.readouterr().out
    assert f"{out} = " in report
    assert cli.main(["bench", "--model", "unet", "--schedule", str(out), "--steps", "4", "--samples", "2",
                     "--repeats", "1"]) == 2
    assert "searched on a DiTTransformer2DModel" in _one_line_error(capsys, "bench")
    assert cli.main(["search", "--model", "dit", "--speedup", "40", "--steps", "4", "--samples", "2",
                     "--seeds", "300", "--out", str(tmp_path / "x.json")]) == 2
    assert "beyond what reusing" in _one_line_error(capsys, "search")
