#!/usr/bin/env bash
# Installs the Debian packages snowflock needs to build and test, if missing.
# Idempotent: runs `apt-get update` (once) only when something must be installed.
set -euo pipefail

packages=(
  gcc          # C example guest, and the linker driver for guest images
  g++          # libFuzzer, built into the fuzz targets (scripts/fuzz.sh)
  libc6-dev    # crt objects for host binaries
  iproute2     # network-namespace test hosts
  python3      # stand-in daemons and probes in the test-cluster tests
  clang-19     # compiles the XDP program in ebpf/
  libbpf-dev   # bpf_helpers.h and friends for the XDP program
  ethtool      # NIC queue and ring inspection in `sf net` tests
  musl-tools   # musl-gcc: static musl programs in the Linux-ABI tests
  gfortran     # a static Fortran program in the Linux-ABI tests
  busybox-static  # programs nobody here wrote, run as Linux-ABI guests in the tests
  prometheus   # promtool, and a real server scraping sfd in the metrics tests
  curl         # HTTP requests from inside test hosts (metrics, Prometheus queries)
  slurmctld slurmd slurm-client munge   # a real Slurm in the test cluster (sf cluster up --slurm)
)

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
  echo "deps: /dev/kvm is not accessible; snowflock needs KVM (run as root on a KVM host)" >&2
  exit 1
fi

# `[limits] host_pages = "huge"` needs the kernel to give memfds huge pages
# where a mapping asks for them (MADV_HUGEPAGE); `advise` changes nothing for
# memory that does not ask. Not persistent: rerun after a reboot.
shmem_thp=/sys/kernel/mm/transparent_hugepage/shmem_enabled
if [[ -w $shmem_thp ]] && grep -q '\[never\]' "$shmem_thp"; then
  echo advise >"$shmem_thp"
fi
