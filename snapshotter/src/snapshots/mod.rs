//! The overlay snapshotter core: containerd's overlayfs snapshotter (`overlay.go`)
//! over the sled [`MetaStore`]. Synchronous; [`crate::service`] runs it on blocking
//! threads.
//!
//! Directory layout under the root:
//! - `lock`: held (flock) by the daemon using the root;
//! - `metadata.sled/`: the metadata store;
//! - `snapshots/<id>/fs`: a snapshot's content (upper dir; for a remote snapshot, the
//!   lazy path's mountpoint);
//! - `snapshots/<id>/work`: overlayfs work dir of an active snapshot;
//! - `snapshots/new-*`: a Create in progress (or orphaned by a crash).
//!
//! Crash safety follows containerd: a new snapshot's directory is fully set up under a
//! temporary name and renamed to its id before its record is written, and a removed
//! snapshot's record is deleted before its directory. So a crash leaves at most a
//! directory without a record, which [`Overlay::cleanup`] deletes (at startup and on
//! containerd's Cleanup), and never a record without its data.

pub mod filter;
pub mod fsutil;
pub mod mounts;

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use containerd_snapshots::api::types::Mount;

use crate::{
    metadata::{Kind, MetaStore, Record, Snapshot, Usage},
    Error, Result,
};

pub use filter::Filters;

/// The overlay snapshotter core.
pub struct Overlay {
    root: PathBuf,
    snapshots_dir: PathBuf,
    meta: MetaStore,
    index_off: bool,
    temp_counter: AtomicU64,
    /// Exclusive lock on `<root>/lock`: two daemons on one root would corrupt each other.
    _lock: nix::fcntl::Flock<fs::File>,
}

impl mounts::Layout for Overlay {
    fn upper_path(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }
    fn work_path(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }
}

fn mkdir_mode(path: &Path, mode: u32) -> Result<()> {
    fs::create_dir(path).map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    // Set the mode explicitly: the daemon's umask must not change what containers see.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))
}

impl Overlay {
    /// Opens the snapshotter at `root`, creating `root` (0700), `root/snapshots` and the
    /// metadata store if needed, locks it against a second daemon, and deletes orphaned
    /// directories left by a crash.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            // 0700 as containerd's snapshotters; an existing root keeps its mode.
            fs::create_dir_all(root)
                .map_err(|e| Error::io(format!("create {}", root.display()), e))?;
            fs::set_permissions(root, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(format!("chmod {}", root.display()), e))?;
        }
        let lock_path = root.join("lock");
        let lock_file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("open {}", lock_path.display()), e))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| {
                Error::io(
                    format!(
                        "lock {} (is another snapshotter using this root?)",
                        lock_path.display()
                    ),
                    std::io::Error::from(errno),
                )
            })?;
        let snapshots_dir = root.join("snapshots");
        if !snapshots_dir.is_dir() {
            mkdir_mode(&snapshots_dir, 0o700)?;
        }
        let meta = MetaStore::open(&root.join("metadata.sled"))?;
        let overlay = Overlay {
            root: root.to_path_buf(),
            snapshots_dir,
            meta,
            index_off: mounts::kernel_supports_index(),
            temp_counter: AtomicU64::new(0),
            _lock: lock,
        };
        let removed = overlay.cleanup()?;
        if removed > 0 {
            tracing::info!(removed, "deleted orphaned snapshot directories");
        }
        Ok(overlay)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/snapshots/<id>`.
    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir.join(id.to_string())
    }

    /// `<root>/snapshots/<id>/fs`: content of a snapshot, mountpoint of a remote one.
    pub fn upper_path(&self, id: u64) -> PathBuf {
        mounts::Layout::upper_path(self, id)
    }

    /// The metadata store.
    pub fn metadata(&self) -> &MetaStore {
        &self.meta
    }

    /// Stat: the record of `key` (active, view or committed).
    pub fn stat(&self, key: &str) -> Result<Record> {
        self.meta.get(key)
    }

    /// Update: the labels of `key`; see [`crate::metadata::Writer::update`].
    pub fn update(
        &self,
        key: &str,
        labels: &HashMap<String, String>,
        fieldpaths: &[String],
    ) -> Result<Record> {
        self.meta.write().update(key, labels, fieldpaths)
    }

    /// Usage: scanned from the upper dir for an active snapshot, as recorded at Commit
    /// otherwise (zero for views and remote snapshots).
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let record = self.meta.get(key)?;
        if record.kind == Kind::Active {
            let upper = self.upper_path(record.id);
            return fsutil::disk_usage(&upper)
                .map_err(|e| Error::io(format!("disk usage of {}", upper.display()), e));
        }
        Ok(record.usage)
    }

    /// Mounts of the active or view snapshot `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let s = self.meta.snapshot(key)?;
        Ok(self.mounts_of(&s))
    }

    fn mounts_of(&self, s: &Snapshot) -> Vec<Mount> {
        mounts::mounts(self, s, self.index_off)
    }

    /// Prepare (kind Active) or View: creates the snapshot and returns it with its mounts.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<(Snapshot, Vec<Mount>)> {
        let w = self.meta.write();
        let plan = w.plan_create(kind, key, parent, labels)?;
        let snapshot = plan.snapshot.clone();
        let temp = self.new_temp_dir(kind)?;
        let dir = self.snapshot_dir(snapshot.id);
        let setup = (|| {
            if let Some(&parent_id) = snapshot.parent_ids.first() {
                // The new root dir takes the owner of the parent's root, as in containerd
                // (the upper dir's root hides the lower one's attributes).
                let parent_fs = self.upper_path(parent_id);
                let st = fs::metadata(&parent_fs)
                    .map_err(|e| Error::io(format!("stat parent {}", parent_fs.display()), e))?;
                std::os::unix::fs::lchown(temp.join("fs"), Some(st.uid()), Some(st.gid()))
                    .map_err(|e| Error::io("chown new snapshot root", e))?;
            }
            fs::rename(&temp, &dir)
                .map_err(|e| Error::io(format!("rename to {}", dir.display()), e))?;
            sync_dir(&self.snapshots_dir);
            Ok(())
        })();
        if let Err(e) = setup {
            let _ = fsutil::remove_tree(&temp);
            return Err(e);
        }
        if let Err(e) = w.finish_create(plan) {
            let _ = fsutil::remove_tree(&dir);
            return Err(e);
        }
        drop(w);
        let mounts = self.mounts_of(&snapshot);
        Ok((snapshot, mounts))
    }

    /// Commit: active `key` becomes committed `name`, with its upper dir's usage.
    pub fn commit(&self, name: &str, key: &str, labels: HashMap<String, String>) -> Result<Record> {
        let w = self.meta.write();
        let active = self.meta.get(key)?;
        let upper = self.upper_path(active.id);
        let usage = fsutil::disk_usage(&upper)
            .map_err(|e| Error::io(format!("disk usage of {}", upper.display()), e))?;
        w.commit(key, name, usage, labels, false)
    }

    /// Commits active `key`, whose `fs` dir the lazy path has mounted, as remote
    /// snapshot `name`. Usage is zero: the content is not on local disk (and scanning it
    /// would fetch it).
    pub fn commit_remote(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<Record> {
        self.meta
            .write()
            .commit(key, name, Usage::default(), labels, true)
    }

    /// Remove, first half: deletes the record of `key` (NotFound; FailedPrecondition with
    /// children) and returns it. The caller unmounts a remote snapshot and then calls
    /// [`Overlay::delete_dir`]; a crash in between leaves an orphan for cleanup.
    pub fn remove(&self, key: &str) -> Result<Record> {
        self.meta.write().remove(key)
    }

    /// Remove, second half: deletes a removed snapshot's directory (detaching any mount
    /// left in it).
    pub fn delete_dir(&self, id: u64) -> Result<()> {
        let dir = self.snapshot_dir(id);
        fsutil::remove_tree(&dir).map_err(|e| Error::io(format!("remove {}", dir.display()), e))
    }

    /// Walk: all snapshots passing `filters`, in key order.
    pub fn list(&self, filters: &Filters) -> Result<Vec<(String, Record)>> {
        Ok(self
            .meta
            .list()?
            .into_iter()
            .filter(|(name, record)| filters.matches(name, record))
            .collect())
    }

    /// Committed remote snapshots (name, record), to mount again at startup.
    pub fn remote_snapshots(&self) -> Result<Vec<(String, Record)>> {
        Ok(self
            .meta
            .list()?
            .into_iter()
            .filter(|(_, r)| r.remote && r.kind == Kind::Committed)
            .collect())
    }

    /// Cleanup: deletes directories under `snapshots/` that no record owns (removed
    /// snapshots whose deletion failed or was interrupted, Creates cut short by a crash).
    /// Holds the writer lock so no Create in progress is mistaken for an orphan. Returns
    /// how many were deleted; failures are logged, as in containerd.
    pub fn cleanup(&self) -> Result<usize> {
        let _w = self.meta.write();
        let ids = self.meta.ids()?;
        let entries = fs::read_dir(&self.snapshots_dir)
            .map_err(|e| Error::io(format!("read {}", self.snapshots_dir.display()), e))?;
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("read snapshots dir", e))?;
            let name = entry.file_name();
            let owned = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if owned {
                continue;
            }
            let path = entry.path();
            match fsutil::remove_tree(&path) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "failed to remove orphaned snapshot directory")
                }
            }
        }
        Ok(removed)
    }

    /// Makes `snapshots/new-*` with `fs` (0755) and, for an active snapshot, `work`
    /// (0711), as containerd's `prepareDirectory`.
    fn new_temp_dir(&self, kind: Kind) -> Result<PathBuf> {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .snapshots_dir
            .join(format!("new-{}-{n}", std::process::id()));
        let made = (|| {
            mkdir_mode(&temp, 0o700)?;
            mkdir_mode(&temp.join("fs"), 0o755)?;
            if kind == Kind::Active {
                mkdir_mode(&temp.join("work"), 0o711)?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            let _ = fsutil::remove_tree(&temp);
            return Err(e);
        }
        Ok(temp)
    }
}

/// fsync a directory so a rename in it is durable before the record that relies on it.
fn sync_dir(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Overlay) {
        let dir = tempfile::tempdir().unwrap();
        let o = Overlay::open(&dir.path().join("root")).unwrap();
        (dir, o)
    }

    #[test]
    fn create_commit_remove_dirs() {
        let (_d, o) = open();
        let (s, m) = o.create(Kind::Active, "a", "", HashMap::new()).unwrap();
        assert_eq!(m[0].r#type, "bind");
        let fs_dir = o.upper_path(s.id);
        let mode = fs::metadata(&fs_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        assert!(o.snapshot_dir(s.id).join("work").is_dir());
        fs::write(fs_dir.join("f"), b"hello").unwrap();
        assert!(o.usage("a").unwrap().inodes >= 2);
        let c = o.commit("c", "a", HashMap::new()).unwrap();
        assert_eq!(c.usage.inodes, 2);
        assert_eq!(o.usage("c").unwrap(), c.usage);
        assert!(matches!(o.mounts("c"), Err(Error::FailedPrecondition(_))));
        let (v, m) = o.create(Kind::View, "v", "c", HashMap::new()).unwrap();
        assert_eq!(m[0].source, fs_dir.display().to_string());
        assert!(!o.snapshot_dir(v.id).join("work").exists());
        assert!(matches!(o.remove("c"), Err(Error::FailedPrecondition(_))));
        let r = o.remove("v").unwrap();
        o.delete_dir(r.id).unwrap();
        assert!(!o.snapshot_dir(v.id).exists());
        let r = o.remove("c").unwrap();
        o.delete_dir(r.id).unwrap();
        assert_eq!(fs::read_dir(o.root().join("snapshots")).unwrap().count(), 0);
    }

    #[test]
    fn one_daemon_per_root() {
        let (d, _o) = open();
        let second = Overlay::open(&d.path().join("root"));
        assert!(
            matches!(second, Err(Error::Io { .. })),
            "second open must fail"
        );
    }

    #[test]
    fn orphans_are_cleaned_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let kept;
        {
            let o = Overlay::open(&root).unwrap();
            kept = o
                .create(Kind::Active, "a", "", HashMap::new())
                .unwrap()
                .0
                .id;
            // A crash mid-Create and mid-Remove.
            fs::create_dir_all(root.join("snapshots/new-1-0/fs")).unwrap();
            fs::create_dir_all(root.join("snapshots/999/fs")).unwrap();
        }
        let o = Overlay::open(&root).unwrap();
        let names: Vec<_> = fs::read_dir(root.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![kept.to_string()]);
        assert_eq!(o.stat("a").unwrap().id, kept);
    }
}
