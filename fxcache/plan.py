"""The plan: which unit runs at which denoising step.

Pure Python, no torch. A :class:`Plan` is the boolean table ``compute[step][unit]``
(True: run the unit and refresh its cache; False: read the value it produced the last
time it ran) over a list of :class:`UnitInfo`, plus the FLOP figures that make the
table meaningful. Every schedule (DeepCache, FORA, BlockCache, learned masks) lowers
to a :class:`fxcache.schedules.Mask`, and a mask plus the units of a model gives a
:class:`Plan`.

The rewrite stage later *binds* the plan to the graphs it built: which step runs which
compiled graph ("executed step kinds"), each with the FLOPs it really executes after
dead-code removal and liveness. Before binding, FLOP figures are estimates from the
unit costs; after binding they are counted on the rewritten graphs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Sequence

from .errors import FxcacheError

__all__ = ["UnitInfo", "Plan", "PlanError", "StepKind"]


class PlanError(FxcacheError, ValueError):
    """A plan that cannot be executed: its message names the step and the unit."""


@dataclass(frozen=True)
class UnitInfo:
    """A cacheable part of a denoiser, as the schedules see it.

    name:   the module path (``up_blocks.1``, ``transformer_blocks.3.attn1``), or
            ``skip_branch.{m}`` for DeepCache's branch m (0 = shallowest skip).
    kind:   ``skip_branch``, ``down_block``, ``mid_block``, ``up_block``, ``resnet``,
            ``attention``, ``transformer_block``, ``mlp``, ``single_block``...
    flops:  FLOPs no longer executed when this unit alone is reused.
    parent: name of the smallest enclosing unit, or None.
    index:  skip-branch number, or the transformer block number for blocks and their
            sublayers; None otherwise.
    block:  for attention/mlp sublayers of a transformer block, the block's name.
    cache_bytes: bytes of the values that leave the unit (its cache slot).
    """

    name: str
    kind: str
    flops: int = 0
    parent: str | None = None
    index: int | None = None
    block: str | None = None
    cache_bytes: int = 0


#: unit kinds that are whole transformer blocks (what residual spans are made of)
BLOCK_KINDS = ("transformer_block", "single_block")
SPAN_PREFIX = "span:"


def span_name(first: str, last: str) -> str:
    """The name of the residual span from block ``first`` to block ``last`` (inclusive);
    see :mod:`fxcache.schedules.spans`."""
    return f"{SPAN_PREFIX}{first}..{last}"


def parse_span(name: str) -> tuple[str, str] | None:
    """``(first, last)`` of a span name, or None when ``name`` is not one."""
    if not isinstance(name, str) or not name.startswith(SPAN_PREFIX):
        return None
    first, sep, last = name[len(SPAN_PREFIX):].partition("..")
    if not sep or not first or not last:
        return None
    return first, last


@dataclass
class StepKind:
    """One distinct graph the runtime executes."""

    index: int
    steps: list[int]
    computed: tuple[str, ...]
    reused: tuple[str, ...]
    flops: int
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    nodes: int | None = None


def _fmt_flops(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} "


def _fmt_bytes(x: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{int(x)} B"


class Plan:
    """``compute[step][unit]`` over named units, validated on construction.

    ``periodic=True`` means the table is one period that repeats for ever (FORA,
    uniform DeepCache); otherwise it covers exactly ``len(table)`` steps (the runtime
    computes everything past the last one).

    A plan is immutable: :meth:`bind` (the rewrite's executed graphs) and
    :meth:`with_compile` (what was compiled) return new plans.

    ``adaptive`` (an :class:`~fxcache.schedules.adaptive.AdaptivePolicy`) marks the plan
    of an adaptive schedule: its table is two rows, the full kind and the reuse kind, and
    which runs at a step is decided at run time (the FLOP figures are those of one full
    and one reused step; ``CachedModel.decisions()`` tells what ran).
    """

    def __init__(
        self,
        units: Sequence[UnitInfo],
        table: Sequence[Sequence[bool]],
        *,
        periodic: bool = False,
        full_flops: int = 0,
        schedule: object = None,
        notes: Sequence[str] = (),
        adaptive: object = None,
    ):
        object.__setattr__(self, "_frozen", False)
        self.unit_infos: tuple[UnitInfo, ...] = tuple(units)
        self.units: tuple[str, ...] = tuple(u.name for u in self.unit_infos)
        self.table: tuple[tuple[bool, ...], ...] = tuple(tuple(bool(v) for v in row) for row in table)
        self.periodic = bool(periodic)
        self.full_flops = int(full_flops)
        self.schedule = schedule
        self._by_name = {u.name: u for u in self.unit_infos}
        self._kind_of_step: list[int] | None = None
        self._kinds: list[StepKind] | None = None
        self.compiled_graphs: int | None = None
        self.compile_note: str = ""
        self.forecast: int = 0  # the order of the forecast at cache reads (with_forecast)
        self.state_bytes: int = 0  # an adaptive schedule's state buffers (with_state_bytes)
        self.notes: tuple[str, ...] = tuple(notes)  # extra lines for explain(), e.g. DeepCache's branch costs
        # an adaptive schedule's AdaptivePolicy (fxcache.schedules.adaptive): the table is then
        # [full row, reuse row], and the runtime picks one of the two per step from a decision
        # computed on the device one step earlier; None for a static plan
        self.adaptive = adaptive
        self._validate()
        self._frozen = True

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(f"a Plan is immutable (tried to set {name!r}); use bind() or with_compile()")
        object.__setattr__(self, name, value)

    def _replace(self, **attrs) -> "Plan":
        new = copy.copy(self)
        for name, value in attrs.items():
            object.__setattr__(new, name, value)
        return new

    # ------------------------------------------------------------------ basics
    @property
    def num_steps(self) -> int:
        """Steps in the table (one period for a periodic plan)."""
        return len(self.table)

    def row(self, step: int) -> tuple[bool, ...]:
        if self.periodic:
            return self.table[step % len(self.table)]
        if not 0 <= step < len(self.table):
            raise PlanError(f"step {step} is outside this plan of {len(self.table)} steps")
        return self.table[step]

    def computed_at(self, step: int) -> tuple[str, ...]:
        return tuple(n for n, c in zip(self.units, self.row(step)) if c)

    def reused_at(self, step: int) -> tuple[str, ...]:
        return tuple(n for n, c in zip(self.units, self.row(step)) if not c)

    def ancestors(self, name: str) -> list[str]:
        out = []
        parent = self._by_name[name].parent
        while parent is not None and parent in self._by_name:
            out.append(parent)
            parent = self._by_name[parent].parent
        return out

    # -------------------------------------------------------------- validation
    def _validate(self) -> None:
        if not self.units:
            raise PlanError("a plan needs at least one unit")
        if len(set(self.units)) != len(self.units):
            dup = sorted({n for n in self.units if self.units.count(n) > 1})
            raise PlanError(f"unit names must be unique; repeated: {dup}")
        if not self.table:
            raise PlanError("a plan needs at least one step")
        for s, row in enumerate(self.table):
            if len(row) != len(self.units):
                raise PlanError(
                    f"step {s} has {len(row)} entries but the plan has {len(self.units)} units {list(self.units)}"
                )
        # Read-before-write: a unit reused at step s must have been computed at an
        # earlier step, unless an enclosing unit is reused at s too (then nobody can
        # observe the inner unit's value at s).
        written = [False] * len(self.units)
        index = {n: i for i, n in enumerate(self.units)}
        for s, row in enumerate(self.table):
            for i, name in enumerate(self.units):
                if row[i] or written[i]:
                    continue
                if any(not row[index[a]] for a in self.ancestors(name) if a in index):
                    continue
                raise PlanError(
                    f"step {s} reuses unit '{name}' but no earlier step computed it, so its cache slot "
                    f"would be read before it was ever written; compute '{name}' at step {s} or earlier "
                    f"(every plan must compute everything it reuses at its first step)"
                )
            for i in range(len(self.units)):
                written[i] = written[i] or row[i]

    # ------------------------------------------------------------------- flops
    def estimated_flops(self, row: Sequence[bool]) -> int:
        """Full FLOPs minus the savings of the outermost reused units. An estimate from one
        row: an inner unit marked computed inside a reused outer one runs anyway when a
        later step reads its cache, which a row cannot see (the bound plan counts it;
        :mod:`fxcache.calibrate.search` keeps its tables canonical so the two agree)."""
        index = {n: i for i, n in enumerate(self.units)}
        saved = 0
        for i, name in enumerate(self.units):
            if row[i]:
                continue
            if any(not row[index[a]] for a in self.ancestors(name) if a in index):
                continue  # an enclosing reused unit already accounts for it
            saved += self._by_name[name].flops
        return max(self.full_flops - saved, 0)

    def bind(self, kind_of_step: Sequence[int], kinds: Sequence[StepKind]) -> "Plan":
        """This plan bound to the rewrite's executed graph of each step (with counted FLOPs)."""
        return self._replace(_kind_of_step=list(kind_of_step), _kinds=list(kinds))

    def with_compile(self, compiled_graphs: int, note: str = "") -> "Plan":
        """This plan with the number of compiled graphs and how they were compiled."""
        return self._replace(compiled_graphs=int(compiled_graphs), compile_note=str(note))

    def with_forecast(self, order: int) -> "Plan":
        """This plan with forecasting cache reads of ``order`` (each slot keeps ``order + 1``
        values)."""
        return self._replace(forecast=int(order))

    def with_state_bytes(self, nbytes: int) -> "Plan":
        """This plan with the bytes of an adaptive schedule's state buffers (the probe's
        reference value, the decision, the running sum), counted in :attr:`cache_bytes`."""
        return self._replace(state_bytes=int(nbytes))

    @property
    def bound(self) -> bool:
        return self._kinds is not None

    @property
    def step_kinds(self) -> list[StepKind]:
        """Distinct executed graphs once bound; distinct table rows before."""
        if self._kinds is not None:
            return self._kinds
        kinds: dict[tuple[bool, ...], StepKind] = {}
        for s, row in enumerate(self.table):
            if row not in kinds:
                kinds[row] = StepKind(
                    index=len(kinds),
                    steps=[],
                    computed=tuple(n for n, c in zip(self.units, row) if c),
                    reused=tuple(n for n, c in zip(self.units, row) if not c),
                    flops=self.estimated_flops(row),
                )
            kinds[row].steps.append(s)
        return list(kinds.values())

    def kind_of_step(self, step: int) -> int:
        if self._kind_of_step is None:
            rows = {k.computed: k.index for k in self.step_kinds}
            return rows[self.computed_at(step)]
        n = len(self._kind_of_step)
        return self._kind_of_step[step % n if self.periodic else step]

    def step_flops(self, step: int) -> int:
        return self.step_kinds[self.kind_of_step(step)].flops

    @property
    def planned_flops(self) -> int:
        """FLOPs of all steps of the table (one period for a periodic plan)."""
        return sum(self.step_flops(s) for s in range(self.num_steps))

    @property
    def ideal_speedup(self) -> float:
        """The FLOP-ideal speed-up over the plan's table: its steps, or one period of a
        periodic plan (:meth:`ideal_speedup_over` gives it over a whole generation)."""
        planned = self.planned_flops
        return (self.full_flops * self.num_steps / planned) if planned else float("inf")

    def ideal_speedup_over(self, steps: int) -> float:
        """The FLOP-ideal speed-up of a generation of ``steps`` steps, ``steps x full step
        FLOPs / sum of the FLOPs of each step's kind`` (a periodic plan repeats; a static
        plan of another length is refused). The one "FLOP-ideal" figure the demo, the CLI,
        the benchmarks and the README report (``fxcache.evaluation.speed``)."""
        if not self.periodic and steps != self.num_steps:
            raise PlanError(f"this plan is a table for {self.num_steps} steps, not {steps}")
        planned = sum(self.step_flops(s) for s in range(steps))
        return (self.full_flops * steps / planned) if planned else float("inf")

    def _cached_units(self) -> list[str]:
        """The units that have a cache slot, in plan order: those some step kind reads or
        writes once bound, those some step reuses before."""
        if self._kinds is not None:
            slots = {r for k in self._kinds for r in (*k.reads, *k.writes)}
        else:
            slots = {n for s in range(self.num_steps) for n in self.reused_at(s)}
        return [n for n in self.units if n in slots]

    def cache_bytes_by_unit(self) -> dict[str, int]:
        """Bytes of each cached unit's slot in one cache state (with forecasting, its
        ``forecast + 1`` values), biggest first. Their sum plus the forecast coefficient
        buffer and an adaptive schedule's state buffers is :attr:`cache_bytes`."""
        per = {n: self._by_name[n].cache_bytes * (self.forecast + 1) for n in self._cached_units()}
        return dict(sorted(per.items(), key=lambda kv: -kv[1]))

    @property
    def cache_bytes(self) -> int:
        """Bytes of the static buffers of one cache state (one input shape in one cache
        context): the cache slots; with forecasting, every slot's history and the
        coefficient buffer; for an adaptive schedule, its state buffers."""
        values = sum(self.cache_bytes_by_unit().values())
        if self.forecast:
            values += len(self.units) * (self.forecast + 1) * 4
        return values + self.state_bytes

    def total_cache_bytes(self, contexts: int = 1) -> int:
        """Bytes of the cache buffers of ``contexts`` cache states of this input shape:
        ``total_cache_bytes(contexts) = contexts * cache_bytes``.

        The runtime keeps one cache state per cache context (diffusers'
        ``model.cache_context(name)``; calls outside any context share one), per thread and
        per input shape it has met (up to ``max_shapes``), each allocated at that
        context's first call with that shape. A pipeline that runs classifier-free
        guidance as two calls per step (Wan's ``"cond"``/``"uncond"``, Flux with
        ``true_cfg_scale``) holds two states; one that concatenates the two halves into
        one batch (SD, SDXL, SD3, CogVideoX) holds one state of twice the batch, which is
        the same bytes, since every cache buffer has the batch dimension. Another input
        shape has its own plan: add its ``total_cache_bytes``."""
        import numbers

        if not isinstance(contexts, numbers.Integral) or isinstance(contexts, bool):
            raise TypeError(f"contexts = {contexts!r} is not allowed; contexts must be a whole number >= 1 "
                            f"(the cache contexts that call the model, e.g. 2 for CFG's cond and uncond)")
        if contexts < 1:
            raise ValueError(f"contexts = {contexts!r} is not allowed; contexts must be a whole number >= 1 "
                             f"(the cache contexts that call the model, e.g. 2 for CFG's cond and uncond)")
        return int(contexts) * self.cache_bytes

    # ------------------------------------------------------------------ output
    def explain(self, contexts: int = 1, steps: int | None = None) -> str:
        """The plan in words: units, step kinds, FLOPs, the FLOP-ideal speed-up and the cache
        bytes, per cache state and in total for ``contexts`` cache contexts
        (:meth:`total_cache_bytes`). ``steps``: the generation's length, for the FLOP-ideal
        speed-up over the whole generation (a periodic plan's own figure is over one
        period). ``str(plan)`` is ``explain()``."""
        total = self.total_cache_bytes(contexts)
        lines = []
        sched = f" from {self.schedule!r}" if self.schedule is not None else ""
        period = f"a period of {self.num_steps} steps that repeats" if self.periodic else f"{self.num_steps} steps"
        lines.append(f"fxcache plan{sched}: {len(self.units)} units, {period}")
        over = "one period" if self.periodic else "the generation"
        figure = f"FLOP-ideal speed-up {self.ideal_speedup:.2f}x over {over}"
        if steps is not None and self.bound and (self.periodic or steps == self.num_steps) and steps != self.num_steps:
            figure = (f"FLOP-ideal speed-up {self.ideal_speedup_over(steps):.2f}x over the generation of {steps} "
                      f"steps ({self.ideal_speedup:.2f}x over one period)")
        lines.append(
            f"  full step: {_fmt_flops(self.full_flops)}FLOPs | planned: {_fmt_flops(self.planned_flops)}FLOPs "
            f"over {self.num_steps} steps | {figure}"
            + ("" if self.bound else " (estimated; exact once compiled)")
        )
        lines.append(f"  cache: {_fmt_bytes(self.cache_bytes)} per cache state"
                     + (f" (forecast order {self.forecast}: {self.forecast + 1} values per slot)" if self.forecast else "")
                     + f"; total {_fmt_bytes(total)} for {contexts} cache context{'s' if contexts != 1 else ''}"
                     + (" (one state per cache context and input shape, e.g. 2 for CFG's cond and uncond)"
                        if contexts == 1 else f" ({contexts} x per state)"))
        lines.append("  units:")
        width = max(len(n) for n in self.units)
        for u in self.unit_infos:
            frac = u.flops / self.full_flops if self.full_flops else 0.0
            lines.append(
                f"    {u.name:<{width}}  {u.kind:<17} saves {_fmt_flops(u.flops)}FLOPs "
                f"({frac:6.1%} of a full step), cache {_fmt_bytes(u.cache_bytes)}"
            )
        lines.append(f"  step kinds ({len(self.step_kinds)}):")
        for k in self.step_kinds:
            frac = k.flops / self.full_flops if self.full_flops else 0.0
            steps = _fmt_steps(k.steps)
            lines.append(
                f"    kind {k.index}: steps {steps}; {_fmt_flops(k.flops)}FLOPs ({frac:.1%} of full)"
                + (f", {k.nodes} nodes" if k.nodes is not None else "")
            )
            lines.append(f"      runs:   {_fmt_names(k.computed, self.units)}")
            lines.append(f"      reuses: {_fmt_names(k.reused, self.units)}")
            if self.bound:
                lines.append(f"      reads {len(k.reads)} slots, writes {len(k.writes)} slots")
        if self.adaptive is not None:
            a = self.adaptive
            limit = "no limit" if a.max_reuse is None else f"at most {a.max_reuse}"
            lines.append(
                f"  adaptive ({a.name}): kind of each step chosen at run time from the {a.statistic} change of "
                f"{a.probe[0]} {list(a.probe[1])} (threshold {a.threshold:g}), decided on the device one step "
                f"ahead; first {a.first_steps} and last {a.last_steps} steps full, {limit} consecutive reuses; "
                f"the figures above assume one full and one reused step"
            )
        for note in self.notes:
            lines.append(f"  {note}")
        if self.compiled_graphs is not None:
            lines.append(f"  compiled graphs: {self.compiled_graphs}" + (f" ({self.compile_note})" if self.compile_note else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()

    def __repr__(self) -> str:
        return (
            f"Plan(units={len(self.units)}, steps={self.num_steps}, periodic={self.periodic}, "
            f"kinds={len(self.step_kinds)}, ideal_speedup={self.ideal_speedup:.2f})"
        )


def _fmt_steps(steps: Iterable[int]) -> str:
    steps = list(steps)
    if len(steps) > 12:
        return ", ".join(map(str, steps[:10])) + f", ... ({len(steps)} steps)"
    return ", ".join(map(str, steps))


def _fmt_names(names: Sequence[str], all_names: Sequence[str]) -> str:
    if not names:
        return "-"
    if len(names) == len(all_names):
        return "all units"
    if len(names) > 8:
        return ", ".join(names[:8]) + f", ... ({len(names)} units)"
    return ", ".join(names)
