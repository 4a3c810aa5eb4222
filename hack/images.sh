#!/usr/bin/env bash
# hack/images.sh: builds the FaaSNet test images locally (nothing comes from Docker Hub), caches
# their OCI layouts, and pushes them to a registry as REGISTRY/faasnet/NAME:latest.
#
# Usage:
#   hack/images.sh build  [busybox|tricky|realistic|all] [--registry ADDR] [--no-push] [--force]
#   hack/images.sh list   [--registry ADDR]     # name, reference, digest, sizes (built images)
#   hack/images.sh ref    NAME [--registry ADDR] # prints ADDR/faasnet/NAME:latest
#   hack/images.sh layout NAME                   # prints the cached OCI layout dir (tag "latest")
#   hack/images.sh expected tricky               # prints the tricky image's expected output
#   hack/images.sh notes  tricky                 # JSON: stream offsets, xattrs, long path
#   hack/images.sh clean                         # removes hack/.cache/images
#
#   ADDR defaults to $FAASNET_REGISTRY, else 127.0.0.1:5000. For a 127.0.0.1 registry that does
#   not answer, `build` starts one with hack/registry.sh. build prints one reference per line on
#   stdout (progress goes to stderr), so REF=$(hack/images.sh build busybox) works.
#
# Images (details and sizes in docs/test-images.md):
#   busybox    1 layer: static busybox + applet symlinks + /etc/passwd. Cmd prints a line.
#   tricky     4 layers crafted with python tarfile (hack/lib/tricky_image.py): hardlinks,
#              symlinks, whiteouts, opaque dirs, long and UTF-8 names, xattrs, special modes,
#              fifo, odd owners, sub-second mtimes, files on 512 KiB stream boundaries. Cmd
#              prints a deterministic listing of the image ending in "tricky listing: ..".
#   realistic  3 layers: debootstrap minbase bookworm / python3 + python3-numpy / /app. Cmd
#              ["python3","/app/handler.py"] prints "faasnet function ready: ...".
#
# Cache: hack/.cache/images/ (FAASNET_IMAGES_CACHE overrides). Each image is keyed on a hash of
# its recipe (the bash recipe function, the python helpers it runs, the inputs such as the
# busybox binary or the Debian mirror), so a second run only checks the registry, and editing a
# recipe rebuilds just that image. The debootstrap rootfs tarball is cached separately under
# hack/.cache/images/debootstrap/. SOURCE_DATE_EPOCH (default 1700000000) pins timestamps.
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
  exit "${1:-2}"
}

CACHE="${FAASNET_IMAGES_CACHE:-${HACK_DIR}/.cache/images}"
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1700000000}"
export PYTHONDONTWRITEBYTECODE=1
ALL_IMAGES=(busybox tricky realistic)
TAG=latest
REALISTIC_SUITE=bookworm
REALISTIC_PACKAGES=(python3 python3-numpy)

# ---------------------------------------------------------------------------------------------
# helpers

sha() { sha256sum | cut -c1-16; }

# The Debian mirror this machine uses (first deb.debian.org-like URI serving bookworm).
debian_mirror() {
  if [[ -n "${FAASNET_DEBIAN_MIRROR:-}" ]]; then
    echo "$FAASNET_DEBIAN_MIRROR"
    return
  fi
  local f uri=""
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -r "$f" ]] || continue
    uri="$(awk -v suite="$REALISTIC_SUITE" '
      /^[[:space:]]*#/ { next }
      /^deb[[:space:]]/ { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i ~ /^https?:/) { if ($(i+1) == suite) { print $i; exit } break } }
      /^URIs:/ { u = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite && u != "") { print u; exit } }
      /^[[:space:]]*$/ { u = "" }
    ' "$f")"
    [[ -n "$uri" ]] && break
  done
  echo "${uri:-http://deb.debian.org/debian}"
}

registry_answers() { curl -fsS -o /dev/null --max-time 3 "http://$1/v2/" 2>/dev/null; }

ensure_registry() {
  local reg="$1"
  registry_answers "$reg" && return 0
  if [[ "$reg" =~ ^127\.0\.0\.1:([0-9]+)$ ]]; then
    "${HACK_DIR}/registry.sh" start --port "${BASH_REMATCH[1]}" >&2 9>&-
  else
    die "registry ${reg} does not answer"
  fi
}

# remote_digest REG REPO TAG: manifest digest the registry holds for REPO:TAG (empty if none).
remote_digest() {
  curl -fsS --max-time 10 -o /dev/null -D - \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    -I "http://$1/v2/$2/manifests/$3" 2>/dev/null |
    tr -d '\r' | awk -F': ' 'tolower($1) == "docker-content-digest" { print $2 }' || true
}

layout_digest() { jq -r --arg t "$TAG" '.manifests[] | select(.annotations["org.opencontainers.image.ref.name"] == $t) | .digest' "$1/index.json"; }

# ---------------------------------------------------------------------------------------------
# recipes: recipe_NAME OUT_LAYOUT WORKDIR builds the image as OUT_LAYOUT:latest.
# Everything a recipe depends on goes into key_NAME, so editing it invalidates the cache.

busybox_rootfs() {
  local root="$1" applet
  mkdir -p "$root"/{bin,dev,etc,proc,root,sys,tmp}
  chmod 0700 "$root/root"
  chmod 1777 "$root/tmp"
  install -m 0755 /bin/busybox "$root/bin/busybox"
  # Equivalent of `busybox --install -s` into a chroot: that command links to the resolved path
  # of the running binary (a host path), so the links are made by hand, all to /bin/busybox.
  for applet in $(/bin/busybox --list); do
    [[ "$applet" == busybox ]] || ln -s /bin/busybox "$root/bin/$applet"
  done
  printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$root/etc/group"
}

key_busybox() {
  {
    declare -f busybox_rootfs recipe_busybox
    cat "${HACK_DIR}/lib/oci_layout.py"
    sha256sum /bin/busybox
    echo "$SOURCE_DATE_EPOCH"
  } | sha
}

recipe_busybox() {
  local out="$1" work="$2"
  busybox_rootfs "$work/rootfs"
  python3 "${HACK_DIR}/lib/oci_layout.py" from-dir --out "$out" --tag "$TAG" --rootfs "$work/rootfs" \
    --env PATH=/bin --cmd '["/bin/sh","-c","echo hello from busybox"]' \
    --history "busybox $(/bin/busybox | head -n1 | awk '{print $2}') static, applets, /etc/passwd" >/dev/null
}

key_tricky() {
  {
    declare -f busybox_rootfs recipe_tricky tricky_expected
    cat "${HACK_DIR}/lib/oci_layout.py" "${HACK_DIR}/lib/tricky_image.py"
    sha256sum /bin/busybox
    echo "$SOURCE_DATE_EPOCH"
  } | sha
}

recipe_tricky() {
  local out="$1" work="$2"
  busybox_rootfs "$work/rootfs"
  python3 "${HACK_DIR}/lib/tricky_image.py" --out "$out" --tag "$TAG" \
    --busybox-rootfs "$work/rootfs" --manifest-out "${out}.notes.json" >/dev/null
  tricky_expected "$out" "$work"
}

# The expected output of the tricky image: unpack it with umoci (an independent layer applier)
# and run its Cmd in a chroot. A container must print exactly this.
tricky_expected() {
  local out="$1" work="$2"
  umoci unpack --image "${out}:${TAG}" "$work/bundle" >/dev/null
  chroot "$work/bundle/rootfs" /bin/sh /tricky/list.sh >"${out}.expected"
  rm -rf "$work/bundle"
}

# The function code of the realistic image (its own layer).
realistic_handler() {
  cat <<'PY'
"""FaaSNet test function: imports a heavy library (many files read at start) and computes."""
import time

t0 = time.monotonic()
import numpy as np  # noqa: E402

a = np.arange(1, 1001, dtype=np.float64)
m = np.linalg.inv(np.diag(a[:50]))
result = int(a @ a) + int(round(np.trace(m) * 1e6))
print(f"faasnet function ready: numpy {np.__version__} result={result}", flush=True)
print(f"import+compute took {time.monotonic() - t0:.3f}s", flush=True)
PY
}

key_debootstrap() {
  { declare -f debootstrap_base; debian_mirror; echo "$REALISTIC_SUITE $SOURCE_DATE_EPOCH"; } | sha
}

# debootstrap_base: path of the cached minbase rootfs tarball (built once, several minutes).
debootstrap_base() {
  local dir="${CACHE}/debootstrap" mirror key tarball work
  mirror="$(debian_mirror)"
  key="$(key_debootstrap)"
  tarball="${dir}/${REALISTIC_SUITE}-minbase-${key}.tar"
  if [[ -s "$tarball" ]]; then
    echo "$tarball"
    return 0
  fi
  need_cmd debootstrap
  mkdir -p "$dir"
  work="$(mktemp -d "${dir}/work.XXXXXX")"
  log "debootstrap --variant=minbase ${REALISTIC_SUITE} from ${mirror} (log: ${work}/debootstrap.log)"
  if ! debootstrap --variant=minbase "$REALISTIC_SUITE" "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -n 20 "$work/debootstrap.log" >&2
    die "debootstrap failed (work dir kept: $work)"
  fi
  # Normalise: no caches, logs, device nodes or host files in the image.
  rm -rf "$work/rootfs"/var/cache/apt/*.bin "$work/rootfs"/var/cache/apt/archives/*.deb \
    "$work/rootfs"/var/lib/apt/lists/* "$work/rootfs"/dev/* "$work/rootfs"/tmp/* \
    "$work/rootfs"/var/cache/debconf/*-old "$work/rootfs"/etc/resolv.conf
  find "$work/rootfs/var/log" -type f -delete
  : >"$work/rootfs/etc/hostname"
  : >"$work/rootfs/etc/machine-id"
  tar --sort=name --numeric-owner --xattrs --xattrs-include='*' \
    --clamp-mtime --mtime="@${SOURCE_DATE_EPOCH}" -C "$work/rootfs" -cf "${tarball}.tmp" .
  mv "${tarball}.tmp" "$tarball"
  rm -rf "$work"
  find "$dir" -maxdepth 1 -name "${REALISTIC_SUITE}-minbase-*.tar" ! -name "$(basename "$tarball")" -delete
  echo "$tarball"
}

# shellcheck disable=SC2317 # called from a trap
chroot_cleanup() {
  local root="$1"
  umount "$root/proc" 2>/dev/null || umount -l "$root/proc" 2>/dev/null || true
  umount "$root/dev" 2>/dev/null || umount -l "$root/dev" 2>/dev/null || true
  rm -f "$root/etc/resolv.conf" "$root/usr/sbin/policy-rc.d"
}

# chroot_run ROOT CMD...: runs CMD in ROOT with /proc, /dev and the host's resolv.conf.
chroot_run() {
  local root="$1"
  shift
  (
    # every step checked by hand: callers run this under `if`, where set -e is off
    trap 'chroot_cleanup "$root"' EXIT
    mkdir -p "$root/proc" "$root/dev" || exit 1
    mount -t proc proc "$root/proc" || exit 1
    mount --bind /dev "$root/dev" || exit 1
    cp -L /etc/resolv.conf "$root/etc/resolv.conf" || exit 1
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d" || exit 1
    chmod 0755 "$root/usr/sbin/policy-rc.d" || exit 1
    # not `exec`: the EXIT trap must run to unmount /proc and /dev before anything packs ROOT
    chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
      DEBIAN_FRONTEND=noninteractive SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" "$@"
  )
}

# assert_no_mounts DIR: dies if anything is mounted under DIR (never pack a host /proc or /dev).
assert_no_mounts() {
  if awk -v d="$1" 'index($2, d "/") == 1 { found = 1 } END { exit !found }' /proc/self/mounts; then
    die "still mounted under $1: $(awk -v d="$1" 'index($2, d "/") == 1 { print $2 }' /proc/self/mounts | tr '\n' ' ')"
  fi
}

key_realistic() {
  {
    declare -f recipe_realistic realistic_handler chroot_run chroot_cleanup assert_no_mounts
    key_debootstrap
    echo "${REALISTIC_PACKAGES[*]} $SOURCE_DATE_EPOCH"
  } | sha
}

recipe_realistic() {
  local out="$1" work="$2" base created bundle
  need_cmd umoci
  base="$(debootstrap_base)"
  created="$(date -u -d "@${SOURCE_DATE_EPOCH}" +%Y-%m-%dT%H:%M:%SZ)"
  bundle="$work/bundle"
  umoci init --layout "$out"
  umoci new --image "${out}:${TAG}"
  umoci unpack --image "${out}:${TAG}" "$bundle" >/dev/null

  log "realistic: layer 1/3 (debootstrap minbase ${REALISTIC_SUITE})"
  tar --numeric-owner --same-owner -p --xattrs --xattrs-include='*' -C "$bundle/rootfs" -xf "$base"
  umoci repack --refresh-bundle --image "${out}:${TAG}" --history.created "$created" \
    --history.created_by "debootstrap --variant=minbase ${REALISTIC_SUITE}" "$bundle"

  log "realistic: layer 2/3 (apt-get install ${REALISTIC_PACKAGES[*]})"
  if ! chroot_run "$bundle/rootfs" sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends ${REALISTIC_PACKAGES[*]} && apt-get clean" \
    >"$work/apt.log" 2>&1; then
    tail -n 30 "$work/apt.log" >&2
    die "apt-get in the chroot failed (log: $work/apt.log)"
  fi
  assert_no_mounts "$bundle"
  rm -rf "$bundle/rootfs"/var/lib/apt/lists/* "$bundle/rootfs"/var/cache/apt/*.bin \
    "$bundle/rootfs"/var/cache/debconf/*-old "$bundle/rootfs"/tmp/*
  find "$bundle/rootfs/var/log" -type f -delete
  umoci repack --refresh-bundle --image "${out}:${TAG}" --history.created "$created" \
    --mask-path /proc --mask-path /sys --mask-path /dev \
    --history.created_by "apt-get install --no-install-recommends ${REALISTIC_PACKAGES[*]}" "$bundle"

  log "realistic: layer 3/3 (/app)"
  mkdir -p "$bundle/rootfs/app"
  realistic_handler >"$bundle/rootfs/app/handler.py"
  touch -d "@${SOURCE_DATE_EPOCH}" "$bundle/rootfs/app/handler.py" "$bundle/rootfs/app"
  umoci repack --image "${out}:${TAG}" --history.created "$created" \
    --mask-path /proc --mask-path /sys --mask-path /dev \
    --history.created_by "COPY handler.py /app/" "$bundle"

  umoci config --image "${out}:${TAG}" --no-history --created "$created" \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env LANG=C.UTF-8 --config.workingdir /app \
    --config.cmd python3 --config.cmd /app/handler.py
  umoci gc --layout "$out"
  rm -rf "$bundle"
}

# ---------------------------------------------------------------------------------------------
# build, cache, push

cached_layout() {  # NAME: path of the current cached layout (may not exist)
  echo "${CACHE}/${1}-$("key_$1")"
}

build_one() {
  local name="$1" out work t0 t1
  out="$(cached_layout "$name")"
  if [[ -f "$out/index.json" && "$FORCE" == 0 ]]; then
    log "${name}: cached (${out})"
  else
    rm -rf "$out" "$out".*
    work="$(mktemp -d "${CACHE}/work-${name}.XXXXXX")"
    log "${name}: building into ${out}"
    t0="$(date +%s)"
    # (not under `if`: set -e must stay active inside the recipe; on failure the work dir stays)
    "recipe_${name}" "${out}.tmp" "$work"
    local f
    for f in "${out}.tmp".*; do
      [[ -e "$f" ]] && mv "$f" "${out}${f#"${out}.tmp"}"
    done
    mv "${out}.tmp" "$out"
    rm -rf "$work"
    t1="$(date +%s)"
    python3 "${HACK_DIR}/lib/oci_layout.py" stat "$out" --tag "$TAG" |
      jq --arg n "$name" --argjson s "$((t1 - t0))" '. + {name: $n, build_seconds: $s}' >"${out}.json"
    log "${name}: built in $((t1 - t0))s"
    # drop layouts of older recipes
    find "$CACHE" -maxdepth 1 -name "${name}-*" ! -name "$(basename "$out")" ! -name "$(basename "$out").*" \
      -exec rm -rf {} +
  fi
  ln -sfn "$(basename "$out")" "${CACHE}/${name}"
}

push_one() {
  local name="$1" reg="$2" out repo digest remote
  out="$(cached_layout "$name")"
  repo="faasnet/${name}"
  digest="$(layout_digest "$out")"
  remote="$(remote_digest "$reg" "$repo" "$TAG")"
  if [[ "$remote" == "$digest" ]]; then
    log "${name}: ${reg}/${repo}:${TAG} already at ${digest}"
  else
    log "${name}: pushing to ${reg}/${repo}:${TAG}"
    skopeo copy --quiet --preserve-digests --dest-tls-verify=false \
      "oci:${out}:${TAG}" "docker://${reg}/${repo}:${TAG}" >&2
    remote="$(remote_digest "$reg" "$repo" "$TAG")"
    [[ "$remote" == "$digest" ]] || die "${name}: registry has ${remote:-nothing}, expected ${digest}"
  fi
}

resolve_names() {
  case "${1:-all}" in
    all) printf '%s\n' "${ALL_IMAGES[@]}" ;;
    busybox | tricky | realistic) echo "$1" ;;
    *) die "unknown image '$1' (busybox, tricky, realistic, all)" ;;
  esac
}

with_lock() {
  mkdir -p "$CACHE"
  exec 9>"${CACHE}/.lock"
  flock 9
}

# ---------------------------------------------------------------------------------------------

cmd="${1:-}"
[[ -n "$cmd" ]] || usage
shift
REGISTRY="${FAASNET_REGISTRY:-127.0.0.1:5000}"
FORCE=0
PUSH=1
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --registry) REGISTRY="${2:?--registry needs a value}"; shift 2 ;;
    --registry=*) REGISTRY="${1#*=}"; shift ;;
    --no-push) PUSH=0; shift ;;
    --force) FORCE=1; shift ;;
    -h | --help) usage 0 ;;
    -*) die "unknown option '$1'" ;;
    *) args+=("$1"); shift ;;
  esac
done
REGISTRY="${REGISTRY#http://}"

case "$cmd" in
  build)
    need_cmd python3 jq skopeo umoci curl flock
    [[ "$(id -u)" == 0 ]] || die "build needs root (chroot, umoci unpack with owners)"
    resolve_names "${args[0]:-all}" >/dev/null
    mapfile -t names < <(resolve_names "${args[0]:-all}")
    # registry first: a daemon started while we hold the lock would inherit the lock's fd
    [[ "$PUSH" == 1 ]] && ensure_registry "$REGISTRY"
    with_lock
    for n in "${names[@]}"; do
      build_one "$n"
      [[ "$PUSH" == 1 ]] && push_one "$n" "$REGISTRY"
      echo "${REGISTRY}/faasnet/${n}:${TAG}"
    done
    ;;
  list)
    printf '%-10s %-40s %-19s %8s %12s %12s %s\n' NAME REFERENCE MANIFEST LAYERS COMPRESSED UNCOMPRESSED BUILT_IN
    for n in "${ALL_IMAGES[@]}"; do
      meta="$(cached_layout "$n").json"
      if [[ -f "$meta" ]]; then
        jq -r --arg ref "${REGISTRY}/faasnet/${n}:${TAG}" \
          '[.name, $ref, .manifest[0:19], (.layers | length), .compressed, .uncompressed, "\(.build_seconds)s"] | @tsv' "$meta" |
          awk -F'\t' '{ printf "%-10s %-40s %-19s %8s %12s %12s %s\n", $1, $2, $3, $4, $5, $6, $7 }'
      else
        printf '%-10s %-40s %s\n' "$n" "${REGISTRY}/faasnet/${n}:${TAG}" "(not built)"
      fi
    done
    ;;
  ref)
    n="$(resolve_names "${args[0]:?usage: ref NAME}")"
    echo "${REGISTRY}/faasnet/${n}:${TAG}"
    ;;
  layout)
    n="$(resolve_names "${args[0]:?usage: layout NAME}")"
    out="$(cached_layout "$n")"
    [[ -f "$out/index.json" ]] || die "${n} is not built (hack/images.sh build ${n} --no-push)"
    echo "$out"
    ;;
  expected | notes)
    [[ "${args[0]:-}" == tricky ]] || die "usage: $cmd tricky"
    f="$(cached_layout tricky)"
    f="${f}.$([[ "$cmd" == expected ]] && echo expected || echo notes.json)"
    [[ -f "$f" ]] || die "tricky is not built (hack/images.sh build tricky --no-push)"
    cat "$f"
    ;;
  clean)
    rm -rf "$CACHE"
    log "removed ${CACHE}"
    ;;
  -h | --help | help) usage 0 ;;
  *) usage ;;
esac
