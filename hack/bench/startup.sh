#!/usr/bin/env bash
# hack/bench/startup.sh: the issue-5 benchmark. The same function container started on N VMs
# at once (N = 1 2 4 8 16 by default), time per VM from the request to the function's first
# output, in four modes measured in the same run:
#   baseline  stock containerd: full pull of the original (gzip) image, overlayfs
#   ondemand  our snapshotter, every VM reads the registry lazily, no tree
#   faasnet   our snapshotter with the function tree (coordinator) and the sibling exchange
#   stripes   the same with stripe trees (lazy.stripe_trees): odd blocks down a second tree
# A benchmark, not a test: it measures and reports, it does not pass or fail on the numbers.
#
# Usage:
#   hack/bench/startup.sh [--ns "1 2 4 8 16"] [--modes "baseline ondemand faasnet stripes"]
#                         [--rate 25mbit] [--image realistic] [--out DIR] [--no-doc]
#                         [--no-profile] [--no-prefetch]
#
#   Deploy-time start profile (default): the image is converted, started once on vm0 (the W
#   run below), and converted again with the files that start read laid out first
#   (image-converter convert --start-profile); the lazy modes run that conversion. The
#   baseline pulls the original image either way. --no-profile: the plain conversion only.
#
#   --no-prefetch  the lazy modes' runs without background prefetch (only blocks a start
#              reads move; to tell prefetch traffic apart from the tree's own delays)
#   --rate R   every VM link, both directions (tc tbf); the registry's egress is 4x R, as the
#              issue asks ("set the registry's egress to 4 VM links")
#   --out DIR  where results go (default bench-out/startup-<time>); results.json there holds
#              every run; unless --no-doc it is copied to docs/data/startup-results.json and
#              the report (docs/benchmarks-startup.md, docs/img/startup.png) is written from
#              it by hack/bench/startup_report.py
#
# Also measured, for the lower bound of the tree (W/r + h*b/r, plus the warm start):
#   W          bytes the function reads at start: one VM, on-demand, prefetch off, registry
#              bytes it fetched (read-ahead included: that is what our reads cost)
#   warm start the same VM started again with every block it needs cached
#   warm at N  after each tree-mode run, the same N VMs started again, every block cached:
#              the CPU cost of N starts at once on this machine (results.json "warm_runs")
# The block order of that cold start (the snapshotter's access-order record) is kept as
# access-order/<layer> in DIR, for the simulator.
set -euo pipefail

# shellcheck source=../lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

ns="1 2 4 8 16" modes="baseline ondemand faasnet stripes" rate=25mbit image=realistic out="" doc=1
profile=1 reset_opts=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ns) ns="$2"; shift 2 ;;
    --modes) modes="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --no-doc) doc=0; shift ;;
    --no-profile) profile=0; shift ;;
    --no-prefetch) reset_opts="--no-prefetch"; shift ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
[[ "$(id -u)" == 0 ]] || die "needs root"
[[ "$rate" =~ ^([0-9]+)mbit$ ]] || die "--rate must be in mbit, e.g. 50mbit"
rate_mbit="${BASH_REMATCH[1]}"
reg_rate="$((4 * rate_mbit))mbit"
max_n=0
for n in $ns; do ((n > max_n)) && max_n="$n"; done
out="${out:-${REPO_ROOT}/bench-out/startup-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "${out}/runs"
export FAASNET_IMAGES_CACHE="${FAASNET_IMAGES_CACHE:-/var/cache/faasnet/images}"
tb="${HACK_DIR}/testbed.sh"
TB_RUN=/run/faasnet-testbed
TB_STATE=/var/lib/faasnet-testbed

[[ -e "${TB_RUN}/vms" ]] && "$tb" down
trap '"$tb" down >/dev/null 2>&1 || true' EXIT
"$tb" up "$max_n" --rate "$rate" --registry-rate "$reg_rate" --mode ondemand --no-prefetch
read -r original converted < <("$tb" push-image "$image")
log "original ${original}, converted ${converted}"

# measure_w REF TAG: the working set W and the warm start of REF, on vm0 alone (cold, then
# warm); then the image is removed, so that the snapshotter writes its records of that cold
# start (block order, files read) at unmount.
measure_w() {
  "$tb" reset --mode ondemand --no-prefetch
  "$tb" run "$1" --vms 0 --json "${out}/runs/w-cold$2.json"
  "$tb" run "$1" --vms 0 --json "${out}/runs/w-warm$2.json"
  nsenter --net=/run/netns/fntb-vm0 -- ctr -a "${TB_RUN}/vm0/containerd.sock" images rm --sync \
    "$1" >/dev/null
}
cache0="${TB_STATE}/vm0/snapshotter/cache"

# wait_quiet "0 1 ...": until the VMs' links have received under 64 KiB in 3 s (background
# prefetch done), at most 180 s.
wait_quiet() {
  local i total last=-1 waited=0
  while ((waited < 180)); do
    total=0
    for i in $1; do
      total=$((total + $(ip netns exec "fntb-vm${i}" cat /sys/class/net/eth0/statistics/rx_bytes)))
    done
    ((last >= 0 && total - last < 65536)) && return 0
    last=$total
    sleep 3
    waited=$((waited + 3))
  done
  log "warning: the VMs' links were still busy after 180 s"
}

if [[ "$profile" == 1 ]]; then
  # The plain conversion's cold start gives the start profile: the files it read, per layer.
  measure_w "$converted" -plain
  cat "${cache0}"/start-files/* >"${out}/start-profile.txt" 2>/dev/null ||
    die "vm0 recorded no files read at start in ${cache0}/start-files"
  log "start profile: $(wc -l <"${out}/start-profile.txt") files"
  read -r _ converted < <("$tb" push-image "$image" --start-profile "${out}/start-profile.txt")
  log "profiled conversion ${converted}"
fi
measure_w "$converted" ""
# The block order of the cold start, for the simulator.
order_dir="${cache0}/access-order"
if [[ -d "$order_dir" ]]; then
  mkdir -p "${out}/access-order"
  cp "$order_dir"/* "${out}/access-order/"
else
  log "warning: vm0 left no access-order record in ${order_dir}"
fi

for mode in $modes; do
  for n in $ns; do
    case "$mode" in
      baseline) "$tb" reset --mode ondemand ;;
      # shellcheck disable=SC2086 # reset_opts is empty or one flag
      *) "$tb" reset --mode "$mode" ${reset_opts} ;;
    esac
    vms="$(seq -s ' ' 0 $((n - 1)))"
    log "mode ${mode}, N=${n}"
    if [[ "$mode" == baseline ]]; then
      "$tb" run "$original" --vms "$vms" --baseline --json "${out}/runs/${mode}-${n}.json" || true
    else
      "$tb" run "$converted" --vms "$vms" --json "${out}/runs/${mode}-${n}.json" || true
    fi
    if [[ "$mode" == faasnet || "$mode" == stripes ]]; then
      "$tb" status >"${out}/runs/${mode}-${n}.status" 2>&1 || true
      # The same N VMs start the function again with every block cached: what N starts at
      # once cost this machine's CPUs with no network in the way (the report's CPU floor).
      # First the cold run's background prefetch must end, or it shares the CPUs.
      wait_quiet "$vms"
      "$tb" run "$converted" --vms "$vms" --json "${out}/runs/${mode}-${n}-warm.json" || true
    fi
  done
done

# run_list SUFFIX: the runs/<mode>-<n>SUFFIX.json files measured, as JSON array items.
run_list() {
  local mode n f sep=""
  for mode in $modes; do
    for n in $ns; do
      f="${out}/runs/${mode}-${n}$1.json"
      [[ -s "$f" ]] || continue
      printf '%s\n  %s' "$sep" "$(cat "$f")"
      sep=","
    done
  done
}

# Everything in one file: parameters, W, warm start, every run.
{
  printf '{"params": {"vm_link_bps": %d, "registry_egress_bps": %d, "block_size": 524288, "image": "%s", "original": "%s", "converted": "%s", "cpus": %d, "date": "%s"},\n' \
    "$((rate_mbit * 1000000 / 8))" "$((4 * rate_mbit * 1000000 / 8))" "$image" "$original" \
    "$converted" "$(nproc)" "$(date -u +%FT%TZ)"
  printf ' "working_set": %s,\n "warm": %s,\n' "$(cat "${out}/runs/w-cold.json")" "$(cat "${out}/runs/w-warm.json")"
  if [[ -s "${out}/runs/w-cold-plain.json" ]]; then
    printf ' "working_set_unprofiled": %s,\n "warm_unprofiled": %s,\n "start_profile_files": %d,\n' \
      "$(cat "${out}/runs/w-cold-plain.json")" "$(cat "${out}/runs/w-warm-plain.json")" \
      "$(wc -l <"${out}/start-profile.txt")"
  fi
  printf ' "runs": [%s],\n "warm_runs": [%s]}\n' "$(run_list "")" "$(run_list -warm)"
} >"${out}/results.json"
log "results: ${out}/results.json"

if [[ "$doc" == 1 ]]; then
  mkdir -p "${REPO_ROOT}/docs/data"
  cp "${out}/results.json" "${REPO_ROOT}/docs/data/startup-results.json"
  python3 "${HACK_DIR}/bench/startup_report.py" "${out}/results.json" \
    --doc "${REPO_ROOT}/docs/benchmarks-startup.md" --plot "${REPO_ROOT}/docs/img/startup.png"
fi
