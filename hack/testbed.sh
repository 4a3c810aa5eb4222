#!/usr/bin/env bash
# hack/testbed.sh: N emulated VMs on one machine, each a network namespace with its own
# containerd and FaaSNet snapshotter, a registry in its own namespace, and the coordinator.
#
# Usage:
#   hack/testbed.sh up N [--rate 100mbit] [--registry-rate 400mbit] [--mode stripes|faasnet|ondemand]
#                        [--profile release|debug] [--no-prefetch] [--no-sibling]
#   hack/testbed.sh reset [--mode stripes|faasnet|ondemand] [--no-prefetch] [--no-sibling]
#                                        # every VM and the coordinator restarted with empty state
#                                        # (caches, images, trees); the registry keeps its images
#   hack/testbed.sh status               # what runs, the trees, each VM's block sources
#   hack/testbed.sh push-image NAME [--start-profile FILE]
#                                        # build hack/images.sh NAME, push it to the testbed
#                                        # registry and convert it (NAME:faasnet; with a start
#                                        # profile, NAME:faasnet-profiled, its files laid out
#                                        # first); prints ORIGINAL CONVERTED refs
#   hack/testbed.sh run REF [--vms "0 1 2"] [--baseline] [--json FILE]
#                                        # start REF's function on the VMs at once; prints each
#                                        # VM's time to first output and where its blocks came from;
#                                        # --baseline: stock containerd instead (full pull of REF,
#                                        # an ordinary image, to overlayfs); --json: also write the
#                                        # per-VM figures, registry bytes and CPU use to FILE
#   hack/testbed.sh down                 # stops everything; leaves nothing mounted or running
#
# Network: bridge fntb0 (10.79.0.1/24, the host: coordinator at :7700), registry namespace
# fntb-reg (10.79.0.2:5000), VM i in namespace fntb-vm<i> (10.79.0.<10+i>; snapshotter peer
# server :9112, metrics :9111). Every VM link is limited to --rate in both directions (tc tbf),
# the registry's egress to --registry-rate, so the network, not the CPUs, is the bottleneck.
# Processes join only the network namespace (nsenter --net), so FUSE mounts stay visible to
# the VM's containerd.
#
# Modes: stripes (default, as the snapshotter's own default) = the function tree
# (coordinator) with stripe trees (odd blocks down the coordinator's second tree); faasnet =
# the function tree alone, with the sibling exchange; ondemand = lazy loading,
# every VM reads the registry (no tree). The baseline (stock containerd, overlayfs, full pull) runs in either mode:
# `run --baseline` with the original image.
# State: /var/lib/faasnet-testbed (roots), /run/faasnet-testbed (sockets, logs, pids).
# Environment: FAASNET_TB_LOG sets the snapshotters' log filter (default info); FAASNET_TB_LAZY
# adds lines to their [lazy] section on up/reset, e.g. "follow_concurrency = 0" for A/B runs.
# FAASNET_TB_NS_SYSCTL: sysctls set in every namespace (VMs and registry) on up, e.g.
# "net.ipv4.tcp_slow_start_after_idle=0" for A/B runs (docs/benchmarks.md, "Slack on the
# uplinks"); default none (the kernel's settings).
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

TB_STATE=/var/lib/faasnet-testbed
TB_RUN=/run/faasnet-testbed
BRIDGE=fntb0
NET=10.79.0
HOST_IP="${NET}.1"
REG_IP="${NET}.2"
REG_ADDR="${REG_IP}:5000"
COORD_ADDR="${HOST_IP}:7700"
TENANT=testbed
TENANT_TOKEN=testbed-token
ADMIN_TOKEN=testbed-admin

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
  exit "${1:-2}"
}

vm_ns() { echo "fntb-vm$1"; }
vm_ip() { echo "${NET}.$((10 + $1))"; }
in_ns() { local ns="$1"; shift; nsenter --net="/run/netns/${ns}" -- "$@"; }

# start_daemon NAME NETNS LOG CMD...: runs CMD in NETNS (or the host if NETNS is empty),
# detached, with its pid in TB_RUN/NAME.pid.
start_daemon() {
  local name="$1" ns="$2" logf="$3"
  shift 3
  if [[ -n "$ns" ]]; then
    set -- nsenter --net="/run/netns/${ns}" -- "$@"
  fi
  launch_daemon "$logf" "$logf" "$@" >"${TB_RUN}/${name}.pid"
}

bin_dir() { echo "${REPO_ROOT}/target/$(cat "${TB_RUN}/profile" 2>/dev/null || echo release)"; }

vm_count() { cat "${TB_RUN}/vms" 2>/dev/null || echo 0; }

add_link() {  # add_link NS IP IFNAME-ON-HOST RATE
  local ns="$1" ip="$2" hif="$3" rate="$4"
  ip netns add "$ns"
  local kv
  for kv in ${FAASNET_TB_NS_SYSCTL:-}; do
    ip netns exec "$ns" sysctl -qw "$kv"
  done
  ip link add "$hif" type veth peer name eth0 netns "$ns"
  ip link set "$hif" master "$BRIDGE" up
  ip -n "$ns" addr add "${ip}/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  if [[ -n "$rate" ]]; then
    tc qdisc add dev "$hif" root tbf rate "$rate" burst 256kb latency 100ms
    tc -n "$ns" qdisc add dev eth0 root tbf rate "$rate" burst 256kb latency 100ms
  fi
}

write_snapshotter_config() {  # VM MODE PREFETCH(true|false) SIBLING(true|false)
  local i="$1" mode="$2" prefetch="${3:-true}" sibling="${4:-true}" dir="${TB_STATE}/vm$1" ip
  ip="$(vm_ip "$i")"
  cat >"${TB_RUN}/vm${i}/snapshotter.toml" <<EOF
root = "${dir}/snapshotter"
socket = "${TB_RUN}/vm${i}/snapshotter.sock"
log_level = "${FAASNET_TB_LOG:-info}"
metrics_address = "${ip}:9111"

[lazy]
peer_listen = "${ip}:9112"
insecure_registries = ["${REG_ADDR}"]
prefetch = ${prefetch}
sibling_exchange = ${sibling}
stripe_trees = $([[ "$mode" == stripes ]] && echo true || echo false)
${FAASNET_TB_LAZY:-}
EOF
  if [[ "$mode" == faasnet || "$mode" == stripes ]]; then
    cat >>"${TB_RUN}/vm${i}/snapshotter.toml" <<EOF

[coordinator]
endpoint = "http://${COORD_ADDR}"
tenant = "${TENANT}"
token = "${TENANT_TOKEN}"
node_id = "vm${i}"
EOF
  fi
}

write_containerd_config() {  # VM
  local i="$1" run="${TB_RUN}/vm$1"
  cat >"${run}/containerd.toml" <<EOF
version = 2
root = "${TB_STATE}/vm${i}/containerd"
state = "${run}/containerd-state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "${run}/containerd.sock"
[ttrpc]
  address = "${run}/containerd.sock.ttrpc"
[proxy_plugins]
  [proxy_plugins.faasnet]
    type = "snapshot"
    address = "${run}/snapshotter.sock"
[stream_processors]
  [stream_processors."io.containerd.faasnet.lz4block"]
    accepts = ["application/vnd.oci.image.layer.v1.tar+faasnet.lz4block"]
    returns = "application/vnd.oci.image.layer.v1.tar"
    path = "$(bin_dir)/image-converter"
    args = ["decompress"]
EOF
}

# start_coordinator: the coordinator on the host side of the bridge, with an empty tree store.
start_coordinator() {
  rm -rf "${TB_STATE:?}/coordinator"
  mkdir -p "${TB_STATE}/coordinator"
  cat >"${TB_RUN}/coordinator.toml" <<EOF
listen = "${COORD_ADDR}"
data_dir = "${TB_STATE}/coordinator"
metrics_listen = "${HOST_IP}:9700"
lease_ttl_ms = 10000
admin_token = "${ADMIN_TOKEN}"
[tenants.${TENANT}]
token = "${TENANT_TOKEN}"
EOF
  start_daemon coordinator "" "${TB_RUN}/coordinator.log" \
    "$(bin_dir)/coordinator" serve --config "${TB_RUN}/coordinator.toml"
  wait_for "coordinator" 20 bash -c "exec 3<>/dev/tcp/${HOST_IP}/7700"
}

# start_vm VM: containerd and the snapshotter of VM, configured by TB_RUN/mode and /prefetch.
start_vm() {
  local i="$1"
  mkdir -p "${TB_RUN}/vm${i}" "${TB_STATE}/vm${i}"
  write_snapshotter_config "$i" "$(cat "${TB_RUN}/mode")" "$(cat "${TB_RUN}/prefetch")" \
    "$(cat "${TB_RUN}/sibling")"
  write_containerd_config "$i"
  start_daemon "vm${i}-snapshotter" "$(vm_ns "$i")" "${TB_RUN}/vm${i}/snapshotter.log" \
    "$(bin_dir)/snapshotter" --config "${TB_RUN}/vm${i}/snapshotter.toml"
  start_daemon "vm${i}-containerd" "$(vm_ns "$i")" "${TB_RUN}/vm${i}/containerd.log" \
    containerd --config "${TB_RUN}/vm${i}/containerd.toml"
}

# unmount_under DIR: every mount below DIR, deepest first.
unmount_under() {
  awk -v a="$1/" 'index($5, a) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

# stop_vm VM: its containers, containerd and snapshotter stopped, its mounts gone.
stop_vm() {
  local i="$1" sock="${TB_RUN}/vm$1/containerd.sock" c
  if [[ -S "$sock" ]]; then
    for c in $(ctr -a "$sock" containers list -q 2>/dev/null); do
      ctr -a "$sock" tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
      ctr -a "$sock" tasks delete -f "$c" >/dev/null 2>&1 || true
      ctr -a "$sock" containers delete "$c" >/dev/null 2>&1 || true
    done
  fi
  stop_pid "${TB_RUN}/vm${i}-containerd.pid" 10
  stop_pid "${TB_RUN}/vm${i}-snapshotter.pid" 10
  unmount_under "${TB_STATE}/vm${i}"
  unmount_under "${TB_RUN}/vm${i}"
}

wait_vms() {
  local n i
  n="$(vm_count)"
  for ((i = 0; i < n; i++)); do
    wait_for "vm${i} snapshotter" 30 test -S "${TB_RUN}/vm${i}/snapshotter.sock"
    wait_for "vm${i} containerd" 30 ctr -a "${TB_RUN}/vm${i}/containerd.sock" version
  done
}

cmd_up() {
  local n="${1:-}" rate=100mbit reg_rate=400mbit mode=stripes profile=release prefetch=true
  local sibling=true i
  [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le 64 ]] || die "up: N must be 1..64"
  shift
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --rate) rate="$2"; shift 2 ;;
      --registry-rate) reg_rate="$2"; shift 2 ;;
      --mode) mode="$2"; shift 2 ;;
      --profile) profile="$2"; shift 2 ;;
      --no-prefetch) prefetch=false; shift ;;
      --no-sibling) sibling=false; shift ;;
      *) usage ;;
    esac
  done
  [[ "$mode" == faasnet || "$mode" == stripes || "$mode" == ondemand ]] ||
    die "up: --mode is faasnet, stripes or ondemand"
  [[ -e "${TB_RUN}/vms" ]] && die "a testbed is up; run hack/testbed.sh down first"
  need_cmd nsenter ip tc containerd ctr ctr-remote docker-registry curl
  mkdir -p "$TB_RUN" "$TB_STATE"
  echo "$profile" >"${TB_RUN}/profile"
  echo "$mode" >"${TB_RUN}/mode"
  echo "$prefetch" >"${TB_RUN}/prefetch"
  echo "$sibling" >"${TB_RUN}/sibling"
  echo "$rate" >"${TB_RUN}/rate"
  echo "$reg_rate" >"${TB_RUN}/registry-rate"
  local cargo_flag=()
  [[ "$profile" == release ]] && cargo_flag=(--release)
  log "building binaries (${profile})"
  (cd "$REPO_ROOT" && cargo build "${cargo_flag[@]}" --quiet --bins \
    -p faasnet-snapshotter -p faasnet-coordinator -p faasnet-image-converter)

  log "network: bridge ${BRIDGE}, ${n} VMs at ${rate}, registry egress ${reg_rate}"
  ip link add "$BRIDGE" type bridge
  ip addr add "${HOST_IP}/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  add_link fntb-reg "$REG_IP" fntbhreg ""
  tc -n fntb-reg qdisc add dev eth0 root tbf rate "$reg_rate" burst 256kb latency 100ms
  echo "$n" >"${TB_RUN}/vms"

  log "registry at ${REG_ADDR}"
  mkdir -p "${TB_STATE}/registry"
  cat >"${TB_RUN}/registry.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: ${TB_STATE}/registry
  delete:
    enabled: true
http:
  addr: ${REG_ADDR}
EOF
  start_daemon registry fntb-reg "${TB_RUN}/registry.log" docker-registry serve "${TB_RUN}/registry.yml"
  wait_for "registry" 20 curl -fsS "http://${REG_ADDR}/v2/"

  log "coordinator at ${COORD_ADDR}"
  start_coordinator

  for ((i = 0; i < n; i++)); do
    add_link "$(vm_ns "$i")" "$(vm_ip "$i")" "fntbh${i}" "$rate"
    start_vm "$i"
  done
  wait_vms
  log "testbed up: ${n} VMs, mode ${mode}, prefetch ${prefetch}"
}

# reset: every VM and the coordinator restarted with empty state, in a (new) mode.
cmd_reset() {
  local n i mode prefetch=true sibling=true
  n="$(vm_count)"
  [[ "$n" -ge 1 ]] || die "no testbed is up"
  mode="$(cat "${TB_RUN}/mode")"
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --mode) mode="$2"; shift 2 ;;
      --no-prefetch) prefetch=false; shift ;;
      --no-sibling) sibling=false; shift ;;
      *) usage ;;
    esac
  done
  [[ "$mode" == faasnet || "$mode" == stripes || "$mode" == ondemand ]] ||
    die "reset: --mode is faasnet, stripes or ondemand"
  for ((i = 0; i < n; i++)); do
    stop_vm "$i" &
  done
  wait
  stop_pid "${TB_RUN}/coordinator.pid" 5
  for ((i = 0; i < n; i++)); do
    rm -rf "${TB_STATE:?}/vm${i}"
  done
  echo "$mode" >"${TB_RUN}/mode"
  echo "$prefetch" >"${TB_RUN}/prefetch"
  echo "$sibling" >"${TB_RUN}/sibling"
  start_coordinator
  for ((i = 0; i < n; i++)); do
    start_vm "$i"
  done
  wait_vms
  log "testbed reset: ${n} VMs, mode ${mode}, prefetch ${prefetch}, sibling exchange ${sibling}"
}

# push-image NAME: the test image NAME, pushed to the testbed registry, and its conversion.
cmd_push_image() {
  local name="${1:?push-image NAME}" orig conv profile=() tag=faasnet
  shift
  case "${1:-}" in
    --start-profile) profile=(--start-profile "${2:?--start-profile FILE}"); tag=faasnet-profiled ;;
    "") ;;
    *) die "push-image: unknown argument '$1'" ;;
  esac
  orig="$("${HACK_DIR}/images.sh" build "$name" --registry "$REG_ADDR")"
  conv="${REG_ADDR}/faasnet/${name}:${tag}"
  "$(bin_dir)/image-converter" -q convert "$orig" "$conv" --plain-http "$REG_ADDR" \
    "${profile[@]}" >/dev/null
  echo "$orig $conv"
}

# scrape VM: the Prometheus text of VM's snapshotter (empty if it does not answer).
scrape() { curl -fsS "http://$(vm_ip "$1"):9111/metrics" 2>/dev/null || true; }

# metric TEXT NAME [SOURCE]: a lazy counter in scraped TEXT, 0 if absent.
metric() {
  local key="faasnet_snapshotter_lazy_$2"
  [[ -n "${3:-}" ]] && key+="{source=\"$3\"}"
  awk -v m="$key" '$1 == m { printf "%d", $2; found=1 } END { if (!found) printf "0" }' <<<"$1"
}

# link_bytes IFNAME DIR: bytes through the host side of a veth (tx = towards the namespace).
link_bytes() { cat "/sys/class/net/$1/statistics/$2_bytes" 2>/dev/null || echo 0; }

# cpu_ticks: "busy total" jiffies of the whole machine.
cpu_ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat; }

cmd_run() {
  local ref="${1:?run REF}" vms="" baseline=0 json="" i n
  shift
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --vms) vms="$2"; shift 2 ;;
      --baseline) baseline=1; shift ;;
      --json) json="$2"; shift 2 ;;
      *) usage ;;
    esac
  done
  n="$(vm_count)"
  [[ "$n" -ge 1 ]] || die "no testbed is up"
  [[ -n "$vms" ]] || vms="$(seq -s ' ' 0 $((n - 1)))"
  local out mode
  out="${TB_RUN}/run-$(date +%s%N)"
  mkdir -p "$out"
  mode="$(cat "${TB_RUN}/mode")"
  [[ "$baseline" == 1 ]] && mode=baseline
  log "starting ${ref} on VMs ${vms} at once (${mode})"
  for i in $vms; do
    echo "$(link_bytes "fntbh${i}" tx)" >"${out}/vm${i}.rx0"
  done
  local reg0 cpu0
  reg0="$(link_bytes fntbhreg rx)"
  cpu0="$(cpu_ticks)"
  for i in $vms; do
    (
      sock="${TB_RUN}/vm${i}/containerd.sock"
      id="vm${i}-$(basename "$out")"
      start=$(date +%s%N)
      if [[ "$baseline" == 1 ]]; then
        # Stock containerd: the whole image pulled and unpacked to overlayfs, then run.
        pull=(ctr -a "$sock" images pull --plain-http "$ref")
        runc=(ctr -a "$sock" run --rm "$ref" "$id")
      else
        pull=(ctr-remote -a "$sock" images rpull --plain-http --snapshotter faasnet "$ref")
        runc=(ctr -a "$sock" run --rm --snapshotter faasnet "$ref" "$id")
      fi
      in_ns "$(vm_ns "$i")" "${pull[@]}" >"${out}/vm${i}.pull" 2>&1 ||
        { echo "pull failed: $(tail -2 "${out}/vm${i}.pull")" >"${out}/vm${i}.err"; exit 1; }
      in_ns "$(vm_ns "$i")" "${runc[@]}" 2>"${out}/vm${i}.err" |
        {
          IFS= read -r first || true
          end=$(date +%s%N)
          echo "$(((end - start) / 1000000))" >"${out}/vm${i}.ms"
          printf '%s\n' "$first" >"${out}/vm${i}.out"
          cat >>"${out}/vm${i}.out"
        }
    ) &
  done
  wait
  local reg1 cpu1 m
  reg1="$(link_bytes fntbhreg rx)"
  cpu1="$(cpu_ticks)"
  printf '%-5s %10s %8s %8s %8s %10s  %s\n' VM start_ms cache peer registry rx_MB "first output line"
  for i in $vms; do
    echo "$(($(link_bytes "fntbh${i}" tx) - $(cat "${out}/vm${i}.rx0")))" >"${out}/vm${i}.rx"
    m="$(scrape "$i")"
    printf '%s\n' "$m" >"${out}/vm${i}.metrics"
    printf '%-5s %10s %8s %8s %8s %10s  %s\n' "vm${i}" "$(cat "${out}/vm${i}.ms" 2>/dev/null || echo FAIL)" \
      "$(metric "$m" blocks_total cache)" "$(metric "$m" blocks_total peer)" \
      "$(metric "$m" blocks_total registry)" "$(($(cat "${out}/vm${i}.rx") / 1000000))" \
      "$(head -1 "${out}/vm${i}.out" 2>/dev/null)"
  done
  local busy total
  read -r busy total < <(paste -d' ' <(echo "$cpu0") <(echo "$cpu1") | awk '{ print $3 - $1, $4 - $2 }')
  printf 'registry sent %d MB; CPU busy %d%% of 2 cores over the run\n' \
    "$(((reg1 - reg0) / 1000000))" "$((total > 0 ? 100 * busy / total : 0))"
  if [[ -n "$json" ]]; then
    {
      printf '{"mode": "%s", "n": %d, "ref": "%s", "registry_bytes": %d, "cpu_busy": %s, "vms": [' \
        "$mode" "$(wc -w <<<"$vms")" "$ref" "$((reg1 - reg0))" \
        "$(awk -v b="$busy" -v t="$total" 'BEGIN { printf "%.3f", (t > 0 ? b / t : 0) }')"
      local sep=""
      for i in $vms; do
        m="$(<"${out}/vm${i}.metrics")"
        printf '%s{"vm": "vm%d", "start_ms": %s, "ok": %s, "rx_bytes": %d, "registry_bytes": %d, "peer_bytes": %d, "cache_bytes": %d, "registry_blocks": %d, "peer_blocks": %d}' \
          "$sep" "$i" "$(cat "${out}/vm${i}.ms" 2>/dev/null || echo null)" \
          "$([[ -s "${out}/vm${i}.out" ]] && echo true || echo false)" "$(cat "${out}/vm${i}.rx")" \
          "$(metric "$m" bytes_total registry)" "$(metric "$m" bytes_total peer)" \
          "$(metric "$m" bytes_total cache)" "$(metric "$m" blocks_total registry)" \
          "$(metric "$m" blocks_total peer)"
        sep=", "
      done
      printf ']}\n'
    } >"$json"
  fi
  local failed=0
  for i in $vms; do
    [[ -s "${out}/vm${i}.out" ]] || { failed=1; log "vm${i} failed: $(tail -3 "${out}/vm${i}.err" 2>/dev/null)"; }
  done
  return "$failed"
}

cmd_status() {
  local n i
  n="$(vm_count)"
  if [[ "$n" -eq 0 ]]; then
    echo "no testbed"
    return 0
  fi
  echo "testbed: ${n} VMs, mode $(cat "${TB_RUN}/mode"), registry ${REG_ADDR}, coordinator ${COORD_ADDR}"
  for f in "${TB_RUN}"/*.pid; do
    printf '  %-22s %s\n' "$(basename "$f" .pid)" "$(pid_alive "$f" && echo running || echo stopped)"
  done
  "$(bin_dir)/coordinator" trees --endpoint "http://${COORD_ADDR}" --admin-token "$ADMIN_TOKEN" 2>/dev/null || true
  printf '%-5s %8s %8s %8s %8s\n' VM cache peer registry served
  local m
  for ((i = 0; i < n; i++)); do
    m="$(scrape "$i")"
    printf '%-5s %8s %8s %8s %8s\n' "vm${i}" "$(metric "$m" blocks_total cache)" \
      "$(metric "$m" blocks_total peer)" "$(metric "$m" blocks_total registry)" \
      "$(metric "$m" served_blocks_total)"
  done
}

cmd_down() {
  local n i f
  n="$(vm_count)"
  for ((i = 0; i < n; i++)); do
    stop_vm "$i" &
  done
  wait
  stop_pid "${TB_RUN}/coordinator.pid" 5
  stop_pid "${TB_RUN}/registry.pid" 5
  # Leftover mounts (FUSE layers, container rootfs) under the testbed's dirs, deepest first.
  awk -v a="$TB_STATE" -v b="$TB_RUN" 'index($5, a) == 1 || index($5, b) == 1 { print $5 }' \
    /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  for f in /run/netns/fntb-*; do
    if [[ -e "$f" ]]; then
      # Whatever still runs in it (e.g. a snapshotter's FUSE fd holder, which outlives its
      # snapshotter by design) would keep the namespace and its veth alive.
      ip netns pids "$(basename "$f")" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
      ip netns del "$(basename "$f")"
    fi
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  rm -rf "${TB_RUN}" "${TB_STATE}"
  log "testbed down"
}

[[ $# -ge 1 ]] || usage
[[ "$(id -u)" == 0 ]] || die "needs root (namespaces, mounts)"
sub="$1"
shift
case "$sub" in
  up) cmd_up "$@" ;;
  reset) cmd_reset "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  push-image) cmd_push_image "$@" ;;
  run) cmd_run "$@" ;;
  -h | --help | help) usage 0 ;;
  *) usage ;;
esac
