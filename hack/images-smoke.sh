#!/usr/bin/env bash
# hack/images-smoke.sh: end-to-end check of the test images with stock containerd (overlayfs):
# starts the registry, builds and pushes the images, starts a private containerd, pulls and runs
# each image and checks its output, then stops that containerd (the registry keeps running).
#
# Usage:
#   hack/images-smoke.sh [busybox|tricky|realistic|all] [--registry 127.0.0.1:5000] [--keep]
#
#   --keep   leave the containerd instance "images-smoke" running (and its images pulled)
# Checks:
#   busybox    prints "hello from busybox"
#   tricky     two runs print the same listing, equal to `hack/images.sh expected tricky`
#              (computed at build time from an independent unpack: umoci + chroot)
#   realistic  prints a line starting "faasnet function ready: "
# Prints one "ok NAME pull=..s run=..s" line per image; exits 1 on the first failure.
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

which_images=all
registry="${FAASNET_REGISTRY:-127.0.0.1:5000}"
keep=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --registry) registry="${2:?}"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
      exit 0
      ;;
    -*) die "unknown option '$1'" ;;
    *) which_images="$1"; shift ;;
  esac
done

inst=images-smoke
ctr_() { "${HACK_DIR}/containerd.sh" ctr "$inst" "$@"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

mapfile -t refs < <("${HACK_DIR}/images.sh" build "$which_images" --registry "$registry")
"${HACK_DIR}/containerd.sh" start "$inst"
out="$(mktemp -d)"
# shellcheck disable=SC2317 # called from the trap
cleanup() {
  rm -rf "$out"
  [[ "$keep" == 1 ]] || "${HACK_DIR}/containerd.sh" wipe "$inst"
}
trap cleanup EXIT
for ref in "${refs[@]}"; do
  name="${ref##*/}"
  name="${name%%:*}"
  ctr_ images rm "$ref" >/dev/null 2>&1 || true
  t0="$(now)"
  ctr_ images pull --plain-http "$ref" >/dev/null
  t1="$(now)"
  ctr_ run --rm "$ref" "${inst}-${name}-1" >"$out/$name.1"
  t2="$(now)"
  case "$name" in
    busybox)
      grep -qx 'hello from busybox' "$out/$name.1" || die "busybox: unexpected output: $(head -c 300 "$out/$name.1")"
      ;;
    tricky)
      ctr_ run --rm "$ref" "${inst}-${name}-2" >"$out/$name.2"
      cmp -s "$out/$name.1" "$out/$name.2" || die "tricky: two runs differ: $(diff "$out/$name.1" "$out/$name.2" | head -20)"
      "${HACK_DIR}/images.sh" expected tricky >"$out/$name.expected"
      cmp -s "$out/$name.1" "$out/$name.expected" ||
        die "tricky: output differs from the expected listing: $(diff "$out/$name.expected" "$out/$name.1" | head -20)"
      ;;
    realistic)
      grep -q '^faasnet function ready: ' "$out/$name.1" || die "realistic: unexpected output: $(head -c 300 "$out/$name.1")"
      ;;
  esac
  echo "ok ${name} pull=$(secs "$t0" "$t1")s run=$(secs "$t1" "$t2")s: $(grep -m1 -E '^(hello from|tricky listing|faasnet function ready)' "$out/$name.1")"
done
