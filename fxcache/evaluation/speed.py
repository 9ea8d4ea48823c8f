"""Speed, measured honestly (DESIGN.md section 5).

:func:`measure_speedup` reports, from one process, the three speed figures of a cached
denoiser and their ratio:

1. **ideal**: the FLOP-ideal speed-up of the plan over the steps the generation really
   ran, ``steps × full FLOPs ÷ Σ FLOPs of each step's graph``;
2. **predicted**: the speed-up predicted from timing each step kind's graph in
   isolation, ``steps × t_full ÷ Σ_step t_kind(step)``, where ``t_full`` is one call of
   the *uncached* model (the plain module, or ``torch.compile`` of it with the same
   backend and inductor options) and ``t_kind`` one call of the (compiled) program the
   runtime runs for that kind, both on copies of the inputs of a real step of the
   generation (cache buffers included), timed round-robin and reduced to a median over
   repeats;
3. **measured**: whole generations, uncached vs cached, run pairwise (A B, B A, A B ...:
   the order alternates so that slow drifts of the machine cancel), the median of the
   per-pair ratios ``t_uncached ÷ t_cached`` with its range. Each repeat is one round
   of (2) followed by one pair of (3), so both figures see the same load;
4. **efficiency** = measured ÷ predicted: what the runtime costs on top of the graphs
   themselves (input flattening, picking the graph, step bookkeeping) and whatever the
   ``run`` loop does besides calling the model (a scheduler step), which both arms pay
   and which pulls (3) towards 1. DESIGN.md asks for ≥ 0.97. To tell the two apart,
   the loop alone is timed too (``run`` with a stand-in that returns the recorded
   outputs at once) and ``efficiency_excl_loop`` = measured ÷ the prediction with the
   loop's time added to both arms: the runtime's own cost.

Only ratios of times taken in this process are reported as results; absolute times are
printed for orientation and must never be compared across processes or machines.
``torch.set_num_threads`` is set once (``threads``) for everything measured and put
back afterwards; all times come from :func:`time.perf_counter`.
"""

from __future__ import annotations

#: DESIGN.md's target for measured / predicted (the runtime's own cost)
EFFICIENCY_TARGET = 0.97

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from ..dropin import DropIn
from ..plan import _fmt_flops

__all__ = ["SpeedReport", "measure_speedup", "interleaved_times"]


@dataclass
class SpeedReport:
    """The speed figures of one cached model on one generation (see module docstring).

    Speed-ups are ratios (> 1: the cached model is faster). Times are seconds, medians
    over repeats, valid only within the process that measured them.
    """

    model: str
    schedule: str
    backend: str | None
    mode: str | None
    threads: int
    steps: int  # model calls in one generation
    repeats: int
    # (1) FLOPs
    ideal_speedup: float
    full_flops: int
    planned_flops: int  # Σ over the generation's steps of the FLOPs of their graphs
    # (2) step kinds timed in isolation
    full_step_s: float  # one uncached model call
    graph_step_s: float | None  # one call of the captured uncached graph, eager (backend None only)
    kind_step_s: list[float]  # one call of each step kind's graph
    kind_steps: list[int]  # how many steps of the generation ran each kind
    kind_flops: list[int]
    predicted_speedup: float
    predicted_min: float  # range of the prediction made from each repeat's round alone
    predicted_max: float
    # (3) whole generations, interleaved pairwise
    uncached_s: float
    cached_s: float
    measured_speedup: float  # median of per-pair ratios
    measured_min: float
    measured_max: float
    pair_ratios: list[float] = field(default_factory=list)
    # (4)
    efficiency: float = math.nan  # measured / predicted
    # the generation loop's own work (run() with a stand-in model returning recorded
    # outputs at once), which both arms pay and which dilutes (3) though it is no cost
    # of the runtime; and (2) and the efficiency with it taken into account
    loop_s: float | None = None
    predicted_with_loop: float | None = None  # (steps x full + loop) / (sum of kinds + loop)
    efficiency_excl_loop: float | None = None  # measured / predicted_with_loop: the runtime's own cost
    # one-off costs (first generation minus a steady one)
    setup_s: float | None = None  # cached: capture + analyze + rewrite (+ compile with a backend)
    baseline_compile_s: float | None = None  # uncached: torch.compile of the plain model; None in eager
    compiled_graphs: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields."""
        return asdict(self)

    def __str__(self) -> str:
        backend = self.backend or "none (eager)"
        if self.mode:
            backend += f", mode={self.mode}"
        lines = [
            f"speed of {self.model} with {self.schedule}",
            f"  backend {backend}; {self.threads} thread(s); {self.steps} steps per generation; "
            f"{self.repeats} repeats (medians)",
            "",
            f"  {'figure':<44} {'speed-up':>9}   detail",
            f"  {'(1) FLOP-ideal, over the generation':<44} {self.ideal_speedup:>8.2f}x   "
            f"{self.steps} x {_fmt_flops(self.full_flops)}FLOPs / {_fmt_flops(self.planned_flops)}FLOPs",
            f"  {'(2) predicted from step kinds in isolation':<44} {self.predicted_speedup:>8.2f}x   "
            f"range {self.predicted_min:.2f}-{self.predicted_max:.2f}; {self.steps} x {_ms(self.full_step_s)} / "
            + " + ".join(f"{n} x {_ms(t)}" for n, t in zip(self.kind_steps, self.kind_step_s) if n),
            f"  {'(3) measured, whole generation':<44} {self.measured_speedup:>8.2f}x   "
            f"range {self.measured_min:.2f}-{self.measured_max:.2f} over {len(self.pair_ratios)} pairs; "
            f"uncached {_ms(self.uncached_s)}, cached {_ms(self.cached_s)}",
            f"  {'runtime efficiency (3)/(2)':<44} {self.efficiency:>9.3f}   target >= {EFFICIENCY_TARGET}: "
            f"{'met' if self.efficiency >= EFFICIENCY_TARGET else 'not met'}",
        ]
        if self.efficiency_excl_loop is not None:
            lines.append(
                f"  {'  the runtime alone (loop work left out)':<44} {self.efficiency_excl_loop:>9.3f}   "
                f"the loop around the model takes {_ms(self.loop_s)} per generation in both arms; "
                f"with it, (2) is {self.predicted_with_loop:.2f}x"
            )
        lines += [
            "",
            "  step kinds:",
        ]
        for k, (t, n, f) in enumerate(zip(self.kind_step_s, self.kind_steps, self.kind_flops)):
            flop_ratio = self.full_flops / f if f else math.inf
            time_ratio = self.full_step_s / t if t else math.inf
            lines.append(
                f"    kind {k}: {n:>3} steps, {_ms(t):>9} per call; vs a full step: "
                f"{flop_ratio:5.2f}x fewer FLOPs, {time_ratio:5.2f}x the speed"
            )
        if self.graph_step_s:
            lines.append(
                f"  captured graph without caching (eager): {_ms(self.graph_step_s)} per call, "
                f"{self.full_step_s / self.graph_step_s:.2f}x the module's speed (the share of (2) and (3) "
                f"that is not caching)"
            )
        if self.setup_s is not None:
            what = "capture + rewrite" + (" + compile" if self.backend else "")
            lines.append(f"  first-call cost of the cached model ({what}): {self.setup_s:.2f} s")
        if self.baseline_compile_s is not None:
            lines.append(f"  torch.compile of the uncached model: {self.baseline_compile_s:.2f} s")
        if self.compiled_graphs is not None and self.backend:
            lines.append(f"  compiled graphs: {self.compiled_graphs}")
        lines.append("  (times are for orientation in this process only; compare ratios, not times)")
        return "\n".join(lines)


def _ms(t: float) -> str:
    return f"{t * 1e3:.2f} ms" if t < 1.0 else f"{t:.3f} s"


def _clone(x):
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


def _calibrate(fns: Sequence[Callable[[], Any]], min_time: float) -> list[int]:
    """Calls per timing sample for each function, from one untimed call, so that a
    sample lasts about ``min_time`` seconds."""
    numbers = []
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        numbers.append(max(1, min(1000, int(min_time / max(dt, 1e-7)))))
    return numbers


def _round(fns: Sequence[Callable[[], Any]], numbers: Sequence[int], r: int) -> list[float]:
    """One round of the round-robin: each function timed once (``numbers[i]`` calls in a
    row, time per call), starting at function ``r mod n`` so the order rotates."""
    n = len(fns)
    out = [0.0] * n
    for j in range(n):
        i = (r + j) % n
        fn, number = fns[i], numbers[i]
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        out[i] = (time.perf_counter() - t0) / number
    return out


def interleaved_times(fns: Sequence[Callable[[], Any]], repeats: int, *, min_time: float = 0.02) -> list[list[float]]:
    """Per-call times ``times[i][r]`` of each of ``fns``, interleaved round-robin: every
    repeat times each function once, the order rotating from repeat to repeat, so
    drifts of the machine hit all of them alike."""
    numbers = _calibrate(fns, min_time)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        for i, t in enumerate(_round(fns, numbers, r)):
            times[i].append(t)
    return times


@contextlib.contextmanager
def _threads(n: int | None):
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def _baseline(plain: torch.nn.Module, options) -> Callable:
    """The uncached arm: the plain model, or ``torch.compile`` of it with the backend,
    mode and (for inductor) the same inductor options, freezing included, that the
    cached model's graphs get, so the two arms differ only by caching."""
    if options.backend is None:
        return plain
    kwargs: dict[str, Any] = {"backend": options.backend}
    inductor_options = None
    if options.backend == "inductor":
        from ..rewrite.compile import _inductor_options

        inductor_options = _inductor_options(options)
    if inductor_options is not None:
        kwargs["options"] = inductor_options
    elif options.mode is not None:
        kwargs["mode"] = options.mode
    elif options.options:
        kwargs["options"] = dict(options.options)
    return torch.compile(plain, **kwargs)


class _Replay(DropIn):
    """Stand-in for the model in ``run``: a drop-in (attributes such as ``config``,
    ``device``, ``dtype`` and the parameters are the model's, and a call goes through
    ``nn.Module.__call__`` as the other arms' calls do) whose forward returns the
    recorded output of each step at once."""

    def __init__(self, model: torch.nn.Module, outputs: list):
        super().__init__(model)
        self._outputs = outputs
        self._i = 0

    def forward(self, *args, **kwargs):
        out = self._outputs[self._i % len(self._outputs)]
        self._i += 1
        return out


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_speedup(
    model: torch.nn.Module,
    schedule,
    run: Callable[[torch.nn.Module], Any],
    *,
    backend: str | None = None,
    mode: str | None = None,
    repeats: int = 7,
    warmup: int = 1,
    num_steps: int | None = None,
    threads: int | None = None,
    min_time: float = 0.1,
    progress: bool = False,
) -> SpeedReport:
    """Measure the three speed figures of ``fxcache.compile(model, schedule, ...)``.

    model: the plain denoiser, or an already built :class:`fxcache.CachedModel` (then
        ``schedule`` must be None, its own options are used and its compile is not
        repeated; ``setup_s`` is then only measured if it has not run yet).
    run: ``run(m)`` performs one whole generation calling ``m`` once per step (e.g.
        ``lambda m: fxcache.models.generate(m, 20, 16, seed=0)``); it is called with the
        uncached and with the cached model, always with one input shape.
    backend, mode: as :func:`fxcache.compile`. The uncached baseline gets the same
        treatment: the plain model for ``backend=None``, else
        ``torch.compile(model, backend=backend, mode=mode)``. Compile time is excluded
        from the figures by warm-up and reported separately.
    repeats: samples per figure (interleaved pairs for the measured speed-up; rounds of
        the round-robin for the isolated step-kind timings).
    warmup: untimed generations of each arm after the first (compiling) one.
    threads: ``torch.set_num_threads`` for the whole measurement (restored afterwards);
        None keeps the current setting. Either way the value is reported.
    min_time: each isolated-timing sample repeats a call until it lasts about this long,
        so that the samples of short and long graphs (each shorter than a whole
        generation) meet interference from other processes alike.
    progress: show a tqdm progress bar.
    """
    from ..runtime import CachedModel

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if isinstance(model, CachedModel):
        if schedule is not None and schedule != model.schedule:
            raise ValueError(
                f"model is already a CachedModel for {model.schedule!r}; pass schedule=None "
                f"(got {schedule!r}) or pass the plain model"
            )
        cm = model
        plain = model.model
        backend, mode = cm.options.backend, cm.options.mode
    else:
        from ..api import compile as fx_compile

        plain = model
        cm = fx_compile(model, schedule, backend=backend, mode=mode, num_steps=num_steps)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * (1 + warmup) + 1 + 2 * repeats + repeats, desc="measure_speedup", unit="run", leave=False)

    def tick(n: int = 1):
        if bar is not None:
            bar.update(n)

    def cached_generation():
        with cm.generation():
            run(cm)

    try:
        with _threads(threads) as nthreads, torch.no_grad():
            baseline = _baseline(plain, cm.options)

            # ---- first calls (capture, rewrite, compile) and warm-up
            fresh = not cm.entries
            t_first_cached = _timed(cached_generation)
            tick()
            t_first_base = _timed(lambda: run(baseline))
            tick()
            for _ in range(warmup):
                run(baseline)
                cached_generation()
                tick(2)
            if not cm.entries:
                raise ValueError("run(model) never called the model; it must run one whole generation")
            entries_before = len(cm.entries)
            entry = cm.entries[-1]

            # ---- one recorded generation: which kind ran at each step, with what inputs.
            # The runtime calls entry.programs[kind](flat_inputs, buffers); wrap each to
            # keep a copy of its arguments, so kinds can be replayed alone on real inputs.
            slots = entry.programs
            originals = list(slots)
            records: list[tuple[int, tuple]] = []
            outputs: list = []  # what the model returned at each step, for the loop-only run

            def recorder(k, fn):
                def call(*args):
                    records.append((k, pytree.tree_map(_clone, args)))
                    out = fn(*args)
                    outputs.append(pytree.tree_unflatten(pytree.tree_map(_clone, list(out)), entry.captured.out_spec))
                    return out

                return call

            slots[:] = [recorder(k, fn) for k, fn in enumerate(originals)]
            try:
                cached_generation()
            finally:
                slots[:] = originals
            tick()
            if len(cm.entries) != entries_before or cm.entries[-1] is not entry:
                raise ValueError(
                    "run(model) used more than one input shape (the cached model built a new graph "
                    "while being measured); measure_speedup needs one generation of one shape"
                )
            if not records:
                raise ValueError("run(model) never called the model; it must run one whole generation")
            steps = len(records)
            kinds_used = sorted({k for k, _ in records})
            kind_inputs = {k: args for k, args in reversed(records)}  # first step of each kind
            num_flat = entry.captured.num_inputs
            first = records[0][1]
            full_flat = first[0]
            b_args, b_kwargs = pytree.tree_unflatten(list(full_flat)[:num_flat], entry.captured.in_spec)

            # ---- (2) and (3), interleaved: each repeat is one round of isolated timings
            # (the uncached model, the captured uncached graph in eager mode, each
            # kind's graph; order rotating) followed by one pair of whole generations
            # (order alternating), so both figures see the same state of the machine.
            fns = [lambda: baseline(*b_args, **b_kwargs)]
            graph_arm = backend is None
            if graph_arm:
                fns.append(lambda: entry.captured.gm(*full_flat[:num_flat]))
            for k in kinds_used:
                fns.append(lambda k=k: originals[k](*kind_inputs[k]))
            numbers = _calibrate(fns, min_time)
            # The loop's own work (scheduler steps, ...), paid by both arms: run() with
            # a stand-in that returns the recorded outputs at once. Skipped when run()
            # needs a real module.
            replay = _Replay(plain, outputs)
            try:
                run(replay)
            except Exception:
                replay = None
            iso: list[list[float]] = [[] for _ in fns]
            ratios, t_unc, t_cac, t_loop = [], [], [], []
            for r in range(repeats):
                for i, t in enumerate(_round(fns, numbers, r)):
                    iso[i].append(t)
                if replay is not None:
                    t_loop.append(_timed(lambda: run(replay)))
                tick()
                if r % 2 == 0:
                    a = _timed(lambda: run(baseline))
                    b = _timed(cached_generation)
                else:
                    b = _timed(cached_generation)
                    a = _timed(lambda: run(baseline))
                tick(2)
                t_unc.append(a)
                t_cac.append(b)
                ratios.append(a / b)
            full_step_s = statistics.median(iso[0])
            graph_step_s = statistics.median(iso[1]) if graph_arm else None
            kind_time = {k: statistics.median(ts) for k, ts in zip(kinds_used, iso[1 + graph_arm :])}
    finally:
        if bar is not None:
            bar.close()

    plan = entry.plan
    n_kinds = len(originals)
    kind_steps = [sum(1 for k, _ in records if k == j) for j in range(n_kinds)]
    kind_flops = [plan.step_kinds[j].flops for j in range(n_kinds)]
    kind_step_s = [kind_time.get(j, math.nan) for j in range(n_kinds)]
    planned_flops = sum(kind_flops[k] for k, _ in records)
    ideal = plan.full_flops * steps / planned_flops if planned_flops else math.inf
    predicted = steps * full_step_s / sum(kind_time[k] for k, _ in records)
    offset = 1 + (graph_step_s is not None)
    per_round = [
        steps * iso[0][r] / sum(iso[offset + kinds_used.index(k)][r] for k, _ in records) for r in range(repeats)
    ]
    measured = statistics.median(ratios)
    loop_s = statistics.median(t_loop) if t_loop else None
    if loop_s is not None:
        with_loop = (steps * full_step_s + loop_s) / (sum(kind_time[k] for k, _ in records) + loop_s)
    else:
        with_loop = None
    t_cached = statistics.median(t_cac)
    t_uncached = statistics.median(t_unc)
    return SpeedReport(
        model=type(plain).__name__,
        schedule=repr(cm.schedule),
        backend=backend,
        mode=mode,
        threads=nthreads,
        steps=steps,
        repeats=repeats,
        ideal_speedup=ideal,
        full_flops=plan.full_flops,
        planned_flops=planned_flops,
        full_step_s=full_step_s,
        graph_step_s=graph_step_s,
        kind_step_s=kind_step_s,
        kind_steps=kind_steps,
        kind_flops=kind_flops,
        predicted_speedup=predicted,
        predicted_min=min(per_round),
        predicted_max=max(per_round),
        uncached_s=t_uncached,
        cached_s=t_cached,
        measured_speedup=measured,
        measured_min=min(ratios),
        measured_max=max(ratios),
        pair_ratios=ratios,
        efficiency=measured / predicted,
        loop_s=loop_s,
        predicted_with_loop=with_loop,
        efficiency_excl_loop=(measured / with_loop) if with_loop else None,
        # first generation minus a steady one; 0 when it was already built/compiled
        setup_s=max(0.0, t_first_cached - t_cached) if fresh else None,
        baseline_compile_s=max(0.0, t_first_base - t_uncached) if backend is not None else None,
        compiled_graphs=plan.compiled_graphs,
    )
