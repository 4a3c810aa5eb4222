#!/usr/bin/env bash
# hack/install-deps.sh: installs what building and testing FaaSNet-rs needs on Debian 12.
#
# Usage:
#   hack/install-deps.sh            # install what is missing (needs root), then check
#   hack/install-deps.sh --check    # only report what is missing; exit 1 if anything is
#
# - apt packages (below): checked with dpkg-query first; when some are missing, one
#   `apt-get update` then `apt-get install -y --no-install-recommends` of just those.
#   Quick (< 1 s) and offline when everything is present.
# - /dev/fuse: `modprobe fuse`, else `mknod /dev/fuse c 10 229`.
# - Rust: cargo, rustfmt and clippy must already be there (rustup is not installed by this
#   script; if rustup exists, missing rustfmt/clippy components are added with it).
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

PACKAGES=(
  # runtime under test
  containerd runc fuse3
  # build
  protobuf-compiler
  # registry and image tooling (hack/registry.sh, hack/images.sh)
  docker-registry skopeo umoci busybox-static debootstrap
  # stargz-snapshotter ships ctr-remote (rpull with a remote snapshotter)
  stargz-snapshotter
  # tests and scripts
  iproute2 jq curl python3 ca-certificates lz4 tar util-linux attr shellcheck
  # containerd's snapshotter conformance suite (Go)
  golang-go golang-github-containerd-containerd-dev
)

check_only=0
case "${1:-}" in
  --check) check_only=1 ;;
  "") ;;
  -h | --help)
    sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'
    exit 0
    ;;
  *) die "unknown argument '$1'" ;;
esac

missing_packages() {
  local installed
  # one dpkg-query for all (unknown packages only print an error, ignored)
  installed="$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null |
    awk '$2 == "installed" { print $1 }' || true)"
  local p
  for p in "${PACKAGES[@]}"; do
    grep -qxF "$p" <<<"$installed" || echo "$p"
  done
}

problems=0

mapfile -t missing < <(missing_packages)
if [[ ${#missing[@]} -gt 0 ]]; then
  if [[ "$check_only" == 1 ]]; then
    log "missing packages: ${missing[*]}"
    problems=1
  else
    [[ "$(id -u)" == 0 ]] || die "installing ${missing[*]} needs root"
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
    mapfile -t missing < <(missing_packages)
    [[ ${#missing[@]} -eq 0 ]] || die "still missing after apt-get install: ${missing[*]}"
  fi
else
  log "all ${#PACKAGES[@]} packages present"
fi

# /dev/fuse for the lazy-loading snapshotter.
if [[ ! -c /dev/fuse ]]; then
  if [[ "$check_only" == 1 ]]; then
    log "/dev/fuse is missing"
    problems=1
  else
    modprobe fuse 2>/dev/null || true
    if [[ ! -c /dev/fuse ]]; then
      log "modprobe fuse did not create /dev/fuse; creating the node by hand"
      mknod -m 0666 /dev/fuse c 10 229 || die "cannot create /dev/fuse"
    fi
  fi
fi
[[ -c /dev/fuse ]] && log "/dev/fuse present"

# Rust toolchain (not installed here).
if ! command -v cargo >/dev/null 2>&1 && [[ -x "${HOME}/.cargo/bin/cargo" ]]; then
  log "cargo is in ${HOME}/.cargo/bin but not on PATH; add it: export PATH=\"\$HOME/.cargo/bin:\$PATH\""
  export PATH="${HOME}/.cargo/bin:${PATH}"
fi
if command -v cargo >/dev/null 2>&1; then
  log "$(cargo --version)"
  for comp in fmt clippy; do
    if ! cargo "$comp" --version >/dev/null 2>&1; then
      if [[ "$check_only" == 0 ]] && command -v rustup >/dev/null 2>&1; then
        c="$comp"
        [[ "$comp" == fmt ]] && c=rustfmt
        log "adding rust component ${c}"
        rustup component add "$c" || { log "could not add ${c}"; problems=1; }
      else
        log "cargo ${comp} is missing"
        problems=1
      fi
    fi
  done
else
  log "cargo not found: install the Rust toolchain (https://rustup.rs) first"
  problems=1
fi

exit "$problems"
