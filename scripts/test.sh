#!/usr/bin/env bash
# The full check: formatting, lints (host workspace and guest SDK), and every
# test, including the ones that run real VMs on /dev/kvm.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/deps.sh

cargo fmt --all -- --check
(cd guest && cargo fmt --all -- --check)
cargo clippy --workspace --all-targets --locked -- -D warnings
# Every backend set builds: the VMM without its default (KVM) backend too.
cargo clippy -p snowflock-vmm --no-default-features --locked -- -D warnings
(cd guest && cargo clippy --examples --features rt --release --locked -- -D warnings)
(cd guest && cargo clippy --all-targets --locked -- -D warnings)
# The Linux personality and the Rust std example, members of the guest
# workspace, apart: their features of the SDK must not unify (`lang` has a
# panic handler, which a std program must not get).
(cd guest && cargo clippy --release -p snowflock-linux --locked -- -D warnings)
(cd guest && cargo clippy --release -p snowflock-std-example --locked -- -D warnings)
(cd guest && cargo test --lib --locked)
cargo test --workspace --locked
# Every parser of bytes from outside, fuzzed for 15 s each (fuzz/, a
# workspace of its own).
(cd fuzz && cargo fmt --all -- --check)
(cd fuzz && cargo clippy --all-targets --locked -- -D warnings)
./scripts/fuzz.sh 15
