"""Speed benchmarks: eager vs compiled, full vs cached (DESIGN.md section 5).

Two kinds of test per (model, backend):

- ``test_generation_time``: pytest-benchmark timings of one whole generation, uncached
  and cached, grouped per model so the table reads eager vs compiled and full vs cached;
- ``test_speed_figures``: :func:`fxcache.evaluation.speed.measure_speedup` (FLOP-ideal, predicted
  from step kinds in isolation, measured end to end, runtime efficiency) and the
  performance targets, asserted here and never in tests/.

Models: the tiny random U-Net and DiT of :mod:`fxcache.testing` (at 32x32, batch 4, so
a step is a few milliseconds of real work) and, when present, the trained 16x16 digit
models of :mod:`fxcache.models`. Backends: ``None`` (eager FX graphs) and inductor
(each graph compiled once per session; minutes on a CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import fxcache
import fxcache.testing
from fxcache.evaluation.speed import measure_speedup

STEPS = 20
REPEATS = int(os.environ.get("FXCACHE_BENCH_REPEATS", "15"))  # DESIGN.md: 15 interleaved pairs

#: DESIGN.md section 5: measured ÷ predicted. What the runtime adds on top of its graphs
#: (flattening the inputs, picking the graph, step bookkeeping) plus what the generation
#: loop does besides calling the model must stay within 3% of a generation.
MIN_EFFICIENCY = 0.97


def _models_available(name: str) -> bool:
    try:
        from fxcache import models
    except ImportError:
        return False
    return name in models.available()


@dataclass
class Built:
    model: torch.nn.Module
    schedule: Any
    run: Callable[[torch.nn.Module], Any]
    unet: bool  # DeepCache on a U-Net (the speed-up target applies)
    trained: bool


def _tiny(family: str, schedule) -> Built:
    tn = fxcache.testing.tiny(family, batch=4, size=32)
    timesteps = [torch.tensor(int(t)) for t in torch.linspace(999, 0, STEPS).round()]

    def run(m):
        for t in timesteps:
            tn.call(m, t)

    return Built(tn.model, schedule, run, tn.unet, trained=False)


def _trained(name: str, schedule) -> Built:
    from fxcache import models

    model = models.load(name)
    labels = torch.arange(16) % 10 if name == "dit" else None

    def run(m):
        return models.generate(m, num_steps=STEPS, num_samples=16, seed=0, class_labels=labels)

    return Built(model, schedule, run, unet=name == "unet", trained=True)


CASES: dict[str, Callable[[], Built]] = {
    "tiny-unet2d": lambda: _tiny("unet2d", fxcache.DeepCache(interval=3, branch=0)),
    "tiny-dit": lambda: _tiny("dit", fxcache.FORA(interval=2)),
    "unet": lambda: _trained("unet", fxcache.DeepCache(interval=3, branch=0)),
    "dit": lambda: _trained("dit", fxcache.FORA(interval=2)),
}
BACKENDS = {"eager": None, "inductor": "inductor"}

_built: dict[str, Built] = {}
_cached: dict[tuple[str, str], fxcache.CachedModel] = {}
_baselines: dict[tuple[str, str], Callable] = {}


def _case(name: str) -> Built:
    if name in ("unet", "dit") and not _models_available(name):
        pytest.skip(f"the embedded trained model {name!r} is not present (scripts/train_models.py {name})")
    if name not in _built:
        _built[name] = CASES[name]()
    return _built[name]


def _cached_model(name: str, backend: str) -> fxcache.CachedModel:
    """One CachedModel per (model, backend) for the session: compiled once, then reused."""
    key = (name, backend)
    if key not in _cached:
        b = _case(name)
        cm = fxcache.compile(b.model, b.schedule, backend=BACKENDS[backend])
        with torch.no_grad(), cm.generation():
            b.run(cm)  # capture, rewrite and compile now, outside any timing
        _cached[key] = cm
    return _cached[key]


def _baseline(name: str, backend: str):
    from fxcache.evaluation.speed import _baseline as make_baseline

    key = (name, backend)
    if key not in _baselines:
        cm = _cached_model(name, backend)
        base = make_baseline(_case(name).model, cm.options)
        with torch.no_grad():
            _case(name).run(base)  # compile outside any timing
        _baselines[key] = base
    return _baselines[key]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("arm", ["uncached", "cached"])
@pytest.mark.parametrize("name", list(CASES))
def test_generation_time(benchmark, name, arm, backend):
    b = _case(name)
    benchmark.group = f"{name}: one generation of {STEPS} steps"
    benchmark.extra_info.update(model=name, arm=arm, backend=backend, threads=torch.get_num_threads())
    if arm == "uncached":
        base = _baseline(name, backend)

        def fn():
            with torch.no_grad():
                b.run(base)
    else:
        cm = _cached_model(name, backend)

        def fn():
            with torch.no_grad(), cm.generation():
                b.run(cm)

    benchmark.pedantic(fn, rounds=5, warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", list(CASES))
def test_speed_figures(name, backend, record_property):
    b = _case(name)
    cm = _cached_model(name, backend)
    counters = torch._dynamo.utils.counters
    graphs_before = counters["stats"]["unique_graphs"]

    rep = measure_speedup(cm, None, b.run, repeats=REPEATS, warmup=1)
    print(f"\n{name} / {backend}\n{rep}")
    for key, value in rep.to_dict().items():
        if not isinstance(value, list):
            record_property(key, value)

    assert rep.ideal_speedup >= 1.0
    assert rep.predicted_speedup > 0 and rep.measured_speedup > 0
    if BACKENDS[backend] is not None:
        # Compile stability (DESIGN.md section 5): after warm-up, a whole generation
        # compiles nothing new, cached or not (the baseline compiles its own graph once).
        graphs_mid = counters["stats"]["unique_graphs"]
        with torch.no_grad(), cm.generation():
            b.run(cm)
        assert counters["stats"]["unique_graphs"] == graphs_mid, "a cached generation recompiled after warm-up"
        assert graphs_mid - graphs_before <= 1  # at most the baseline's first compile
    if b.unet:
        # DeepCache behind the shallowest skip skips most of a U-Net's FLOPs at partial
        # steps: whole generations must get faster, eager and compiled.
        assert rep.measured_speedup > 1.0, f"DeepCache made {name} slower:\n{rep}"
    if b.trained and not b.unet:
        # FORA on the trained DiT (batch 16, 64 tokens) skips enough work to show.
        assert rep.measured_speedup > 1.0, f"FORA made {name} slower:\n{rep}"
    # The runtime must not eat what the graphs save (see MIN_EFFICIENCY). DESIGN.md
    # charges the efficiency to the runtime (dispatch, cache writes, step bookkeeping),
    # so the loop's own work (scheduler steps), which both arms pay and which pulls (3)
    # towards 1 however good the runtime is, is left out when it could be timed; the
    # plain (3)/(2) is printed beside it in the report.
    eff = rep.efficiency_excl_loop if rep.efficiency_excl_loop is not None else rep.efficiency
    assert eff >= MIN_EFFICIENCY, f"runtime efficiency {eff:.3f} < {MIN_EFFICIENCY}:\n{rep}"
