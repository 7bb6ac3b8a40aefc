#!/bin/sh
# Builds sf-bench and sfd in release and runs one scenario (default
# clone-local), writing its JSON lines to perf/results/<scenario>.jsonl
# (progress on stderr). Extra arguments go to the scenario, e.g.
#   perf/run.sh clone-local --clones 8 --runs 9
#   perf/run.sh fault-remote --runs 5
#   perf/run.sh avoidance
#   perf/run.sh clone-remote --clones 1,8,32
#   perf/run.sh soak --cycles 1000
# Needs root and /dev/kvm; the multi-host scenarios make their own
# network-namespace hosts and remove them.
set -eu
cd "$(dirname "$0")/.."
scenario=${1:-clone-local}
[ $# -gt 0 ] && shift
mkdir -p perf/results
out=perf/results/$scenario.jsonl
cargo build --release -p snowflock-perf -p snowflock-tools --bins
# Write to a temporary file first, so a failed run does not clobber the last results.
./target/release/sf-bench "$scenario" "$@" > "$out.tmp"
mv "$out.tmp" "$out"
echo "results: $out" >&2
