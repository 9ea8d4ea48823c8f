"""Searched schedules: a static (step x unit) table found offline for a FLOP budget, then
compiled as it is (static buffers, no run-time decision)::

    found = fxcache.search(model, lambda m, s: generate(m, num_steps=20, num_samples=8, seed=s),
                           speedup=2.5, seeds=(0, 1), units="fora", method="anneal")
    cached = fxcache.compile(model, found)          # the table and its forecast order
    found.save("dit_2.5x.json"); fxcache.SearchResult.load("dit_2.5x.json")

**The problem.** A candidate is a boolean table ``m[t, u]`` (1: unit u is computed at
step t). Row 0 computes everything (it fills every cache), so no candidate reads before
it writes. Its cost is the plan's FLOPs over the generation (:meth:`Plan.estimated_flops`
of each row: the full step minus what the outermost reused units save), known without
running it; a budget (``speedup=``: FLOP-ideal speed-up over the generation, or
``flops=``: a fraction of the uncached generation's FLOPs) admits the tables whose cost
is at most ``full / speedup``. Its quality is the final output of ``run(m, seed)`` on the
calibration seeds against the uncached model's, by ``metric`` (SQNR in dB over every
seed's output, or a callable ``metric(reference, output) -> float``, higher is better).
Every candidate runs through the runtime the model will be compiled with (the rewritten
step graphs, eager), sharing one capture.

**Methods** (``method=``):

- ``"greedy"``: from a profile of each unit's step-to-step change (``l1rel`` of
  :func:`fxcache.profile`, one generation), repeatedly reuse the cell that adds the least
  accumulated drift per FLOP saved (the drift of a reused cell is the change summed since
  its unit was last computed) until the budget is met; also FORA's uniform table at the
  shortest interval the budget allows, without and with TaylorSeer's warm-up (the first
  2-4 steps computed). All are evaluated, the best kept: up to five evaluations. The
  other searches start from the best of them.
- ``"anneal"``: simulated annealing from the better start (BudCache's search): moves swap a
  computed and a reused cell (same unit at another step, or another unit), or compute one
  more cell while the budget allows; a worse table is accepted with probability
  ``exp(Δ / T)``, T set from the first moves (a typical loss accepted with probability 1/2)
  and falling geometrically to 1/50 of that over ``iterations``; a long walk without a new
  best returns to the best table.
- ``"evolve"``: a genetic search (ECAD's, with one objective under a hard budget):
  a population seeded from the start, tournament selection, crossover by unit columns or
  step rows, the annealing moves as mutations, each child repaired to the budget with the
  profile's drift.
- ``"exhaustive"``: every table within the budget (small problems only: at most
  ``2**16`` tables); the optimum the others are tested against.

``forecast=(0, 1, 2)`` runs the method once per forecast order (0: reuse the cached value;
1, 2: TaylorSeer's extrapolation) and keeps the best; ``iterations`` are per order.

Deterministic under ``seed``. ``checkpoint=PATH`` keeps every evaluation in a JSON file
(written atomically every few evaluations); a search started again with the same file and
the same arguments replays from it without running those candidates again, so an
interrupted search resumes and ends with the table the uninterrupted one finds.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree

from ..analyze.units import find_units
from ..capture import capture, flatten_call, signature_of
from ..dropin import DropIn
from ..errors import ArtefactMismatchError, CheckpointError
from ..plan import Plan
from ..runtime import CachedModel
from ..runtime.options import CompileOptions
from ..schedules import Mask, ScheduleError, fora_units, mask_from_dict, select_units
from ..schedules.spans import block_units

__all__ = ["search", "SearchResult", "METHODS", "SEARCH_FORMAT"]

METHODS = ("greedy", "anneal", "evolve", "exhaustive")
SEARCH_FORMAT = "fxcache.search"
_VERSION = 1
_MAX_EXHAUSTIVE = 2**16
_SCORE_CAP = 300.0  # dB: an exact output scores this (SQNR is infinite there)
_T_START, _T_END = 1.0, 0.02  # dB before the first moves set it; end / start


# --------------------------------------------------------------------------- result
@dataclass
class SearchResult:
    """A searched schedule: the table (:class:`Mask`), its forecast order, and how it was
    found. ``fxcache.compile(model, result)`` compiles it (checking the model's class);
    ``save``/``load`` keep it as JSON."""

    mask: Mask
    forecast: int
    score: float  # metric on the calibration seeds (dB for "sqnr")
    ideal_speedup: float  # FLOP-ideal over the generation: full FLOPs / planned FLOPs
    planned_flops: int
    budget_flops: int
    full_flops: int  # of the uncached generation
    method: str
    metric: str
    seeds: tuple
    model_class: str
    evaluations: int  # candidates run (replayed ones from a checkpoint not counted)
    seconds: float
    history: list = field(default_factory=list)  # (evaluation, best score so far)
    by_order: dict = field(default_factory=dict)  # forecast order -> best score with it
    tie: str | None = None  # units decided together (search(tie=))

    @property
    def num_steps(self) -> int:
        return self.mask.num_steps

    def mask_for(self, num_steps: int) -> Mask:
        """The table stretched to a generation of ``num_steps`` steps: step ``i`` follows
        the searched row at the same relative position, ``round(i (T - 1) / (num_steps - 1))``,
        and step 0 computes everything. The result is not searched and not judged. A
        searched table is a plan for exactly its own number of steps: a pipeline that runs
        another length is refused (``PlanLengthError``), a bare model warned; this is the
        explicit way to carry it over (bench/table6_search.py measures how well it does)."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ScheduleError(f"mask_for(num_steps = {num_steps!r}): a whole number >= 1 is needed")
        T = self.mask.num_steps
        full = (True,) * len(self.mask.units)
        rows = [full] + [self.mask.table[round(i * (T - 1) / max(num_steps - 1, 1))] for i in range(1, num_steps)]
        return Mask(tuple(rows), self.mask.units)

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model of another class than the one searched on (the unit names are
        checked when the mask is lowered)."""
        base = model.model if isinstance(model, CachedModel) else model
        if type(base).__name__ != self.model_class:
            raise ArtefactMismatchError(
                f"this schedule was searched on a {self.model_class}, not a {type(base).__name__}; "
                f"search again on this model (fxcache.search)"
            )

    def __str__(self) -> str:
        orders = ", ".join(f"forecast {k}: {v:.2f}" for k, v in sorted(self.by_order.items()))
        return (f"searched schedule ({self.method}) on {self.model_class}: {self.metric} {self.score:.2f} on seeds "
                f"{list(self.seeds)}, FLOP-ideal {self.ideal_speedup:.2f}x over {self.num_steps} steps (budget "
                f"{self.full_flops / max(self.budget_flops, 1):.2f}x), forecast order {self.forecast}; "
                f"{self.evaluations} candidates run in {self.seconds:.0f} s" + (f" ({orders})" if orders else "")
                + "\n" + str(self.mask))

    def to_dict(self) -> dict:
        return {
            "format": SEARCH_FORMAT, "version": _VERSION, "model_class": self.model_class,
            "mask": self.mask.to_dict(), "forecast": self.forecast, "score": _finite(self.score),
            "ideal_speedup": self.ideal_speedup, "planned_flops": self.planned_flops,
            "budget_flops": self.budget_flops, "full_flops": self.full_flops, "method": self.method,
            "metric": self.metric, "seeds": list(self.seeds), "evaluations": self.evaluations,
            "seconds": self.seconds, "history": [list(h) for h in self.history],
            "by_order": {str(k): _finite(v) for k, v in self.by_order.items()}, "tie": self.tie,
        }

    def save(self, path: str | os.PathLike) -> str:
        from ..artefacts.store import write_text_atomic

        path = os.fspath(path)
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchResult":
        """Read a file :meth:`save` wrote; any problem is a :class:`CheckpointError`
        naming the file."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"no searched schedule at '{path}'; write one with result.save(path)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"searched schedule '{path}' cannot be read: {exc}") from None
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"searched schedule '{path}' is damaged or not fxcache's: {exc}") from None

    @classmethod
    def from_dict(cls, d: dict) -> "SearchResult":
        if not isinstance(d, dict) or d.get("format") != SEARCH_FORMAT:
            raise ValueError(f"format is not {SEARCH_FORMAT!r}")
        if d.get("version") != _VERSION:
            raise ValueError(f"version {d.get('version')!r}; this fxcache reads version {_VERSION}")
        mask = mask_from_dict(d["mask"])
        forecast = d["forecast"]
        if forecast not in (0, 1, 2):
            raise ValueError(f"forecast = {forecast!r}; allowed 0, 1, 2")
        if not isinstance(d["model_class"], str):
            raise TypeError("model_class must be a string")
        return cls(
            mask=mask, forecast=int(forecast), score=float(d["score"]), ideal_speedup=float(d["ideal_speedup"]),
            planned_flops=int(d["planned_flops"]), budget_flops=int(d["budget_flops"]),
            full_flops=int(d["full_flops"]), method=str(d["method"]), metric=str(d["metric"]),
            seeds=tuple(d["seeds"]), model_class=d["model_class"], evaluations=int(d["evaluations"]),
            seconds=float(d["seconds"]), history=[tuple(h) for h in d.get("history", [])],
            by_order={int(k): float(v) for k, v in d.get("by_order", {}).items()}, tie=d.get("tie"),
        )


def _finite(x: float) -> float:
    return max(min(float(x), _SCORE_CAP), -_SCORE_CAP) if not math.isnan(x) else -_SCORE_CAP


# --------------------------------------------------------------------------- problem
class _Problem:
    """The tables, their cost and the budget. A searched table has one column per group
    of units (``groups``: unit indices; by default each unit alone) and is expanded to
    the units' table for its cost and its Mask; ``cells`` a search may turn off are the
    (step, group) positions of rows >= 1."""

    def __init__(self, infos, full_flops: int, num_steps: int, budget: int, groups=None):
        self.units = tuple(u.name for u in infos)
        self.groups = [list(g) for g in groups] if groups is not None else [[i] for i in range(len(infos))]
        self._column = np.zeros(len(infos), dtype=int)  # unit -> its group's column
        for g, members in enumerate(self.groups):
            self._column[members] = g
        self.T, self.U = num_steps, len(self.groups)  # U: columns of a searched table
        self._plan = Plan(list(infos), ((True,) * len(infos),), periodic=True, full_flops=full_flops)
        index = {n: i for i, n in enumerate(self.units)}
        # nested units (DeepCache's branches): the enclosing units of each, among the searched ones
        self._around = [[index[a] for a in self._plan.ancestors(n) if a in index] for n in self.units]
        self.full = full_flops * num_steps
        self.budget = budget
        self._row_cost: dict = {}

    def expand(self, table: np.ndarray) -> np.ndarray:
        """The units' table, canonical: a unit counts as computed at a step only where every
        unit around it is. (The runtime computes an inner unit inside a reused outer one
        when a later step reads the inner cache: a table saying so would cost more than
        its rows' estimate. Canonical, the estimate is what the runtime runs, or more.)"""
        units = table[..., self._column]
        if any(self._around):
            units = units.copy()
            for u, around in enumerate(self._around):
                for a in around:
                    units[..., u] &= units[..., a]
        return units

    def row_cost(self, row) -> int:
        key = bytes(np.asarray(row, dtype=np.uint8))
        c = self._row_cost.get(key)
        if c is None:
            units_row = self.expand(np.asarray(row, dtype=bool))
            c = self._row_cost[key] = self._plan.estimated_flops(tuple(bool(v) for v in units_row))
        return c

    def cost(self, table: np.ndarray) -> int:
        return sum(self.row_cost(r) for r in table)

    def fits(self, table: np.ndarray) -> bool:
        return self.cost(table) <= self.budget

    def full_table(self) -> np.ndarray:
        return np.ones((self.T, self.U), dtype=bool)

    def mask(self, table: np.ndarray) -> Mask:
        return Mask(tuple(tuple(bool(v) for v in r) for r in self.expand(table)), self.units)


def _key(order: int, table: np.ndarray) -> str:
    return f"{order}:" + "/".join("".join("1" if v else "0" for v in r) for r in table)


# --------------------------------------------------------------------------- evaluation
class _Counting(DropIn):
    def __init__(self, model):
        super().__init__(model)
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def _floats(out) -> torch.Tensor:
    leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if not leaves:
        raise ValueError(f"run(model, seed) returned {type(out).__name__} with no floating-point tensor; return "
                         f"the generated samples (or latents)")
    return torch.cat([x.detach().reshape(-1).to("cpu", torch.float64) for x in leaves])


def _sqnr(reference: torch.Tensor, output: torch.Tensor) -> float:
    noise = (reference - output).pow(2).sum().item()
    if not math.isfinite(noise):
        return -_SCORE_CAP
    if noise == 0.0:
        return _SCORE_CAP
    return 10.0 * math.log10(max(reference.pow(2).sum().item(), 1e-300) / noise)


class _Evaluator:
    """Runs candidates through the runtime (eager step graphs, one shared capture) and
    scores them against the uncached outputs; remembers every score (and keeps them in
    the checkpoint file)."""

    def __init__(self, model, run, seeds, metric, num_steps: int, memo: dict, checkpoint, ckpt_key, every: int):
        self.model, self.run, self.seeds, self.num_steps = model, run, list(seeds), num_steps
        self.metric = metric
        self.memo, self.checkpoint, self.ckpt_key, self.every = memo, checkpoint, ckpt_key, every
        self.new = 0
        self._captures: dict = {}
        self.graphs: dict = {}  # step graphs built so far (solve_steps(memo=)), on the one capture
        with torch.no_grad():
            self.reference = torch.cat([_floats(run(model, s)) for s in self.seeds])

    def capture(self, model, args, kwargs):
        key = signature_of(*flatten_call(model, args, kwargs))
        if key not in self._captures:
            self._captures[key] = capture(model, args, kwargs)
        return self._captures[key]

    def score(self, problem: _Problem, order: int, table: np.ndarray, bar=None) -> float:
        key = _key(order, problem.expand(table))  # tables that mean the same are run once
        if key in self.memo:
            return self.memo[key]
        # eager and unfused: the same step graphs the compiled model runs, before inductor
        options = CompileOptions(backend=None, num_steps=self.num_steps, forecast=order, verbose=False,
                                 fuse=False, segments=False)
        cached = CachedModel(self.model, problem.mask(table), options)
        cached.engine._shared = self
        try:
            with torch.no_grad():
                out = torch.cat([_floats(self.run(cached, s)) for s in self.seeds])
        finally:
            cached.engine._shared = None  # no cycle keeps this candidate's graphs and buffers alive
            del cached
        value = self.metric(self.reference, out) if out.shape == self.reference.shape else -_SCORE_CAP
        value = _finite(value)
        self.memo[key] = value
        self.new += 1
        if bar is not None:
            bar.update(1)
        if self.checkpoint and self.new % self.every == 0:
            self.save()
        return value

    def save(self) -> None:
        if self.checkpoint:
            from ..artefacts.store import write_text_atomic

            write_text_atomic(self.checkpoint, json.dumps({"key": self.ckpt_key, "scores": self.memo}) + "\n")


# --------------------------------------------------------------------------- the profile's drift
class _Drift:
    """The greedy proxy: per unit, the drift of its reused cells (each one's change summed
    since the unit was last computed), from the profile's ``l1rel``; a group's drift is
    its units' sum."""

    def __init__(self, change: np.ndarray, groups):
        c = np.array(change, dtype=float)
        c[~np.isfinite(c)] = np.nan
        fill = np.nanmax(c) if np.isfinite(c).any() else 1.0
        c = np.where(np.isnan(c), fill, c)
        c[0] = 0.0
        self.change = np.stack([c[:, g].sum(axis=1) for g in groups], axis=1)

    def column(self, col: np.ndarray, u: int) -> float:
        total, acc = 0.0, 0.0
        for t in range(len(col)):
            if col[t]:
                acc = 0.0
            else:
                acc += self.change[t, u]
                total += acc
        return total


def _gain(problem: _Problem, table: np.ndarray, t: int, u: int) -> int:
    """FLOPs saved by turning cell (t, u) off (0 when an enclosing unit already is)."""
    row = table[t].copy()
    before = problem.row_cost(row)
    row[u] = not row[u]
    return abs(before - problem.row_cost(row))


def _reduce(problem: _Problem, drift: _Drift, table: np.ndarray) -> np.ndarray:
    """Turn cells off, least drift per FLOP first, until the table fits the budget."""
    table = table.copy()
    cost = problem.cost(table)
    cols = [drift.column(table[:, u], u) for u in range(problem.U)]
    while cost > problem.budget:
        best, pick = math.inf, None
        for t in range(1, problem.T):
            for u in range(problem.U):
                if not table[t, u]:
                    continue
                g = _gain(problem, table, t, u)
                if g <= 0:
                    continue
                col = table[:, u].copy()
                col[t] = False
                d = (drift.column(col, u) - cols[u]) / g
                if d < best:
                    best, pick = d, (t, u, g)
        if pick is None:
            break
        t, u, g = pick
        table[t, u] = False
        cols[u] = drift.column(table[:, u], u)
        cost -= g
    return table


def _fill(problem: _Problem, drift: _Drift, table: np.ndarray) -> np.ndarray:
    """Compute more cells, most drift removed per FLOP first, while the budget allows."""
    table = table.copy()
    cost = problem.cost(table)
    while True:
        best, pick = 0.0, None
        for t in range(1, problem.T):
            for u in range(problem.U):
                if table[t, u]:
                    continue
                g = _gain(problem, table, t, u)
                if g <= 0 or cost + g > problem.budget:
                    continue
                col = table[:, u].copy()
                col[t] = True
                d = (drift.column(table[:, u], u) - drift.column(col, u)) / g
                if pick is None or d > best:
                    best, pick = d, (t, u, g)
        if pick is None:
            return table
        t, u, g = pick
        table[t, u] = True
        cost += g


def _uniform(problem: _Problem, drift: _Drift, warmup: int = 0) -> np.ndarray | None:
    """FORA's table at the shortest interval within the budget, after ``warmup`` computed
    steps (TaylorSeer's rule, as diffusers' hook: steps ``0..warmup-1``, then every step
    with ``(s - warmup - 1) % n == 0``), its slack then filled."""
    for n in range(2, problem.T + 1):
        table = np.zeros((problem.T, problem.U), dtype=bool)
        if warmup:
            table[:warmup] = True
            table[warmup + 1::n] = True
        else:
            table[::n] = True
        if problem.fits(table):
            return _fill(problem, drift, table)
    return None


def _starts(problem: _Problem, drift: _Drift) -> list:
    """Where the searches start: the profile's greedy table and the uniform ones (without
    and with a warm-up of 2-4 computed steps), each distinct table once."""
    starts = [_fill(problem, drift, _reduce(problem, drift, problem.full_table()))]
    for warmup in (0, 2, 3, 4):
        uniform = _uniform(problem, drift, warmup)
        if uniform is not None and not any((uniform == t).all() for t in starts):
            starts.append(uniform)
    return starts


# --------------------------------------------------------------------------- methods
def _propose(problem: _Problem, table: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A neighbour within the budget: swap a computed and a reused cell (the same unit at
    another step, or any other), swap two steps' rows (a whole step moves: cells of
    several units that only pay off together), or compute one more cell."""
    on = [(t, u) for t in range(1, problem.T) for u in range(problem.U) if table[t, u]]
    off = [(t, u) for t in range(1, problem.T) for u in range(problem.U) if not table[t, u]]
    if not off:
        return None
    slack = problem.budget - problem.cost(table)
    for _ in range(32):
        new = table.copy()
        move = rng.random()
        if move < 0.15 or not on:  # compute one more cell, if it fits
            t, u = off[rng.integers(len(off))]
            new[t, u] = True
            if _gain(problem, table, t, u) <= slack:
                return new
            continue
        if move < 0.35 and problem.T > 2:  # two steps trade rows
            a, b = rng.choice(np.arange(1, problem.T), size=2, replace=False)
            if (table[a] != table[b]).any():
                new[[a, b]] = table[[b, a]]
                return new
            continue
        t, u = on[rng.integers(len(on))]
        same = [c for c in off if c[1] == u]
        pool = same if (move < 0.65 and same) else off
        t2, u2 = pool[rng.integers(len(pool))]
        new[t, u], new[t2, u2] = False, True
        if problem.fits(new):
            return new
    return None


def _anneal(problem, evaluate, start: np.ndarray, rng, iterations: int) -> None:
    """Simulated annealing. The starting temperature is set from the first moves: a
    typical loss (the median of the first few worse scores) is accepted with
    probability 1/2; it then falls geometrically to 1/50 of that."""
    cur, cur_s = start, evaluate(start)
    best, best_s, since = cur, cur_s, 0
    losses: list = []
    t0 = None
    for i in range(iterations):
        cand = _propose(problem, cur, rng)
        if cand is None:
            break
        s = evaluate(cand)
        if t0 is None:
            if s < cur_s:
                losses.append(cur_s - s)
            if len(losses) >= 4 or i >= iterations // 4:
                t0 = max(float(np.median(losses)) / math.log(2), 1e-3) if losses else _T_START
        temp = (t0 or _T_START) * _T_END ** (i / max(iterations - 1, 1))
        if s >= cur_s or rng.random() < math.exp((s - cur_s) / temp):
            cur, cur_s = cand, s
        if cur_s > best_s:
            best, best_s, since = cur, cur_s, 0
        else:
            since += 1
            if since >= max(8, iterations // 8):  # a long walk without a new best: back to the best
                cur, cur_s, since = best, best_s, 0


def _evolve(problem, evaluate, start: np.ndarray, drift: _Drift, rng, iterations: int) -> None:
    """A genetic search under the budget: elitism (2), tournament selection, crossover by
    unit columns or by step rows, one or two moves of :func:`_propose` as mutation, and a
    repair that reuses cells by the profile's drift until the child fits (and, half of the
    time, computes cells while the budget allows)."""
    population = max(4, min(8, iterations // 4))

    def repair(t):
        t = _reduce(problem, drift, t)
        return _fill(problem, drift, t) if rng.random() < 0.5 else t

    pop = [start]
    while len(pop) < population:  # the greedy table and ever further walks from it
        child = pop[-1]
        for _ in range(1 + len(pop) // 2):
            moved = _propose(problem, child, rng)
            child = child if moved is None else moved
        pop.append(repair(child))
    scores = [evaluate(p) for p in pop]
    generations = max(1, (iterations - population) // population)
    for _ in range(generations):
        order = np.argsort(scores)[::-1]
        nxt, nxt_s = [pop[order[0]], pop[order[1]]], [scores[order[0]], scores[order[1]]]

        def pick():
            a, b = rng.integers(len(pop), size=2)
            return pop[a] if scores[a] >= scores[b] else pop[b]

        while len(nxt) < population:
            pa, pb = pick(), pick()
            if rng.random() < 0.5:  # whole units from either parent
                child = np.where((rng.random(problem.U) < 0.5)[None, :], pa, pb)
            else:  # whole steps from either parent
                child = np.where((rng.random(problem.T) < 0.5)[:, None], pa, pb)
            for _ in range(1 + int(rng.integers(2))):
                moved = _propose(problem, child, rng)
                child = moved if moved is not None else child
            child = repair(child)
            child[0] = True
            nxt.append(child)
            nxt_s.append(evaluate(child))
        pop, scores = nxt, nxt_s


def _exhaustive(problem, evaluate) -> None:
    cells = (problem.T - 1) * problem.U
    if 2**cells > _MAX_EXHAUSTIVE:
        raise ScheduleError(f"method='exhaustive' enumerates 2^{cells} tables; allowed: at most 2^16 "
                            f"(fewer steps or units), or method='anneal'/'evolve'")
    for bits in range(2**cells):
        table = problem.full_table()
        flat = [(bits >> i) & 1 for i in range(cells)]
        table[1:] = np.array(flat, dtype=bool).reshape(problem.T - 1, problem.U)
        if problem.fits(table):
            evaluate(table)


# --------------------------------------------------------------------------- entry point
#: the layer kinds ``units="deepcache"`` adds to the skip branches
_OUTER_LAYER_KINDS = ("resnet", "attention")


def _outer_layers(unitset) -> list[str]:
    """The layers of a U-Net's outermost level: resnet/attention units inside no skip
    branch but the shallowest (``skip_branch.0``) or none, i.e. those a DeepCache partial
    step at branch 0 still runs or that only branch 0 skips."""
    branches = [u for u in unitset if u.kind == "skip_branch"]
    if not branches:
        return []
    deeper = [b for b in branches if b.index != 0]
    return [u.name for u in unitset if u.kind in _OUTER_LAYER_KINDS
            and not any(b.contains(u) for b in deeper)]


def _select(unitset, units) -> list:
    """The searched units' infos, each ``parent`` the smallest enclosing *searched* unit
    (nesting through an unsearched unit, e.g. ``down_blocks.0`` between
    ``skip_branch.0`` and ``down_blocks.0.resnets.0``, must not be lost: the search's
    canonical tables and its FLOP count rest on it)."""
    infos = unitset.infos()
    if units == "fora":
        picked = fora_units(infos)
    elif units == "blocks":
        picked = block_units(infos)
    elif units == "deepcache":
        outer = _outer_layers(unitset)
        picked = [u for u in infos if u.kind == "skip_branch" or u.name in outer] if outer else []
    else:
        picked = select_units(infos, units, what="search(units=...)")
    if not picked:
        kinds = sorted({u.kind for u in infos})
        hint = ("; 'deepcache' needs DeepCache's skip branches (a U-Net)" if units == "deepcache"
                else "; for a U-Net try units='deepcache'" if "skip_branch" in kinds else "")
        raise ScheduleError(f"search(units={units!r}) selects no unit of this model; its unit kinds: {kinds}{hint}")
    return unitset.infos([u.name for u in picked])


TIES = (None, "block", "step")


def _groups(picked, tie) -> list:
    """The searched table's columns: unit indices decided together."""
    if tie is None:
        return [[i] for i in range(len(picked))]
    if tie == "step":
        return [list(range(len(picked)))]
    if tie == "block":
        order: dict = {}
        for i, u in enumerate(picked):
            order.setdefault(u.block or u.name, []).append(i)
        return list(order.values())
    raise ValueError(f"tie = {tie!r}; allowed: None, 'block', 'step'")


def _budget(full: int, speedup, flops) -> int:
    if (speedup is None) == (flops is None):
        raise ValueError("search needs exactly one budget: speedup= (FLOP-ideal speed-up over the generation, "
                         "> 1) or flops= (a fraction of the uncached generation's FLOPs, in (0, 1])")
    if speedup is not None:
        if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not speedup >= 1:
            raise ValueError(f"speedup = {speedup!r}; allowed: a number >= 1")
        return int(full / speedup)
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not 0 < flops <= 1:
        raise ValueError(f"flops = {flops!r}; allowed: a fraction of the full FLOPs in (0, 1]")
    return int(full * flops)


def search(
    model: torch.nn.Module,
    run: Callable[[torch.nn.Module, int], Any],
    *,
    speedup: float | None = None,
    flops: float | None = None,
    seeds: Sequence[int] = (0, 1),
    units: str | Sequence[str] = "fora",
    tie: str | None = None,
    forecast: Sequence[int] = (0, 1, 2),
    metric: str | Callable = "sqnr",
    method: str = "anneal",
    iterations: int = 200,
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
) -> SearchResult:
    """Find a static schedule for ``model`` within a FLOP budget (see the module doc).

    run:        ``run(m, seed)`` one whole generation with ``m`` in place of the model,
                returning its samples (or latents); called once per seed for the
                reference and once per seed for every candidate.
    speedup / flops: the budget (exactly one): FLOP-ideal speed-up over the generation,
                or the fraction of the uncached generation's FLOPs.
    seeds:      calibration seeds (keep others for judging the result).
    units:      ``"fora"`` (attention and MLP sublayers), ``"deepcache"`` (a U-Net's skip
                branches and the resnet/attention layers of its outermost level), ``"blocks"`` (whole
                transformer blocks), or unit kinds / names (``fxcache.units(model)``).
    tie:        None (each unit decided alone), ``"block"`` (a transformer block's
                sublayers together) or ``"step"`` (all units together: a step mask,
                BudCache's space; each step is then a full step or one kind of partial
                step, which keeps the step kinds few and their run time close to FLOPs).
    forecast:   forecast orders to try (0, 1, 2); the best is kept.
    metric:     ``"sqnr"`` (dB over all seeds' outputs) or ``metric(reference, output)``
                on the flattened float64 outputs, higher is better.
    method:     ``"greedy"``, ``"anneal"``, ``"evolve"`` or ``"exhaustive"``.
    iterations: candidates proposed per forecast order (anneal, evolve).
    seed:       the search's own random seed (deterministic under it).
    checkpoint: JSON file of every evaluation; resumes a search with the same arguments.
    """
    t0 = time.perf_counter()
    _budget(1, speedup, flops)  # a bad budget is refused before any generation runs
    if tie not in TIES:
        raise ValueError(f"tie = {tie!r}; allowed: None, 'block', 'step'")
    if method not in METHODS:
        raise ValueError(f"method = {method!r}; allowed: {', '.join(METHODS)}")
    if not callable(run):
        raise TypeError(f"run must be callable as run(model, seed); got {type(run).__name__}")
    seeds = tuple(seeds)
    if not seeds:
        raise ValueError("seeds is empty; give at least one calibration seed")
    orders = tuple(forecast) if not isinstance(forecast, int) else (forecast,)
    if not orders or any(o not in (0, 1, 2) or isinstance(o, bool) for o in orders):
        raise ValueError(f"forecast = {forecast!r}; allowed: orders among 0, 1, 2")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations = {iterations!r}; allowed: a whole number >= 1")
    if isinstance(metric, str):
        if metric != "sqnr":
            raise ValueError(f"metric = {metric!r}; allowed: 'sqnr' or a callable metric(reference, output)")
        metric_fn, metric_name = _sqnr, "sqnr"
    elif callable(metric):
        metric_fn, metric_name = metric, getattr(metric, "__name__", "metric")
    else:
        raise TypeError(f"metric must be 'sqnr' or callable; got {type(metric).__name__}")

    # one generation counts the steps and records the first call's inputs
    first: dict = {}
    counter = _Counting(model)

    def note(mod, args, kwargs):
        first.setdefault("call", (args, kwargs))

    handle = counter.register_forward_pre_hook(note, with_kwargs=True)  # on our own wrapper only
    try:
        with torch.no_grad():
            run(counter, seeds[0])
    finally:
        handle.remove()
    if "call" not in first:
        raise ValueError("run(model, seed) never called the model; it must call model(...) once per step")
    num_steps = counter.calls
    args, kwargs = first["call"]
    captured = capture(model, args, kwargs)
    unitset = find_units(captured.gm)
    picked = _select(unitset, units)
    full_step = unitset.full_flops
    problem = _Problem(picked, full_step, num_steps, 0, _groups(picked, tie))
    problem.budget = _budget(problem.full, speedup, flops)
    lowest = problem.cost(np.vstack([np.ones((1, problem.U), bool), np.zeros((num_steps - 1, problem.U), bool)]))
    if lowest > problem.budget:
        raise ScheduleError(
            f"the budget ({problem.full / max(problem.budget, 1):.2f}x) is beyond what reusing these "
            f"{problem.U} unit(s) can reach over {num_steps} steps (at most {problem.full / lowest:.2f}x with "
            f"only step 0 computed); lower it or search over more units")

    ckpt_key = {"model_class": type(model).__name__, "units": list(problem.units), "tie": tie, "num_steps": num_steps,
                "budget": problem.budget, "seeds": list(seeds), "metric": metric_name}
    memo: dict = {}
    path = os.fspath(checkpoint) if checkpoint is not None else None
    if path and os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"search checkpoint '{path}' cannot be read: {exc}") from None
        if not isinstance(saved, dict) or saved.get("key") != ckpt_key or not isinstance(saved.get("scores"), dict):
            raise CheckpointError(f"search checkpoint '{path}' belongs to another search (model, units, steps, "
                                  f"budget, seeds or metric differ); remove it or give another path")
        memo = {str(k): float(v) for k, v in saved["scores"].items()}
    evaluator = _Evaluator(model, run, seeds, metric_fn, num_steps, memo, path, ckpt_key, checkpoint_every)
    evaluator._captures[signature_of(*flatten_call(model, args, kwargs))] = captured  # captured once

    drift = None
    if method in ("greedy", "anneal", "evolve"):
        from .profiler import profile

        prof = profile(model, run, units=list(problem.units), seeds=seeds[:1], example=(args, kwargs),
                       progress=False)
        index = [prof.units.index(n) for n in problem.units]
        drift = _Drift(np.asarray(prof.l1rel)[:, index], problem.groups)

    from tqdm.auto import tqdm

    per_order = {"greedy": 5, "exhaustive": None}.get(method, iterations + 5)
    total = per_order * len(orders) if per_order else None
    history, best = [], (-math.inf, None, None)
    by_order: dict = {}
    with tqdm(total=total, desc=f"search ({method})", unit="candidate", disable=not progress) as bar:
        for order in orders:
            rng = np.random.default_rng([seed, order])
            best_here = [-math.inf]

            def evaluate(table, order=order):
                nonlocal best
                s = evaluator.score(problem, order, table, bar)
                if s > best_here[0]:
                    best_here[0] = s
                if s > best[0]:
                    best = (s, order, table.copy())
                    history.append((evaluator.new, s))
                return s

            if method == "exhaustive":
                _exhaustive(problem, evaluate)
            else:
                starts = _starts(problem, drift)
                scores = [evaluate(t) for t in starts]
                start = starts[int(np.argmax(scores))]
                if method == "greedy":
                    pass
                elif method == "anneal":
                    _anneal(problem, evaluate, start, rng, iterations)
                else:
                    _evolve(problem, evaluate, start, drift, rng, iterations)
            by_order[order] = best_here[0]
    evaluator.save()
    evaluator.graphs.clear()  # the step graphs and the capture of every candidate: freed now, not at a GC
    evaluator._captures.clear()
    score, order, table = best
    planned = problem.cost(table)
    return SearchResult(
        mask=problem.mask(table), forecast=order, score=score, ideal_speedup=problem.full / planned,
        planned_flops=planned, budget_flops=problem.budget, full_flops=problem.full, method=method,
        metric=metric_name, seeds=seeds, model_class=type(model).__name__, evaluations=evaluator.new,
        seconds=time.perf_counter() - t0, history=history, by_order=by_order, tie=tie,
    )
