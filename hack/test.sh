#!/usr/bin/env bash
# Runs every test of the project: format and lint checks, unit and property tests, and the
# end-to-end tests on real processes (registry, containerd, runc, FUSE, network namespaces).
#
#   hack/test.sh [extra cargo test args]
#
# Needs root (FUSE mounts, containerd, namespaces) and the packages of hack/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
# Test images are cached outside the work tree, so CI's fresh clones reuse the slow
# debootstrap build done by an earlier run on the same machine.
export FAASNET_IMAGES_CACHE="${FAASNET_IMAGES_CACHE:-/var/cache/faasnet/images}"

if [ "$(id -u)" != 0 ]; then
	echo "hack/test.sh: the end-to-end tests need root (FUSE, containerd)" >&2
	exit 2
fi

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
# Test binaries run one after another; tests inside a binary share the 2 cores.
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee /tmp/faasnet-test.log
rc=${PIPESTATUS[0]}
# One closing line over all test binaries.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' /tmp/faasnet-test.log
exit "$rc"
