//! The mounts handed to containerd for an active or view snapshot, exactly as
//! containerd's overlay snapshotter builds them (`overlay.go`, `mounts`).

use std::path::{Path, PathBuf};

use containerd_snapshots::api::types::Mount;

use crate::metadata::{Kind, Snapshot};

/// Layout of the snapshot directories, for building mount options.
pub trait Layout {
    /// `<root>/snapshots/<id>/fs`: the upper dir (active), or the layer content
    /// (committed; a lazy-path mountpoint for a remote snapshot).
    fn upper_path(&self, id: u64) -> PathBuf;
    /// `<root>/snapshots/<id>/work`: overlayfs work dir of an active snapshot.
    fn work_path(&self, id: u64) -> PathBuf;
}

fn bind(source: &Path, ro: bool) -> Mount {
    Mount {
        r#type: "bind".into(),
        source: source.display().to_string(),
        target: String::new(),
        options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
    }
}

/// Mounts for `s`:
/// - no parent: a bind mount of its own dir (`rw`, or `ro` for a view), because overlayfs
///   needs at least one lowerdir;
/// - a view of a single parent: a read-only bind mount of the parent;
/// - otherwise overlay: `lowerdir=` the parent chain nearest first, plus
///   `upperdir=`/`workdir=` for an active snapshot (a view gets a read-only overlay of
///   lowerdirs only).
///
/// `index_off` adds `index=off` when the kernel knows the option, as containerd does, so
/// that layers shared by several overlays do not trip the inodes index.
pub fn mounts(layout: &dyn Layout, s: &Snapshot, index_off: bool) -> Vec<Mount> {
    if s.parent_ids.is_empty() {
        return vec![bind(&layout.upper_path(s.id), s.kind == Kind::View)];
    }
    let mut options = Vec::new();
    if index_off {
        options.push("index=off".to_string());
    }
    if s.kind == Kind::Active {
        options.push(format!("workdir={}", layout.work_path(s.id).display()));
        options.push(format!("upperdir={}", layout.upper_path(s.id).display()));
    } else if s.parent_ids.len() == 1 {
        return vec![bind(&layout.upper_path(s.parent_ids[0]), true)];
    }
    let lower: Vec<String> = s
        .parent_ids
        .iter()
        .map(|&id| layout.upper_path(id).display().to_string())
        .collect();
    options.push(format!("lowerdir={}", lower.join(":")));
    vec![Mount {
        r#type: "overlay".into(),
        source: "overlay".into(),
        target: String::new(),
        options,
    }]
}

/// Whether the running kernel's overlayfs has the `index` parameter (so `index=off` is
/// understood).
pub fn kernel_supports_index() -> bool {
    Path::new("/sys/module/overlay/parameters/index").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct L;
    impl Layout for L {
        fn upper_path(&self, id: u64) -> PathBuf {
            PathBuf::from(format!("/r/snapshots/{id}/fs"))
        }
        fn work_path(&self, id: u64) -> PathBuf {
            PathBuf::from(format!("/r/snapshots/{id}/work"))
        }
    }

    fn snap(kind: Kind, id: u64, parents: &[u64]) -> Snapshot {
        Snapshot {
            id,
            kind,
            parent_ids: parents.to_vec(),
        }
    }

    #[test]
    fn no_parent_is_a_bind() {
        let m = mounts(&L, &snap(Kind::Active, 1, &[]), true);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].source, "/r/snapshots/1/fs");
        assert_eq!(m[0].options, vec!["rw", "rbind"]);
        let m = mounts(&L, &snap(Kind::View, 1, &[]), true);
        assert_eq!(m[0].options, vec!["ro", "rbind"]);
    }

    #[test]
    fn view_of_one_parent_is_a_ro_bind_of_it() {
        let m = mounts(&L, &snap(Kind::View, 5, &[3]), true);
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].source, "/r/snapshots/3/fs");
        assert_eq!(m[0].options, vec!["ro", "rbind"]);
    }

    #[test]
    fn active_with_parents_is_overlay() {
        let m = mounts(&L, &snap(Kind::Active, 5, &[3, 2]), true);
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(m[0].source, "overlay");
        assert_eq!(
            m[0].options,
            vec![
                "index=off",
                "workdir=/r/snapshots/5/work",
                "upperdir=/r/snapshots/5/fs",
                "lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs",
            ]
        );
        let m = mounts(&L, &snap(Kind::View, 5, &[3, 2]), false);
        assert_eq!(
            m[0].options,
            vec!["lowerdir=/r/snapshots/3/fs:/r/snapshots/2/fs"]
        );
    }
}
