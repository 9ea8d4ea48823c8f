"""Timestep-aware block masking (timestep-aware-block-masking.txt; DESIGN.md §4): learn
``m[t, b] ∈ {0, 1}`` (1: compute block b at step t and refresh its cache; 0: reuse the
cache) one timestep at a time, with the model frozen::

    mask = learn_mask(model, lambda m, s: generate(m, num_steps=20, num_samples=4, seed=s),
                      LearnedMask(lambda_sparsity=3e-3, lambda_bimodal=1e-3, iters=100))
    cached = fxcache.compile(model, mask)

1. **Teacher run.** ``run(m, config.seed)`` generates once with the full model (or a list
   of per-step ``(args, kwargs)`` is given); a wrapper records every step's model inputs.
   A no-grad pass per step then gives the relative change of the *feature* from the
   previous step, ``r_t = |F(t) - F(t-1)|_1 / |F(t)|_1`` (Eq. 9). ``F`` is the output of the final
   block: the selected unit whose output comes last in the graph (``feature="output"``:
   the model's output instead).
2. **Per timestep** ``t = 1 .. T-1``, in order (step 0 computes everything): the
   teacher (every block computed) is evaluated at step t's input to get the target
   ``F(t)``. With ``config.rollout`` (the default, as the paper trains: "perform the
   denoising process" with the cache "continuously updated as the timestep increases"),
   step t starts from what the *masked* model holds: each block's cache is its output at
   the last step whose learned mask computed it, and when ``run(m, seed)`` is given the
   sampler is driven by the masked model (a second generation, with a drop-in that learns
   each step's α, thresholds it and returns the masked step's output), so step t's input
   is the masked model's own latent. With given per-step inputs the inputs are those, the
   caches still the masked model's. ``rollout=False``: every step independently from the
   teacher's step t-1 block outputs (a cache older than one step is never seen in
   training, so runs of reuse go unpunished: on the embedded DiT at 20 steps this
   variant reuses blocks for 8 steps in a row; see bench/results/table4.md).
   A relaxed mask ``α = sigmoid(θ)`` (θ
   initialised to ``logit(0.9)``) is trained with Adam on θ only: each iteration samples
   ``m ~ Bernoulli(α)`` and uses the straight-through estimator ``m + α - sg(α)``
   (forward: the sample, backward: identity to α). The relaxation is a rewrite of the
   captured graph (:func:`fxcache.rewrite.blend.blend_graph`): every block's outputs are
   ``m_b · computed_b + (1 - m_b) · cache_b`` with ``m_b`` a graph input, so the loss is
   differentiated through the same graph the compiler rewrites (the teacher is that
   graph with every ``m_b = 1``, the model itself bit for bit). The loss (Eq. 11) is ::

       L_t = |F_masked - F|^2 / |F|^2   +   w_t · (λ1 Σ_b c_b α_b + λ2 Σ_b α_b (1 - α_b))

   with ``c_b = 1`` (``config.cost="units"``, the paper) or the unit's FLOPs over the
   mean unit's (``cost="flops"``)
   (relative squared error, so λ1, λ2 mean the same for any feature scale).
   Near α = 1 the regulariser's slope is ``λ1 + λ2 (1 - 2α) ≈ λ1 - λ2`` and the feature
   term only ever rewards computing, so **with λ1 <= λ2 nothing is ever reused**: pick
   λ1 > λ2 (the trained digit DiT, 10 steps: λ1 = 3e-3, λ2 = 1e-3 computes half the
   blocks).
3. **Timestep-aware weights** (Sec. 3.4; the paper's piecewise Eq. 10 is lost in the
   copy, this is a smooth stand-in with the same intent): with ``r̄`` the mean of ``r_t``
   over t >= 1, ``w̃_t = clip(r̄ / r_t, 1/4, 4)`` and ``w_t = w̃_t / mean_{s>=1} w̃_s``:
   small regularisation where the feature changes a lot (fidelity first), large where it
   changes little (reuse aggressively); mean 1 over the trained steps. ``r_t = 0`` gives
   the upper clip, NaN the lower. ``loss_scaling=False``: ``w_t = 1``.
   ``loss_scaling="sensitivity"`` (not the paper's): the weights come from what an error
   at step t does to the final sample, measured (:func:`step_sensitivity`, one
   generation per step): ``s_t`` = the final samples' relative move per unit of relative
   perturbation of step t's output, and ``w_t ∝ s_t^-p`` (:func:`sensitivity_weights`,
   p = 2 with the squared feature loss, 1 with ``feature_loss="l2"``). On the embedded
   DiT (DDIM 20, table 4's teacher run) ``s_t`` falls from 2.2 at step 0 to 0.03-0.04 at
   steps 13-18: an early error reaches the sample 55-80x more, while the paper's ``r_t``
   is smallest early and so asks for the most reuse there. ``feature_loss="l2"`` takes the square root of the relative error:
   errors of consecutive steps (a stale cache read again and again) add up along the
   trajectory with their norms, which the squared loss undercounts.
   ``config.max_reuse = K`` (not the paper's): a unit whose learned mask reused it K steps
   in a row is computed at the next step: its sample is forced to 1 in that step's
   training and its cell to 1 in the mask, so each step learns among the other units.
   Each step's loss sees only that step, so without a bound a slowly changing unit can be
   held stale for most of the generation while the errors add up downstream.
4. ``m[t] = α_t > threshold``, ``m[0] = 1``, then rectification (Sec. 3.5) when
   ``config.rectify``: the paper's chain rule (:func:`fxcache.schedules.rectify`) when the
   blocks form a chain (each block's output is read only by the next one, as transformer
   blocks); otherwise that rule would drop values a skip connection reads, so cells are
   cleared by the compiler's own cross-step liveness instead (a computed unit whose value
   no one at this step or later reads). Either way the compiled model is unchanged: the
   rewrite's liveness already skips those blocks; rectification makes the mask say so.

Memory: one step's graph at a time. Teacher values are computed under ``no_grad``, the
loss history holds floats, and of the block outputs only the caches of step t and those
of step t+1 are kept; the teacher's inputs of every step are kept (for ``r_t``).
With ``feature="final_block"`` the blend graph stops at the last block's output.
Every step's call must have the input shapes of the first one (one captured graph).

The model's parameters get ``requires_grad_(False)`` during training; their flags and
the model's train/eval mode are restored afterwards.

``learn_mask`` returns the :class:`~fxcache.schedules.Mask`;
``learn_mask_details`` (same arguments) returns a :class:`MaskLearningResult` with the
mask, the α table, the loss histories, ``r_t`` and ``w_t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree

from ..analyze.units import Unit, UnitSet, find_units
from ..capture import capture, flatten_call, signature_of
from ..dropin import DropIn
from ..rewrite.blend import blend_graph
from ..schedules import LearnedMask, Mask, ScheduleError, rectify, select_units

__all__ = ["learn_mask", "learn_mask_details", "MaskLearningResult", "timestep_weights", "sensitivity_weights",
           "step_sensitivity", "INIT_ALPHA"]

#: α at the start of every timestep's optimisation ("init near 1": compute everything).
INIT_ALPHA = 0.9
_CLIP = 4.0


@dataclass
class MaskLearningResult:
    """Everything :func:`learn_mask_details` learned.

    mask:         the final :class:`Mask` (thresholded, step 0 all ones, rectified if asked).
    unrectified:  the thresholded mask before rectification.
    alpha:        ``[T, B]`` final α per step and block (row 0: ones, not trained).
    loss:         ``[T, iters]`` total loss per iteration (row 0 NaN).
    feature_loss: ``[T, iters]`` the feature term alone (row 0 NaN).
    change:       ``[T]`` r_t, relative change of the teacher's feature (r_0 NaN).
    weights:      ``[T]`` w_t (w_0 = 0: step 0 is not trained).
    sensitivity:  ``[T]`` s_t of :func:`step_sensitivity` (``loss_scaling="sensitivity"``), else None.
    units:        block names, columns of the tables.
    feature:      the unit whose output is the feature, or ``"output"``.
    rectified_by: ``"chain"`` (the paper's rule), ``"liveness"``, or None.
    """

    mask: Mask
    unrectified: Mask
    alpha: np.ndarray
    loss: np.ndarray
    feature_loss: np.ndarray
    change: np.ndarray
    weights: np.ndarray
    units: tuple[str, ...]
    feature: str
    rectified_by: str | None = None
    sensitivity: np.ndarray | None = None
    meta: dict = field(default_factory=dict)


def timestep_weights(change: Sequence[float]) -> np.ndarray:
    """``w_t`` from the feature changes ``r_t`` (``change[0]`` ignored; see module doc)."""
    r = np.asarray(change, dtype=np.float64)
    w = np.zeros_like(r)
    if len(r) < 2:
        return w
    rs = r[1:]
    finite = rs[np.isfinite(rs)]
    mean = float(finite.mean()) if finite.size else math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.where(np.isfinite(rs), mean / rs, 0.0)
    raw = np.where(np.isnan(raw), 1.0 / _CLIP, raw)  # 0/0: no change anywhere
    raw = np.clip(raw, 1.0 / _CLIP, _CLIP)
    w[1:] = raw / raw.mean()
    return w


# ------------------------------------------------------------------------ helpers
def _clone(tree):
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, tree)


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _first_output(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    sample = getattr(out, "sample", None)
    return sample if sample is not None else _tensors(out)


def _rel_change(cur: list[torch.Tensor], prev: list[torch.Tensor]) -> float:
    num = sum(float((a.double() - b.double()).abs().sum()) for a, b in zip(cur, prev))
    den = sum(float(a.double().abs().sum()) for a in cur)
    if den == 0:
        return 0.0 if num == 0 else math.nan
    return num / den


def _rel_mse(feat: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    num = sum(((a.float() - b.float()) ** 2).sum() for a, b in zip(feat, target))
    den = sum((b.float() ** 2).sum() for b in target)
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)


class _InputRecorder(DropIn):
    """Drop-in used for the teacher run: the full model, recording each call's inputs."""

    def __init__(self, model):
        super().__init__(model)
        self.calls: list = []

    def forward(self, *args, **kwargs):
        self.calls.append((_clone(tuple(args)), _clone(dict(kwargs))))
        with torch.no_grad():
            return self.model(*args, **kwargs)


class _Student(DropIn):
    """Drop-in for the masked run: at each call, learn that step's α from the caches the
    masked model holds, then take the step with the thresholded mask and return its
    output, so the sampler goes on from the masked model's own latents."""

    def __init__(self, model, captured, train, advance, num_steps: int):
        super().__init__(model)
        self._captured, self._train, self._advance, self._num_steps = captured, train, advance, num_steps
        self.t, self._caches = 0, None

    def forward(self, *args, **kwargs):
        t = self.t
        if t >= self._num_steps:
            raise ScheduleError(
                f"the masked run called the model more than the teacher run's {self._num_steps} times; "
                f"run(model, seed) must make the same number of calls each time"
            )
        flat = _flat_inputs(self.model, self._captured, args, kwargs, t)
        self._caches, outs = self._train(t, flat, self._caches)
        self._advance(t)
        self.t += 1
        if t + 1 == self._num_steps:
            self._caches = None  # the last step's caches are read by no one
        return pytree.tree_unflatten(outs, self._captured.out_spec)


def _is_chain(gm, units: list[Unit]) -> bool:
    """Each unit's outputs are used only inside the next unit (data-flow order)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    for a, b in zip(units, units[1:]):
        for o in a.outputs:
            if any(user.name not in b.region for user in by_name[o].users):
                return False
    return True


def _liveness_rectify(gm, unitset: UnitSet, units: list[Unit], mask: Mask) -> Mask:
    """Clear cells whose unit the rewrite would not run (its value is read by no one at
    this step or later): the compiler's rectification, for any graph shape."""
    from ..planning import lower_to_plan
    from ..rewrite.step_graphs import solve_steps

    plan = lower_to_plan(mask, unitset, None)
    solved = solve_steps(gm, units, plan)
    table = [list(r) for r in mask.table]
    by_name = {u.name: u for u in units}
    for t in range(1, len(table)):
        graph = solved.graphs[solved.kind_of_step[t]]
        for b, name in enumerate(mask.units):
            u = by_name[name]
            if table[t][b] and name not in graph.writes and not any(o in graph.executed for o in u.outputs):
                table[t][b] = False
    return Mask(tuple(tuple(r) for r in table), mask.units, periodic=mask.periodic)


def _flat_inputs(model, captured, args, kwargs, t: int) -> list:
    """Step t's call flattened as the captured graph takes it (same shapes as step 0's)."""
    flat, spec = flatten_call(model, args, kwargs)
    if signature_of(flat, spec) != captured.signature:
        raise ScheduleError(
            f"the model's call at step {t} has other input shapes, dtypes or structure than at step 0; mask "
            f"learning runs one captured graph over the whole generation: keep the inputs' shapes fixed"
        )
    return flat


def _teacher_inputs(model, run_or_inputs, seed) -> tuple[list, Any]:
    """Per-step ``(args, kwargs)`` of the teacher's generation, and what ``run`` returned
    (None for given inputs)."""
    result = None
    if callable(run_or_inputs):
        rec = _InputRecorder(model)
        result = run_or_inputs(rec, seed)
        calls = rec.calls
    else:
        try:
            calls = list(run_or_inputs)
        except TypeError:
            raise ScheduleError(
                f"learn_mask(run_or_inputs=...) must be run(model, seed) or a sequence of per-step (args, kwargs); "
                f"got {type(run_or_inputs).__name__}"
            ) from None
        for item in calls:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict)):
                raise ScheduleError(
                    "learn_mask(run_or_inputs=[...]) entries must be (args, kwargs) pairs, one per step"
                )
        calls = [(tuple(a), dict(k)) for a, k in calls]
        if not calls:
            raise ScheduleError("learn_mask(run_or_inputs=[]) is empty; give one (args, kwargs) per step")
    if not calls:
        raise ScheduleError("the teacher run never called the model; run(model, seed) must call it once per step")
    return calls, result


class _Perturbed(DropIn):
    """The model, with its output at call ``step`` moved by ``eps`` times its RMS in a fixed
    random direction (the first tensor of the output)."""

    def __init__(self, model, step: int, eps: float):
        super().__init__(model)
        self._step, self._eps, self.t = step, eps, 0

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            out = self.model(*args, **kwargs)
            if self.t == self._step:
                leaves, spec = pytree.tree_flatten(out)
                i = next(k for k, x in enumerate(leaves) if isinstance(x, torch.Tensor))
                x = leaves[i]
                g = torch.Generator().manual_seed(1_000_003 + self._step)
                noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
                rms = x.float().pow(2).mean().sqrt()
                leaves[i] = x + (self._eps * rms).to(x.dtype) * noise
                out = pytree.tree_unflatten(leaves, spec)
        self.t += 1
        return out


def step_sensitivity(model, run: Callable[[torch.nn.Module, int], Any], seed: int, num_steps: int, *,
                     reference=None, eps: float = 1e-2, progress: bool = False) -> np.ndarray:
    """How far the final samples move, relative to their norm and per unit of relative
    output error, when the model's output at step t alone is perturbed by ``eps`` times its
    RMS: ``s[t] = |x_T(perturbed at t) - x_T| / |x_T| / eps``, one generation per step
    (``reference``: ``run(model, seed)``'s result, when already known). ``run`` must return
    the generated samples (a tensor or a structure of tensors)."""
    def final(result, what):
        leaves = _tensors(result) if result is not None else []
        if not leaves:
            raise ScheduleError(
                f"LearnedMask(loss_scaling='sensitivity') measures how the final samples move: run(model, seed) must "
                f"return them; it returned {type(result).__name__} ({what})"
            )
        return [x.detach().double() for x in leaves]

    with torch.no_grad():
        ref = final(run(model, seed) if reference is None else reference, "the teacher run")
        norm = math.sqrt(sum(float((x ** 2).sum()) for x in ref))
        from tqdm.auto import tqdm

        out = np.zeros(num_steps)
        for t in tqdm(range(num_steps), desc="step sensitivity", unit="step", disable=not progress):
            moved = final(run(_Perturbed(model, t, eps), seed), f"the run perturbed at step {t}")
            diff = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(moved, ref)))
            out[t] = (diff / norm / eps) if norm > 0 else 0.0
    return out


def sensitivity_weights(sensitivity: Sequence[float], power: float) -> np.ndarray:
    """``w_t ∝ (s̄ / s_t)^power`` over t >= 1, mean 1 (``w_0 = 0``): the regulariser is
    small where an error reaches the final sample strongly. ``s_t`` is floored at
    ``s̄ / 1000`` (a step nothing downstream reads would get an infinite weight)."""
    s = np.asarray(sensitivity, dtype=np.float64)
    w = np.zeros_like(s)
    if len(s) < 2:
        return w
    rs = s[1:]
    mean = float(rs.mean())
    if not math.isfinite(mean) or mean <= 0:
        w[1:] = 1.0
        return w
    raw = (mean / np.maximum(rs, mean / 1000.0)) ** power
    w[1:] = raw / raw.mean()
    return w


# ---------------------------------------------------------------------------- the verb
def learn_mask_details(
    model: torch.nn.Module,
    run_or_inputs: Callable[[torch.nn.Module, int], Any] | Sequence[tuple[tuple, dict]],
    config: LearnedMask | None = None,
    *,
    feature: str = "final_block",
    progress: bool = True,
) -> MaskLearningResult:
    """Learn a timestep-aware block mask; returns the mask and what was learned.

    run_or_inputs: ``run(m, seed)`` performing one generation with ``m`` in place of the
                   model, one ``m(...)`` call per denoising step (called once, with
                   ``config.seed``); or the per-step ``(args, kwargs)`` of the model calls.
    config:        :class:`~fxcache.schedules.LearnedMask` (default ``LearnedMask()``);
                   ``config.units`` picks the blocks (a kind such as
                   ``"transformer_block"``, ``"resnet"``, ``"up_block"``, or names).
    feature:       ``"final_block"`` (default): the loss compares the output of the last
                   block; ``"output"``: the model's output (``.sample`` / element 0).
    progress:      a tqdm progress bar over the timesteps.
    """
    config = LearnedMask() if config is None else config
    if not isinstance(config, LearnedMask):
        raise ScheduleError(f"learn_mask(config=...) must be a LearnedMask; got {type(config).__name__}")
    if feature not in ("final_block", "output"):
        raise ScheduleError(f"learn_mask(feature={feature!r}) is not allowed; allowed: 'final_block', 'output'")

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        if config.loss_scaling == "sensitivity" and not callable(run_or_inputs):
            raise ScheduleError(
                "LearnedMask(loss_scaling='sensitivity') measures how the final samples move when one step's output "
                "is perturbed: give learn_mask run(model, seed) returning the samples, not per-step inputs"
            )
        calls, teacher_result = _teacher_inputs(model, run_or_inputs, config.seed)
        captured = capture(model, *calls[0])
        unitset = find_units(captured.gm)
        infos = select_units(unitset.infos(), config.units, what="LearnedMask.units")
        if not infos:
            raise ScheduleError(f"LearnedMask.units = {config.units!r} selects no unit of {type(model).__name__}")
        position = {n.name: i for i, n in enumerate(captured.gm.graph.nodes)}
        by_name = unitset.by_name()
        # data-flow order; of units returning the same value the outermost comes last
        units = sorted((by_name[i.name] for i in infos), key=lambda u: (position[u.outputs[-1]], len(u.region)))
        feature_name = units[-1].name if feature == "final_block" else "output"
        graph = blend_graph(captured.gm, units, model_outputs=feature == "output")
        feature_slots = [i for i, (u, _) in enumerate(graph.slots) if u == feature_name]
        flats = [_flat_inputs(model, captured, args, kwargs, t) for t, (args, kwargs) in enumerate(calls)]
        T, B = len(calls), len(units)
        device = params[0].device if params else torch.device("cpu")
        ones = [torch.ones((), device=device) for _ in range(B)]
        nodes = {n.name: n for n in captured.gm.graph.nodes}
        zeros = []
        for name, k in graph.slots:
            val = nodes[by_name[name].outputs[k]].meta["val"]
            zeros.append(torch.zeros(val.shape, dtype=val.dtype, device=device))

        def _feature_of(outs, blocks):
            """The feature (see ``feature``) from a blend graph's outputs and slots."""
            if feature_name == "output":
                return _tensors(_first_output(pytree.tree_unflatten(list(outs), captured.out_spec)))
            return [blocks[i] for i in feature_slots]

        def run(t: int, weights, caches):
            """The feature at step t and the blended slots (the next step's caches)."""
            outs, blocks = graph(flats[t], weights, caches)
            return _feature_of(outs, blocks), blocks

        # r_t of the teacher's feature: one no-grad pass per step (every weight 1: the model),
        # keeping only the previous feature
        change, prev = [], None
        with torch.no_grad():
            for t in range(T):
                feat = [f.detach().clone() for f in run(t, ones, zeros)[0]]
                change.append(math.nan if prev is None else _rel_change(feat, prev))
                prev = feat
        prev = None
        if config.num_steps is not None and config.num_steps != T:
            raise ScheduleError(
                f"LearnedMask.num_steps = {config.num_steps} but the teacher run called the model {T} times; "
                f"set num_steps to {T} (or None)"
            )
        change = np.array(change, dtype=np.float64)
        sensitivity = None
        if config.loss_scaling == "sensitivity":
            sensitivity = step_sensitivity(model, run_or_inputs, config.seed, T, reference=teacher_result,
                                           progress=progress)
            weights = sensitivity_weights(sensitivity, 2.0 if config.feature_loss == "mse" else 1.0)
        elif config.loss_scaling:
            weights = timestep_weights(change)
        else:
            weights = np.r_[0.0, np.ones(T - 1)]
        alpha = np.ones((T, B))
        loss_hist = np.full((T, config.iters), np.nan)
        feat_hist = np.full((T, config.iters), np.nan)
        init = math.log(INIT_ALPHA / (1 - INIT_ALPHA))
        cost = torch.ones(B, device=device)
        if config.cost == "flops":
            f = torch.tensor([float(u.flops) for u in units], device=device)
            if float(f.sum()) > 0:
                cost = f / f.mean()

        from tqdm.auto import tqdm

        rollout = config.rollout
        # the model's outputs are needed only where the masked model drives the sampler
        drives = rollout and callable(run_or_inputs)
        step_graph = graph
        if drives and feature != "output":
            step_graph = blend_graph(captured.gm, units, model_outputs=True)

        age = np.zeros(B, dtype=np.int64)  # steps since each unit was last computed (thresholded masks)

        def train(t: int, flat, caches):
            """Learn α at step t from the caches ``caches`` (None at step 0); returns the
            blended slots that become the caches of step t+1 and, when the masked model
            drives the sampler, its outputs at step t (flattened; else [])."""
            with torch.no_grad():
                outs, blocks = graph(flat, ones, zeros if caches is None else caches)
                target = [f.detach() for f in (_feature_of(outs, blocks))]
                blocks = [b.detach() for b in blocks]
            if t == 0:  # every unit computed: the model itself
                if not drives:
                    return blocks, []
                if step_graph is not graph:
                    with torch.no_grad():
                        outs = step_graph(flat, ones, zeros)[0]
                return blocks, list(outs)
            # units reused max_reuse steps in a row must compute now (their sample is forced to 1)
            forced = age >= (config.max_reuse if config.max_reuse is not None else T)
            force = torch.tensor(forced, device=device)
            theta = torch.full((B,), init, device=device, dtype=torch.float32, requires_grad=True)
            opt = torch.optim.Adam([theta], lr=config.lr)
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + t)
            w = float(weights[t])
            with torch.enable_grad():
                for it in range(config.iters):
                    a = torch.sigmoid(theta)
                    sample = (torch.rand(B, generator=gen).to(device) < a.detach()).to(a.dtype)
                    mix = sample + a - a.detach()  # straight-through: forward the sample, backward to α
                    if forced.any():
                        mix = torch.where(force, torch.ones_like(mix), mix)
                    outs, blended = graph(flat, list(mix.unbind(0)), caches)
                    fl = _rel_mse(_feature_of(outs, blended), target)
                    if config.feature_loss == "l2":
                        fl = fl.clamp_min(1e-30).sqrt()
                    reg = config.lambda_sparsity * (a * cost).sum() + config.lambda_bimodal * (a * (1 - a)).sum()
                    loss = fl + w * reg
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_hist[t, it] = float(loss.detach())
                    feat_hist[t, it] = float(fl.detach())
            del a, sample, mix, outs, blended, fl, reg, loss  # no graph of step t outlives it
            alpha[t] = torch.sigmoid(theta.detach()).cpu().numpy()
            alpha[t][forced] = 1.0
            age[:] = np.where(alpha[t] > config.threshold, 0, age + 1)
            if not rollout:  # every step independently: the teacher's caches go on
                return blocks, []
            # the masked model's own step: what the compiled mask will hold and return
            m = [torch.tensor(float(v > config.threshold), device=device) for v in alpha[t]]
            with torch.no_grad():
                outs, blended = step_graph(flat, m, caches)
            return [b.detach() for b in blended], list(outs)

        bar = tqdm(total=T, desc="learn_mask", unit="step", disable=not progress)

        def advance(t):
            bar.update(1)
            if t:
                bar.set_postfix(loss=f"{loss_hist[t, -1]:.3g}", computed=int((alpha[t] > config.threshold).sum()))

        try:
            if drives:
                stepper = _Student(model, captured, train, advance, T)
                run_or_inputs(stepper, config.seed)
                if stepper.t != T:
                    raise ScheduleError(
                        f"the masked run called the model {stepper.t} times and the teacher run {T} times; "
                        f"run(model, seed) must make the same number of calls each time"
                    )
            else:
                caches = None
                for t in range(T):
                    caches, _ = train(t, flats[t], caches)
                    advance(t)
                del caches
        finally:
            bar.close()

        names = tuple(u.name for u in units)
        table = alpha > config.threshold
        table[0] = True
        raw = Mask(tuple(tuple(bool(v) for v in row) for row in table), names)
        rectified_by = None
        mask = raw
        if config.rectify:
            if _is_chain(captured.gm, units):
                mask, rectified_by = rectify(raw, order=names), "chain"
            else:
                mask, rectified_by = _liveness_rectify(captured.gm, unitset, units, raw), "liveness"
        return MaskLearningResult(
            mask=mask,
            unrectified=raw,
            alpha=alpha,
            loss=loss_hist,
            feature_loss=feat_hist,
            change=change,
            weights=weights,
            units=names,
            feature=feature_name,
            rectified_by=rectified_by,
            sensitivity=sensitivity,
            meta={"model_class": type(model).__name__, "config": config.to_dict(), "num_steps": T},
        )
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode


def learn_mask(
    model: torch.nn.Module,
    run_or_inputs: Callable[[torch.nn.Module, int], Any] | Sequence[tuple[tuple, dict]],
    config: LearnedMask | None = None,
    *,
    feature: str = "final_block",
    progress: bool = True,
) -> Mask:
    """Learn a timestep-aware block mask (see the module doc); returns the :class:`Mask`.
    :func:`learn_mask_details` takes the same arguments and also returns α, the losses,
    ``r_t`` and ``w_t``."""
    return learn_mask_details(model, run_or_inputs, config, feature=feature, progress=progress).mask
