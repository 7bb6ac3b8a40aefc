#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of bytes from outside (fuzz/, see
# fuzz/src/lib.rs): builds the cargo-fuzz targets on the pinned stable
# toolchain, writes their seed corpora with the real encoders, runs each
# target for SECONDS (default 20) and fails if any crashes. Prints one JSON
# line per target; each run's libFuzzer log is fuzz/target/fuzz-TARGET.log
# and a crashing input lands in fuzz/artifacts/TARGET/.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-20}
version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -qF "$version"; then
  cargo install cargo-fuzz --locked --version "$version"
fi

cd fuzz
# No sanitizer: -Zsanitizer needs a nightly compiler. libFuzzer's coverage,
# Rust's bounds and overflow checks (debug assertions are on) and the
# targets' invariants find the bugs.
flags=(--sanitizer none)
cargo fuzz build "${flags[@]}"
# Seeds are generated, not committed: they come from this tree's encoders
# (a descriptor captured on KVM changes with every format version) and guest
# images (megabytes of static executables). Fuzzer finds accumulate next to
# them in fuzz/corpus/, which git ignores.
cargo run --locked --example seeds -- corpus

count() {
  find "$1" -maxdepth 1 -type f 2>/dev/null | wc -l
}

failed=()
for target in $(cargo fuzz list); do
  log=target/fuzz-$target.log
  mkdir -p "corpus/$target" "artifacts/$target"
  crashes_before=$(count "artifacts/$target")
  started=$(date +%s)
  status=0
  cargo fuzz run "${flags[@]}" "$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  elapsed=$(($(date +%s) - started))
  execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)
  ran=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
  crashes=$(($(count "artifacts/$target") - crashes_before))
  if ((status != 0 && crashes == 0)); then
    crashes=1
  fi
  printf '{"target":"%s","execs":%s,"seconds":%s,"corpus":%s,"crashes":%s}\n' \
    "$target" "${execs:-0}" "${ran:-$elapsed}" "$(count "corpus/$target")" "$crashes"
  if ((crashes > 0)); then
    failed+=("$target")
  fi
done

if ((${#failed[@]})); then
  echo "fuzz: crashes in ${failed[*]}; logs in fuzz/target/fuzz-<target>.log" >&2
  exit 1
fi
