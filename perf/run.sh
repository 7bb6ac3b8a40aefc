#!/bin/sh
# Builds sf-bench in release and runs the default clone-local scenario,
# writing its JSON lines to perf/results/clone-local.jsonl (progress on stderr).
# Extra arguments go to the scenario, e.g. `perf/run.sh --clones 8 --runs 9`.
# Needs /dev/kvm (run as root or as a member of the kvm group).
set -eu
cd "$(dirname "$0")/.."
mkdir -p perf/results
out=perf/results/clone-local.jsonl
# Write to a temporary file first, so a failed run does not clobber the last results.
cargo run --release -p snowflock-perf --bin sf-bench -- clone-local "$@" > "$out.tmp"
mv "$out.tmp" "$out"
echo "results: $out" >&2
