#!/usr/bin/env bash
# Run diffusers' own fast pipeline tests with and without fxcache on every pipeline's
# denoiser, and write a Markdown table: per pipeline, tests passing without fxcache, with
# it, and refused (fxcache raised an FxcacheError and the plugin fell back), plus every
# test that passes without fxcache and fails with it, with its one-line error.
#
#   bash scripts/diffusers_suite.sh [--schedule full|real] [--pipelines ddpm,ddim,dit,...]
#                                   [--out results.md] [--files main|all] [--timeout SECONDS]
#                                   [--test-timeout SECONDS] [-k EXPR]
#
# How it works: each pipeline's tests run twice with pytest, once plain ("off") and once
# with scripts/diffusers_suite/fxcache_suite_plugin.py, which calls
# `fxcache.enable(pipe, schedule, backend=None)` on every pipeline right after it is
# constructed (caching attached to the denoiser in place; see the plugin's docstring);
# scripts/diffusers_suite/summarize.py compares the two junit reports.
#
# --schedule full (default): a compute-everything plan (FORA(1) for transformers,
#   DeepCache(1, branch 0) for U-Nets, else Mask.full of the model's units); every cached
#   denoiser call is also checked bit for bit against the plain model's class forward.
# --schedule real: FORA(2) / DeepCache(2, branch 0); only "no fxcache error" is asked.
# --pipelines: any of ddpm ddim dit pixart_alpha pixart_sigma sd sdxl sd3 flux cogvideox
#   wan sana ltx qwenimage (default: all of them, in that order).
# --files main: only each pipeline's main (text-to-image/video) test file; all (default):
#   every test file in tests/pipelines/<name>/ except the ONNX ones.
# --timeout: per pipeline and run (default 1800 s); --test-timeout: per test (default 300 s).
# --out: the report (default ./diffusers_suite_<schedule>.md), rewritten after each pipeline.
#
# Environment:
#   DIFFUSERS_TESTS=DIR      a diffusers checkout (or its tests/ folder) to take the tests from
#   FXCACHE_SUITE_CACHE=DIR  tests, test dependencies, Hub stand-ins and results
#                            (default ~/.cache/fxcache-diffusers-suite)
#   FXCACHE_SUITE_RESULTS=DIR  where the junit XML, logs and plugin events go
#                            (default $FXCACHE_SUITE_CACHE/results/<schedule>-<date>)
#   FXCACHE_SRC=DIR          test the fxcache package in DIR/fxcache instead of the installed
#                            one (e.g. a `git archive HEAD fxcache` export while the work tree
#                            is being edited); unset: the fxcache .venv imports (this checkout)
#   PYTHON                   the interpreter (default .venv/bin/python)
#   FXCACHE_SUITE_VERIFY=0|1 the bit-for-bit check (default 1 for full, 0 for real)
#
# Example (the run in scripts/diffusers_suite/RESULTS.md; about 30 min on 2 cores):
#
#   DIFFUSERS_TESTS=/path/to/diffusers FXCACHE_SUITE_CACHE=/tmp/fxsuite \
#     bash scripts/diffusers_suite.sh --schedule full --files main --out full.md
#
# Output per pipeline in the results folder: <p>.off.xml / <p>.<schedule>.xml (junit),
# <p>.<run>.log (pytest output), <p>.<run>.status (rc or timeout),
# <p>.<schedule>.events.jsonl (per test: pipelines cached, cached/verified/hooked calls,
# refusals, schedule switches, mismatches).
#
# The tests (diffusers' tests/ folder, never copied into this repository) come from, in
# order: $DIFFUSERS_TESTS, the cache, the sdist of the installed diffusers version on PyPI
# (if it ships tests/pipelines: 0.42.1 does not), a shallow git clone of the matching tag
# from GitHub (where reachable). Test dependencies (parameterized, pytest-timeout,
# requests-mock) are installed from PyPI into the cache, not into .venv.
# The Hub repositories the tests load are replaced by offline stand-ins
# (scripts/diffusers_suite/hub_standins.py), so tests that compare hard-coded pixel
# slices fail with and without fxcache alike; the baseline is "passes without fxcache".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
HERE="$ROOT/scripts/diffusers_suite"
CACHE="${FXCACHE_SUITE_CACHE:-$HOME/.cache/fxcache-diffusers-suite}"

SCHEDULE=full
PIPELINES="ddpm,ddim,dit,pixart_alpha,pixart_sigma,sd,sdxl,sd3,flux,cogvideox,wan,sana,ltx,qwenimage"
OUT=""
FILES=all
TIMEOUT=1800
TEST_TIMEOUT=300
KEXPR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --schedule) SCHEDULE="$2"; shift 2 ;;
    --pipelines) PIPELINES="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --files) FILES="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --test-timeout) TEST_TIMEOUT="$2"; shift 2 ;;
    -k) KEXPR="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "diffusers_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$SCHEDULE" in full|real) ;; *) echo "--schedule must be full or real" >&2; exit 2 ;; esac
case "$FILES" in main|all) ;; *) echo "--files must be main or all" >&2; exit 2 ;; esac
[[ -x "$PY" ]] || { echo "no Python at $PY (run scripts/setup.sh, or set PYTHON)" >&2; exit 2; }
OUT="${OUT:-$PWD/diffusers_suite_$SCHEDULE.md}"
[[ -d "$(dirname "$OUT")" ]] || { echo "--out: folder $(dirname "$OUT") does not exist" >&2; exit 2; }

# pipeline name -> test folder and main test file
declare -A DIR=( [ddpm]=ddpm [ddim]=ddim [dit]=dit [pixart_alpha]=pixart_alpha [pixart_sigma]=pixart_sigma
  [sd]=stable_diffusion [sdxl]=stable_diffusion_xl [sd3]=stable_diffusion_3 [flux]=flux [cogvideox]=cogvideo
  [wan]=wan [sana]=sana [ltx]=ltx [qwenimage]=qwenimage )
declare -A MAIN=( [ddpm]=test_ddpm.py [ddim]=test_ddim.py [dit]=test_dit.py [pixart_alpha]=test_pixart.py
  [pixart_sigma]=test_pixart.py [sd]=test_stable_diffusion.py [sdxl]=test_stable_diffusion_xl.py
  [sd3]=test_pipeline_stable_diffusion_3.py [flux]=test_pipeline_flux.py [cogvideox]=test_cogvideox.py
  [wan]=test_wan.py [sana]=test_sana.py [ltx]=test_ltx.py [qwenimage]=test_qwenimage.py )
IFS=, read -r -a PIPES <<< "$PIPELINES"
for p in "${PIPES[@]}"; do
  [[ -n "${DIR[$p]:-}" ]] || { echo "unknown pipeline '$p' (known: ${!DIR[*]})" >&2; exit 2; }
done

mkdir -p "$CACHE"
VERSION="$("$PY" -c 'import diffusers; print(diffusers.__version__)')"

# ------------------------------------------------------------------ the tests
TESTROOT="$CACHE/tests-$VERSION"       # holds tests/ only (no src/: the installed diffusers is tested)
stage_tests() {  # $1: a folder holding tests/pipelines, copied to $TESTROOT
  rm -rf "$TESTROOT.tmp" && mkdir -p "$TESTROOT.tmp"
  cp -r "$1/tests" "$TESTROOT.tmp/tests"
  rm -rf "$TESTROOT" && mv "$TESTROOT.tmp" "$TESTROOT"
}
if [[ -n "${DIFFUSERS_TESTS:-}" ]]; then
  src="$DIFFUSERS_TESTS"; [[ -d "$src/tests/pipelines" ]] || src="$(dirname "$src")"
  [[ -d "$src/tests/pipelines" ]] || { echo "DIFFUSERS_TESTS=$DIFFUSERS_TESTS holds no tests/pipelines" >&2; exit 2; }
  TESTROOT="$CACHE/tests-from-env"; stage_tests "$src"
  echo "tests: from DIFFUSERS_TESTS=$DIFFUSERS_TESTS"
elif [[ -d "$TESTROOT/tests/pipelines" ]]; then
  echo "tests: cached in $TESTROOT"
else
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  got=""
  if "$PY" -m pip download --quiet --no-deps --no-binary :all: "diffusers==$VERSION" -d "$tmp/sdist" >/dev/null 2>&1; then
    tar -xzf "$tmp"/sdist/diffusers-*.tar.gz -C "$tmp"
    if [[ -d "$tmp/diffusers-$VERSION/tests/pipelines" ]]; then stage_tests "$tmp/diffusers-$VERSION"; got="sdist"; fi
  fi
  if [[ -z "$got" ]] && command -v git >/dev/null &&
     timeout 300 git clone --quiet --depth 1 --branch "v$VERSION" https://github.com/huggingface/diffusers "$tmp/git" 2>/dev/null; then
    stage_tests "$tmp/git"; got="git tag v$VERSION"
  fi
  if [[ -z "$got" ]]; then
    echo "cannot obtain diffusers' tests for $VERSION: the PyPI sdist ships no tests/pipelines and GitHub" >&2
    echo "is not reachable. Point DIFFUSERS_TESTS at a diffusers checkout (or its tests/ folder)." >&2
    exit 2
  fi
  echo "tests: $got -> $TESTROOT"
fi

# ------------------------------------------------------------------ dependencies, stand-ins
DEPS="$CACHE/deps"
if ! PYTHONPATH="$DEPS" "$PY" -c 'import parameterized, pytest_timeout, requests_mock' 2>/dev/null; then
  "$PY" -m pip install --quiet --upgrade --no-deps --target "$DEPS" parameterized pytest-timeout requests-mock 2>&1 |
    grep -v '^WARNING: Location' || true
fi
HUB="$CACHE/hub"
"$PY" "$HERE/hub_standins.py" "$HUB" >/dev/null 2>&1 || "$PY" "$HERE/hub_standins.py" "$HUB"

export HF_HUB_CACHE="$HUB" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export PYTHONPATH="$DEPS:$HERE${PYTHONPATH:+:$PYTHONPATH}"
if [[ -n "${FXCACHE_SRC:-}" ]]; then   # test another fxcache tree (a folder holding fxcache/)
  [[ -f "$FXCACHE_SRC/fxcache/__init__.py" ]] || { echo "FXCACHE_SRC=$FXCACHE_SRC holds no fxcache/" >&2; exit 2; }
  export PYTHONPATH="$FXCACHE_SRC:$PYTHONPATH"
fi
FXCACHE_AT="$(cd "$TESTROOT" && "$PY" -c 'import fxcache, os; print(os.path.dirname(fxcache.__file__))')"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" RUN_SLOW=0 RUN_NIGHTLY=0 PYTHONHASHSEED=0
export FXCACHE_CHECK="${FXCACHE_CHECK:-1}"   # fxcache checks its graph contract after every pass

RESULTS="${FXCACHE_SUITE_RESULTS:-$CACHE/results/$SCHEDULE-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$RESULTS"
echo "diffusers $VERSION, fxcache from $FXCACHE_AT, schedule $SCHEDULE, files $FILES, results in $RESULTS"
echo "diffusers $VERSION; fxcache $FXCACHE_AT; schedule $SCHEDULE; files $FILES; tests $TESTROOT" > "$RESULTS/run.txt"

run_one() {  # $1 pipeline, $2 off|full|real
  local p="$1" run="$2" target
  if [[ "$FILES" == main ]]; then
    target=("tests/pipelines/${DIR[$p]}/${MAIN[$p]}")
  else
    target=("tests/pipelines/${DIR[$p]}" "--ignore-glob=*onnx*")
  fi
  rm -f "$RESULTS/$p.$run.events.jsonl"
  local args=(-m pytest -p no:cacheprovider -p fxcache_suite_plugin -q -rfE
              --timeout="$TEST_TIMEOUT" --junitxml="$RESULTS/$p.$run.xml" "${target[@]}")
  [[ -n "$KEXPR" ]] && args+=(-k "$KEXPR")
  local start=$SECONDS rc=0
  (cd "$TESTROOT" && FXCACHE_SUITE="$run" FXCACHE_SUITE_EVENTS="$RESULTS/$p.$run.events.jsonl" \
     timeout --kill-after=30 "$TIMEOUT" "$PY" "${args[@]}") > "$RESULTS/$p.$run.log" 2>&1 || rc=$?
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then echo "timeout" > "$RESULTS/$p.$run.status"
  else echo "rc=$rc" > "$RESULTS/$p.$run.status"; fi
  printf '  %-13s %-5s %4ss  %s  %s\n' "$p" "$run" "$((SECONDS - start))" "$(cat "$RESULTS/$p.$run.status")" \
    "$(tail -n 1 "$RESULTS/$p.$run.log")"
}

for p in "${PIPES[@]}"; do
  run_one "$p" off
  run_one "$p" "$SCHEDULE"
  "$PY" "$HERE/summarize.py" "$RESULTS" "$SCHEDULE" "${PIPES[@]}" > "$OUT"   # rewritten after each pipeline
done
echo "report: $OUT"
