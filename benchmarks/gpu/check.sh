# The GPU check, one command on the GPU machine, from the repository root, with the wheel bundle of `make gpu-bundle`
# in .whl (or $BUNDLE; carried along: it is ignored by git):
#
#   bash benchmarks/gpu/check.sh            # install the bundle, run `pytest -m cuda`, measure (measure.py)
#   bash benchmarks/gpu/check.sh --smoke    # on a CPU: the measurements at toy sizes, in seconds (the suite runs it)
#
# Rebuild the bundle first (`make gpu-bundle`): it holds this package's wheel as the working tree was then. The tests
# and the measurements import the working tree's package; the wheel provides the plugin's start-up hook.
# Writes into $OUT (results/gpu by default): cuda_tests.log, measurements.json and measurements.md. BUDGET (seconds,
# 480 by default) bounds the whole run: the cuda tests get at most TEST_SECONDS (240) of it, the measurements the rest
# (each step bounded in measure.py, torch.compile last with what is left). Exits with the status of the cuda tests.
set -euo pipefail
OUT=${OUT:-results/gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if [[ "${1:-}" == "--smoke" ]]; then
    exec "$PYTHON" benchmarks/gpu/measure.py --smoke --out "$OUT"
fi

source benchmarks/gpu/install.sh "${BUNDLE:-.whl}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the working tree's package; the wheel gave the start-up hook
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
tests=0
timeout "${TEST_SECONDS:-240}" "$PYTHON" -m pytest -m cuda -q -n 4 --dist loadfile -p no:cacheprovider \
    > "$OUT/cuda_tests.log" 2>&1 || tests=$?
tail -n 25 "$OUT/cuda_tests.log"
"$PYTHON" benchmarks/gpu/measure.py --out "$OUT" --budget $(( ${BUDGET:-480} - SECONDS ))
exit $tests
