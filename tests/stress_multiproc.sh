#!/usr/bin/env bash
# Repeat the multi-process tests under load to catch intermittent failures (a rank aborting at exit, a hang):
# two loops run at once, so the two launches compete for the CPUs; each test runs RUNS times in all.
# Not run by CI (minutes to hours on 2 cores).
#
#   tests/stress_multiproc.sh                  # RUNS=10 of every multiproc test except the distributed matrix
#   RUNS=4 tests/stress_multiproc.sh tests/test_pairwise.py -m multiproc      # any pytest selection
#
# Prints, per test, how many of its runs failed, and how many logs show an abort at exit.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-10}
SELECTION=("$@")
if [ ${#SELECTION[@]} -eq 0 ]; then
  SELECTION=(tests/test_d2o.py tests/test_disentangled.py tests/test_pairwise.py tests/test_multiproc.py -m multiproc)
fi
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/stress-multiproc.XXXX")
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

lane() {  # lane NUMBER: run the selection RUNS/2 times (the first lane takes the odd one)
  local runs=$(( RUNS / 2 + ($1 == 1 ? RUNS % 2 : 0) ))
  for i in $(seq 1 "$runs"); do
    .venv/bin/python -m pytest -q -rfE -p no:cacheprovider "${SELECTION[@]}" > "$LOGS/lane$1-run$i.log" 2>&1
  done
}

start=$(date +%s)
lane 1 & lane 2 & wait
echo "stress_multiproc: $RUNS runs of: ${SELECTION[*]} ($(( $(date +%s) - start )) s, logs in $LOGS)"
echo "summary line of each run:"; grep -h -E "[0-9]+ (passed|failed|errors?)" "$LOGS"/*.log | sed 's/^/  /'
echo "failures per test:"; (grep -h -E "^(FAILED|ERROR) " "$LOGS"/*.log | awk '{print $2}' | sort | uniq -c | sed 's/^/  /') || true
failed=0
for log in "$LOGS"/*.log; do
  if grep -q -E "[0-9]+ (failed|errors?)" "$log" || ! grep -q -E "[0-9]+ passed" "$log"; then failed=$((failed + 1)); fi
done
echo "failed runs: $failed of $RUNS"
echo "aborts at exit: $(grep -l -E "terminate called|SIGABRT|Signal 6" "$LOGS"/*.log | wc -l) logs"
