#!/usr/bin/env bash
# GPU readiness in one command. Needs only the README's setup (bash scripts/setup.sh).
#
# With a CUDA GPU (what torch sees; the first device is used) it runs, in about 3-5
# minutes and never more than the budget (FXCACHE_GPU_CHECK_BUDGET_S, default 480 s):
#   1. the kernel tests natively: tests/test_kernels.py with TRITON_INTERPRET=0, the
#      Triton kernels on CUDA tensors against their PyTorch references;
#   2. the compile tests on CUDA: tests/test_compile.py -k test_cuda_ (inductor: 0 graph breaks,
#      0 recompiles in a second generation; mode="reduce-overhead": every step kind
#      recorded as a CUDA graph on the static cache buffers, replays equal the first run);
#   3. the speed ratios of DeepCache (tiny U-Net) and FORA (tiny DiT), eager vs inductor,
#      interleaved in one process, the models of step 2 (so inductor's and Triton's
#      caches are warm); printed, not asserted: models this small are launch-bound.
# Without CUDA it skips each of these, saying so in one line, after checking that the
# CUDA tests are still selected (the suite collects and skips them) and running step 3's
# script on the CPU, uncompiled; it exits 0, in about 20 s. CI runs it in that mode
# (scripts/test.sh, after the suite) so it cannot rot.
#
# Exit status: 0 when every check passed or was skipped for want of CUDA, 1 otherwise
# (a failing test, an exception, the budget exceeded, or a GPU that torch cannot use).
#   --cpu          CPU mode even if a GPU is visible (e.g. a CPU-only torch on a GPU host)
#   --require-gpu  fail instead of skipping when there is no usable CUDA device
set -uo pipefail
cd "$(dirname "$0")/.."

FORCE_CPU=0
REQUIRE_GPU=0
for arg in "$@"; do
  case "$arg" in
    --cpu) FORCE_CPU=1 ;;
    --require-gpu) REQUIRE_GPU=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "gpu_check: no .venv here: run bash scripts/setup.sh first" >&2
  exit 1
fi
BUDGET=${FXCACHE_GPU_CHECK_BUDGET_S:-480}
START=$SECONDS
PASSED=0
SKIPPED=0
FAILED=0

say() { printf 'gpu_check: %s\n' "$*"; }
pass() { PASSED=$((PASSED + 1)); say "PASS  $*"; }
skip() { SKIPPED=$((SKIPPED + 1)); say "SKIP  $*"; }
fail() { FAILED=$((FAILED + 1)); say "FAIL  $*"; }

# Runs "$@" with what is left of the budget; 124 when it ran out.
run_budgeted() {
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -le 5 ]; then
    say "the budget of ${BUDGET} s is spent"
    return 124
  fi
  timeout --kill-after=10 "$left" "$@"
}

# ------------------------------------------------------------------ what is here
GPU_SEEN=""
if command -v nvidia-smi >/dev/null 2>&1; then
  GPU_SEEN=$(nvidia-smi -L 2>/dev/null | head -n 1)
fi
if [ -n "$GPU_SEEN" ] || compgen -G '/dev/nvidia[0-9]*' >/dev/null || [ -e /dev/kfd ]; then
  # a GPU may be here: ask torch (importing it costs seconds, so only then)
  INFO=$("$PY" -c '
import torch
ok = torch.cuda.is_available() and torch.cuda.device_count() > 0
name = torch.cuda.get_device_name(0) if ok else "-"
print("cuda" if ok else "cpu", torch.__version__, torch.version.cuda, name, sep="|")
' 2>&1) || { say "FAIL  cannot import torch from .venv: $INFO"; exit 1; }
  IFS='|' read -r DEVICE TORCH_VERSION TORCH_CUDA GPU_NAME <<<"$INFO"
  GPU_SEEN=${GPU_SEEN:-a GPU device file}
else
  DEVICE=cpu
  TORCH_VERSION=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || echo "?")
  TORCH_CUDA=None
fi
WHY="no CUDA device"
if [ "$FORCE_CPU" = 1 ]; then
  DEVICE=cpu
  WHY="--cpu given"
elif [ "$DEVICE" = cpu ] && [ -n "$GPU_SEEN" ]; then
  fail "nvidia-smi sees a GPU ($GPU_SEEN) but torch $TORCH_VERSION (CUDA build: $TORCH_CUDA) cannot use it; install a CUDA build of torch into .venv, or pass --cpu"
  exit 1
fi
if [ "$DEVICE" = cpu ] && [ "$REQUIRE_GPU" = 1 ]; then
  fail "--require-gpu: no CUDA device usable by torch $TORCH_VERSION"
  exit 1
fi
if [ "$DEVICE" = cuda ]; then
  say "GPU mode: $GPU_NAME, torch $TORCH_VERSION (CUDA $TORCH_CUDA), budget ${BUDGET} s"
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # one GPU
else
  say "CPU mode ($WHY; torch $TORCH_VERSION): the checks that need CUDA are skipped"
fi

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rfEs)

# ------------------------------------------------------------------ 1. kernels, native
if [ "$DEVICE" = cuda ]; then
  if TRITON_INTERPRET=0 FXCACHE_REQUIRE_CUDA=1 run_budgeted "${PYTEST[@]}" tests/test_kernels.py; then
    pass "kernel tests, native Triton on CUDA (tests/test_kernels.py, TRITON_INTERPRET=0)"
  else
    fail "kernel tests, native Triton on CUDA (tests/test_kernels.py, TRITON_INTERPRET=0)"
  fi
else
  skip "kernel tests natively on CUDA: $WHY (scripts/test.sh runs them in Triton's interpreter)"
fi

# ------------------------------------------------------------------ 2. compile on CUDA
if [ "$DEVICE" = cuda ]; then
  if TRITON_INTERPRET=0 FXCACHE_REQUIRE_CUDA=1 run_budgeted "${PYTEST[@]}" tests/test_compile.py -k test_cuda_; then
    pass "compile tests on CUDA: 0 graph breaks, 0 recompiles, CUDA graphs with mode='reduce-overhead' (tests/test_compile.py -k test_cuda_)"
  else
    fail "compile tests on CUDA (tests/test_compile.py -k test_cuda_)"
  fi
else
  # the suite (scripts/test.sh) collects the CUDA tests and skips them; here only the
  # selection above is checked, so that a renamed test shows now, not on the first GPU run
  NCUDA=$(grep -c '^def test_cuda_' tests/test_compile.py)
  if [ "$NCUDA" -ge 3 ] && grep -q '^def test_dispatch_on_cuda' tests/test_kernels.py; then
    skip "compile tests and CUDA graphs on CUDA: $WHY ($NCUDA test functions selected by -k test_cuda_; the suite skips them)"
  else
    fail "tests/test_compile.py -k test_cuda_ selects $NCUDA tests (expected 3 or more) or test_dispatch_on_cuda is gone"
  fi
fi

# ------------------------------------------------------------------ 3. speed ratios
SPEED_PY=$(cat <<'EOF'
"""DeepCache (tiny U-Net) and FORA (tiny DiT): one generation's time, uncached and
cached, eager and compiled; rounds interleave the four arms (rotating their order),
ratios are medians of per-round ratios. Arguments: device backend rounds size families,
where backend "none" runs the "compiled" arms as eager FX graphs (a smoke test, no figures)."""
import statistics
import sys
import time

import torch
import torch.utils._pytree as pytree
from torch._dynamo.utils import counters

import fxcache
from fxcache.testing import tiny

device, backend, rounds, size, families = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
backend = None if backend == "none" else backend
if device == "cpu":
    torch.set_num_threads(1)  # tiny models: one thread beats two busy ones
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
CASES = [
    ("unet2d", fxcache.DeepCache(interval=2, branch=1), "skip_branch.0"),
    ("dit", fxcache.FORA(interval=2), "transformer_blocks.0"),
]
CASES = [c for c in CASES if c[0] in families.split(",")]
ARMS = ("eager uncached", "eager cached", "compiled uncached", "compiled cached")


def generation(model, calls):
    if isinstance(model, fxcache.CachedModel):
        model.reset()
    for args, kwargs in calls:
        model(*args, **kwargs)


def timed(model, calls):
    sync()
    t0 = time.perf_counter()
    generation(model, calls)
    sync()
    return time.perf_counter() - t0


for family, schedule, a_unit in CASES:
    torch._dynamo.reset()
    counters.clear()
    T = tiny(family, batch=2, size=size)
    model = T.model.to(device)
    to = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    calls = [pytree.tree_map(to, T.inputs(t)) for t in T.timesteps]  # moved once, not at every call
    full = fxcache.Mask([[True]], [a_unit], periodic=True)  # computes everything: the uncached graph
    arms = dict(zip(ARMS, (
        model,
        fxcache.compile(model, schedule, backend=None),
        fxcache.compile(model, full, backend=backend),
        fxcache.compile(model, schedule, backend=backend),
    )))
    with torch.no_grad():
        t0 = time.perf_counter()
        for m in arms.values():
            generation(m, calls)  # warm-up: compiles each kind of step once
        warm_s = time.perf_counter() - t0
        graphs = counters["stats"]["unique_graphs"]
        times = {n: [] for n in ARMS}
        with torch._dynamo.config.patch(error_on_recompile=True):
            for r in range(rounds):
                for n in ARMS[r % 4:] + ARMS[:r % 4]:
                    times[n].append(timed(arms[n], calls))
    breaks = sum(counters["graph_break"].values())
    if breaks:
        raise SystemExit(f"{family}: {breaks} graph breaks")

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    ms = {n: statistics.median(times[n]) * 1e3 for n in ARMS}
    name = type(schedule).__name__
    print(f"{family} + {schedule} on {device}, batch 2, {len(calls)} steps, {rounds} interleaved rounds; "
          f"warm-up incl. compile {warm_s:.1f} s, {graphs} compiled graphs, 0 graph breaks, 0 recompiles")
    for kind, label in (("eager", "eager"), ("compiled", str(backend))):
        print(f"  {label:9s} uncached {ms[kind + ' uncached']:8.2f} ms, cached {ms[kind + ' cached']:8.2f} ms: "
              f"{name} speed-up {ratio(kind + ' uncached', kind + ' cached'):.2f}x")
    print(f"  {backend} over eager: uncached {ratio('eager uncached', 'compiled uncached'):.2f}x, "
          f"cached {ratio('eager cached', 'compiled cached'):.2f}x; "
          f"FLOP-ideal {name} speed-up {arms['compiled cached'].plan.ideal_speedup:.2f}x")
EOF
)
if [ "$DEVICE" = cuda ]; then
  if TRITON_INTERPRET=0 run_budgeted "$PY" -c "$SPEED_PY" cuda inductor "${FXCACHE_GPU_CHECK_ROUNDS:-20}" 16 unet2d,dit; then
    pass "speed ratios eager vs inductor on CUDA (printed above)"
  else
    fail "speed ratios eager vs inductor on CUDA"
  fi
else
  # the same code on the CPU, the DiT only, the "compiled" arms left eager: checks that
  # the script runs and measures nothing (CPU figures: bench/compile_report.py)
  if OUT=$(TRITON_INTERPRET=1 run_budgeted "$PY" -c "$SPEED_PY" cpu none 1 16 dit 2>&1); then
    skip "speed ratios eager vs inductor on CUDA: $WHY (the script ran on the CPU without compiling)"
  else
    RC=$?
    printf '%s\n' "$OUT"
    fail "the speed-ratio script failed on the CPU (exit $RC; 124: out of time)"
  fi
fi

# not in the "N passed, N failed" form: CI reads the closing line of pytest above as the test count
say "summary: $PASSED steps ran and passed, $SKIPPED were skipped, $FAILED failed ($((SECONDS - START)) s)"
[ "$FAILED" = 0 ]
