#!/usr/bin/env bash
# hack/bench/convert.sh: converter throughput and size against plain gzip decompression, on a
# cached test image (default: realistic, built by hack/images.sh). Not a test: it measures.
#
# Usage:
#   hack/bench/convert.sh [--image NAME] [--runs N] [--threads N] [--no-build] [--no-doc]
#                         [--doc FILE] [--converter PATH]
#
# In one run, RUNS times each, interleaved, all inputs in the page cache (warm):
#   zcat       `zcat` of every gzip layer of the image > /dev/null (one process per layer,
#              one after another: single-threaded, like any gzip consumer)
#   convert    `image-converter convert oci:LAYOUT:latest oci:TMP:latest --force` with the
#              release build, --threads N (default: nproc) and the default --jobs
#   convert-1  the same with --threads 1 --jobs 1 (one core, for a per-core comparison)
# and reports the median wall time, MB/s of uncompressed tar (MB = 10^6 bytes), CPU seconds
# (user+sys from /usr/bin/time) and the converter/zcat throughput ratio (target >= 0.8x);
# then the converted vs gzip size per layer and in total (target <= 1.4x), from the blob
# sizes of the two OCI layouts.
#
# The markdown report goes to stdout and, unless --no-doc, replaces the generated section of
# docs/benchmarks-convert.md (between the bench:convert markers; the rest of the file, the
# hand-written reading of the results, is kept).
#
# --converter PATH benchmarks another image-converter binary (e.g. one built with another
# flate2 backend in a copy of the tree); it implies --no-build, and --no-doc unless --doc is
# given.
#
# Environment: FAASNET_IMAGES_CACHE (default /var/cache/faasnet/images, as hack/test.sh),
# TMPDIR for the converted layouts. Needs jq, gzip, /usr/bin/time (package `time`), cargo.
set -euo pipefail

# shellcheck source=../lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/common.sh"

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
  exit "${1:-2}"
}

IMAGE=realistic
CONVERTER=""
RUNS=3
THREADS="$(nproc)"
BUILD=1
DOC="${REPO_ROOT}/docs/benchmarks-convert.md"
WRITE_DOC=1
DOC_GIVEN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --image) IMAGE="${2:?--image needs a value}"; shift 2 ;;
    --runs) RUNS="${2:?--runs needs a value}"; shift 2 ;;
    --threads) THREADS="${2:?--threads needs a value}"; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --converter) CONVERTER="${2:?--converter needs a path}"; BUILD=0; shift 2 ;;
    --doc) DOC="${2:?--doc needs a value}"; DOC_GIVEN=1; shift 2 ;;
    --no-doc) WRITE_DOC=0; shift ;;
    -h | --help) usage 0 ;;
    *) log "unknown argument '$1'"; usage ;;
  esac
done
[[ -n "$CONVERTER" && "$DOC_GIVEN" == 0 ]] && WRITE_DOC=0
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive number"
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive number"

need_cmd jq zcat awk sha256sum
[[ -x /usr/bin/time ]] || die "missing /usr/bin/time (apt-get install time)"
export FAASNET_IMAGES_CACHE="${FAASNET_IMAGES_CACHE:-/var/cache/faasnet/images}"

# --- inputs ---------------------------------------------------------------------------------

CUSTOM_CONVERTER=0
if [[ -z "$CONVERTER" ]]; then
  CONVERTER="${REPO_ROOT}/target/release/image-converter"
else
  CUSTOM_CONVERTER=1
  CONVERTER="$(realpath "$CONVERTER")"
fi
if [[ "$BUILD" == 1 ]]; then
  log "cargo build --release -p faasnet-image-converter"
  (cd "$REPO_ROOT" && cargo build --release --quiet -p faasnet-image-converter)
fi
[[ -x "$CONVERTER" ]] || die "${CONVERTER} is not built (drop --no-build)"

if ! LAYOUT="$("${HACK_DIR}/images.sh" layout "$IMAGE" 2>/dev/null)"; then
  log "${IMAGE} is not built yet: hack/images.sh build ${IMAGE} --no-push (realistic takes minutes)"
  "${HACK_DIR}/images.sh" build "$IMAGE" --no-push >/dev/null
  LAYOUT="$("${HACK_DIR}/images.sh" layout "$IMAGE")"
fi

blob() { echo "$1/blobs/${2%%:*}/${2#*:}"; }
# manifest_of LAYOUT: path of the manifest blob tagged latest.
manifest_of() {
  blob "$1" "$(jq -r '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == "latest") | .digest' "$1/index.json")"
}

MANIFEST="$(manifest_of "$LAYOUT")"
mapfile -t LAYER_DIGESTS < <(jq -r '.layers[].digest' "$MANIFEST")
mapfile -t LAYER_TYPES < <(jq -r '.layers[].mediaType' "$MANIFEST")
LAYER_FILES=()
for i in "${!LAYER_DIGESTS[@]}"; do
  [[ "${LAYER_TYPES[$i]}" == *gzip ]] || die "layer ${LAYER_DIGESTS[$i]} is ${LAYER_TYPES[$i]}, not gzip"
  LAYER_FILES+=("$(blob "$LAYOUT" "${LAYER_DIGESTS[$i]}")")
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/faasnet-bench-convert.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Warm the page cache and measure the uncompressed sizes once.
declare -A UNCOMPRESSED
TOTAL_UNCOMPRESSED=0
for i in "${!LAYER_FILES[@]}"; do
  n="$(zcat "${LAYER_FILES[$i]}" | wc -c)"
  UNCOMPRESSED[${LAYER_DIGESTS[$i]}]="$n"
  TOTAL_UNCOMPRESSED=$((TOTAL_UNCOMPRESSED + n))
done
log "${IMAGE}: ${#LAYER_FILES[@]} gzip layers, ${TOTAL_UNCOMPRESSED} bytes of tar (${LAYOUT})"

# --- timing ---------------------------------------------------------------------------------

# timed NAME CMD...: runs CMD under /usr/bin/time, appends "wall user sys" to $WORK/NAME.times.
timed() {
  local name="$1"
  shift
  /usr/bin/time -f '%e %U %S' -o "$WORK/$name.last" "$@" >/dev/null 2>"$WORK/$name.err" ||
    { cat "$WORK/$name.err" >&2; die "${name} failed: $*"; }
  cat "$WORK/$name.last" >>"$WORK/$name.times"
}

# shellcheck disable=SC2016 # $f expands in the inner bash
run_zcat() { timed zcat bash -c 'for f; do zcat "$f"; done >/dev/null' _ "${LAYER_FILES[@]}"; }

# run_convert NAME ARGS...: converts into a fresh layout (so no run finds the previous blobs).
run_convert() {
  local name="$1"
  shift
  rm -rf "$WORK/out-$name" "$WORK/cache"
  timed "$name" "$CONVERTER" convert "oci:${LAYOUT}:latest" "oci:$WORK/out-$name:latest" \
    --force --quiet --cache-dir "$WORK/cache" "$@"
}

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq 1 "$RUNS"); do
  log "run ${r}/${RUNS}: zcat, convert (--threads ${THREADS}), convert (--threads 1 --jobs 1)"
  run_zcat
  run_convert convert --threads "$THREADS"
  run_convert convert-1 --threads 1 --jobs 1
done
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

# median FILE COLUMN-EXPR: median over the runs of an awk expression on "wall user sys".
median() {
  awk "{ print $2 }" "$1" | sort -g | awk '{ v[NR] = $1 } END { printf "%.2f", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
all_runs() { awk '{ printf "%s%s", sep, $1; sep = " / " }' "$1"; }

declare -A WALL CPU MBPS MBCPU
# shellcheck disable=SC2016 # awk expressions
for n in zcat convert convert-1; do
  WALL[$n]="$(median "$WORK/$n.times" '$1')"
  CPU[$n]="$(median "$WORK/$n.times" '$2 + $3')"
  MBPS[$n]="$(awk -v b="$TOTAL_UNCOMPRESSED" -v t="${WALL[$n]}" 'BEGIN { printf "%.1f", b / t / 1e6 }')"
  MBCPU[$n]="$(awk -v b="$TOTAL_UNCOMPRESSED" -v t="${CPU[$n]}" 'BEGIN { printf "%.1f", b / t / 1e6 }')"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

# --- sizes ----------------------------------------------------------------------------------

CONV_LAYOUT="$WORK/out-convert"
CONV_MANIFEST="$(manifest_of "$CONV_LAYOUT")"

# --- report ---------------------------------------------------------------------------------

CPU_MODEL="$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
VERSION="$(cd "$REPO_ROOT" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
DIRTY="$(cd "$REPO_ROOT" && git status --porcelain -- image-converter format 2>/dev/null | head -c1)"
[[ -n "$DIRTY" ]] && VERSION="${VERSION} (image-converter/ or format/ modified)"

report() {
  echo "Generated by \`hack/bench/convert.sh\` on $(date -u +%Y-%m-%dT%H:%MZ), commit ${VERSION}."
  echo
  echo "* Machine: $(nproc) cores, ${CPU_MODEL:-unknown CPU}, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM, $(uname -r)."
  echo "* Load average (1/5/15 min) before: ${LOAD_BEFORE}, after: ${LOAD_AFTER} (the machine is shared)."
  echo "* Image: \`${IMAGE}\` ($(basename "$LAYOUT")), ${#LAYER_FILES[@]} gzip layers, ${TOTAL_UNCOMPRESSED} bytes of uncompressed tar; inputs in the page cache."
  if [[ "$CUSTOM_CONVERTER" == 1 ]]; then
    echo "* Converter: ${CONVERTER} (given with --converter)."
  else
    echo "* Converter: release build, gzip via flate2 $(cd "$REPO_ROOT" && cargo tree -p faasnet-image-converter -i flate2 -e features --prefix none 2>/dev/null | grep -o 'feature "\(miniz_oxide\|zlib-rs\|zlib\|zlib-ng\|zlib-ng-compat\|cloudflare_zlib\)"' | sort -u | tr '\n' ' ' || echo '?')backend."
  fi
  echo "* ${RUNS} runs of each, interleaved; medians. MB/s = uncompressed tar bytes / wall time / 10^6. CPU = user + sys seconds."
  echo
  echo "| what | wall (s), median | runs (s) | MB/s of tar | vs zcat | CPU (s) | CPU / wall | MB per CPU-s | vs zcat |"
  echo "|---|---:|---|---:|---:|---:|---:|---:|---:|"
  local n label
  for n in zcat convert convert-1; do
    case "$n" in
      zcat) label="\`zcat\` each layer > /dev/null" ;;
      convert) label="\`image-converter convert\` (--threads ${THREADS}, default --jobs)" ;;
      convert-1) label="\`image-converter convert --threads 1 --jobs 1\`" ;;
    esac
    printf '| %s | %s | %s | %s | %sx | %s | %s | %s | %sx |\n' "$label" "${WALL[$n]}" "$(all_runs "$WORK/$n.times")" \
      "${MBPS[$n]}" "$(ratio "${MBPS[$n]}" "${MBPS[zcat]}")" "${CPU[$n]}" "$(ratio "${CPU[$n]}" "${WALL[$n]}")" \
      "${MBCPU[$n]}" "$(ratio "${MBCPU[$n]}" "${MBCPU[zcat]}")"
  done
  echo
  echo "Throughput ratio converter / zcat (wall): **$(ratio "${MBPS[convert]}" "${MBPS[zcat]}")x** with ${THREADS} threads (target >= 0.8x), $(ratio "${MBPS[convert-1]}" "${MBPS[zcat]}")x with one compression thread and one layer at a time. Per CPU-second (work done per unit of CPU, independent of parallelism and less sensitive to load): $(ratio "${MBCPU[convert]}" "${MBCPU[zcat]}")x."
  echo
  echo "| layer | tar bytes | gzip bytes | converted bytes | converted / gzip | blocks |"
  echo "|---|---:|---:|---:|---:|---:|"
  local d bs conv_size gz_size blocks tot_gz=0 tot_conv=0 tot_blocks=0
  for i in "${!LAYER_DIGESTS[@]}"; do
    d="${LAYER_DIGESTS[$i]}"
    gz_size="$(stat -c %s "${LAYER_FILES[$i]}")"
    conv_size="$(jq -r --arg d "$d" '.layers[] | select(.annotations["io.faasnet.layer.original-digest"] == $d) | .size' "$CONV_MANIFEST")"
    [[ -n "$conv_size" ]] || die "no converted layer for ${d}"
    bs="$(jq -r --arg d "$d" '.layers[] | select(.annotations["io.faasnet.layer.original-digest"] == $d) | .annotations["io.faasnet.layer.block-size"]' "$CONV_MANIFEST")"
    blocks="$(awk -v t="${UNCOMPRESSED[$d]}" -v bs="$bs" 'BEGIN { printf "%d", int((t + bs - 1) / bs) }')"
    tot_gz=$((tot_gz + gz_size))
    tot_conv=$((tot_conv + conv_size))
    tot_blocks=$((tot_blocks + blocks))
    printf '| %s | %s | %s | %s | %sx | %s |\n' "${d:7:12}" "${UNCOMPRESSED[$d]}" "$gz_size" "$conv_size" \
      "$(ratio "$conv_size" "$gz_size")" "$blocks"
  done
  printf '| **total** | %s | %s | %s | **%sx** | %s |\n' "$TOTAL_UNCOMPRESSED" "$tot_gz" "$tot_conv" \
    "$(ratio "$tot_conv" "$tot_gz")" "$tot_blocks"
  echo
  echo "Size target: converted / gzip <= 1.4x (block size 512 KiB)."
}

REPORT="$(report)"
printf '%s\n' "$REPORT"

if [[ "$WRITE_DOC" == 1 ]]; then
  printf '%s\n' "$REPORT" >"$WORK/report.md"
  write_doc_section "$DOC" convert "Converter benchmark" "$WORK/report.md"
  log "wrote the results into ${DOC}"
fi
