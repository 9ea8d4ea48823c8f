"""The ``fxcache`` command line: ``fxcache demo | profile | bench | plan``.

``fxcache demo``     generate digits with the embedded trained U-Net, uncached and with
                     DeepCache; print the plan, the fidelity (SQNR/PSNR) and the three
                     speed figures; write a side-by-side PNG.
``fxcache profile``  record how much each unit's output changes from step to step
                     (the input of ``fxcache.BlockCache``) and save it.
``fxcache bench``    print a :class:`fxcache.evaluation.speed.SpeedReport` for a model and
                     schedule.
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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from .dropin import DropIn

__all__ = ["main", "build_parser", "parse_schedule"]

MODELS = ("unet", "dit")
BACKENDS = ("none", "inductor", "aot_eager")
_SCHEDULE_HELP = ("deepcache:INTERVAL[:BRANCH] or adaptive-deepcache:THRESHOLD[:BRANCH] (U-Net), fora:INTERVAL, "
                  "fbc:THRESHOLD or teacache:THRESHOLD (DiT), e.g. deepcache:3:0, fora:2, fbc:0.15")
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
}


def parse_schedule(text: str):
    """``deepcache:3``, ``deepcache:3:0``, ``fora:2``, ``fbc:0.15``, ``teacache:0.2`` or
    ``adaptive-deepcache:0.05:1`` → a schedule config. A NaN or infinite value, a
    fraction where a whole number is needed, or a value the config refuses (a negative
    threshold, interval or branch) is an ``ArgumentTypeError`` naming the parameter."""
    import math

    from . import schedules

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
                    f"invalid schedule {text!r}: {param} = {token.strip()} is not allowed: intervals and branches are "
                    f"whole numbers")
            value = int(value)
        values[param] = value
    for param, _whole, _allowed, default in params[len(nums):]:
        values[param] = default
    try:
        return getattr(schedules, cls_name)(**values)
    except schedules.ScheduleError as exc:
        raise argparse.ArgumentTypeError(f"invalid schedule {text!r}: {exc}") from None


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
    sub = parser.add_subparsers(dest="command", metavar="{demo,profile,bench,plan}")
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
        p.add_argument("--forecast", type=int, choices=(0, 1, 2), default=0,
                       help="cache reads: 0 reuse (default), 1 or 2 TaylorSeer forecast of that order")

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
    prof.add_argument("--model", choices=MODELS, required=True, help="embedded trained model")
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
    which = bench.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", choices=MODELS, help="embedded trained model")
    which.add_argument("--pipeline", default=None, metavar="DIR",
                       help="a diffusers pipeline saved in a local folder (save_pretrained): its denoiser is "
                            "measured inside the pipeline's own loop")
    bench.add_argument("--prompt", default="a photo of a cat", help="with --pipeline: the prompt, if it takes one")
    bench.add_argument("--schedule", type=parse_schedule, default=None,
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
    plan.add_argument("--schedule", type=parse_schedule, default=None, help=f"{_SCHEDULE_HELP} (default fora:3)")
    plan.add_argument("--contexts", type=_positive, default=None,
                      help="cache contexts per generation, each one cache state (default: 2 for pipelines with "
                      "classifier-free guidance, 1 for FLUX.1-dev)")
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


def _check_schedule_fits(model, schedule, steps: int, labels=None) -> None:
    """Lower ``schedule`` on the units of ``model`` (one capture of a one-sample call),
    so that a schedule the model cannot follow (a DeepCache branch it does not have) is
    refused before any generation runs, not after the uncached one."""
    import torch

    from .api import units as find_units
    from .schedules import ModelFacts, lower

    cfg = model.config
    x = torch.zeros(1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    kwargs = {} if labels is None else {"class_labels": labels[:1]}
    with torch.no_grad():
        unitset = find_units(model, x, torch.zeros(1, dtype=torch.long), **kwargs)
    lower(schedule, unitset.infos(), steps, model=ModelFacts.of(unitset, type(model).__name__))


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
        cached = fx_compile(model, schedule, backend=backend, forecast=args.forecast)
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
    from .models import generate

    model = _load(args.model)
    torch.set_num_threads(args.threads)
    labels = _labels(args.model, args.samples)
    units = None
    if args.units:
        parts = [u.strip() for u in args.units.split(",") if u.strip()]
        units = parts[0] if len(parts) == 1 else tuple(parts)

    def run(m, seed):
        return generate(m, num_steps=args.steps, num_samples=args.samples, seed=seed, class_labels=labels)

    print(f"profiling {args.model}: {len(args.seeds)} generations of {args.steps} steps, {args.samples} samples",
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


def cmd_bench(args) -> int:
    if args.mode is not None and args.backend != "inductor":
        raise CliError(f"--mode {args.mode} is a torch.compile mode of inductor; add --backend inductor "
                       f"(with --backend {args.backend} it would be ignored)")
    if args.json:
        _check_output(args.json, "--json")

    from .evaluation.speed import measure_speedup
    from .models import generate
    from .schedules import DeepCache

    if args.pipeline is not None:
        return _bench_pipeline(args, measure_speedup)
    schedule = args.schedule or parse_schedule(_DEFAULT_SCHEDULE[args.model])
    if args.model == "dit" and isinstance(schedule, DeepCache):
        raise CliError("DeepCache caches behind a U-Net skip connection and the DiT has none; use --schedule fora:N")
    backend = _backend(args.backend)
    model = _load(args.model)
    _compile_warning(backend)
    labels = _labels(args.model, args.samples)

    def run(m):
        return generate(m, num_steps=args.steps, num_samples=args.samples, seed=0, class_labels=labels)

    return _measure_and_report(args, model, schedule, run, backend, measure_speedup)


def _measure_and_report(args, model, schedule, run, backend, measure_speedup) -> int:
    """``fxcache bench``'s measurement and output, for an embedded model or a pipeline's denoiser."""
    try:
        if args.forecast:  # a built CachedModel carries the option; measure_speedup uses it as it is
            from . import compile as fx_compile

            model, schedule = fx_compile(model, schedule, backend=backend, mode=args.mode, forecast=args.forecast), None
        report = measure_speedup(model, schedule, run, backend=backend, mode=args.mode, repeats=args.repeats,
                                 threads=args.threads, progress=True)
    except Exception as exc:
        if _is_fxcache_error(exc):
            raise CliError(str(exc)) from exc
        raise
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


def _bench_pipeline(args, measure_speedup) -> int:
    import os

    from .api import _denoisers

    if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        raise CliError(f"--pipeline {args.pipeline}: not a diffusers pipeline folder (no model_index.json); save "
                       f"one with pipe.save_pretrained(folder)")
    if args.schedule is None:
        raise CliError("--pipeline needs --schedule (e.g. deepcache:3:0 for a U-Net, fora:2 or fbc:0.1 for a "
                       "transformer)")
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    name = _denoisers(pipe, None)[0]
    model = getattr(pipe, name)
    backend = _backend(args.backend)
    _compile_warning(backend)
    call = _pipeline_call(pipe, args)
    print(f"fxcache bench: {type(pipe).__name__} from {args.pipeline}, denoiser '{name}' "
          f"({type(model).__name__}), {args.steps} steps, {args.samples} sample(s)", flush=True)

    def run(m):
        setattr(pipe, name, m)
        try:
            call["generator"].manual_seed(0)
            return pipe(**call)
        finally:
            setattr(pipe, name, model)

    return _measure_and_report(args, model, args.schedule, run, backend, measure_speedup)


def cmd_plan(args) -> int:
    from . import configs
    from .plan import _fmt_bytes

    schedule = args.schedule or parse_schedule("fora:3")
    m = configs.info(args.config)
    steps = args.steps or m.steps
    contexts = args.contexts or m.contexts
    try:
        height, width, frames, _ = configs.resolve_size(m.name, args.height, args.width, args.frames, args.batch)
        plan = configs.plan_config(m.name, schedule, height=height, width=width, num_frames=frames,
                                   num_steps=steps, batch=args.batch)
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


_COMMANDS = {"demo": cmd_demo, "profile": cmd_profile, "bench": cmd_bench, "plan": cmd_plan}


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
