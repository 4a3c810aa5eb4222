#!/usr/bin/env bash
# hack/bench/timeline.sh: where a start's time goes on the links. Brings up a testbed of N VMs,
# starts the function on all of them at once (one cold start of the profiled image) and
# samples every VM link's bytes in both directions, and the registry's, every ~0.3 s. Prints
# the per-VM start times, then a table of link rates over time (hack/bench/timeline_report.py).
# A diagnosis tool, not a benchmark: it asserts nothing.
#
# Usage:
#   hack/bench/timeline.sh [--vms 16] [--rate 25mbit] [--mode stripes] [--image realistic]
#                          [--start-profile FILE] [--out DIR]
#
#   --start-profile FILE  files read at start (startup.sh leaves one in its --out DIR as
#                start-profile.txt); without it the plain conversion runs
#   --out DIR    where samples.txt, run.json and the report go (default
#                bench-out/timeline-<time>)
# The testbed stays up afterwards (hack/testbed.sh status / down). FAASNET_TB_LAZY applies, as
# for hack/testbed.sh (e.g. "follow_concurrency = 8" for an A/B run).
set -euo pipefail

# shellcheck source=../lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

n=16 rate=25mbit mode=stripes image=realistic profile="" out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --vms) n="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --mode) mode="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --start-profile) profile="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
[[ "$(id -u)" == 0 ]] || die "needs root"
[[ "$rate" =~ ^([0-9]+)mbit$ ]] || die "--rate must be in mbit, e.g. 25mbit"
out="${out:-${REPO_ROOT}/bench-out/timeline-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
export FAASNET_IMAGES_CACHE="${FAASNET_IMAGES_CACHE:-/var/cache/faasnet/images}"
tb="${HACK_DIR}/testbed.sh"

[[ -e /run/faasnet-testbed/vms ]] && "$tb" down >/dev/null
"$tb" up "$n" --rate "$rate" --registry-rate "$((4 * BASH_REMATCH[1]))mbit" --mode "$mode" \
  >"${out}/up.log" 2>&1 || die "testbed up failed: see ${out}/up.log"
push=("$tb" push-image "$image")
[[ -n "$profile" ]] && push+=(--start-profile "$profile")
read -r _ ref < <("${push[@]}" 2>>"${out}/up.log")
"$tb" reset --mode "$mode" >>"${out}/up.log" 2>&1

# One line per sample: time (ns), then per VM the bytes towards it and from it (the host side
# of its veth: tx is the VM's downlink), then the registry's uplink.
(
  while :; do
    line="$(date +%s%N)"
    for ((i = 0; i < n; i++)); do
      line+=" $(<"/sys/class/net/fntbh${i}/statistics/tx_bytes") $(<"/sys/class/net/fntbh${i}/statistics/rx_bytes")"
    done
    echo "${line} $(</sys/class/net/fntbhreg/statistics/rx_bytes)"
    sleep 0.25
  done
) >"${out}/samples.txt" &
sampler=$!
trap 'kill "$sampler" 2>/dev/null || true' EXIT
"$tb" run "$ref" --vms "$(seq -s ' ' 0 $((n - 1)))" --json "${out}/run.json" | tee "${out}/run.log" || true
sleep 3
kill "$sampler"
python3 "${HACK_DIR}/bench/timeline_report.py" "${out}/samples.txt" --vms "$n" --rate "${BASH_REMATCH[1]}" |
  tee "${out}/report.md"
log "samples and report in ${out}"
