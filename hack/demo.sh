#!/usr/bin/env bash
# hack/demo.sh: FaaSNet end to end on one machine. Brings up a small testbed (3 VMs as network
# namespaces, each with containerd and the FaaSNet snapshotter; a registry; the coordinator),
# builds the demo image (Debian + python3 + numpy; the function imports numpy and prints) and
# converts it to the block format, starts the function on all VMs at once, prints each VM's
# start time and where its blocks came from (cache, peer, registry) and the function tree, then
# tears everything down.
#
# Usage: hack/demo.sh [--vms 3] [--rate 100mbit] [--profile release|debug] [--keep]
#   --keep   leave the testbed up afterwards (hack/testbed.sh status / down)
# Needs root and the packages of hack/install-deps.sh. The first run builds the demo image with
# debootstrap (a few minutes; cached in /var/cache/faasnet/images).
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

vms=3 rate=100mbit profile=release keep=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --vms) vms="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --profile) profile="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//'; exit 2 ;;
  esac
done
[[ "$(id -u)" == 0 ]] || die "needs root (network namespaces, FUSE, containerd)"
export FAASNET_IMAGES_CACHE="${FAASNET_IMAGES_CACHE:-/var/cache/faasnet/images}"
tb="${HACK_DIR}/testbed.sh"

if [[ -e /run/faasnet-testbed/vms ]]; then
  log "a testbed is already up; taking it down first"
  "$tb" down
fi
[[ "$keep" == 1 ]] || trap '"$tb" down' EXIT

"$tb" up "$vms" --rate "$rate" --profile "$profile"
log "building and converting the demo image"
read -r original converted < <("$tb" push-image realistic)
log "original image:  ${original}"
log "converted image: ${converted}"
echo
"$tb" run "$converted"
echo
"$tb" status
