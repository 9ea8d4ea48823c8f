#!/usr/bin/env bash
# The README's first command. Sets everything up (scripts/setup.sh: creates .venv and
# installs fxcache) and runs the demo: the embedded trained U-Net generates 16 digits
# uncached and with DeepCache; prints the plan, SQNR/PSNR and the three speed figures;
# writes demo.png (uncached | cached | difference). Extra arguments go to `fxcache demo`,
# e.g.  bash scripts/demo.sh --steps 50 --interval 5 --out digits.png
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fxcache demo "$@"
