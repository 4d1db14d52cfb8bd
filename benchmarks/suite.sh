#!/usr/bin/env bash
# The runs behind the tables in benchmarks/README.md: every workload, every durability, on disk and in
# memory, with JSON and a chart per target. Takes about 15 minutes on 2 cores.
#   PYTHON=.venv/bin/python benchmarks/suite.sh [results-folder]
set -euo pipefail
results=${1:-bench-results}
mkdir -p "$results"
bench=("${PYTHON:-python3}" -m tensorsink bench --workload all --rounds 5)
"${bench[@]}" --out /tmp/tensorsink-suite --json "$results/disk.json" --plot "$results/disk.png" \
    | tee "$results/disk.txt"
rm -rf /tmp/tensorsink-suite
# fsync costs nothing in memory, so only durability none says anything there.
"${bench[@]}" --durability none --out /dev/shm/tensorsink-suite \
    --json "$results/memory.json" --plot "$results/memory.png" | tee "$results/memory.txt"
rm -rf /dev/shm/tensorsink-suite
