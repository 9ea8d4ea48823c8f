"""Timestep-aware block masking (timestep-aware-block-masking.txt): the hyper-parameters
of mask learning. The learned table is a :class:`~.mask.Mask`. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass

from ..plan import UnitInfo
from ._validate import ScheduleError, _bad, _check_bool, _check_int, _check_real, _check_selector, _Config
from .mask import Mask
from .registry import _serialisable, register_lowering

__all__ = ["LearnedMask"]


# -------------------------------------------------------------------------- LearnedMask
@_serialisable
@dataclass(frozen=True)
class LearnedMask(_Config):
    """Hyper-parameters of timestep-aware block masking (timestep-aware-block-masking.txt).

    Not lowerable by itself: ``mask = fxcache.learn_mask(model, LearnedMask(...), ...)``
    learns a :class:`Mask`, which is what gets compiled.

    lambda_sparsity: λ1, weight of Σ_b α_b (push towards reuse).
    lambda_bimodal:  λ2, weight of Σ_b α_b (1 - α_b) (push α to 0/1).
    lr, iters:       optimiser step size and iterations per timestep.
    threshold:       α > threshold → compute (1), else reuse (0).
    units:           which units the mask covers (a kind, or kinds / unit names).
    num_steps:       steps to learn the mask for (None: the generation's).
    loss_scaling:    the per-step weights w_t of the regulariser: True or ``"change"``
                     (the paper's timestep-aware weights, Sec. 3.4: from the feature's
                     relative change r_t), ``"sensitivity"`` (from how much the final
                     sample moves when step t's output is perturbed, measured on the
                     teacher's run: a step whose error reaches the final sample s times
                     more gets 1/s^p the regulariser, p = 2 for ``"mse"``, 1 for ``"l2"``;
                     ``learn_mask`` then needs ``run(m, seed)`` returning the samples), or
                     False (w_t = 1).
    feature_loss:    ``"mse"`` (the paper: relative squared error of the feature) or
                     ``"l2"`` (relative error norm, its square root: per-step errors that
                     add up along the trajectory count linearly, not squared).
    rectify:         apply :func:`rectify` to the thresholded mask (Sec. 3.5).
    rollout:         True (default): learn along the masked model's own denoising, as the
                     paper trains: step t starts from the caches the masked model holds
                     (a block reused at t-1 still holds its value of an earlier step) and,
                     when ``learn_mask`` gets ``run(m, seed)``, from the masked model's
                     own latents. False: every step independently from the teacher's
                     step t-1 outputs (a stale cache is never seen in training).
    cost:            what the sparsity term counts: ``"units"`` (the paper's Σ_b α_b) or
                     ``"flops"`` (Σ_b α_b f_b / mean_b f_b, f_b the unit's FLOPs: the same
                     scale, but a unit costing twice the mean is pushed twice as hard).
    max_reuse:       None (the paper), or K >= 1: a unit the learned mask reused K steps in
                     a row is computed at the next step (its sample is forced to 1 in
                     training), as MagCache's K bounds a cache's age; each step's mask
                     is still learned, among the units not forced.
    seed:            seed of the noise and of the mask sampling.
    """

    # λ1 > λ2: near α = 1 the regulariser's slope is λ1 - λ2 and the feature loss only
    # rewards computing, so with λ1 <= λ2 nothing is ever reused (measured on the
    # embedded DiT: 3e-3 / 1e-3 computes half the blocks at 10 steps).
    lambda_sparsity: float = 3e-3
    lambda_bimodal: float = 1e-3
    lr: float = 1e-1
    iters: int = 100
    threshold: float = 0.5
    units: str | tuple[str, ...] = "transformer_block"
    num_steps: int | None = None
    loss_scaling: bool | str = True
    feature_loss: str = "mse"
    rectify: bool = True
    rollout: bool = True
    cost: str = "units"
    max_reuse: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        c = "LearnedMask"
        object.__setattr__(self, "lambda_sparsity", _check_real(c, "lambda_sparsity", self.lambda_sparsity, 0.0))
        object.__setattr__(self, "lambda_bimodal", _check_real(c, "lambda_bimodal", self.lambda_bimodal, 0.0))
        lr = _check_real(c, "lr", self.lr, 0.0)
        if lr == 0.0:
            raise _bad(c, "lr", self.lr, "a finite number > 0")
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "iters", _check_int(c, "iters", self.iters, 1))
        threshold = _check_real(c, "threshold", self.threshold, 0.0, maximum=1.0)
        object.__setattr__(self, "threshold", threshold)
        object.__setattr__(self, "units", _check_selector(c, "units", self.units))
        object.__setattr__(self, "num_steps", _check_int(c, "num_steps", self.num_steps, 1, optional=True))
        if not isinstance(self.loss_scaling, bool) and self.loss_scaling not in ("change", "sensitivity"):
            raise _bad(c, "loss_scaling", self.loss_scaling, "True, False, 'change' or 'sensitivity'")
        if self.feature_loss not in ("mse", "l2"):
            raise _bad(c, "feature_loss", self.feature_loss, "'mse' or 'l2'")
        _check_bool(c, "rectify", self.rectify)
        _check_bool(c, "rollout", self.rollout)
        if self.cost not in ("units", "flops"):
            raise _bad(c, "cost", self.cost, "'units' or 'flops'")
        object.__setattr__(self, "max_reuse", _check_int(c, "max_reuse", self.max_reuse, 1, optional=True))
        object.__setattr__(self, "seed", _check_int(c, "seed", self.seed, 0))


@register_lowering(LearnedMask)
def _lower_learned(s: LearnedMask, units: list[UnitInfo], num_steps: int | None) -> Mask:
    raise ScheduleError(
        "LearnedMask holds the hyper-parameters of mask learning and has no table to lower; learn the mask "
        "first with `mask = fxcache.learn_mask(model, LearnedMask(...), ...)` (it returns a Mask, which can "
        "be saved with mask.save(path)), then compile with that Mask"
    )
