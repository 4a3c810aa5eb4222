#!/usr/bin/env python3
"""Recipe of the `tricky` test image: layers crafted entry by entry to exercise everything a
snapshotter, a layer converter or a lazy FUSE filesystem can get wrong.

    tricky_image.py --out LAYOUT --tag TAG --busybox-rootfs DIR [--manifest-out FILE]

Layers (bottom first):
  0 busybox       the very same layer as the `busybox` image (shared blob), so the image runs
  1 tricky-base   hardlinks, symlinks (relative, absolute, dangling, loops, escaping), long names
                  (component >100, path >255, link target >100), UTF-8 names, user.* xattrs,
                  empty files/dirs, setuid/setgid/sticky, fifo, odd uid/gid (PAX uid/gid),
                  PAX sub-second mtimes, a file whose data ends exactly on a 512 KiB boundary of
                  the tar stream, a file whose data starts exactly on one, 5 MiB of random data,
                  2 MiB of zeros, many small files
  2 tricky-delete whiteouts (file, dir, symlink), an opaque dir, file->dir replacement
  3 tricky-top    re-creation of a whited-out file, dir->file replacement, content and
                  metadata-only changes, a hardlink pair, /tricky/list.sh (the Cmd)

The Cmd, /tricky/list.sh, prints one line per path (mode, owner, size, mtime, nlink, md5 or
link target) sorted bytewise, then a summary line:
    tricky listing: <N> entries, md5 <md5 of the listing lines>
Its output depends only on the image, so two runs (or two snapshotters) must print the same.
--manifest-out writes a JSON description of the crafted special cases (paths, stream offsets).
"""

import argparse
import json
import os
import random
import sys
import tarfile

sys.dont_write_bytecode = True  # no __pycache__ in hack/lib
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import oci_layout  # noqa: E402

BLOCK = 512 * 1024
SUBSEC = "1600000000.123456789"

LIST_SH = r"""#!/bin/sh
# Deterministic listing of every path of this image (the Cmd of faasnet/tricky).
# Mount points and files the runtime may create are left out.
export LC_ALL=C PATH=/bin
line() {
  p="$1"
  if [ -L "$p" ]; then
    busybox stat -c '%A %u:%g %y %N' "$p"
  elif [ -d "$p" ]; then
    busybox stat -c '%A %u:%g %n' "$p"
  elif [ -f "$p" ]; then
    s=$(busybox md5sum "$p")
    busybox stat -c "%A %u:%g %s %y nlink=%h ${s%% *} %n" "$p"
  else
    busybox stat -c '%A %u:%g %y %n' "$p"
  fi
}
listing=$(busybox find / -xdev -mindepth 1 \
    \( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp \
       -o -path /etc/hosts -o -path /etc/hostname -o -path /etc/resolv.conf -o -path /etc/mtab \) \
    -prune -o -print | busybox sort | while IFS= read -r p; do line "$p"; done)
printf '%s\n' "$listing"
n=$(printf '%s\n' "$listing" | busybox wc -l)
sum=$(printf '%s\n' "$listing" | busybox md5sum)
echo "tricky listing: $n entries, md5 ${sum%% *}"
"""


def layer_base(notes):
    lw = oci_layout.LayerWriter()
    D = "data"
    lw.dir(D)

    # --- empty things
    lw.dir(f"{D}/empty-dir")
    lw.file(f"{D}/empty-file", b"")
    lw.file(f"{D}/one-byte", b"x")
    lw.file(f"{D}/exactly-512", bytes(range(256)) * 2)

    # --- hardlinks (within this layer)
    lw.dir(f"{D}/hardlinks")
    lw.file(f"{D}/hardlinks/original", b"hardlinked content\n", xattrs={"user.faasnet.hl": "yes"})
    lw.hardlink(f"{D}/hardlinks/link1", f"{D}/hardlinks/original")
    lw.dir(f"{D}/hardlinks/sub")
    lw.hardlink(f"{D}/hardlinks/sub/link2", f"{D}/hardlinks/original")

    # --- symlinks
    lw.dir(f"{D}/links")
    lw.symlink(f"{D}/links/relative", "../hardlinks/original")
    lw.symlink(f"{D}/links/absolute", "/bin/busybox")
    lw.symlink(f"{D}/links/dangling", "../does/not/exist")
    lw.symlink(f"{D}/links/dir-link", "../hardlinks")
    lw.symlink(f"{D}/links/loop-a", "loop-b")
    lw.symlink(f"{D}/links/loop-b", "loop-a")
    lw.symlink(f"{D}/links/escape", "../../../../../../../etc/passwd")
    lw.symlink(f"{D}/links/long-target", "../" + "t" * 120 + "/target-that-is-longer-than-100")

    # --- long names
    lw.dir(f"{D}/long")
    long_component = "n" * 150 + ".txt"  # one component > 100 chars (PAX path)
    lw.file(f"{D}/long/{long_component}", b"long component\n")
    deep = f"{D}/long"
    for i in range(5):
        deep += "/" + f"d{i}" + "e" * 58  # 5 x 60-char dirs
        lw.dir(deep)
    deep_file = deep + "/file-at-the-end-of-a-path-longer-than-255.txt"
    assert len(deep_file) > 255, len(deep_file)
    lw.file(deep_file, b"deep\n")
    lw.hardlink(f"{D}/long/hardlink-to-deep-file", deep_file)
    notes["long_path"] = {"path": "/" + deep_file, "length": len(deep_file)}

    # --- UTF-8 names
    lw.dir(f"{D}/unicode")
    lw.dir(f"{D}/unicode/日本語")
    lw.file(f"{D}/unicode/日本語/ファイル.txt", "こんにちは\n".encode())
    lw.file(f"{D}/unicode/émoji-🚀.txt", "rocket 🚀\n".encode())
    lw.dir(f"{D}/unicode/Ünïcödé dir")
    lw.file(f"{D}/unicode/Ünïcödé dir/naïve café.txt", b"caf\xc3\xa9\n")
    lw.file(f"{D}/unicode/spaces and 'quotes' and \"double\".txt", b"quotes\n")

    # --- xattrs (user.* only: they survive on any fs that supports xattrs, unprivileged)
    lw.dir(f"{D}/xattrs", xattrs={"user.faasnet.dir": "on a directory"})
    lw.file(
        f"{D}/xattrs/file",
        b"has xattrs\n",
        xattrs={"user.faasnet.a": "alpha", "user.faasnet.utf8": "värde ✓"},
    )
    # (no empty xattr value: an empty PAX record value means "unset" in POSIX pax, so tools differ)
    notes["xattrs"] = {
        "/data/xattrs": {"user.faasnet.dir": "on a directory"},
        "/data/xattrs/file": {"user.faasnet.a": "alpha", "user.faasnet.utf8": "värde ✓"},
        "/data/hardlinks/original": {"user.faasnet.hl": "yes"},
    }

    # --- modes, owners, special files, times
    lw.dir(f"{D}/modes")
    lw.file(f"{D}/modes/setuid", b"#!/bin/sh\n", mode=0o4755)
    lw.file(f"{D}/modes/setgid", b"#!/bin/sh\n", mode=0o2755)
    lw.dir(f"{D}/modes/sticky", mode=0o1777)
    lw.dir(f"{D}/modes/setgid-dir", mode=0o2775, gid=100)
    lw.file(f"{D}/modes/no-perms", b"secret\n", mode=0o000)
    lw.file(f"{D}/modes/odd-owner", b"odd\n", mode=0o640, uid=1234567, gid=7654321,
            uname="nobody-here", gname="no-group")
    lw.file(f"{D}/modes/nobody", b"nobody\n", uid=65534, gid=65534)
    lw.fifo(f"{D}/modes/fifo", mode=0o620, uid=1000, gid=1000)
    lw.file(f"{D}/modes/subsecond-mtime", b"t\n", mtime=SUBSEC)
    lw.dir(f"{D}/modes/subsecond-dir", mtime="1600000001.5")
    lw.file(f"{D}/modes/year-2100", b"future\n", mtime=4102444800)
    lw.symlink(f"{D}/modes/subsecond-link", "subsecond-mtime", mtime="1600000002.000000001")

    # --- layout-sensitive files (offsets in the uncompressed tar stream)
    lw.dir(f"{D}/blocks")
    # a file whose data ends exactly on a 512 KiB boundary
    ti = lw._info(f"{D}/blocks/ends-on-boundary.bin", tarfile.REGTYPE, 0o644, 0, 0, None, None)
    data_start = lw.offset + lw.header_size(ti)
    end = ((data_start + 4096) // BLOCK + 1) * BLOCK
    size = end - data_start
    rnd = random.Random(512)
    lw.file(f"{D}/blocks/ends-on-boundary.bin", rnd.randbytes(size))
    notes["ends_on_boundary"] = {"path": "/data/blocks/ends-on-boundary.bin", "data_offset": data_start,
                                 "size": size, "data_end": end}
    # the next header therefore starts on the boundary too
    # a file whose data starts exactly on a boundary: pad with a filler file first
    ti_next = lw._info(f"{D}/blocks/starts-on-boundary.bin", tarfile.REGTYPE, 0o644, 0, 0, None, None)
    ti_fill = lw._info(f"{D}/blocks/filler.bin", tarfile.REGTYPE, 0o644, 0, 0, None, None)
    fill_data_start = lw.offset + lw.header_size(ti_fill)
    target = (fill_data_start // BLOCK + 1) * BLOCK
    fill_size = target - lw.header_size(ti_next) - fill_data_start
    assert fill_size > 0 and fill_size % 512 == 0
    lw.file(f"{D}/blocks/filler.bin", rnd.randbytes(fill_size))
    assert lw.offset + lw.header_size(ti_next) == target
    lw.file(f"{D}/blocks/starts-on-boundary.bin", rnd.randbytes(100_000))
    notes["starts_on_boundary"] = {"path": "/data/blocks/starts-on-boundary.bin", "data_offset": target}
    # many blocks: 5 MiB incompressible, 2 MiB of zeros
    lw.file(f"{D}/blocks/random-5MiB.bin", random.Random(5).randbytes(5 * 1024 * 1024))
    lw.file(f"{D}/blocks/zeros-2MiB.bin", bytes(2 * 1024 * 1024))
    # many small files in one block
    lw.dir(f"{D}/small")
    for i in range(200):
        lw.file(f"{D}/small/f{i:03d}", (f"small file {i}\n" * (i % 17 + 1)).encode())

    # --- things the next layers change
    lw.dir(f"{D}/whiteout")
    lw.file(f"{D}/whiteout/gone.txt", b"deleted in layer 2, re-created in layer 3\n")
    lw.file(f"{D}/whiteout/stays.txt", b"stays\n")
    lw.dir(f"{D}/whiteout/gone-dir")
    lw.file(f"{D}/whiteout/gone-dir/inner.txt", b"inner\n")
    lw.dir(f"{D}/whiteout/gone-dir/deeper")
    lw.file(f"{D}/whiteout/gone-dir/deeper/x", b"x\n")
    lw.symlink(f"{D}/whiteout/gone-link", "stays.txt")
    lw.file(f"{D}/whiteout/.hidden-not-a-whiteout", b"a dotfile that only looks special\n")
    lw.dir(f"{D}/opaque")
    lw.file(f"{D}/opaque/old-a.txt", b"hidden by the opaque dir of layer 2\n")
    lw.dir(f"{D}/opaque/old-sub")
    lw.file(f"{D}/opaque/old-sub/old-b.txt", b"hidden too\n")
    lw.dir(f"{D}/replace")
    lw.file(f"{D}/replace/file-becomes-dir", b"I am a file in layer 1\n")
    lw.dir(f"{D}/replace/dir-becomes-file")
    lw.file(f"{D}/replace/dir-becomes-file/child", b"child of a dir replaced in layer 3\n")
    lw.file(f"{D}/modified.txt", b"version 1\n")
    lw.dir(f"{D}/chmod-only", mode=0o755)
    lw.file(f"{D}/chmod-only/f", b"f\n")
    return lw.close()


def layer_delete():
    lw = oci_layout.LayerWriter()
    D = "data"
    lw.dir(D)
    lw.dir(f"{D}/whiteout")
    lw.whiteout(f"{D}/whiteout/gone.txt")
    lw.whiteout(f"{D}/whiteout/gone-dir")
    lw.whiteout(f"{D}/whiteout/gone-link")
    lw.dir(f"{D}/opaque")
    lw.opaque(f"{D}/opaque")
    lw.file(f"{D}/opaque/new.txt", b"the only file left in the opaque dir\n")
    lw.dir(f"{D}/replace")
    lw.dir(f"{D}/replace/file-becomes-dir")
    lw.file(f"{D}/replace/file-becomes-dir/now-a-dir.txt", b"layer 2 made this a directory\n")
    return lw.close()


def layer_top():
    lw = oci_layout.LayerWriter()
    D = "data"
    lw.dir(D)
    lw.dir(f"{D}/whiteout")
    lw.file(f"{D}/whiteout/gone.txt", b"re-created in layer 3\n")
    lw.dir(f"{D}/replace")
    lw.file(f"{D}/replace/dir-becomes-file", b"layer 3 made this a file\n")
    lw.file(f"{D}/modified.txt", b"version 3, longer than version 1\n")
    lw.dir(f"{D}/chmod-only", mode=0o700)
    lw.dir(f"{D}/top")
    lw.file(f"{D}/top/pair-a", b"hardlink pair in the top layer\n", mode=0o600)
    lw.hardlink(f"{D}/top/pair-b", f"{D}/top/pair-a", mode=0o600)
    lw.dir("tricky")
    lw.file("tricky/list.sh", LIST_SH.encode(), mode=0o755)
    return lw.close()


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="latest")
    ap.add_argument("--busybox-rootfs", required=True)
    ap.add_argument("--manifest-out")
    a = ap.parse_args(argv)
    notes = {}
    layers = [oci_layout.layer_from_dir(a.busybox_rootfs), layer_base(notes), layer_delete(), layer_top()]
    desc = oci_layout.write_layout(
        a.out,
        a.tag,
        layers,
        cmd=["/bin/sh", "/tricky/list.sh"],
        env=["PATH=/bin"],
        history=["busybox (shared with faasnet/busybox)", "tricky-base", "tricky-delete", "tricky-top"],
    )
    if a.manifest_out:
        notes["layer_sizes"] = [len(t) for t in layers]
        notes["manifest"] = desc["digest"]
        with open(a.manifest_out, "w") as f:
            json.dump(notes, f, indent=2, ensure_ascii=False, sort_keys=True)
            f.write("\n")
    print(desc["digest"])


if __name__ == "__main__":
    main(sys.argv[1:])
