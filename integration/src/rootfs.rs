//! Mounting an image's root filesystem read-only (`ctr images mount`) and comparing two
//! root filesystems file by file: type, content (sha256), mode with setuid/setgid/sticky,
//! owner, size, symlink target, device numbers, xattrs, mtime (with nanoseconds) and
//! hardlink groups.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CString, OsString};
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use sha2::{Digest, Sha256};

use crate::containerd::Containerd;

/// An image's rootfs mounted read-only: a view snapshot of the image's top chain ID
/// (`ctr snapshots --snapshotter S view --mounts`) mounted with mount(8). Unmounted and the
/// view removed on drop (detached lazily if unmount fails).
///
/// (`ctr images mount` would be shorter, but ctr 1.6 ignores its `--snapshotter` flag and
/// unpacks into overlayfs, which needs the layer blobs a lazy pull never downloads.)
pub struct ImageMount<'a> {
    containerd: &'a Containerd,
    namespace: String,
    snapshotter: String,
    key: String,
    target: PathBuf,
    mounted: bool,
    _dir: tempfile::TempDir,
}

impl<'a> ImageMount<'a> {
    /// Mounts a read-only view of snapshot `chain_id` of `snapshotter` in namespace `ns`.
    pub fn mount(
        containerd: &'a Containerd,
        namespace: &str,
        snapshotter: &str,
        chain_id: &str,
    ) -> anyhow::Result<ImageMount<'a>> {
        let dir = tempfile::Builder::new()
            .prefix("faasnet-imgmnt")
            .tempdir_in("/tmp")?;
        let target = dir.path().join("rootfs");
        std::fs::create_dir(&target)?;
        let key = format!(
            "view-{}",
            dir.path().file_name().unwrap_or_default().to_string_lossy()
        );
        let out = containerd
            .ctr_ok(&[
                "-n",
                namespace,
                "snapshots",
                "--snapshotter",
                snapshotter,
                "view",
                "--mounts",
                &key,
                chain_id,
            ])
            .with_context(|| format!("view of {snapshotter} snapshot {chain_id}"))?;
        let mut mount = ImageMount {
            containerd,
            namespace: namespace.to_string(),
            snapshotter: snapshotter.to_string(),
            key,
            target: target.clone(),
            mounted: false,
            _dir: dir,
        };
        let mounts: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("view mounts: {out}"))?;
        let mounts = mounts.as_array().context("view mounts: not a list")?;
        anyhow::ensure!(mounts.len() == 1, "expected one mount, got {out}");
        let m = &mounts[0];
        let kind = m["Type"].as_str().unwrap_or_default();
        let source = m["Source"].as_str().unwrap_or_default();
        let options: Vec<&str> = m["Options"]
            .as_array()
            .map(|o| o.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        let mut cmd = std::process::Command::new("mount");
        if kind != "bind" {
            cmd.args(["-t", kind]);
        }
        cmd.args(["-o", &options.join(",")])
            .arg(source)
            .arg(&target);
        let res = cmd.output().context("run mount")?;
        anyhow::ensure!(
            res.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&res.stderr)
        );
        mount.mounted = true;
        Ok(mount)
    }

    /// Where the image's rootfs is.
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for ImageMount<'_> {
    fn drop(&mut self) {
        if self.mounted {
            let c = CString::new(self.target.as_os_str().as_bytes()).unwrap();
            // SAFETY: umount2 with a valid C string.
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                crate::netns::unmount_under(&self.target);
            }
        }
        let _ = self.containerd.ctr(&[
            "-n",
            &self.namespace,
            "snapshots",
            "--snapshotter",
            &self.snapshotter,
            "rm",
            &self.key,
        ]);
    }
}

/// containerd's chain ID of the layers with `diff_ids` (OCI image spec: identity.ChainID).
pub fn chain_id(diff_ids: &[String]) -> String {
    let mut chain = diff_ids.first().cloned().unwrap_or_default();
    for d in &diff_ids[1..] {
        chain = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{chain} {d}").as_bytes()))
        );
    }
    chain
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Char,
    Block,
    Socket,
}

/// Everything compared about one path.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular files: size and sha256 of the content.
    pub size: Option<u64>,
    pub sha256: Option<String>,
    /// Symlinks: the target.
    pub target: Option<OsString>,
    /// Devices: rdev.
    pub rdev: Option<u64>,
    /// Seconds and nanoseconds.
    pub mtime: (i64, i64),
    /// Regular files: the link count and the other paths of the tree sharing the inode.
    pub nlink: Option<u64>,
    pub hardlinks: BTreeSet<PathBuf>,
    /// Extended attributes (overlayfs-internal `trusted.overlay.*` left out).
    pub xattrs: BTreeMap<OsString, Vec<u8>>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} {:04o} {}:{} mtime={}.{:09}",
            self.kind, self.mode, self.uid, self.gid, self.mtime.0, self.mtime.1
        )?;
        if let Some(s) = self.size {
            write!(f, " size={s}")?;
        }
        if let Some(h) = &self.sha256 {
            write!(f, " sha256={}", &h[..16])?;
        }
        if let Some(t) = &self.target {
            write!(f, " -> {t:?}")?;
        }
        if let Some(r) = self.rdev {
            write!(f, " rdev={r:#x}")?;
        }
        if let Some(n) = self.nlink {
            write!(f, " nlink={n}")?;
        }
        if !self.hardlinks.is_empty() {
            write!(f, " links={:?}", self.hardlinks)?;
        }
        for (k, v) in &self.xattrs {
            write!(f, " {k:?}={:?}", String::from_utf8_lossy(v))?;
        }
        Ok(())
    }
}

/// A whole tree: relative path (`""` is the root) → entry.
pub type Tree = BTreeMap<PathBuf, Entry>;

/// Walks `root` (not following symlinks, not crossing into other mounts' contents is not
/// checked: an image mount has none) and reads every regular file.
pub fn read_tree(root: &Path) -> anyhow::Result<Tree> {
    let mut tree = Tree::new();
    let mut inodes: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = root.join(&rel);
        let md = std::fs::symlink_metadata(&abs).with_context(|| format!("lstat {abs:?}"))?;
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_char_device() {
            Kind::Char
        } else if ft.is_block_device() {
            Kind::Block
        } else {
            Kind::Socket
        };
        let mut entry = Entry {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: None,
            sha256: None,
            target: None,
            rdev: None,
            mtime: (md.mtime(), md.mtime_nsec()),
            nlink: None,
            hardlinks: BTreeSet::new(),
            xattrs: xattrs(&abs).with_context(|| format!("xattrs of {abs:?}"))?,
        };
        match kind {
            Kind::Dir => {
                for e in std::fs::read_dir(&abs).with_context(|| format!("readdir {abs:?}"))? {
                    stack.push(rel.join(e?.file_name()));
                }
            }
            Kind::File => {
                entry.size = Some(md.len());
                entry.sha256 = Some(sha256_file(&abs)?);
                entry.nlink = Some(md.nlink());
                if md.nlink() > 1 {
                    inodes
                        .entry((md.dev(), md.ino()))
                        .or_default()
                        .push(rel.clone());
                }
            }
            Kind::Symlink => {
                let target =
                    std::fs::read_link(&abs).with_context(|| format!("readlink {abs:?}"))?;
                entry.target = Some(target.into_os_string());
            }
            Kind::Char | Kind::Block => entry.rdev = Some(md.rdev()),
            Kind::Fifo | Kind::Socket => {}
        }
        tree.insert(rel, entry);
    }
    for paths in inodes.values() {
        for p in paths {
            let others = paths.iter().filter(|q| *q != p).cloned().collect();
            tree.get_mut(p).expect("walked").hardlinks = others;
        }
    }
    Ok(tree)
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = File::open(path).with_context(|| format!("open {path:?}"))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("read {path:?}"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The extended attributes of `path` (not following symlinks), without `trusted.overlay.*`.
pub fn xattrs(path: &Path) -> anyhow::Result<BTreeMap<OsString, Vec<u8>>> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut out = BTreeMap::new();
    // SAFETY: size query with a null buffer.
    let len = unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) };
    if len < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTSUP) {
            return Ok(out);
        }
        return Err(e.into());
    }
    let mut names = vec![0u8; len as usize];
    // SAFETY: buffer of the size just reported.
    let len = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    anyhow::ensure!(len >= 0, "llistxattr: {}", std::io::Error::last_os_error());
    names.truncate(len as usize);
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(b"trusted.overlay.") {
            continue;
        }
        let cname = CString::new(name)?;
        // SAFETY: size query with a null buffer.
        let vlen = unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), std::ptr::null_mut(), 0) };
        anyhow::ensure!(vlen >= 0, "lgetxattr: {}", std::io::Error::last_os_error());
        let mut value = vec![0u8; vlen as usize];
        // SAFETY: buffer of the size just reported.
        let vlen = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        anyhow::ensure!(vlen >= 0, "lgetxattr: {}", std::io::Error::last_os_error());
        value.truncate(vlen as usize);
        out.insert(OsString::from_vec(name.to_vec()), value);
    }
    Ok(out)
}

/// Every difference between `expected` and `actual`, one line each (empty: identical).
///
/// Directory mtimes no layer defines are not compared: the root's, and those of implied
/// directories (a layer that adds `usr/bin/x` without an entry for `usr/`, as umoci writes
/// them; the directory then shadows the lower layers' `usr/` with the unpacker's own
/// attributes). An unpacking snapshotter gives them the time it created them, a FUSE
/// layer a fixed one. `expected` must come from an unpacking snapshotter that ran after
/// `unpacked_since` (seconds since the epoch): its directories dated later than that are
/// the implied ones (the test images clamp every recorded time to the past).
pub fn compare_trees(expected: &Tree, actual: &Tree, unpacked_since: i64) -> Vec<String> {
    let mut diffs = Vec::new();
    for (path, e) in expected {
        let undefined_mtime =
            path.as_os_str().is_empty() || (e.kind == Kind::Dir && e.mtime.0 >= unpacked_since);
        let same = |a: &Entry| {
            if undefined_mtime {
                let mut a = a.clone();
                a.mtime = e.mtime;
                a == *e
            } else {
                a == e
            }
        };
        match actual.get(path) {
            None => diffs.push(format!("missing: /{} ({e:?})", path.display())),
            Some(a) if !same(a) => diffs.push(format!(
                "differs: /{}\n    expected {e:?}\n    actual   {a:?}",
                path.display()
            )),
            Some(_) => {}
        }
    }
    for (path, a) in actual {
        if !expected.contains_key(path) {
            diffs.push(format!("unexpected: /{} ({a:?})", path.display()));
        }
    }
    diffs
}

/// Summary counts of a tree, for logs: entries, files, bytes, symlinks, hardlinked files,
/// entries with xattrs.
pub fn summary(tree: &Tree, unpacked_since: i64) -> String {
    let files = tree.values().filter(|e| e.kind == Kind::File).count();
    let bytes: u64 = tree.values().filter_map(|e| e.size).sum();
    let links = tree.values().filter(|e| e.kind == Kind::Symlink).count();
    let hard = tree.values().filter(|e| !e.hardlinks.is_empty()).count();
    let xat = tree.values().filter(|e| !e.xattrs.is_empty()).count();
    let special = tree.values().filter(|e| (e.mode & 0o7000) != 0).count();
    let implied = tree
        .values()
        .filter(|e| e.kind == Kind::Dir && e.mtime.0 >= unpacked_since)
        .count();
    format!(
        "{} entries, {files} files ({bytes} bytes), {links} symlinks, {hard} hardlinked, \
         {xat} with xattrs, {special} setuid/setgid/sticky, {implied} dirs with no mtime",
        tree.len()
    )
}

/// Checks the lazily pulled image against the original, the way a user would: pulls
/// `original` in containerd namespace `orig` with containerd's own overlayfs snapshotter,
/// mounts both images' rootfs read-only (the lazy one from namespace `lazy_ns` through
/// snapshotter `faasnet`; both images have chain ID `chain`), walks both and compares every
/// entry. Returns the original tree's [`summary`] when they are identical; otherwise an error
/// listing up to 30 differences. The mounts are gone when it returns.
pub fn compare_with_original(
    ctd: &Containerd,
    lazy_ns: &str,
    original: &str,
    chain: &str,
) -> anyhow::Result<String> {
    let unpacked_since = unix_now() - 1;
    ctd.ctr_ok(&["-n", "orig", "images", "pull", "--plain-http", original])?;
    let lazy_mount = ImageMount::mount(ctd, lazy_ns, "faasnet", chain)?;
    let orig_mount = ImageMount::mount(ctd, "orig", "overlayfs", chain)?;
    let (lazy, orig) = std::thread::scope(|s| {
        let l = s.spawn(|| read_tree(lazy_mount.path()));
        let o = s.spawn(|| read_tree(orig_mount.path()));
        (l.join().expect("walk"), o.join().expect("walk"))
    });
    let lazy = lazy.context("the lazily pulled rootfs")?;
    let orig = orig.context("the original rootfs")?;
    let diffs = compare_trees(&orig, &lazy, unpacked_since);
    anyhow::ensure!(
        diffs.is_empty(),
        "the lazily pulled rootfs differs from the original image's in {} entries:\n{}",
        diffs.len(),
        diffs
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    Ok(summary(&orig, unpacked_since))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
