#!/usr/bin/env bash
# hack/testbed.sh: N emulated VMs on one machine, each a network namespace with its own
# containerd and FaaSNet snapshotter, a registry in its own namespace, and the coordinator.
#
# Usage:
#   hack/testbed.sh up N [--rate 100mbit] [--registry-rate 400mbit] [--mode faasnet|ondemand]
#                        [--profile release|debug]
#   hack/testbed.sh status               # what runs, the trees, each VM's block sources
#   hack/testbed.sh push-image NAME      # build hack/images.sh NAME, push it to the testbed
#                                        # registry and convert it; prints ORIGINAL CONVERTED refs
#   hack/testbed.sh run REF [--vms "0 1 2"]
#                                        # start REF's function on the VMs at once; prints each
#                                        # VM's time to first output and where its blocks came from
#   hack/testbed.sh down                 # stops everything; leaves nothing mounted or running
#
# Network: bridge fntb0 (10.79.0.1/24, the host: coordinator at :7700), registry namespace
# fntb-reg (10.79.0.2:5000), VM i in namespace fntb-vm<i> (10.79.0.<10+i>; snapshotter peer
# server :9112, metrics :9111). Every VM link is limited to --rate in both directions (tc tbf),
# the registry's egress to --registry-rate, so the network, not the CPUs, is the bottleneck.
# Processes join only the network namespace (nsenter --net), so FUSE mounts stay visible to
# the VM's containerd.
#
# Modes: faasnet = the function tree (coordinator); ondemand = lazy loading, every VM reads the
# registry (no tree).
# State: /var/lib/faasnet-testbed (roots), /run/faasnet-testbed (sockets, logs, pids).
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

write_snapshotter_config() {  # VM MODE
  local i="$1" mode="$2" dir="${TB_STATE}/vm$1" ip
  ip="$(vm_ip "$i")"
  cat >"${TB_RUN}/vm${i}/snapshotter.toml" <<EOF
root = "${dir}/snapshotter"
socket = "${TB_RUN}/vm${i}/snapshotter.sock"
log_level = "info"
metrics_address = "${ip}:9111"

[lazy]
peer_listen = "${ip}:9112"
insecure_registries = ["${REG_ADDR}"]
EOF
  if [[ "$mode" == faasnet ]]; then
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

cmd_up() {
  local n="${1:-}" rate=100mbit reg_rate=400mbit mode=faasnet profile=release i
  [[ "$n" =~ ^[0-9]+$ && "$n" -ge 1 && "$n" -le 64 ]] || die "up: N must be 1..64"
  shift
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --rate) rate="$2"; shift 2 ;;
      --registry-rate) reg_rate="$2"; shift 2 ;;
      --mode) mode="$2"; shift 2 ;;
      --profile) profile="$2"; shift 2 ;;
      *) usage ;;
    esac
  done
  [[ "$mode" == faasnet || "$mode" == ondemand ]] || die "up: --mode is faasnet or ondemand"
  [[ -e "${TB_RUN}/vms" ]] && die "a testbed is up; run hack/testbed.sh down first"
  need_cmd nsenter ip tc containerd ctr ctr-remote docker-registry curl
  mkdir -p "$TB_RUN" "$TB_STATE"
  echo "$profile" >"${TB_RUN}/profile"
  echo "$mode" >"${TB_RUN}/mode"
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

  for ((i = 0; i < n; i++)); do
    add_link "$(vm_ns "$i")" "$(vm_ip "$i")" "fntbh${i}" "$rate"
    mkdir -p "${TB_RUN}/vm${i}" "${TB_STATE}/vm${i}"
    write_snapshotter_config "$i" "$mode"
    write_containerd_config "$i"
    start_daemon "vm${i}-snapshotter" "$(vm_ns "$i")" "${TB_RUN}/vm${i}/snapshotter.log" \
      "$(bin_dir)/snapshotter" --config "${TB_RUN}/vm${i}/snapshotter.toml"
    start_daemon "vm${i}-containerd" "$(vm_ns "$i")" "${TB_RUN}/vm${i}/containerd.log" \
      containerd --config "${TB_RUN}/vm${i}/containerd.toml"
  done
  for ((i = 0; i < n; i++)); do
    wait_for "vm${i} snapshotter" 30 test -S "${TB_RUN}/vm${i}/snapshotter.sock"
    wait_for "vm${i} containerd" 30 ctr -a "${TB_RUN}/vm${i}/containerd.sock" version
  done
  log "testbed up: ${n} VMs, mode ${mode}"
}

# push-image NAME: the test image NAME, pushed to the testbed registry, and its conversion.
cmd_push_image() {
  local name="${1:?push-image NAME}" orig conv
  orig="$("${HACK_DIR}/images.sh" build "$name" --registry "$REG_ADDR")"
  conv="${REG_ADDR}/faasnet/${name}:faasnet"
  "$(bin_dir)/image-converter" -q convert "$orig" "$conv" --plain-http "$REG_ADDR" >/dev/null
  echo "$orig $conv"
}

metric() {  # metric VM NAME SOURCE: value of a lazy counter on VM, 0 if absent
  curl -fsS "http://$(vm_ip "$1"):9111/metrics" 2>/dev/null |
    awk -v m="faasnet_snapshotter_lazy_$2{source=\"$3\"}" '$1 == m { printf "%d", $2; found=1 } END { if (!found) printf "0" }'
}

cmd_run() {
  local ref="${1:?run REF}" vms="" i n
  shift
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --vms) vms="$2"; shift 2 ;;
      *) usage ;;
    esac
  done
  n="$(vm_count)"
  [[ "$n" -ge 1 ]] || die "no testbed is up"
  [[ -n "$vms" ]] || vms="$(seq -s ' ' 0 $((n - 1)))"
  local out
  out="${TB_RUN}/run-$(date +%s%N)"
  mkdir -p "$out"
  log "starting ${ref} on VMs ${vms} at once"
  for i in $vms; do
    (
      sock="${TB_RUN}/vm${i}/containerd.sock"
      id="vm${i}-$(basename "$out")"
      start=$(date +%s%N)
      in_ns "$(vm_ns "$i")" ctr-remote -a "$sock" images rpull --plain-http \
        --snapshotter faasnet "$ref" >"${out}/vm${i}.pull" 2>&1 || { echo "pull failed" >"${out}/vm${i}.err"; exit 1; }
      in_ns "$(vm_ns "$i")" ctr -a "$sock" run --rm --snapshotter faasnet "$ref" "$id" 2>"${out}/vm${i}.err" |
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
  printf '%-5s %10s %8s %8s %8s  %s\n' VM start_ms cache peer registry "first output line"
  for i in $vms; do
    printf '%-5s %10s %8s %8s %8s  %s\n' "vm${i}" "$(cat "${out}/vm${i}.ms" 2>/dev/null || echo FAIL)" \
      "$(metric "$i" blocks_total cache)" "$(metric "$i" blocks_total peer)" \
      "$(metric "$i" blocks_total registry)" "$(head -1 "${out}/vm${i}.out" 2>/dev/null)"
  done
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
  for ((i = 0; i < n; i++)); do
    printf '%-5s %8s %8s %8s %8s\n' "vm${i}" "$(metric "$i" blocks_total cache)" \
      "$(metric "$i" blocks_total peer)" "$(metric "$i" blocks_total registry)" \
      "$(curl -fsS "http://$(vm_ip "$i"):9111/metrics" 2>/dev/null | awk '$1 == "faasnet_snapshotter_lazy_served_blocks_total" { printf "%d", $2 }')"
  done
}

cmd_down() {
  local n i f
  n="$(vm_count)"
  for ((i = 0; i < n; i++)); do
    local sock="${TB_RUN}/vm${i}/containerd.sock"
    if [[ -S "$sock" ]]; then
      for c in $(ctr -a "$sock" containers list -q 2>/dev/null); do
        ctr -a "$sock" tasks kill -s SIGKILL "$c" >/dev/null 2>&1 || true
        ctr -a "$sock" tasks delete -f "$c" >/dev/null 2>&1 || true
        ctr -a "$sock" containers delete "$c" >/dev/null 2>&1 || true
      done
    fi
    stop_pid "${TB_RUN}/vm${i}-containerd.pid" 10
    stop_pid "${TB_RUN}/vm${i}-snapshotter.pid" 10
  done
  stop_pid "${TB_RUN}/coordinator.pid" 5
  stop_pid "${TB_RUN}/registry.pid" 5
  # Leftover mounts (FUSE layers, container rootfs) under the testbed's dirs, deepest first.
  awk -v a="$TB_STATE" -v b="$TB_RUN" 'index($5, a) == 1 || index($5, b) == 1 { print $5 }' \
    /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  for f in /run/netns/fntb-*; do
    if [[ -e "$f" ]]; then ip netns del "$(basename "$f")"; fi
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
  down) cmd_down ;;
  status) cmd_status ;;
  push-image) cmd_push_image "$@" ;;
  run) cmd_run "$@" ;;
  -h | --help | help) usage 0 ;;
  *) usage ;;
esac
