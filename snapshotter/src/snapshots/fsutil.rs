//! Filesystem helpers: disk usage like containerd's `fs.DiskUsage`, and finding and
//! detaching mounts below a directory before it is deleted.

use std::{
    collections::HashSet,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::metadata::Usage;

/// Disk usage of the tree at `root` (not following symlinks, not crossing into other
/// filesystems' content counted twice): distinct inodes, and their allocated blocks × 512.
/// The same numbers containerd's `continuity/fs.DiskUsage` reports, which Commit stores.
pub fn disk_usage(root: &Path) -> io::Result<Usage> {
    let mut seen = HashSet::new();
    let mut size = 0i64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path)?;
        if seen.insert((meta.dev(), meta.ino())) {
            size += (meta.blocks() as i64) * 512;
        }
        if meta.is_dir() {
            for entry in fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(Usage {
        size,
        inodes: seen.len() as i64,
    })
}

/// Mount points at or below `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|mp| mp.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    Ok(found)
}

/// Lazily detaches every mount at or below `dir`. A lazy-path FUSE mount whose daemon
/// died (e.g. the previous snapshotter process) is stale: stat fails with ENOTCONN and
/// nothing below can be removed until it is detached.
pub fn detach_mounts_under(dir: &Path) -> io::Result<usize> {
    let mounts = mounts_under(dir)?;
    for mp in &mounts {
        match nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(io::Error::other(format!("detach {}: {e}", mp.display()))),
        }
    }
    Ok(mounts.len())
}

/// Deletes `dir` and everything in it, first detaching mounts below it so that a
/// remote layer's content is never deleted through its mount. A missing `dir` is fine.
pub fn remove_tree(dir: &Path) -> io::Result<()> {
    detach_mounts_under(dir)?;
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// /proc/self/mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_hardlinks_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("fs");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("a"), vec![1u8; 10000]).unwrap();
        fs::hard_link(root.join("a"), root.join("b")).unwrap();
        std::os::unix::fs::symlink("a", root.join("c")).unwrap();
        let u = disk_usage(&root).unwrap();
        assert_eq!(u.inodes, 3, "dir, a (=b), symlink c");
        assert!(u.size >= 10000);
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\"), r"/end\");
    }
}
