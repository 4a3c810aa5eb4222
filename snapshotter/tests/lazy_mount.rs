//! A converted layer pushed to a real registry, mounted through FUSE by the layer manager,
//! read back with std::fs and compared with the tar it came from; then seen through a real
//! overlayfs to check the whiteout presentation; then mounted again from the disk cache.

mod lazy_support;

use std::{
    collections::{BTreeSet, HashMap},
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
};

use faasnet_format::{EntryKind, Toc};
use faasnet_snapshotter::lazy::{LayerRef, Source, StaticUpstream};
use lazy_support::*;

const REPO: &str = "faasnet/lazy-mount";

/// Every kind of entry, files of several sizes (multi-block with 64 KiB blocks), an entry
/// overridden later in the archive, PAX times and xattrs, whiteouts.
fn test_tar() -> (Vec<u8>, HashMap<&'static str, Vec<u8>>) {
    let mut t = TarBuilder::new();
    let mut content = HashMap::new();
    let m = |mode, uid, gid| Meta {
        mode,
        uid,
        gid,
        ..Meta::default()
    };
    t.dir("etc", m(0o755, 0, 0));
    t.file("etc/hosts", m(0o644, 0, 0), b"old contents, replaced below");
    t.pax(&[
        ("mtime", b"1700000001.123456789"),
        ("SCHILY.xattr.user.note", b"hello xattr"),
        ("SCHILY.xattr.trusted.custom", b"\x00\x01binary"),
    ]);
    let hosts = b"127.0.0.1 localhost\n".to_vec();
    t.file("etc/hosts", m(0o600, 1000, 1001), &hosts);
    content.insert("etc/hosts", hosts);
    t.dir("bin", m(0o755, 0, 0));
    let busybox = noise(300_000, 1);
    t.file("bin/busybox", m(0o4755, 0, 0), &busybox);
    content.insert("bin/busybox", busybox);
    t.hardlink("bin/sh-hard", "bin/busybox");
    t.symlink("bin/sh", "busybox");
    t.symlink("abs-link", "/etc/hosts");
    t.dir("data", m(0o700, 5, 6));
    let exact = noise(65_536, 2);
    t.file("data/exact-block", m(0o640, 5, 6), &exact);
    content.insert("data/exact-block", exact);
    t.file("data/empty", m(0o644, 0, 0), b"");
    content.insert("data/empty", Vec::new());
    let text = b"compressible text ".repeat(20_000);
    t.file("data/text", m(0o644, 0, 0), &text);
    content.insert("data/text", text);
    t.file("implicit/dir/file", m(0o644, 0, 0), b"deep");
    content.insert("implicit/dir/file", b"deep".to_vec());
    t.dir("var", m(0o755, 0, 0));
    t.file("var/.wh.old", m(0o644, 0, 0), b"");
    t.dir("opq", m(0o755, 0, 0));
    t.file("opq/.wh..wh..opq", m(0o644, 0, 0), b"");
    t.file("opq/new", m(0o644, 0, 0), b"fresh");
    content.insert("opq/new", b"fresh".to_vec());
    t.dir("dev", m(0o755, 0, 0));
    t.device("dev/null", tar::EntryType::Char, 1, 3, m(0o666, 0, 0));
    t.device("dev/sda", tar::EntryType::Block, 8, 16, m(0o660, 0, 6));
    t.device("run/fifo", tar::EntryType::Fifo, 0, 0, m(0o644, 0, 0));
    for i in 0..40u32 {
        let name: &'static str = Box::leak(format!("many/f{i:02}").into_boxed_str());
        let data = noise(i as usize * 997, 100 + i);
        t.file(name, m(0o644, i as u64, 0), &data);
        content.insert(name, data);
    }
    (t.finish(), content)
}

fn kind_of(ft: std::fs::FileType) -> EntryKind {
    if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_char_device() {
        EntryKind::Char
    } else if ft.is_block_device() {
        EntryKind::Block
    } else if ft.is_fifo() {
        EntryKind::Fifo
    } else {
        EntryKind::File
    }
}

/// Checks every entry of the mount against the TOC (metadata) and the tar (bytes).
fn check_tree(mnt: &Path, toc: &Toc, tar: &[u8], content: &HashMap<&str, Vec<u8>>) {
    // The last entry of each path wins.
    let mut last = HashMap::new();
    for e in &toc.entries {
        last.insert(e.path.clone(), e);
    }
    for (path, e) in &last {
        let name = e.name();
        if path.is_empty() || name.starts_with(".wh.") {
            continue;
        }
        let p = mnt.join(path);
        let md = std::fs::symlink_metadata(&p).unwrap_or_else(|err| panic!("{path}: {err}"));
        if e.kind == EntryKind::Hardlink {
            let target = std::fs::symlink_metadata(mnt.join(e.link.as_ref().unwrap())).unwrap();
            assert_eq!(md.ino(), target.ino(), "{path}: hardlink shares the inode");
            assert_eq!(md.nlink(), 2, "{path}: nlink");
            assert_eq!(std::fs::read(&p).unwrap(), content["bin/busybox"]);
            continue;
        }
        assert_eq!(kind_of(md.file_type()), e.kind, "{path}: kind");
        assert_eq!(md.mode() & 0o7777, e.mode, "{path}: mode");
        assert_eq!(
            (md.uid() as u64, md.gid() as u64),
            (e.uid, e.gid),
            "{path}: owner"
        );
        assert_eq!(md.mtime(), e.mtime, "{path}: mtime");
        assert_eq!(md.mtime_nsec() as u32, e.mtime_nsec, "{path}: mtime nsec");
        match e.kind {
            EntryKind::File => {
                let data = std::fs::read(&p).unwrap();
                assert_eq!(md.len(), e.size, "{path}: size");
                assert_eq!(md.blocks(), e.size.div_ceil(512), "{path}: st_blocks");
                let start = e.offset as usize;
                assert!(
                    data == tar[start..start + e.size as usize],
                    "{path}: bytes differ from the tar"
                );
                if let Some(c) = content.get(path.as_str()) {
                    assert!(data == *c, "{path}: bytes differ from what was archived");
                }
            }
            EntryKind::Symlink => {
                assert_eq!(
                    std::fs::read_link(&p).unwrap(),
                    PathBuf::from(e.link.as_ref().unwrap())
                );
            }
            EntryKind::Char | EntryKind::Block => {
                assert_eq!(
                    md.rdev(),
                    libc::makedev(e.devmajor, e.devminor),
                    "{path}: rdev"
                );
            }
            _ => {}
        }
        for (name, value) in e.xattrs_decoded() {
            assert_eq!(
                getxattr(&p, name).as_deref(),
                Some(&value[..]),
                "{path}: xattr {name}"
            );
        }
    }
    let hosts = mnt.join("etc/hosts");
    let mut names = listxattr(&hosts);
    names.sort();
    assert_eq!(names, vec!["trusted.custom", "user.note"]);
    assert_eq!(
        std::fs::symlink_metadata(&hosts).unwrap().mtime_nsec(),
        123_456_789
    );
    assert_eq!(
        std::fs::read(&hosts).unwrap(),
        content["etc/hosts"],
        "later entry wins"
    );

    // Whiteouts, the overlayfs way.
    let old = std::fs::symlink_metadata(mnt.join("var/old")).unwrap();
    assert!(old.file_type().is_char_device());
    assert_eq!(old.rdev(), 0);
    let var: BTreeSet<_> = list(&mnt.join("var"));
    assert_eq!(var, BTreeSet::from(["old".to_string()]));
    assert_eq!(
        getxattr(&mnt.join("opq"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(list(&mnt.join("opq")), BTreeSet::from(["new".to_string()]));
    assert_eq!(getxattr(&mnt.join("etc"), "trusted.overlay.opaque"), None);

    // Implied directories, directory listings, nlink of directories.
    assert!(std::fs::metadata(mnt.join("implicit/dir"))
        .unwrap()
        .is_dir());
    assert_eq!(
        list(mnt),
        ["abs-link", "bin", "data", "dev", "etc", "implicit", "many", "opq", "run", "var"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    assert_eq!(list(&mnt.join("many")).len(), 40);
    assert_eq!(std::fs::metadata(mnt.join("implicit")).unwrap().nlink(), 3);
    // Read-only.
    assert!(std::fs::write(mnt.join("etc/new"), b"x").is_err());
    // Reads at odd offsets across block boundaries.
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(mnt.join("bin/busybox")).unwrap();
    f.seek(SeekFrom::Start(65_000)).unwrap();
    let mut buf = vec![0u8; 140_000];
    f.read_exact(&mut buf).unwrap();
    assert!(buf == content["bin/busybox"][65_000..205_000]);
}

fn list(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn is_mounted(mp: &Path) -> bool {
    let mp = mp.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(mp.to_str().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mount_read_compare_overlay_and_remount_from_cache() {
    let registry = Registry::start();
    let (tar, content) = test_tar();
    let (blob, converted) = convert(&tar);
    assert!(
        converted.toc.blocks.len() > 8,
        "the layer spans many blocks"
    );
    let digest = registry.push_blob(REPO, &blob).await;
    assert_eq!(digest, converted.blob_digest);
    let layer = LayerRef::new(registry.addr.clone(), REPO, digest.clone()).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (manager, metrics) = manager(dir.path(), false, false);
    manager
        .mount(&layer, None, StaticUpstream::root(), &mnt)
        .await
        .unwrap();
    assert!(is_mounted(&mnt));

    let toc = converted.toc.clone();
    let (m2, tar2) = (mnt.clone(), tar.clone());
    let content2 = content.clone();
    tokio::task::spawn_blocking(move || check_tree(&m2, &toc, &tar2, &content2))
        .await
        .unwrap();

    // Each block came from the registry at most once, one range request each (plus the
    // tail request for the TOC; the size came from a HEAD).
    let from_registry = metrics.blocks_from(Source::Registry);
    assert!(from_registry > 0 && from_registry <= converted.toc.blocks.len() as u64);
    let ranges = registry.range_requests(&digest);
    assert_eq!(ranges.len() as u64, from_registry + 1, "{ranges:?}");

    // overlayfs over the FUSE layer and a lower directory: whiteouts and opaque dirs hide.
    let base = dir.path().join("base");
    for d in ["var", "opq", "etc"] {
        std::fs::create_dir_all(base.join(d)).unwrap();
    }
    std::fs::write(base.join("var/old"), b"hidden by the whiteout").unwrap();
    std::fs::write(base.join("var/kept"), b"still here").unwrap();
    std::fs::write(base.join("opq/stale"), b"hidden by the opaque dir").unwrap();
    std::fs::write(base.join("etc/passwd"), b"root").unwrap();
    let merged = dir.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let opts = format!("lowerdir={}:{}", mnt.display(), base.display());
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(opts.as_str()),
    )
    .expect("mount overlay over the FUSE layer");
    let merged2 = merged.clone();
    tokio::task::spawn_blocking(move || {
        assert!(
            !merged2.join("var/old").exists(),
            "whiteout hides the lower file"
        );
        assert_eq!(
            std::fs::read(merged2.join("var/kept")).unwrap(),
            b"still here"
        );
        assert_eq!(
            list(&merged2.join("opq")),
            BTreeSet::from(["new".to_string()])
        );
        assert_eq!(std::fs::read(merged2.join("etc/passwd")).unwrap(), b"root");
        assert_eq!(
            std::fs::read(merged2.join("etc/hosts")).unwrap(),
            b"127.0.0.1 localhost\n"
        );
    })
    .await
    .unwrap();
    nix::mount::umount(&merged).unwrap();

    assert!(manager.unmount(&mnt).await.unwrap());
    assert!(!is_mounted(&mnt));
    drop(manager);

    // A new manager over the same cache: the blocks read before come from disk.
    let (manager, metrics) = lazy_support::manager(dir.path(), false, false);
    manager
        .mount(
            &layer,
            Some(converted.blob_size),
            StaticUpstream::root(),
            &mnt,
        )
        .await
        .unwrap();
    let (m2, content2) = (mnt.clone(), content.clone());
    tokio::task::spawn_blocking(move || {
        for (path, data) in &content2 {
            assert!(std::fs::read(m2.join(path)).unwrap() == *data, "{path}");
        }
    })
    .await
    .unwrap();
    assert_eq!(metrics.blocks_from(Source::Registry), 0);
    assert!(metrics.blocks_from(Source::Cache) > 0);
    // Not even the TOC: it was kept on disk.
    assert_eq!(
        registry.range_requests(&digest).len() as u64,
        from_registry + 1
    );
    manager.unmount(&mnt).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_our_format_takes_the_ordinary_path() {
    use faasnet_snapshotter::{
        lazy::{remote::Upstreams, LazyRemoteLayers},
        RemoteLayers,
    };
    let registry = Registry::start();
    let (tar, _) = test_tar();
    let digest = registry.push_blob(REPO, &tar).await; // a plain tar, not converted
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (manager, _) = manager(dir.path(), false, false);
    let remote = LazyRemoteLayers::new(manager.clone(), Upstreams::Registry);
    let mut labels = HashMap::new();
    labels.insert(
        "containerd.io/snapshot/remote/stargz.reference".to_string(),
        format!("{}/{REPO}:plain", registry.addr),
    );
    labels.insert(
        "containerd.io/snapshot/remote/stargz.digest".to_string(),
        digest,
    );
    assert!(!remote.prepare_remote("k", &labels, &mnt).await.unwrap());
    assert!(!is_mounted(&mnt));

    // The converted one through the same seam is mounted, and removed.
    let (blob, _) = convert(&tar);
    let digest = registry.push_blob(REPO, &blob).await;
    labels.insert(
        "containerd.io/snapshot/cri.layer-digest".to_string(),
        digest.clone(),
    );
    labels.remove("containerd.io/snapshot/remote/stargz.digest");
    assert!(remote.prepare_remote("k", &labels, &mnt).await.unwrap());
    assert!(is_mounted(&mnt));
    let m2 = mnt.clone();
    let hosts = tokio::task::spawn_blocking(move || std::fs::read(m2.join("etc/hosts")).unwrap())
        .await
        .unwrap();
    assert_eq!(hosts, b"127.0.0.1 localhost\n");
    remote.remove_remote("k", &labels, &mnt).await.unwrap();
    assert!(!is_mounted(&mnt));
    // Restore mounts it again (as after a daemon restart).
    remote.restore_remote("k", &labels, &mnt).await.unwrap();
    assert!(is_mounted(&mnt));
    remote.remove_remote("k", &labels, &mnt).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn busy_mount_is_detached_lazily_and_keeps_serving_open_files() {
    let registry = Registry::start();
    let (tar, content) = test_tar();
    let (blob, _) = convert(&tar);
    let digest = registry.push_blob(REPO, &blob).await;
    let layer = LayerRef::new(registry.addr.clone(), REPO, digest).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (manager, _) = manager(dir.path(), false, false);
    manager
        .mount(&layer, None, StaticUpstream::root(), &mnt)
        .await
        .unwrap();
    let m2 = mnt.clone();
    let file =
        tokio::task::spawn_blocking(move || std::fs::File::open(m2.join("bin/busybox")).unwrap())
            .await
            .unwrap();
    assert!(manager.unmount(&mnt).await.unwrap());
    assert!(!is_mounted(&mnt), "detached from the tree");
    let expected = content["bin/busybox"].clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = file;
        let mut data = Vec::new();
        file.read_to_end(&mut data).unwrap();
        assert!(
            data == expected,
            "the open file still reads through the detached mount"
        );
    })
    .await
    .unwrap();
}
