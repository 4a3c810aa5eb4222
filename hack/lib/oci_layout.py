#!/usr/bin/env python3
"""Write OCI image layouts by hand, byte for byte reproducibly.

Used by hack/images.sh for the `busybox` and `tricky` test images. Everything that would make
two builds differ is pinned: tar entries are sorted, owners and mtimes come from the recipe (or
are clamped to SOURCE_DATE_EPOCH), gzip headers carry mtime 0 and no file name, JSON is written
with sorted keys.

Library:
    LayerWriter          craft a PAX tar layer entry by entry (whiteouts, xattrs, fifos, ...)
    layer_from_dir()     deterministic tar of a directory tree
    write_layout()       blobs/sha256 + config + manifest + index.json + oci-layout

CLI:
    oci_layout.py from-dir --out DIR --tag TAG --rootfs ROOTFS [--cmd JSON] [--env K=V ...]
    oci_layout.py stat LAYOUT [--tag TAG]     # JSON: digests, compressed/uncompressed sizes
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
MT_INDEX = "application/vnd.oci.image.index.v1+json"

DEFAULT_EPOCH = 1700000000  # 2023-11-14T22:13:20Z


def source_date_epoch():
    return int(os.environ.get("SOURCE_DATE_EPOCH", DEFAULT_EPOCH))


def rfc3339(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class LayerWriter:
    """A PAX-format tar layer built entry by entry, in the order the calls are made.

    Paths are given without a leading slash ("bin/sh"). Every entry takes mode, uid, gid, mtime
    (int; or a string "SECONDS.NANOS", written verbatim as a PAX `mtime` record), and
    xattrs ({"user.name": b"value"} → PAX `SCHILY.xattr.user.name`).
    """

    def __init__(self, epoch=None):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)
        self.epoch = source_date_epoch() if epoch is None else epoch
        self.names = []

    # -- low level -------------------------------------------------------------------------
    def _info(self, path, type_, mode, uid, gid, mtime, xattrs, uname="", gname=""):
        ti = tarfile.TarInfo(path)
        ti.type = type_
        ti.mode = mode
        ti.uid = uid
        ti.gid = gid
        ti.uname = uname
        ti.gname = gname
        if isinstance(mtime, str):
            # exact PAX record, e.g. "1600000000.123456789" (a float would lose nanoseconds)
            ti.pax_headers["mtime"] = mtime
            ti.mtime = float(mtime)
        else:
            ti.mtime = self.epoch if mtime is None else mtime
        if xattrs:
            for k, v in sorted(xattrs.items()):
                if isinstance(v, bytes):
                    # tarfile encodes PAX values as UTF-8 strings; keep bytes that decode.
                    v = v.decode("utf-8", "surrogateescape")
                ti.pax_headers["SCHILY.xattr." + k] = v
        return ti

    def add(self, ti, data=None):
        self.names.append(ti.name)
        self.tar.addfile(ti, io.BytesIO(data) if data is not None else None)

    @property
    def offset(self):
        """Current length of the uncompressed tar stream."""
        return self.tar.offset

    def header_size(self, ti):
        """Bytes the header(s) of `ti` will take in the stream (PAX extended header included)."""
        return len(ti.tobuf(tarfile.PAX_FORMAT, self.tar.encoding, self.tar.errors))

    # -- entries ---------------------------------------------------------------------------
    def dir(self, path, mode=0o755, uid=0, gid=0, mtime=None, xattrs=None, **kw):
        self.add(self._info(path.rstrip("/"), tarfile.DIRTYPE, mode, uid, gid, mtime, xattrs, **kw))

    def file(self, path, data=b"", mode=0o644, uid=0, gid=0, mtime=None, xattrs=None, **kw):
        ti = self._info(path, tarfile.REGTYPE, mode, uid, gid, mtime, xattrs, **kw)
        ti.size = len(data)
        self.add(ti, data)
        return ti

    def symlink(self, path, target, uid=0, gid=0, mtime=None, xattrs=None):
        ti = self._info(path, tarfile.SYMTYPE, 0o777, uid, gid, mtime, xattrs)
        ti.linkname = target
        self.add(ti)

    def hardlink(self, path, target, mode=0o644, uid=0, gid=0, mtime=None):
        """`target` is the path of an earlier entry of this same layer."""
        if target not in self.names:
            raise ValueError(f"hardlink {path} -> {target}: target not in this layer")
        ti = self._info(path, tarfile.LNKTYPE, mode, uid, gid, mtime, None)
        ti.linkname = target
        self.add(ti)

    def fifo(self, path, mode=0o644, uid=0, gid=0, mtime=None):
        self.add(self._info(path, tarfile.FIFOTYPE, mode, uid, gid, mtime, None))

    def whiteout(self, path):
        """Deletes `path` of a lower layer (an empty `.wh.<name>` file)."""
        d, n = os.path.split(path)
        self.file(os.path.join(d, ".wh." + n), b"", mode=0o000)

    def opaque(self, dirpath):
        """Hides everything lower layers put under `dirpath` (`.wh..wh..opq`)."""
        self.file(os.path.join(dirpath, ".wh..wh..opq"), b"", mode=0o000)

    def close(self):
        self.tar.close()
        return self.buf.getvalue()


def layer_from_dir(root, epoch=None, owner=(0, 0)):
    """Deterministic tar of the tree under `root` (sorted names, hardlinks kept, mtimes clamped
    to `epoch`, owner forced to `owner` unless owner is None, sockets skipped)."""
    epoch = source_date_epoch() if epoch is None else epoch
    lw = LayerWriter(epoch)
    seen = {}  # (dev, ino) -> first path, for hardlinks

    def walk(rel):
        full = os.path.join(root, rel) if rel else root
        for name in sorted(os.listdir(full)):
            r = os.path.join(rel, name) if rel else name
            p = os.path.join(root, r)
            st = os.lstat(p)
            uid, gid = (st.st_uid, st.st_gid) if owner is None else owner
            mtime = min(int(st.st_mtime), epoch)
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                lw.dir(r, perm, uid, gid, mtime)
                walk(r)
            elif stat.S_ISLNK(st.st_mode):
                lw.symlink(r, os.readlink(p), uid, gid, mtime)
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen:
                    lw.hardlink(r, seen[key], perm, uid, gid, mtime)
                    continue
                seen[key] = r
                with open(p, "rb") as f:
                    lw.file(r, f.read(), perm, uid, gid, mtime)
            elif stat.S_ISFIFO(st.st_mode):
                lw.fifo(r, perm, uid, gid, mtime)
            # sockets and device nodes are not part of test images

    walk("")
    return lw.close()


def gzip_bytes(data, level=6):
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=level, mtime=0) as g:
        g.write(data)
    return out.getvalue()


def _write_blob(layout, data):
    h = sha256_hex(data)
    d = os.path.join(layout, "blobs", "sha256")
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, h)
    if not os.path.exists(p):
        tmp = p + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    return {"digest": "sha256:" + h, "size": len(data)}


def write_layout(
    layout,
    tag,
    layers,
    cmd=None,
    entrypoint=None,
    env=None,
    workdir=None,
    labels=None,
    history=None,
    epoch=None,
    compress=True,
):
    """Write (or add `tag` to) an OCI image layout at `layout`.

    layers: list of uncompressed tar streams (bytes), bottom first. Returns the manifest
    descriptor.
    """
    epoch = source_date_epoch() if epoch is None else epoch
    created = rfc3339(epoch)
    os.makedirs(layout, exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')

    layer_descs, diff_ids = [], []
    for tar in layers:
        diff_ids.append("sha256:" + sha256_hex(tar))
        blob = gzip_bytes(tar) if compress else tar
        d = _write_blob(layout, blob)
        d["mediaType"] = MT_LAYER_GZIP if compress else MT_LAYER_TAR
        layer_descs.append(d)

    cfg = {}
    if env is not None:
        cfg["Env"] = list(env)
    if cmd is not None:
        cfg["Cmd"] = list(cmd)
    if entrypoint is not None:
        cfg["Entrypoint"] = list(entrypoint)
    if workdir:
        cfg["WorkingDir"] = workdir
    if labels:
        cfg["Labels"] = dict(labels)
    if history is None:
        history = [f"faasnet hack layer {i}" for i in range(len(layers))]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": created, "created_by": h} for h in history],
    }
    cdesc = _write_blob(layout, canonical_json(config))
    cdesc["mediaType"] = MT_CONFIG
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": cdesc,
        "layers": layer_descs,
    }
    mdesc = _write_blob(layout, canonical_json(manifest))
    mdesc["mediaType"] = MT_MANIFEST
    mdesc["annotations"] = {"org.opencontainers.image.ref.name": tag}

    index_path = os.path.join(layout, "index.json")
    manifests = []
    if os.path.exists(index_path):
        with open(index_path) as f:
            manifests = [
                m
                for m in json.load(f).get("manifests", [])
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag
            ]
    manifests.append(mdesc)
    with open(index_path, "wb") as f:
        f.write(canonical_json({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests}))
    return mdesc


def layout_stat(layout, tag):
    """Manifest digest and per-layer compressed/uncompressed sizes of `layout`:`tag`."""
    import zlib

    def blob(d):
        return os.path.join(layout, "blobs", "sha256", d.split(":", 1)[1])

    with open(os.path.join(layout, "index.json")) as f:
        idx = json.load(f)
    mdesc = next(
        m for m in idx["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag
    )
    with open(blob(mdesc["digest"])) as f:
        manifest = json.load(f)
    layers = []
    for l in manifest["layers"]:
        n = 0
        with open(blob(l["digest"]), "rb") as f:
            if l["mediaType"].endswith("+gzip"):
                z = zlib.decompressobj(16 + zlib.MAX_WBITS)
                while True:
                    chunk = f.read(1 << 20)
                    if not chunk:
                        break
                    n += len(z.decompress(chunk))
                n += len(z.flush())
            else:
                n = os.fstat(f.fileno()).st_size
        layers.append({"digest": l["digest"], "mediaType": l["mediaType"], "size": l["size"], "uncompressed": n})
    return {
        "manifest": mdesc["digest"],
        "config": manifest["config"]["digest"],
        "layers": layers,
        "compressed": sum(l["size"] for l in layers),
        "uncompressed": sum(l["uncompressed"] for l in layers),
    }


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="action", required=True)
    fd = sub.add_parser("from-dir", help="one-layer image from a directory")
    fd.add_argument("--out", required=True)
    fd.add_argument("--tag", default="latest")
    fd.add_argument("--rootfs", required=True)
    fd.add_argument("--cmd", help='JSON array, e.g. ["/bin/sh","-c","echo hi"]')
    fd.add_argument("--env", action="append", default=[])
    fd.add_argument("--history", default=None)
    st = sub.add_parser("stat", help="JSON: manifest digest, layer sizes (compressed, uncompressed)")
    st.add_argument("layout")
    st.add_argument("--tag", default="latest")
    a = ap.parse_args(argv)
    if a.action == "stat":
        json.dump(layout_stat(a.layout, a.tag), sys.stdout, indent=2)
        print()
    if a.action == "from-dir":
        tar = layer_from_dir(a.rootfs)
        d = write_layout(
            a.out,
            a.tag,
            [tar],
            cmd=json.loads(a.cmd) if a.cmd else None,
            env=a.env or None,
            history=[a.history or f"copy {os.path.basename(a.rootfs.rstrip('/'))} /"],
        )
        print(d["digest"])


if __name__ == "__main__":
    main(sys.argv[1:])
