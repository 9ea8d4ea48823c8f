"""The ``fxcache`` command line: ``fxcache demo | profile | bench | plan``.

``fxcache demo``     generate digits with the embedded trained U-Net, uncached and with
                     DeepCache; print the plan, the fidelity (SQNR/PSNR) and the three
                     speed figures; write a side-by-side PNG.
``fxcache profile``  record how much each unit's output changes from step to step
                     (the input of ``fxcache.BlockCache``) and save it: of an embedded model
                     (``--model``) or of the denoiser of a saved diffusers pipeline, inside
                     the pipeline's own loop (``--pipeline DIR``).
``fxcache bench``    print a :class:`fxcache.evaluation.speed.SpeedReport` for a model
                     (``--model`` or ``--pipeline DIR``) and schedule.
``fxcache plan``     print the plan of a schedule on a published denoiser config
                     (``fxcache.configs``: SD 1.5, SDXL, SD3.5 Medium, FLUX.1-dev, Wan 2.1
                     14B, CogVideoX-5B) on the meta device, without weights: units, the
                     FLOP-ideal speed-up, cache bytes per cache state and in total.

Every subcommand runs on the CPU in this process; ``--backend none`` (the default) runs
the graphs eagerly, ``--backend inductor`` compiles them (minutes on a CPU). Every file a
command writes (``--out``, ``--plot``, ``--json``) is checked before any work starts: its
folder must exist (nothing is created), be writable (tried with a file created and
removed there; /proc and /sys refused), an existing target must be a regular file, and
the extension must be one the command can write; otherwise the command prints one line
and exits with status 2. ``demo`` checks ``--branch`` against the model and ``bench``
checks ``--mode`` before any generation.

A ``--schedule`` is parsed into a :class:`ScheduleSpec`: the schedule config
(:func:`parse_schedule`'s answer) and what the command does with it beyond the config.
``taylorseer:N[:ORDER]`` is TaylorSeer's schedule on FORA's units (the first ORDER + 1
steps computed as its warm-up, then every N-th) with cache reads forecast with order
ORDER (``fxcache.compile(..., forecast=ORDER)``; an explicit ``--forecast`` that says
otherwise is refused). ``magcache:THRESHOLD[:MAX_REUSE]`` is MagCache with its published
limits (at most MAX_REUSE = 3 reused steps in a row, the first 20% of the steps
computed); its magnitude ratios are calibrated in this process, on one generation with
seed 1, before anything is measured (seed 0). ``fxcache plan`` has no weights to
calibrate with and refuses ``magcache:``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

from .dropin import DropIn

__all__ = ["main", "build_parser", "parse_schedule", "parse_spec", "ScheduleSpec"]

MODELS = ("unet", "dit")
BACKENDS = ("none", "inductor", "aot_eager")
_SCHEDULE_HELP = ("deepcache:INTERVAL[:BRANCH] or adaptive-deepcache:THRESHOLD[:BRANCH] (U-Net), fora:INTERVAL, "
                  "fbc:THRESHOLD, teacache:THRESHOLD, magcache:THRESHOLD[:MAX_REUSE] (ratios calibrated first, "
                  "on seed 1) or taylorseer:INTERVAL[:ORDER] (forecast order 1 or 2) (DiT), e.g. deepcache:3:0, "
                  "fora:2, fbc:0.15, magcache:0.1, taylorseer:3:1; or a FILE.json fxcache search wrote")
_DEFAULT_SCHEDULE = {"unet": "deepcache:3:0", "dit": "fora:2"}


class CliError(Exception):
    """A user error the command line reports in one line (exit status 2)."""


# ------------------------------------------------------------------ argument types
# kind -> (config class, its parameters in order: (name, whole number?, allowed, default))
_SCHEDULE_PARAMS = {
    "deepcache": ("DeepCache", (("interval", True, "a whole number >= 1", None), ("branch", True, "a whole number >= 0", 0))),
    "fora": ("FORA", (("interval", True, "a whole number >= 1", None),)),
    "fbc": ("FirstBlockCache", (("threshold", False, "a finite number >= 0", None),)),
    "teacache": ("TeaCache", (("threshold", False, "a finite number >= 0", None),)),
    "adaptive-deepcache": (
        "AdaptiveDeepCache",
        (("threshold", False, "a finite number >= 0", None), ("branch", True, "a whole number >= 0", 0)),
    ),
    # MagCache's published limit K = 3 (diffusers' max_skip_steps); its ratios are calibrated on the model
    "magcache": ("MagCache", (("threshold", False, "a finite number >= 0", None),
                              ("max_reuse", True, "a whole number >= 0", 3))),
    "taylorseer": ("FORA", (("interval", True, "a whole number >= 1", None), ("order", True, "1 or 2", 1))),
}
#: parameters that are not the config's, with their allowed values: the CLI applies them (ScheduleSpec)
_SPEC_PARAMS = {"order": (1, 2)}
#: MagCache's retention ratio (its paper and diffusers' default): the first 20% of the steps compute
_MAGCACHE_RETENTION = 0.2
#: MagCache's ratios are calibrated on this seed; bench measures on seed 0
_CALIBRATION_SEED = 1


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """A ``--schedule`` as written: ``schedule`` is the config (what :func:`parse_schedule`
    returns), the rest is what the command does with it beyond the config.

    forecast:  the forecast order the kind itself sets (``taylorseer:N:ORDER``), or None
               where ``--forecast`` decides.
    warmup:    steps computed before the interval starts (TaylorSeer's warm-up, ORDER + 1;
               0: none). With a warm-up the command runs TaylorSeer's steps as a Mask over
               the units ``schedule`` (FORA) caches on the model.
    calibrate: the config still needs MagCache's magnitude ratios, calibrated on the model
               before anything is measured.
    """

    text: str
    kind: str
    schedule: Any
    forecast: int | None = None
    warmup: int = 0
    calibrate: bool = False


def parse_schedule(text: str):
    """``deepcache:3``, ``deepcache:3:0``, ``fora:2``, ``fbc:0.15``, ``teacache:0.2``,
    ``adaptive-deepcache:0.05:1``, ``magcache:0.1[:3]`` or ``taylorseer:3[:1]`` → a schedule
    config (``magcache:`` without its ratios yet; ``taylorseer:N`` is ``FORA(N)``, its
    order and warm-up are in :func:`parse_spec`'s answer). A NaN or infinite value, a
    fraction where a whole number is needed, or a value the config refuses (a negative
    threshold, interval or branch) is an ``ArgumentTypeError`` naming the parameter."""
    return parse_spec(text).schedule


def parse_spec(text: str) -> ScheduleSpec:
    """``--schedule``'s type: the :class:`ScheduleSpec` of ``text`` (see :func:`parse_schedule`)."""
    import math

    from . import schedules

    if text.strip().lower().endswith(".json"):  # a schedule fxcache search wrote
        from .calibrate.search import SearchResult
        from .errors import CheckpointError

        try:
            found = SearchResult.load(text.strip())
        except CheckpointError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return ScheduleSpec(text.strip(), "searched", found, forecast=found.forecast)
    parts = text.strip().lower().split(":")
    name, nums = parts[0], parts[1:]
    spec = _SCHEDULE_PARAMS.get(name)
    if spec is None or not 1 <= len(nums) <= len(spec[1]):
        raise argparse.ArgumentTypeError(f"invalid schedule {text!r}: use {_SCHEDULE_HELP}")
    cls_name, params = spec
    values = {}
    for token, (param, whole, allowed, _default) in zip(nums, params):
        try:
            value = float(token)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid schedule {text!r}: numbers expected after ':'; use {_SCHEDULE_HELP}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(
                f"invalid schedule {text!r}: {param} = {token.strip()} is not a finite number; {param} must be {allowed}")
        if whole:
            if value != int(value):
                raise argparse.ArgumentTypeError(
                    f"invalid schedule {text!r}: {param} = {token.strip()} is not allowed: intervals, branches, "
                    f"orders and reuse limits are whole numbers")
            value = int(value)
        if param in _SPEC_PARAMS and value not in _SPEC_PARAMS[param]:
            raise argparse.ArgumentTypeError(
                f"invalid schedule {text!r}: {param} = {token.strip()} is not allowed; {param} must be {allowed}")
        values[param] = value
    for param, _whole, _allowed, default in params[len(nums):]:
        values[param] = default
    extra = {p: values.pop(p) for p in list(values) if p in _SPEC_PARAMS}
    try:
        config = getattr(schedules, cls_name)(**values)
    except schedules.ScheduleError as exc:
        raise argparse.ArgumentTypeError(f"invalid schedule {text!r}: {exc}") from None
    if name == "taylorseer":
        return ScheduleSpec(text.strip(), name, config, forecast=extra["order"], warmup=extra["order"] + 1)
    return ScheduleSpec(text.strip(), name, config, calibrate=name == "magcache")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 0,1,2)")
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed (e.g. 0,1,2)")
    return seeds


def _mode(text: str) -> str:
    """A ``torch.compile`` mode: the rule ``fxcache.compile(mode=...)`` applies."""
    from .errors import OptionError
    from .rewrite.compile import check_mode

    try:
        check_mode(text, what="--mode")
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _backend(value: str) -> str | None:
    return None if value == "none" else value


# ------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxcache",
        description="Feature caching for diffusion denoisers as an FX compiler pass (CPU demo, profiler, benchmark).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,profile,bench,plan,search}")
    sub.required = True

    def common(p, *, steps=20):
        p.add_argument("--steps", type=_positive, default=steps, help=f"DDIM steps per generation (default {steps})")
        p.add_argument("--threads", type=_positive, default=1,
                       help="torch.set_num_threads for everything run and timed (default 1: these 16x16 models gain "
                       "little from more, and one thread keeps timings stable on a shared machine)")

    def speed(p, repeats):
        p.add_argument("--backend", choices=BACKENDS, default="none",
                       help="none: eager FX graphs (default, fast to start); inductor: torch.compile (minutes on CPU)")
        p.add_argument("--repeats", type=_positive, default=repeats,
                       help=f"interleaved timing repeats (default {repeats})")
        p.add_argument("--forecast", type=int, choices=(0, 1, 2), default=None,
                       help="cache reads: 0 reuse (default), 1 or 2 TaylorSeer forecast of that order "
                       "(taylorseer:N:ORDER sets it)")

    def pipeline_or_model(p, done):
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("--model", choices=MODELS, help="embedded trained model")
        which.add_argument("--pipeline", default=None, metavar="DIR",
                           help="a diffusers pipeline saved in a local folder (save_pretrained): its denoiser is "
                                f"{done} inside the pipeline's own loop")
        p.add_argument("--prompt", default="a photo of a cat", help="with --pipeline: the prompt, if it takes one")

    demo = sub.add_parser("demo", help="generate digits with the trained U-Net, uncached vs DeepCache",
                          description="Generate digits with the embedded trained U-Net, uncached and with DeepCache; "
                          "print the plan, SQNR/PSNR and the three speed figures; write a side-by-side PNG.")
    common(demo)
    demo.add_argument("--interval", type=_positive, default=3, help="DeepCache: a full step every N steps (default 3)")
    demo.add_argument("--branch", type=_non_negative, default=0,
                      help="DeepCache: skip branch to cache behind, 0 = shallowest (default 0)")
    demo.add_argument("--samples", type=_positive, default=16, help="digits per generation (default 16)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    demo.add_argument("--out", default="demo.png",
                      help="image to write (default demo.png; .png, .jpg, .webp, ...); its folder must exist")
    speed(demo, repeats=5)
    demo.add_argument("--no-bench", action="store_true", help="skip the speed measurement")

    prof = sub.add_parser("profile", help="record the step-to-step change of every unit (input of BlockCache)",
                          description="Run generations through a recorder and save, per unit and step, the relative "
                          "L1 change of its output (block caching, Eq. 6).")
    pipeline_or_model(prof, "profiled")
    common(prof)
    prof.add_argument("--samples", type=_positive, default=8, help="samples per generation (default 8)")
    prof.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="comma-separated seeds (default 0,1,2)")
    prof.add_argument("--units", default=None,
                      help="unit kind(s) or names, comma-separated (default: every unit except skip branches)")
    prof.add_argument("--out", required=True, help="profile file to write (.safetensors); its folder must exist")
    prof.add_argument("--plot", default=None,
                      help="also plot the profile to this image (.png, .pdf, .svg, ...; needs matplotlib)")

    bench = sub.add_parser("bench", help="measure the three speed figures of a model and schedule",
                           description="Measure, in this process: the FLOP-ideal speed-up, the speed-up predicted "
                           "from timing each step kind in isolation, the measured end-to-end speed-up, "
                           "and their ratio (runtime efficiency).")
    pipeline_or_model(bench, "measured")
    bench.add_argument("--schedule", type=parse_spec, default=None,
                       help=f"{_SCHEDULE_HELP} (default: deepcache:3:0 for unet, fora:2 for dit)")
    common(bench)
    bench.add_argument("--samples", type=_positive, default=16, help="batch size (default 16)")
    speed(bench, repeats=7)
    bench.add_argument("--mode", type=_mode, default=None,
                       help="torch.compile mode, with --backend inductor (default, reduce-overhead, max-autotune, ...)")
    bench.add_argument("--json", default=None, help="also write the report as JSON to this file; its folder must exist")

    from .configs import NAMES as CONFIGS

    plan = sub.add_parser("plan", help="the plan of a schedule on a published denoiser config (no weights)",
                          description="Build a published denoiser from its config.json on the meta device (no "
                          "weights, no memory), capture it at this resolution and print the plan of the "
                          "schedule: units, step kinds, the FLOP-ideal speed-up and the cache bytes per cache "
                          "state and in total.")
    plan.add_argument("--config", required=True, choices=CONFIGS, help="published denoiser")
    plan.add_argument("--height", type=_positive, default=None, help="image height in pixels (default: usual one)")
    plan.add_argument("--width", type=_positive, default=None, help="image width in pixels (default: usual one)")
    plan.add_argument("--frames", type=_positive, default=None, help="video frames, 4k + 1 (video models)")
    plan.add_argument("--steps", type=_positive, default=None, help="denoising steps (default: usual ones)")
    plan.add_argument("--batch", type=_positive, default=1, help="the model's batch per call (default 1)")
    plan.add_argument("--schedule", type=parse_spec, default=None,
                      help=f"{_SCHEDULE_HELP} (default fora:3; magcache: needs weights: use bench)")
    plan.add_argument("--contexts", type=_positive, default=None,
                      help="cache contexts per generation, each one cache state (default: 2 for pipelines with "
                      "classifier-free guidance, 1 for FLUX.1-dev)")
    search = sub.add_parser("search", help="search a static schedule for a FLOP budget (fxcache.search)",
                            description="Search a (step x unit) table and its forecast order that keeps the final "
                            "output closest to the uncached run (SQNR on the calibration seeds) within a FLOP "
                            "budget; write it as JSON, usable as bench --schedule FILE.json and "
                            "fxcache.compile(model, fxcache.SearchResult.load(FILE)).")
    pipeline_or_model(search, "searched")
    budget = search.add_mutually_exclusive_group(required=True)
    budget.add_argument("--speedup", type=float, help="FLOP-ideal speed-up over the generation, e.g. 2.5")
    budget.add_argument("--flops", type=float, help="fraction of the uncached generation's FLOPs, e.g. 0.4")
    common(search)
    search.add_argument("--samples", type=_positive, default=8, help="samples per calibration generation (default 8)")
    search.add_argument("--seeds", type=_seeds, default=(300, 301),
                        help="calibration seeds, comma-separated (default 300,301; judge on others)")
    search.add_argument("--method", choices=("greedy", "anneal", "evolve", "exhaustive"), default="anneal",
                        help="search method (default anneal)")
    search.add_argument("--iterations", type=_positive, default=60,
                        help="candidates per forecast order, anneal/evolve (default 60)")
    search.add_argument("--orders", type=_seeds, default=(0, 1, 2), help="forecast orders to try (default 0,1,2)")
    search.add_argument("--units", default="fora",
                        help="fora (attention/MLP sublayers, default), deepcache (a U-Net's skip branches and its "
                             "outermost layers), blocks, or unit kinds/names, comma-separated")
    search.add_argument("--checkpoint", default=None, help="JSON file of every evaluation: resumes a search")
    search.add_argument("--out", required=True, help="schedule file to write (.json); its folder must exist")
    return parser


# ------------------------------------------------------------------------ helpers
class _Ticking(DropIn):
    """Drop-in that advances a progress bar at every model call."""

    def __init__(self, model, bar):
        super().__init__(model)
        self._bar = bar

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self._bar.update(1)
        return out


def _generate(model, steps: int, samples: int, seed: int, labels, desc: str):
    from tqdm.auto import tqdm

    from .models import generate

    with tqdm(total=steps, desc=desc, unit="step", leave=False) as bar:
        return generate(_Ticking(model, bar), num_steps=steps, num_samples=samples, seed=seed, class_labels=labels)


def _load(name: str):
    from . import models

    if name not in models.available():
        raise CliError(
            f"the embedded model {name!r} is not in this installation (available: "
            f"{', '.join(models.available()) or 'none'}); train it with scripts/train_models.py {name}"
        )
    return models.load(name)


def _labels(name: str, samples: int):
    import torch

    return (torch.arange(samples) % 10) if name == "dit" else None


def _compile_warning(backend: str | None) -> None:
    if backend == "inductor":
        print(
            "note: --backend inductor compiles one graph per kind of step and the uncached baseline with "
            "torch.compile; on a CPU that takes a minute or more before anything is timed.",
            flush=True,
        )


#: kernel pseudo-filesystems: os.access lets root "write" there, but no file can be made
_PSEUDO_FILESYSTEMS = ("/proc", "/sys")


def _check_output(path: str, option: str, extensions: Sequence[str] | None = None) -> None:
    """Refuse, before any work, an output the command could not write at the end: its
    folder missing (never created: the same rule for every command and option) or not
    a folder, not writable (a file is created and removed there to make sure: os.access
    says yes to root on /proc), on a kernel pseudo-filesystem, the path a folder or
    another non-regular file, or an extension outside ``extensions``."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CliError(f"{option} {path}: is a folder; give a file name inside it")
    if extensions is not None:
        ext = os.path.splitext(path)[1].lower()
        if ext not in extensions:
            raise CliError(
                f"{option} {path}: cannot write {repr(ext) if ext else 'a file without extension'}; "
                f"use {extensions[0]}" + (f" (or {', '.join(extensions[1:])})" if len(extensions) > 1 else "")
            )
    if not os.path.exists(parent):
        ancestor = parent
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            raise CliError(f"{option} {path}: {ancestor} is not a folder; choose a path inside an existing folder")
        raise CliError(f"{option} {path}: the folder {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.path.isdir(parent):
        raise CliError(f"{option} {path}: {parent} is not a folder; choose a path inside an existing folder")
    if os.path.exists(path) and not os.path.isfile(path):
        # the file is written beside its name and renamed over it, which would replace a device node
        raise CliError(f"{option} {path}: is not a regular file (a device, FIFO or socket); give a file path")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise CliError(f"{option} {path}: cannot write there (permission denied); choose a writable folder")
    real = os.path.realpath(parent)
    pseudo = next((p for p in _PSEUDO_FILESYSTEMS if real == p or real.startswith(p + os.sep)), None)
    if pseudo is not None:
        raise CliError(f"{option} {path}: cannot write there ({pseudo} is the kernel's pseudo-filesystem, not a place "
                       f"for files); choose a folder on a real filesystem")
    # os.access says yes to root almost anywhere: try it, with a file created and removed
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".fxcache-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise CliError(f"{option} {path}: cannot write there ({exc.strerror or exc}); choose a writable folder") from None


def _check_schedule_fits(model, schedule, steps: int, labels=None):
    """Lower ``schedule`` on the units of ``model`` (one capture of a one-sample call),
    so that a schedule the model cannot follow (a DeepCache branch it does not have) is
    refused before any generation runs, not after the uncached one. Returns its Mask."""
    import torch

    from .api import units as find_units
    from .schedules import ModelFacts, lower

    cfg = model.config
    x = torch.zeros(1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    kwargs = {} if labels is None else {"class_labels": labels[:1]}
    with torch.no_grad():
        unitset = find_units(model, x, torch.zeros(1, dtype=torch.long), **kwargs)
    return lower(schedule, unitset.infos(), steps, model=ModelFacts.of(unitset, type(model).__name__))


def _forecast_order(spec: ScheduleSpec | None, given: int | None) -> int:
    """The forecast order of a run: the one ``taylorseer:N:ORDER`` sets, else ``--forecast``
    (default 0); a ``--forecast`` that says otherwise than the schedule is a CliError."""
    if spec is None or spec.forecast is None:
        return given or 0
    if given is not None and given != spec.forecast:
        raise CliError(f"--schedule {spec.text} forecasts with order {spec.forecast} and --forecast {given} says "
                       f"otherwise; leave out --forecast (TaylorSeer's order is the schedule's last number: "
                       f"taylorseer:INTERVAL:ORDER)")
    return spec.forecast


def _schedule_for(spec: ScheduleSpec, steps: int, lower_on_model: Callable, model=None, run=None):
    """The schedule ``spec`` runs on one model. ``lower_on_model(schedule)`` lowers or plans
    a schedule on that model (anything with ``.units``), raising what it refuses.

    taylorseer: TaylorSeer's steps (diffusers' rule, as ``taylorseer_schedule`` in
    bench/table5_adaptive.py runs it: steps ``0..warmup-1``, then every step with
    ``(s - warmup - 1) % N == 0``) as a Mask over the units FORA(N) caches on this model.
    magcache: MagCache's lowering tried first (a model without transformer blocks is
    refused before any generation), then its magnitude ratios calibrated with
    ``run(m, seed)`` on one generation (seed 1; bench measures on seed 0), the first 20%
    of the steps computed."""
    from .schedules import Mask

    if spec.warmup:
        n, w = spec.schedule.interval, spec.warmup
        names = lower_on_model(spec.schedule).units
        computed = [s < w or (s - w - 1) % n == 0 for s in range(steps)]
        nth = {1: "", 2: "2nd ", 3: "3rd "}.get(n, f"{n}th ")
        print(f"{spec.text}: TaylorSeer's steps on the {len(names)} units FORA({n}) caches: steps 0-{w - 1} computed "
              f"(warm-up), then every {nth}step ({sum(computed)} of {steps} computed); cache reads forecast with order "
              f"{spec.forecast}", flush=True)
        return Mask([(c,) * len(names) for c in computed], names)
    if spec.calibrate:
        from .calibrate.fit import fit_magcache, profile_magnitudes
        from .runtime.voice import fmt_seconds

        lower_on_model(dataclasses.replace(spec.schedule, ratios=(1.0,) * steps))  # the model can follow it
        print(f"{spec.text}: calibrating MagCache's magnitude ratios on one generation of {steps} steps "
              f"(seed {_CALIBRATION_SEED}) ...", end="", flush=True)
        import torch

        t0 = time.perf_counter()
        with torch.no_grad():
            ratios = fit_magcache(profile_magnitudes(model, run, seeds=(_CALIBRATION_SEED,)))
        print(f" calibrated in {fmt_seconds(time.perf_counter() - t0)}", flush=True)
        first = max(1, int(_MAGCACHE_RETENTION * len(ratios)))
        return dataclasses.replace(spec.schedule, ratios=ratios, first_steps=first)
    return spec.schedule


def _plot_extensions() -> tuple[str, ...]:
    """What ``Profile.plot`` can save, or a CliError when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CliError("--plot needs matplotlib, which is not installed; install it (pip install matplotlib) "
                       "or leave out --plot") from None
    types = FigureCanvasAgg(Figure()).get_supported_filetypes()
    first = [t for t in ("png", "pdf", "svg") if t in types]
    return tuple(f".{t}" for t in first + sorted(set(types) - set(first)))


# ---------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    import torch

    from .evaluation.render import image_extensions

    _check_output(args.out, "--out", image_extensions())

    from . import compile as fx_compile
    from .evaluation.metrics import psnr, sqnr
    from .evaluation.render import save_side_by_side
    from .evaluation.speed import measure_speedup
    from .models import generate
    from .schedules import DeepCache

    backend = _backend(args.backend)
    schedule = DeepCache(interval=args.interval, branch=args.branch)
    model = _load("unet")
    _compile_warning(backend)
    torch.set_num_threads(args.threads)
    print(f"fxcache demo: embedded U-Net ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"16x16 digits), DDIM {args.steps} steps, {args.samples} samples, seed {args.seed}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    try:
        cached = fx_compile(model, schedule, backend=backend, forecast=args.forecast or 0)
        _check_schedule_fits(model, schedule, args.steps)  # before any generation: --branch 9 fails here
        with torch.no_grad():
            t0 = time.perf_counter()
            ref = _generate(model, args.steps, args.samples, args.seed, None, "uncached")
            t_ref = time.perf_counter() - t0
            t0 = time.perf_counter()
            with cached.generation():
                out = _generate(cached, args.steps, args.samples, args.seed, None, f"cached {schedule.interval}:{schedule.branch}")
            t_first = time.perf_counter() - t0
    except Exception as exc:
        if _is_fxcache_error(exc):
            raise CliError(str(exc)) from exc
        raise
    what = "capture + rewrite" + (f" + compile with {backend}" if backend else "")
    print(f"uncached generation: {t_ref:.2f} s; first cached generation ({what}): {t_first:.2f} s\n")
    print(cached.plan.explain(steps=args.steps))
    s, p = sqnr(ref, out), psnr(ref, out)
    print(f"\nfidelity of the cached samples to the uncached ones (same noise): SQNR {s:.2f} dB, PSNR {p:.2f} dB "
          f"(max |diff| {float((ref - out).abs().max()):.3f} on [-1, 1])")
    report = None
    if not args.no_bench:
        print("\nmeasuring speed (uncached and cached generations interleaved; ratios only) ...", flush=True)

        def run(m):
            return generate(m, num_steps=args.steps, num_samples=args.samples, seed=args.seed)

        report = measure_speedup(cached, None, run, repeats=args.repeats, threads=args.threads, progress=True)
        print()
        print(report)
    footer = f"SQNR {s:.1f} dB, PSNR {p:.1f} dB"
    if report is not None:
        footer += (f"; speed-up: FLOP-ideal {report.ideal_speedup:.2f}x, predicted {report.predicted_speedup:.2f}x, "
                   f"measured {report.measured_speedup:.2f}x")
    diff = ((ref - out).abs() * 4 - 1).clamp(-1, 1)  # |difference| x 4, black = 0
    save_side_by_side(
        args.out,
        [ref, out, diff],
        [f"uncached\nDDIM {args.steps} steps, seed {args.seed}",
         f"DeepCache(interval={schedule.interval}, branch={schedule.branch})\nsame noise",
         "|uncached - cached| x 4\n(black: equal)"],
        footer,
    )
    print(f"\nwrote {args.out} (left: uncached, middle: cached, right: |difference| x 4)")
    return 0


def cmd_profile(args) -> int:
    _check_output(args.out, "--out", (".safetensors",))
    if args.plot:
        _check_output(args.plot, "--plot", _plot_extensions())

    import torch

    from .calibrate.profiler import profile

    units = _unit_selector(args.units) if args.units else None
    model, run, what = _model_and_run(args)
    torch.set_num_threads(args.threads)
    print(f"profiling {what}: {len(args.seeds)} generations of {args.steps} steps, {args.samples} samples",
          flush=True)
    try:
        with torch.no_grad():
            prof = profile(model, run, units=units, seeds=args.seeds, progress=True)
    except Exception as exc:
        if _is_fxcache_error(exc):
            raise CliError(str(exc)) from exc
        raise
    saved = prof.save(args.out)
    print(f"{prof!r}\nwrote {saved or args.out}")
    if args.plot:
        prof.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_search(args) -> int:
    _check_output(args.out, "--out", (".json",))
    if args.checkpoint:
        _check_output(args.checkpoint, "--checkpoint", (".json",))
    if any(o not in (0, 1, 2) for o in args.orders):
        raise CliError(f"--orders {','.join(map(str, args.orders))}: forecast orders are 0, 1 or 2")
    import torch

    from .calibrate.search import search

    model, run, what = _model_and_run(args)
    torch.set_num_threads(args.threads)
    budget = f"{args.speedup:g}x FLOP-ideal" if args.speedup is not None else f"{args.flops:g} of the FLOPs"
    print(f"searching {what}: {budget}, {args.method}, seeds {','.join(map(str, args.seeds))}, {args.steps} steps, "
          f"{args.samples} samples, forecast orders {','.join(map(str, args.orders))}", flush=True)
    try:
        found = search(model, run, speedup=args.speedup, flops=args.flops, seeds=args.seeds,
                       units=_unit_selector(args.units), forecast=args.orders, method=args.method,
                       iterations=args.iterations, checkpoint=args.checkpoint, progress=True)
    except ValueError as exc:  # ScheduleError is one
        raise CliError(str(exc)) from exc
    except Exception as exc:
        if _is_fxcache_error(exc):
            raise CliError(str(exc)) from exc
        raise
    found.save(args.out)
    print(f"{found}\nwrote {args.out} (fxcache bench --schedule {args.out} measures it)")
    return 0


def _unit_selector(text: str):
    """``--units a,b``: one kind or name as a string, several as a tuple (select_units' forms)."""
    parts = [u.strip() for u in text.split(",") if u.strip()]
    return parts[0] if len(parts) == 1 else tuple(parts)


def _model_and_run(args) -> tuple[Any, Callable, str]:
    """The denoiser (``--pipeline``'s or the embedded ``--model``), ``run(m, seed)`` of one
    generation with ``m`` in its place, and how to name it in a message."""
    if args.pipeline is not None:
        p = _open_pipeline(args)
        return p.model, p.run, p.what
    model, run, _ = _embedded(args)
    return model, run, args.model


def _embedded(args) -> tuple[Any, Callable, Any]:
    """An embedded model, ``run(m, seed=0)`` (one generation of ``args.steps`` steps and
    ``args.samples`` samples with ``m`` as the model) and its class labels (digits 0-9 for
    the DiT, None for the U-Net)."""
    from .models import generate

    model = _load(args.model)
    labels = _labels(args.model, args.samples)

    def run(m, seed=0):
        return generate(m, num_steps=args.steps, num_samples=args.samples, seed=seed, class_labels=labels)

    return model, run, labels


def cmd_bench(args) -> int:
    if args.mode is not None and args.backend != "inductor":
        raise CliError(f"--mode {args.mode} is a torch.compile mode of inductor; add --backend inductor "
                       f"(with --backend {args.backend} it would be ignored)")
    if args.json:
        _check_output(args.json, "--json")
    forecast = _forecast_order(args.schedule, args.forecast)

    from .api import plan_for
    from .schedules import DeepCache

    if args.pipeline is not None:
        if args.schedule is None:
            raise CliError("--pipeline needs --schedule (e.g. deepcache:3:0 for a U-Net, fora:2 or fbc:0.1 for a "
                           "transformer)")
        p = _open_pipeline(args)
        print(f"fxcache bench: {p.what}, {args.steps} steps, {args.samples} sample(s)", flush=True)
        return _measure_and_report(args, p.model, args.schedule, forecast, p.run,
                                   lambda s: plan_for(p.pipe, s, **p.call))
    spec = args.schedule or parse_spec(_DEFAULT_SCHEDULE[args.model])
    if args.model == "dit" and isinstance(spec.schedule, DeepCache):
        raise CliError("DeepCache caches behind a U-Net skip connection and the DiT has none; use --schedule fora:N")
    if args.model == "unet" and (spec.warmup or spec.calibrate):
        raise CliError(f"{spec.kind}: reuses the transformer blocks and the embedded U-Net has none; use --schedule "
                       f"deepcache:INTERVAL[:BRANCH] or adaptive-deepcache:THRESHOLD[:BRANCH]")
    model, run, labels = _embedded(args)
    return _measure_and_report(args, model, spec, forecast, run,
                               lambda s: _check_schedule_fits(model, s, args.steps, labels))


def _measure_and_report(args, model, spec: ScheduleSpec, forecast: int, run, lower_on_model) -> int:
    """``fxcache bench``'s measurement and output, for an embedded model or a pipeline's denoiser."""
    from .evaluation.speed import measure_speedup

    backend = _backend(args.backend)
    _compile_warning(backend)
    try:
        schedule = _schedule_for(spec, args.steps, lower_on_model, model, run)
        if forecast:  # a built CachedModel carries the option; measure_speedup uses it as it is
            from . import compile as fx_compile

            model, schedule = fx_compile(model, schedule, backend=backend, mode=args.mode, forecast=forecast), None
        report = measure_speedup(model, schedule, run, backend=backend, mode=args.mode, repeats=args.repeats,
                                 threads=args.threads, progress=True)
    except Exception as exc:
        if _is_fxcache_error(exc):
            raise CliError(str(exc)) from exc
        raise
    report.schedule = f"{spec.text} = {report.schedule}" + (f" + forecast order {forecast}" if forecast else "")
    print(report)
    if args.json:
        from .artefacts.store import write_text_atomic

        write_text_atomic(args.json, json.dumps(report.to_dict(), indent=2))  # a failure leaves the old file
        print(f"wrote {args.json}")
    return 0


def _pipeline_call(pipe, args) -> dict:
    """Keyword arguments of one generation of ``pipe``: ``args.samples`` samples, ``args.steps``
    steps, a fixed generator, latents out where the pipeline allows (the decoder is not what
    is measured, and both arms would pay it)."""
    import inspect

    import torch

    params = inspect.signature(type(pipe).__call__).parameters
    call = {"num_inference_steps": args.steps, "generator": torch.Generator().manual_seed(0)}
    if "prompt" in params:
        call["prompt"] = args.prompt
        if "num_images_per_prompt" in params:
            call["num_images_per_prompt"] = args.samples
        elif "num_videos_per_prompt" in params:
            call["num_videos_per_prompt"] = args.samples
    elif "class_labels" in params:
        call["class_labels"] = list(range(args.samples))
    elif "batch_size" in params:
        call["batch_size"] = args.samples
    if "output_type" in params:
        call["output_type"] = "latent" if "prompt" in params or "class_labels" in params else "np"
    return call


class _Pipeline(NamedTuple):
    """A saved pipeline opened for ``bench`` and ``profile``: ``run(m, seed=0)`` is one
    generation (``call``, the generator seeded) with ``m`` in place of its denoiser."""

    pipe: Any
    name: str  # the denoiser's attribute
    model: Any  # the denoiser
    call: dict
    run: Callable
    what: str  # "DDPMPipeline from DIR, denoiser 'unet' (UNet2DModel)"


def _open_pipeline(args) -> _Pipeline:
    """``--pipeline DIR``: a folder without ``model_index.json`` is a one-line CliError,
    before anything is loaded."""
    if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        raise CliError(f"--pipeline {args.pipeline}: not a diffusers pipeline folder (no model_index.json); save "
                       f"one with pipe.save_pretrained(folder)")
    from diffusers import DiffusionPipeline

    from .api import _denoisers

    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    name = _denoisers(pipe, None)[0]
    model = getattr(pipe, name)
    call = _pipeline_call(pipe, args)

    def run(m, seed=0):
        setattr(pipe, name, m)
        try:
            call["generator"].manual_seed(seed)
            return pipe(**call)
        finally:
            setattr(pipe, name, model)

    what = f"{type(pipe).__name__} from {args.pipeline}, denoiser '{name}' ({type(model).__name__})"
    return _Pipeline(pipe, name, model, call, run, what)


def cmd_plan(args) -> int:
    from . import configs
    from .plan import _fmt_bytes

    spec = args.schedule or parse_spec("fora:3")
    m = configs.info(args.config)
    if spec.calibrate:
        raise CliError(f"--schedule {spec.text}: MagCache needs magnitude ratios calibrated on the model's weights, and "
                       f"fxcache plan builds {m.label} without weights (meta device); measure it on a saved pipeline "
                       f"with fxcache bench --pipeline DIR --schedule {spec.text}")
    steps = args.steps or m.steps
    contexts = args.contexts or m.contexts
    try:
        height, width, frames, _ = configs.resolve_size(m.name, args.height, args.width, args.frames, args.batch)
        model = configs.build(m.name)
        size = dict(height=height, width=width, num_frames=frames, num_steps=steps, batch=args.batch, model=model)
        schedule = _schedule_for(spec, steps, lambda s: configs.plan_config(m.name, s, **size))
        plan = configs.plan_config(m.name, schedule, forecast=spec.forecast or 0, **size)
    except Exception as exc:
        if _is_fxcache_error(exc):
            raise CliError(str(exc)) from exc
        raise
    clip = f"{width}x{height}" + (f", {frames} frames" if frames else "")
    print(f"{m.label} ({m.repo}), {str(m.dtype).replace('torch.', '')}, {clip}, batch {args.batch}, {steps} steps")
    print(plan.explain(contexts=contexts))
    speedup = configs.flop_speedup(plan, steps)
    figure = (f"FLOP-ideal speed-up {speedup:.2f}x over {steps} steps" if plan.adaptive is None else
              "FLOP-ideal speed-up: decided at run time (adaptive); a reused step costs "
              f"{plan.step_kinds[1].flops / plan.full_flops:.1%} of a full one")
    print(f"summary: {figure}; cache {_fmt_bytes(plan.cache_bytes)} per cache state, "
          f"{_fmt_bytes(plan.total_cache_bytes(contexts))} total for {contexts} cache context"
          f"{'s' if contexts != 1 else ''}")
    return 0


def _is_fxcache_error(exc: BaseException) -> bool:
    from .errors import FxcacheError

    return isinstance(exc, FxcacheError)


_COMMANDS = {"demo": cmd_demo, "profile": cmd_profile, "bench": cmd_bench, "plan": cmd_plan, "search": cmd_search}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fxcache`` and ``python -m fxcache``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
    import torch

    threads = torch.get_num_threads()  # commands set their own; put it back for in-process callers
    try:
        return _COMMANDS[args.command](args)
    except CliError as exc:
        print(f"fxcache {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
