#!/usr/bin/env bash
# hack/bench/fuse-read.sh: read throughput of the snapshotter's lazy (FUSE) layers, against the
# same image on containerd's overlayfs snapshotter, and cold reads over a rate-limited link.
# A benchmark, not a test: it measures and reports, it does not pass or fail on the numbers.
#
# Usage:
#   hack/bench/fuse-read.sh [--runs N] [--rate RATE] [--port P] [--subnet A.B.C]
#                           [--only warm|cold] [--no-build] [--no-doc] [--doc FILE] [--keep]
#                           [--snapshotter PATH] [--no-pull]
#
#   --runs N      runs of every measurement, medians reported (default 3)
#   --rate RATE   tc tbf rate of the cold link, tc syntax (default 200mbit)
#   --port P      registry port (default 5079)
#   --subnet ABC  /24 of the bench bridge, as A.B.C (default 10.79.1): host A.B.C.1, netns A.B.C.10
#   --only        run one phase only (the doc is then not written)
#   --no-build    use the release binaries as they are
#   --no-pull     skip the cold `ctr images pull` baseline
#   --keep        leave the work dir (logs, configs) behind for inspection
#   --snapshotter PATH  benchmark another snapshotter binary (e.g. an experimental build in a
#                 copy of the tree); implies --no-build and --no-doc. The environment is passed
#                 to it, so an experimental build can read knobs from it.
#
# What it does, all in one run, with the release build (target/release):
#  setup  a bridge (frbr0, A.B.C.1/24) and a network namespace (frbench, A.B.C.10) on a veth
#         pair; Debian's docker-registry listening on A.B.C.1:PORT (storage kept in
#         $STATE_ROOT/bench-fuse-read-registry so reruns skip the pushes); the realistic image
#         (hack/images.sh build realistic, cache FAASNET_IMAGES_CACHE) pushed as
#         A.B.C.1:PORT/faasnet/realistic:latest and converted with image-converter to
#         A.B.C.1:PORT/faasnet/realistic:faasnet.
#  warm   (host network, no rate limit) private containerd `fr-warm` with the snapshotter as
#         proxy plugin "faasnet"; the converted image rpulled with ctr-remote and mounted
#         (a `ctr snapshots view` of the top layer, mounted), the original pulled and mounted
#         the same way with overlayfs. Waits until the background prefetch has every block in the block cache.
#         Then, RUNS times, interleaved: `echo 3 > drop_caches` and read (a) the largest file
#         of the image with cat, (b) every file with `tar -cf - -C DIR . | wc -c`; then the
#         same read again without dropping (page cache hot). MB/s = bytes read / wall / 10^6.
#         Snapshotter CPU seconds from /proc/PID/stat. Content of both trees compared once.
#  cold   the snapshotter and containerd `fr-cold` run in the namespace (nsenter --net, which
#         keeps the mount namespace, so containerd sees the FUSE mounts); tc tbf RATE on both
#         veth ends. RUNS times each, with an empty block cache (fresh snapshotter root and
#         containerd): rpull + mount, then read the largest file, or the whole image. Link
#         bytes from the snapshotter's faasnet_snapshotter_lazy_bytes_total{source="registry"}
#         (stored block bytes) and from the host veth's tx_bytes (everything on the wire);
#         link use = wire bytes/s / RATE. Also the baseline: `ctr images pull` of the original
#         gzip image over the same link (download + unpack, no lazy loading).
#
# The markdown report goes to stdout and, unless --no-doc/--only, replaces the generated section
# of docs/benchmarks-fuse.md (between the bench:fuse-read markers; the hand-written reading
# around it is kept).
#
# Everything it starts (registry, containerds, snapshotters, mounts, netns, bridge) is stopped
# and removed on exit, also on failure or Ctrl-C; a rerun first clears leftovers of an aborted
# one. Needs root, jq, curl, tc, ip, nsenter, ctr, ctr-remote, containerd, docker-registry.
set -euo pipefail

# shellcheck source=../lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
  exit "${1:-2}"
}

RUNS=3
RATE=200mbit
PORT=5079
SUBNET=10.79.1
ONLY=""
BUILD=1
WRITE_DOC=1
KEEP=0
PULL=0
SNAP_GIVEN=""
DOC="${REPO_ROOT}/docs/benchmarks-fuse.md"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --runs) RUNS="${2:?--runs needs a value}"; shift 2 ;;
    --rate) RATE="${2:?--rate needs a value}"; shift 2 ;;
    --port) PORT="${2:?--port needs a value}"; shift 2 ;;
    --subnet) SUBNET="${2:?--subnet needs a value}"; shift 2 ;;
    --only) ONLY="${2:?--only needs warm or cold}"; WRITE_DOC=0; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --no-doc) WRITE_DOC=0; shift ;;
    --doc) DOC="${2:?--doc needs a value}"; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --no-pull) PULL=1; shift ;;
    --snapshotter) SNAP_GIVEN="$(realpath "${2:?--snapshotter needs a path}")"; BUILD=0; WRITE_DOC=0; shift 2 ;;
    -h | --help) usage 0 ;;
    *) log "unknown argument '$1'"; usage ;;
  esac
done
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive number"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "bad --port"
[[ "$SUBNET" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "bad --subnet (want A.B.C)"
[[ -z "$ONLY" || "$ONLY" == warm || "$ONLY" == cold ]] || die "--only takes warm or cold"
RATE_BPS="$(awk -v r="$RATE" 'BEGIN {
  n = r + 0; u = tolower(substr(r, length(n "") + 1))
  m = (u == "kbit") ? 1e3 / 8 : (u == "mbit") ? 1e6 / 8 : (u == "gbit") ? 1e9 / 8 : (u == "bps" || u == "") ? 1 : (u == "kbps") ? 1e3 : (u == "mbps") ? 1e6 : -1
  if (m < 0 || n <= 0) exit 1; printf "%d", n * m }')" || die "cannot parse --rate '${RATE}' (use e.g. 200mbit)"

[[ "$(id -u)" == 0 ]] || die "needs root (FUSE, mounts, netns, drop_caches)"
need_cmd jq curl tc ip nsenter ctr ctr-remote containerd docker-registry tar awk
export FAASNET_IMAGES_CACHE="${FAASNET_IMAGES_CACHE:-/var/cache/faasnet/images}"

HOST_IP="${SUBNET}.1"
NS_IP="${SUBNET}.10"
BRIDGE=frbr0
NETNS=frbench
VETH_HOST=frh0
REG="${HOST_IP}:${PORT}"
REG_DIR="${STATE_ROOT}/bench-fuse-read-registry"
WORK="${STATE_ROOT}/bench-fuse-read"
SNAP="${SNAP_GIVEN:-${REPO_ROOT}/target/release/snapshotter}"
CONVERTER="${REPO_ROOT}/target/release/image-converter"
METRICS_PORT=19181
PEER_PORT=19182
ORIG_REF="${REG}/faasnet/realistic:latest"
CONV_REF="${REG}/faasnet/realistic:faasnet"
CTRD=("${HACK_DIR}/containerd.sh")
IN_NS=(nsenter "--net=/run/netns/${NETNS}" --)

# --- cleanup ----------------------------------------------------------------------------------

# Mount points under DIR, deepest first.
mounts_under() {
  awk -v d="$1" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts | sort -r
}

unmount_under() {
  local m
  while IFS= read -r m; do
    [[ -n "$m" ]] || continue
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
  done < <(mounts_under "$1")
}

# stop_snapshotter NAME: TERM the snapshotter of phase NAME, then detach whatever it left.
stop_snapshotter() {
  local dir="${WORK}/$1"
  [[ -d "$dir" ]] || return 0
  stop_pid "${dir}/snapshotter.pid" 15
  unmount_under "$dir"
}

# teardown_phase NAME: image mounts, containerd fr-NAME (wiped), snapshotter, state.
teardown_phase() {
  local name="$1" dir="${WORK}/$1"
  if [[ -f "$dir/snapshotter.log" ]]; then
    # the logs of every phase stay in WORK/logs (see --keep)
    mkdir -p "${WORK}/logs"
    LOG_SEQ=$((${LOG_SEQ:-0} + 1))
    cp "$dir/snapshotter.log" "${WORK}/logs/${LOG_SEQ}-${name}-snapshotter.log" 2>/dev/null || true
    cp "${RUN_ROOT}/containerd-fr-${name}/containerd.log" "${WORK}/logs/${LOG_SEQ}-${name}-containerd.log" 2>/dev/null || true
  fi
  if [[ -d "$dir/mnt" ]]; then
    local m
    for m in "$dir"/mnt/*; do
      [[ -d "$m" ]] || continue
      if mountpoint -q "$m"; then
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
      fi
    done
  fi
  "${CTRD[@]}" wipe "fr-${name}" >/dev/null 2>&1 || log "containerd fr-${name}: wipe failed"
  stop_snapshotter "$name"
  unmount_under "$dir"
  rm -rf "$dir"
}

teardown_net() {
  [[ -e "/run/netns/${NETNS}" ]] && ip netns del "$NETNS" 2>/dev/null
  ip link show "$VETH_HOST" >/dev/null 2>&1 && ip link del "$VETH_HOST" 2>/dev/null
  ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE" 2>/dev/null
  return 0
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  log "cleaning up"
  teardown_phase warm
  teardown_phase cold
  stop_pid "${REG_DIR}/registry.pid" 10
  teardown_net
  if [[ "$KEEP" == 1 ]]; then
    log "kept ${WORK}"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Leftovers of an aborted run.
teardown_phase warm
teardown_phase cold
stop_pid "${REG_DIR}/registry.pid" 10
teardown_net
rm -rf "$WORK"
mkdir -p "$WORK"

# --- build, network, registry, images ---------------------------------------------------------

if [[ "$BUILD" == 1 ]]; then
  log "cargo build --release -p faasnet-snapshotter -p faasnet-image-converter"
  (cd "$REPO_ROOT" && cargo build --release --quiet -p faasnet-snapshotter -p faasnet-image-converter)
fi
[[ -x "$SNAP" && -x "$CONVERTER" ]] || die "release binaries missing (drop --no-build)"

log "network: bridge ${BRIDGE} ${HOST_IP}/24, netns ${NETNS} ${NS_IP}, tbf ${RATE} on both veth ends"
ip link add "$BRIDGE" type bridge
ip addr add "${HOST_IP}/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
ip netns add "$NETNS"
ip link add "$VETH_HOST" type veth peer name eth0 netns "$NETNS"
ip link set "$VETH_HOST" master "$BRIDGE" up
ip -n "$NETNS" addr add "${NS_IP}/24" dev eth0
ip -n "$NETNS" link set eth0 up
ip -n "$NETNS" link set lo up
TBF=(root tbf rate "$RATE" burst 256kb latency 100ms)
tc qdisc add dev "$VETH_HOST" "${TBF[@]}"
tc -n "$NETNS" qdisc add dev eth0 "${TBF[@]}"

mkdir -p "${REG_DIR}/storage"
cat >"${REG_DIR}/config.yml" <<YAML
# generated by hack/bench/fuse-read.sh
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: ${REG_DIR}/storage
  delete:
    enabled: true
  redirect:
    disable: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: ${REG}
YAML
reg_answers() { curl -fsS -o /dev/null --max-time 2 "http://${REG}/v2/"; }
launch_daemon "${WORK}/registry.out" "${WORK}/registry.log" docker-registry serve "${REG_DIR}/config.yml" >"${REG_DIR}/registry.pid"
wait_for "registry on ${REG}" 15 reg_answers || { tail -n 20 "${WORK}/registry.log" >&2; die "registry did not come up"; }
"${IN_NS[@]}" curl -fsS -o /dev/null --max-time 5 "http://${REG}/v2/" || die "registry not reachable from netns ${NETNS}"

log "image: hack/images.sh build realistic --registry ${REG}"
"${HACK_DIR}/images.sh" build realistic --registry "$REG" >/dev/null
log "convert: ${ORIG_REF} -> ${CONV_REF}"
"$CONVERTER" convert -q --plain-http "$REG" --cache-dir "${REG_DIR}/convert-cache" "$ORIG_REF" "$CONV_REF" >/dev/null

# Sizes from the registry: converted layers (stored bytes) and blocks.
CONV_MANIFEST="$(curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://${REG}/v2/faasnet/realistic/manifests/faasnet")"
ORIG_MANIFEST="$(curl -fsS -H 'Accept: application/vnd.oci.image.manifest.v1+json' "http://${REG}/v2/faasnet/realistic/manifests/latest")"
CONV_BYTES="$(jq '[.layers[].size] | add' <<<"$CONV_MANIFEST")"
ORIG_BYTES="$(jq '[.layers[].size] | add' <<<"$ORIG_MANIFEST")"
printf '%s\n' "$CONV_MANIFEST" >"${WORK}/converted-manifest.json"

# --- helpers ----------------------------------------------------------------------------------

now() { date +%s.%N; }
# cpu_s PID: user + sys CPU seconds of PID so far.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz }' "/proc/$1/stat"; }
# host_cpu_busy: busy jiffies and total jiffies of the whole machine ("busy total").
host_cpu() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# metric PORT_OR_CMD NAME [LABELS]: value of one counter (0 when absent). Reads $METRICS_CMD.
metric() {
  local name="$1" labels="${2:-}"
  "${METRICS_CMD[@]}" curl -fsS --max-time 5 "http://127.0.0.1:${METRICS_PORT}/metrics" |
    awk -v n="$name" -v l="$labels" '
      $1 == n || $1 == n "{" l "}" { v = $2 }
      END { printf "%d", v + 0 }'
}

# start_phase NAME [nsenter...]: snapshotter + containerd fr-NAME (in the netns for cold).
start_phase() {
  local name="$1" dir="${WORK}/$1"
  shift
  local pre=("$@")
  mkdir -p "$dir/root" "$dir/mnt"
  cat >"$dir/snapshotter.toml" <<TOML
root = "${dir}/root"
socket = "${dir}/snapshotter.sock"
log_level = "info"
metrics_address = "127.0.0.1:${METRICS_PORT}"

[lazy]
peer_listen = "127.0.0.1:${PEER_PORT}"
insecure_registries = ["${REG}"]
TOML
  launch_daemon "$dir/snapshotter.log" "$dir/snapshotter.log" "${pre[@]}" "$SNAP" --config "$dir/snapshotter.toml" >"$dir/snapshotter.pid"
  SNAP_PID="$(<"$dir/snapshotter.pid")"
  wait_for "snapshotter ${name}" 20 test -S "$dir/snapshotter.sock" || { tail -n 20 "$dir/snapshotter.log" >&2; die "snapshotter ${name} did not come up"; }
  [[ "$(cat "/proc/${SNAP_PID}/comm")" == snapshotter ]] || die "pid ${SNAP_PID} is not the snapshotter"
  "${pre[@]}" "${CTRD[@]}" start "fr-${name}" --snapshotter-socket "$dir/snapshotter.sock" >/dev/null 2>"$dir/containerd-start.log" ||
    { cat "$dir/containerd-start.log" >&2; die "containerd fr-${name} did not start"; }
  CTR_SOCK="$("${CTRD[@]}" sock "fr-${name}")"
}

# chain_id MANIFEST_JSON: the chain ID of the image's top layer (from its config's diff_ids).
chain_id() {
  local cfg chain="" d
  cfg="$(curl -fsS "http://${REG}/v2/faasnet/realistic/blobs/$(jq -r .config.digest <<<"$1")")"
  for d in $(jq -r '.rootfs.diff_ids[]' <<<"$cfg"); do
    if [[ -z "$chain" ]]; then
      chain="$d"
    else
      chain="sha256:$(printf '%s %s' "$chain" "$d" | sha256sum | cut -d' ' -f1)"
    fi
  done
  echo "$chain"
}

# view_mount SNAPSHOTTER CHAIN DIR [nsenter...]: a read-only view of the image's top snapshot,
# mounted at DIR. (`ctr images mount --snapshotter` of containerd 1.6 ignores the flag: it
# reads a global flag that does not exist, so it would always use overlayfs.)
view_mount() {
  local sn="$1" chain="$2" dir="$3" mounts
  shift 3
  mkdir -p "$dir"
  mounts="$("$@" ctr -a "$CTR_SOCK" snapshots --snapshotter "$sn" view --mounts "fr-view-${sn}" "$chain")"
  [[ "$(jq length <<<"$mounts")" == 1 ]] || die "unexpected mounts for the ${sn} view: ${mounts}"
  mount -t "$(jq -r '.[0] | .type // .Type' <<<"$mounts")" -o "$(jq -r '.[0] | .options // .Options | join(",")' <<<"$mounts")" \
    "$(jq -r '.[0] | .source // .Source' <<<"$mounts")" "$dir"
}

# Per-measurement records: "$WORK/results/NAME" holds one line per run: "bytes seconds cpu ...".
mkdir -p "${WORK}/results"
record() { local name="$1"; shift; echo "$*" >>"${WORK}/results/${name}"; }

# read_tar DIR: prints the bytes of the tar stream of DIR (every file read once).
read_tar() { tar -cf - -C "$1" . | wc -c; }
# (cat: `wc -c <FILE` would only stat a regular file.)
# shellcheck disable=SC2002
read_file() { cat "$1" | wc -c; }

# timed_read NAME PID KIND PATH: runs read_KIND PATH, records "bytes seconds snapshotter-cpu-s
# block-bytes-the-snapshotter-read-from-its-disk-cache".
timed_read() {
  local name="$1" pid="$2" kind="$3" path="$4" t0 t1 c0 c1 k0 k1 bytes
  k0="$(metric faasnet_snapshotter_lazy_bytes_total 'source="cache"')"
  c0="$(cpu_s "$pid")"
  t0="$(now)"
  bytes="$("read_${kind}" "$path")"
  t1="$(now)"
  c1="$(cpu_s "$pid")"
  k1="$(metric faasnet_snapshotter_lazy_bytes_total 'source="cache"')"
  record "$name" "$bytes $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }') $(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }') $((k1 - k0))"
  check_bytes "$name" "$kind" "$bytes"
}

# check_bytes NAME KIND BYTES: every read of a kind must see the same bytes (a FUSE mount that
# vanished, e.g. detached by someone else's cleanup, reads as an empty directory).
declare -A EXPECT=()
check_bytes() {
  if [[ -z "${EXPECT[$2]:-}" ]]; then
    EXPECT[$2]="$3"
  elif [[ "${EXPECT[$2]}" != "$3" ]]; then
    die "$1: read $3 bytes, earlier reads of the same tree saw ${EXPECT[$2]} (a mount vanished?)"
  fi
}

# median FILE COLUMN: median of one column over the runs.
median() {
  awk -v c="$2" '{ print $c }' "$1" | sort -g |
    awk '{ v[NR] = $1 } END { if (NR == 0) { print "n/a"; exit } x = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print x }'
}
# mbps FILE: median MB/s (bytes / seconds per run).
mbps() {
  awk '{ if ($2 > 0) print $1 / $2 / 1e6 }' "$1" | sort -g |
    awk '{ v[NR] = $1 } END { if (NR == 0) { print "n/a"; exit } x = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.1f", x }'
}
all_mbps() { awk '{ printf "%s%.1f", sep, $1 / $2 / 1e6; sep = " / " }' "$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 == 0 || a == "n/a" || b == "n/a") print "n/a"; else printf "%.2f", a / b }'; }

CONV_CHAIN="$(chain_id "$CONV_MANIFEST")"
ORIG_CHAIN="$(chain_id "$ORIG_MANIFEST")"

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"

# --- warm -------------------------------------------------------------------------------------

BIG_REL=""
CONTENT_CHECK="not run"
PREFETCH_WAIT=""
if [[ "$ONLY" != cold ]]; then
  log "warm: snapshotter + containerd fr-warm (host network)"
  METRICS_CMD=()
  start_phase warm
  WARM_PID="$SNAP_PID"
  t0="$(now)"
  ctr-remote -a "$CTR_SOCK" images rpull --plain-http --snapshotter faasnet "$CONV_REF" >/dev/null
  ctr -a "$CTR_SOCK" images pull --plain-http "$ORIG_REF" >/dev/null
  FUSE_DIR="${WORK}/warm/mnt/fuse"
  OV_DIR="${WORK}/warm/mnt/overlay"
  mkdir -p "$FUSE_DIR" "$OV_DIR"
  view_mount faasnet "$CONV_CHAIN" "$FUSE_DIR"
  view_mount overlayfs "$ORIG_CHAIN" "$OV_DIR"
  [[ "$(metric faasnet_snapshotter_remote_prepares_total)" -gt 0 ]] ||
    die "no layer was mounted lazily (see ${WORK}/warm/snapshotter.log)"
  awk -v d="${WORK}/warm/root/" 'index($2, d) == 1 && $3 ~ /^fuse/ { n++ } END { exit n == 0 }' /proc/self/mounts ||
    die "no FUSE mount under ${WORK}/warm/root"
  FUSE_TYPE="$(awk -v d="${WORK}/warm/root/" 'index($2, d) == 1 && $3 ~ /^fuse/ { print $3; exit }' /proc/self/mounts)"
  log "warm: layers mounted (${FUSE_TYPE})"

  # Wait for the prefetch: every block fetched (registry counter stops growing) and written.
  log "warm: waiting for the prefetch to fill the block cache"
  last=-1
  stable=0
  for ((i = 0; i < 600; i++)); do
    cur="$(metric faasnet_snapshotter_lazy_bytes_total 'source="registry"')"
    if [[ "$cur" == "$last" ]]; then
      stable=$((stable + 1))
      ((stable >= 6)) && break
    else
      stable=0
    fi
    last="$cur"
    sleep 0.5
  done
  PREFETCH_WAIT="$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')"
  WARM_REG_BYTES="$cur"
  WARM_PREFETCHED="$(metric faasnet_snapshotter_lazy_prefetched_blocks_total)"
  WARM_REG_BLOCKS="$(metric faasnet_snapshotter_lazy_blocks_total 'source="registry"')"
  log "warm: ${WARM_REG_BLOCKS} blocks (${WARM_REG_BYTES} bytes) from the registry, ${WARM_PREFETCHED} by prefetch, after ${PREFETCH_WAIT}s"
  sync

  # The largest regular file of the image.
  BIG_REL="$(cd "$OV_DIR" && find . -xdev -type f -printf '%s %P\n' | awk '$1 + 0 > max { max = $1 + 0; p = substr($0, index($0, " ") + 1) } END { print p }')"
  [[ -n "$BIG_REL" ]] || die "no file in the image"
  log "warm: largest file ${BIG_REL} ($(stat -c %s "$OV_DIR/$BIG_REL") bytes)"

  for r in $(seq 1 "$RUNS"); do
    log "warm: run ${r}/${RUNS}"
    for what in fuse overlay; do
      dir="$FUSE_DIR"
      [[ "$what" == overlay ]] && dir="$OV_DIR"
      drop_caches
      timed_read "warm-file-${what}" "$WARM_PID" file "$dir/$BIG_REL"
      timed_read "hot-file-${what}" "$WARM_PID" file "$dir/$BIG_REL"
      drop_caches
      timed_read "warm-tar-${what}" "$WARM_PID" tar "$dir"
      timed_read "hot-tar-${what}" "$WARM_PID" tar "$dir"
    done
  done
  WARM_REG_AFTER="$(metric faasnet_snapshotter_lazy_bytes_total 'source="registry"')"
  [[ "$WARM_REG_AFTER" == "$WARM_REG_BYTES" ]] ||
    log "warning: $((WARM_REG_AFTER - WARM_REG_BYTES)) registry bytes fetched during the warm runs (prefetch was not complete)"

  log "warm: comparing the content of both trees"
  if diff <(cd "$FUSE_DIR" && find . -xdev -type f -print0 | sort -z | xargs -0 sha256sum) \
    <(cd "$OV_DIR" && find . -xdev -type f -print0 | sort -z | xargs -0 sha256sum) >"${WORK}/content.diff"; then
    CONTENT_CHECK="identical ($(cd "$OV_DIR" && find . -xdev -type f | wc -l) regular files)"
  else
    CONTENT_CHECK="DIFFERENT (see ${WORK}/content.diff; run with --keep)"
    log "warning: FUSE and overlayfs trees differ"
  fi
  teardown_phase warm
fi

# --- cold -------------------------------------------------------------------------------------

if [[ "$ONLY" != warm ]]; then
  METRICS_CMD=("${IN_NS[@]}")
  if [[ -z "$BIG_REL" ]]; then
    # --only cold: find the largest file from the original image's tar listing.
    BIG_REL="$(for d in $(jq -r '.layers[].digest' <<<"$ORIG_MANIFEST"); do
      curl -fsS "http://${REG}/v2/faasnet/realistic/blobs/${d}" | tar -tvzf - 2>/dev/null
    done | awk '$1 ~ /^-/ && $3 + 0 > max { max = $3 + 0; p = $6 } END { sub(/^\.\//, "", p); print p }')"
  fi
  tx() { cat "/sys/class/net/${VETH_HOST}/statistics/tx_bytes"; }

  # cold_run KIND: fresh snapshotter + containerd in the netns, rpull, mount, read, record
  # "file-bytes seconds snapshotter-cpu registry-bytes wire-bytes rpull-seconds host-busy-share".
  cold_run() {
    local kind="$1" dir="${WORK}/cold" t0 t1 c0 c1 r0 r1 b0 b1 p0 p1 w0 w1 bytes target h0 h1 ht0 ht1 tp
    teardown_phase cold
    start_phase cold "${IN_NS[@]}"
    mkdir -p "$dir/mnt/fuse"
    tp="$(now)"
    "${IN_NS[@]}" ctr-remote -a "$CTR_SOCK" images rpull --plain-http --snapshotter faasnet "$CONV_REF" >/dev/null
    view_mount faasnet "$CONV_CHAIN" "$dir/mnt/fuse" "${IN_NS[@]}"
    tp="$(awk -v a="$tp" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')"
    target="$dir/mnt/fuse"
    [[ "$kind" == file ]] && target="$dir/mnt/fuse/$BIG_REL"
    r0="$(metric faasnet_snapshotter_lazy_bytes_total 'source="registry"')"
    b0="$(metric faasnet_snapshotter_lazy_blocks_total 'source="registry"')"
    p0="$(metric faasnet_snapshotter_lazy_prefetched_blocks_total)"
    w0="$(tx)"
    c0="$(cpu_s "$SNAP_PID")"
    read -r h0 ht0 < <(host_cpu)
    t0="$(now)"
    bytes="$("read_${kind}" "$target")"
    t1="$(now)"
    check_bytes "cold-${kind}" "$kind" "$bytes"
    read -r h1 ht1 < <(host_cpu)
    c1="$(cpu_s "$SNAP_PID")"
    w1="$(tx)"
    r1="$(metric faasnet_snapshotter_lazy_bytes_total 'source="registry"')"
    b1="$(metric faasnet_snapshotter_lazy_blocks_total 'source="registry"')"
    p1="$(metric faasnet_snapshotter_lazy_prefetched_blocks_total)"
    record "cold-${kind}" "$bytes $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }') $(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }') $((r1 - r0)) $((w1 - w0)) ${tp} $(awk -v a="$h0" -v b="$h1" -v s="$ht0" -v e="$ht1" 'BEGIN { printf "%.2f", (b - a) / (e - s) }') ${r0} $((b1 - b0)) $((p1 - p0))"
  }

  # Baseline: the original gzip image pulled and unpacked over the same link (overlayfs).
  pull_run() {
    local dir="${WORK}/cold" t0 t1 w0 w1
    teardown_phase cold
    start_phase cold "${IN_NS[@]}"
    w0="$(tx)"
    t0="$(now)"
    "${IN_NS[@]}" ctr -a "$CTR_SOCK" images pull --plain-http "$ORIG_REF" >/dev/null
    t1="$(now)"
    w1="$(tx)"
    record pull "${ORIG_BYTES} $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }') 0 0 $((w1 - w0))"
  }

  for r in $(seq 1 "$RUNS"); do
    log "cold: run ${r}/${RUNS}: largest file, whole image, full pull baseline (link ${RATE})"
    cold_run file
    cold_run tar
    if [[ "$PULL" == 0 ]]; then pull_run; fi
  done
  teardown_phase cold
fi
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

# --- report -----------------------------------------------------------------------------------

CPU_MODEL="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
VERSION="$(cd "$REPO_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
DIRTY="$(cd "$REPO_ROOT" && git status --porcelain -- snapshotter format 2>/dev/null | head -c1)"
[[ -n "$DIRTY" ]] && VERSION="${VERSION} (snapshotter/ or format/ modified)"
RES="${WORK}/results"
BLOCK_SIZE="$(jq -r '[.layers[].annotations["io.faasnet.layer.block-size"] // empty] | first // "?"' <<<"$CONV_MANIFEST")"

report() {
  echo "Generated by \`hack/bench/fuse-read.sh\` on $(date -u +%Y-%m-%dT%H:%MZ), commit ${VERSION}, release build."
  echo
  echo "* Machine: $(nproc) cores, ${CPU_MODEL:-unknown CPU}, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM, $(uname -r), $(findmnt -no FSTYPE -T "$STATE_ROOT" 2>/dev/null || echo '?') under ${STATE_ROOT}."
  echo "* Load average (1/5/15 min) before: ${LOAD_BEFORE}, after: ${LOAD_AFTER} (the machine is shared; others compile meanwhile)."
  echo "* Image: \`realistic\` (hack/images.sh), original ${ORIG_BYTES} bytes of gzip layers, converted ${CONV_BYTES} bytes (LZ4 blocks of ${BLOCK_SIZE}); largest file \`/${BIG_REL}\`."
  [[ -n "$SNAP_GIVEN" ]] && echo "* Snapshotter: ${SNAP_GIVEN} (--snapshotter); environment knobs: $(env | grep '^FR_' | tr '\n' ' ' || true)"
  echo "* ${RUNS} runs of each, medians (all runs listed). MB = 10^6 bytes."
  if [[ "$ONLY" != cold ]]; then
    echo
    echo "### Warm: every block in the local block cache"
    echo
    echo "Prefetch filled the block cache in ${PREFETCH_WAIT}s after the rpull began (${WARM_REG_BLOCKS} blocks, ${WARM_REG_BYTES} bytes from the local registry). Content of the two trees: ${CONTENT_CHECK}."
    echo "\"warm\": \`echo 3 > /proc/sys/vm/drop_caches\` before the read (FUSE reads go to the block cache file on disk, overlayfs reads to ext4); \"hot\": the same read right after, page cache full. Whole image: \`tar -cf - -C DIR . | wc -c\` (MB/s of tar stream). Snapshotter CPU: user+sys seconds of the daemon during the read."
    echo
    echo "| read | FUSE MB/s | runs | overlayfs MB/s | runs | FUSE / overlayfs | snapshotter CPU s (FUSE) |"
    echo "|---|---:|---|---:|---|---:|---:|"
    local k label f o
    for k in warm-file hot-file warm-tar hot-tar; do
      case "$k" in
        warm-file) label="largest file, warm (page cache dropped)" ;;
        hot-file) label="largest file, page cache hot" ;;
        warm-tar) label="whole image (tar), warm (page cache dropped)" ;;
        hot-tar) label="whole image (tar), page cache hot" ;;
      esac
      f="$(mbps "$RES/$k-fuse")"
      o="$(mbps "$RES/$k-overlay")"
      printf '| %s | %s | %s | %s | %s | **%sx** | %s |\n' "$label" "$f" "$(all_mbps "$RES/$k-fuse")" "$o" \
        "$(all_mbps "$RES/$k-overlay")" "$(ratio "$f" "$o")" "$(median "$RES/$k-fuse" 3)"
    done
    echo
    echo "Target: warm FUSE / overlayfs >= 0.6x."
  fi
  if [[ "$ONLY" != warm ]]; then
    echo
    echo "### Cold: empty block cache, link limited to ${RATE} ($(awk -v b="$RATE_BPS" 'BEGIN { printf "%.1f", b / 1e6 }') MB/s) by tc tbf"
    echo
    echo "Snapshotter and containerd in a network namespace, the registry on the host side of the veth. Each run starts from a fresh snapshotter root and containerd; the read begins right after \`rpull\` + mount of a view (background prefetch runs from the mount on, so it shares the link with the read). registry MB/s: stored (compressed) block bytes from \`faasnet_snapshotter_lazy_bytes_total{source=\"registry\"}\` during the read / read time; wire MB/s: the host veth's tx_bytes (HTTP, TCP/IP included) / read time; link use = wire MB/s / tc rate. Host CPU busy: share of all $(nproc) cores busy during the read (anything on the machine)."
    echo
    echo "| read | bytes read | s (median) | file MB/s | runs | registry MB/s | wire MB/s | link use | snapshotter CPU s | host CPU busy | rpull+mount s | fetched before read | registry blocks during the read: prefetch or read-ahead / all |"
    echo "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"
    local k label
    for k in file tar; do
      case "$k" in
        file) label="largest file (\`cat\`)" ;;
        tar) label="whole image (\`tar\`)" ;;
      esac
      local f="$RES/cold-$k"
      printf '| %s | %s | %s | %s | %s | %s | %s | **%s** | %s | %s | %s | %s MB | %s |\n' "$label" "$(median "$f" 1)" "$(median "$f" 2)" \
        "$(mbps "$f")" "$(all_mbps "$f")" \
        "$(awk '{ print $4 / $2 / 1e6 }' "$f" | sort -g | awk '{ v[NR] = $1 } END { printf "%.1f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')" \
        "$(awk '{ print $5 / $2 / 1e6 }' "$f" | sort -g | awk '{ v[NR] = $1 } END { printf "%.1f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')" \
        "$(awk -v r="$RATE_BPS" '{ print $5 / $2 / r }' "$f" | sort -g | awk '{ v[NR] = $1 } END { printf "%.2fx", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')" \
        "$(median "$f" 3)" "$(awk '{ printf "%s%.0f%%", sep, $7 * 100; sep = " / " }' "$f")" "$(median "$f" 6)" \
        "$(awk '{ print $8 / 1e6 }' "$f" | sort -g | awk '{ v[NR] = $1 } END { printf "%.1f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')" \
        "$(awk '{ printf "%s%d / %d", sep, $10, $9; sep = ", " }' "$f")"
    done
    echo
    local e2e
    e2e="$(awk '{ print $2 + $6 }' "$RES/cold-tar" | sort -g | awk '{ v[NR] = $1 } END { printf "%.2f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')"
    echo "Whole image end to end (rpull + mount + tar of every file, the whole converted image crosses the link): ${e2e} s median; the converted image alone needs $(awk -v b="$CONV_BYTES" -v r="$RATE_BPS" 'BEGIN { printf "%.2f", b / r }') s at the tc rate, so end-to-end link use is **$(awk -v b="$CONV_BYTES" -v r="$RATE_BPS" -v t="$e2e" 'BEGIN { printf "%.2fx", b / r / t }')**."
    echo
    local pull_s
    if [[ -f "$RES/pull" ]]; then
      pull_s="$(median "$RES/pull" 2)"
      echo "Baseline over the same link: \`ctr images pull\` of the original gzip image (download ${ORIG_BYTES} bytes + unpack into overlayfs): ${pull_s} s median (runs $(awk '{ printf "%s%.1f", sep, $2; sep = " / " }' "$RES/pull") s), wire $(awk '{ print $5 / $2 / 1e6 }' "$RES/pull" | sort -g | awk '{ v[NR] = $1 } END { printf "%.1f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }') MB/s. Converted image at the tc rate: $(awk -v b="$CONV_BYTES" -v r="$RATE_BPS" 'BEGIN { printf "%.1f", b / r }') s."
    fi
    echo
    echo "Target: cold link use >= 0.8x."
  fi
}

REPORT="$(report)"
printf '%s\n' "$REPORT"
cp -r "$RES" "${TMPDIR:-/tmp}/fuse-read-results.$$" 2>/dev/null && log "raw results: ${TMPDIR:-/tmp}/fuse-read-results.$$"

if [[ "$WRITE_DOC" == 1 ]]; then
  printf '%s\n' "$REPORT" >"${WORK}/report.md"
  write_doc_section "$DOC" fuse-read "Snapshotter read benchmark" "${WORK}/report.md"
  log "wrote the results into ${DOC}"
fi
