//! The read-only FUSE filesystem of one layer, built from its TOC, and [`LayerMount`] to
//! mount it.
//!
//! The inode table is built once at mount time with tar semantics: a later entry with the
//! same path replaces an earlier one (a directory keeps its children), hardlinks share the
//! inode of their target (its `nlink` counts every name), missing parent directories are
//! implied. OCI whiteouts are presented the way overlayfs expects from a lower layer, as
//! containerd's overlay differ and stargz-snapshotter do: `.wh.NAME` becomes a character
//! device 0:0 named `NAME`, and `.wh..wh..opq` in a directory disappears and gives the
//! directory the xattr `trusted.overlay.opaque=y`.
//!
//! Content is immutable, so entries and attributes get long TTLs and the kernel page cache is
//! kept: where the kernel offers FUSE_NO_OPEN_SUPPORT, open and opendir answer ENOSYS once and
//! the kernel stops sending open/release at all (keeping the cache by default); elsewhere
//! files are opened with `FOPEN_KEEP_CACHE`. Reads are
//! answered from tokio tasks, so a slow block fetch does not hold a FUSE thread.

use std::{
    collections::BTreeMap,
    ffi::{OsStr, OsString},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use faasnet_format::{EntryKind, Toc, TocEntry};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
    SessionACL,
};
use tracing::{debug, info, warn};

use super::{block_store::BlockStore, LazyError, Result};

/// Attribute and entry TTL: the layer never changes while mounted.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// xattr overlayfs reads to find opaque directories.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// One inode.
#[derive(Debug, Clone)]
struct Node {
    kind: FileType,
    perm: u16,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: SystemTime,
    rdev: u32,
    /// Names pointing at this inode (non-directories).
    names: u32,
    /// Offset of the data in the tar stream (regular files).
    data_offset: u64,
    /// Symlink target.
    link: Vec<u8>,
    xattrs: Vec<(OsString, Vec<u8>)>,
    parent: usize,
    /// Children by name (directories); sorted, so readdir offsets are stable.
    children: BTreeMap<OsString, usize>,
}

impl Node {
    fn dir(parent: usize) -> Node {
        Node {
            kind: FileType::Directory,
            perm: 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: UNIX_EPOCH,
            rdev: 0,
            names: 1,
            data_offset: 0,
            link: Vec::new(),
            xattrs: Vec::new(),
            parent,
            children: BTreeMap::new(),
        }
    }

    fn from_entry(e: &TocEntry, parent: usize) -> Node {
        let kind = match e.kind {
            EntryKind::File | EntryKind::Hardlink => FileType::RegularFile,
            EntryKind::Dir => FileType::Directory,
            EntryKind::Symlink => FileType::Symlink,
            EntryKind::Char => FileType::CharDevice,
            EntryKind::Block => FileType::BlockDevice,
            EntryKind::Fifo => FileType::NamedPipe,
        };
        let mut n = Node::dir(parent);
        n.kind = kind;
        n.set_attrs(e);
        if kind == FileType::Symlink {
            n.link = e.link.clone().unwrap_or_default().into_bytes();
            n.size = n.link.len() as u64;
        }
        if matches!(kind, FileType::CharDevice | FileType::BlockDevice) {
            n.rdev = encode_dev(e.devmajor, e.devminor);
        }
        n
    }

    fn set_attrs(&mut self, e: &TocEntry) {
        self.perm = (e.mode & 0o7777) as u16;
        self.uid = e.uid as u32;
        self.gid = e.gid as u32;
        self.size = e.size;
        self.data_offset = e.offset;
        self.mtime = time_of(e.mtime, e.mtime_nsec);
        self.xattrs = e
            .xattrs_decoded()
            .map(|(k, v)| (OsString::from(k), v))
            .collect();
    }
}

/// The kernel's `new_encode_dev` (what FUSE's 32-bit `rdev` carries).
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn time_of(secs: i64, nsec: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

/// The inode table of a layer. Inode number = index + 1; the root is inode 1.
#[derive(Debug)]
pub struct InodeTable {
    nodes: Vec<Node>,
    total_size: u64,
}

impl InodeTable {
    /// Builds the table from the TOC's entries.
    pub fn build(toc: &Toc) -> InodeTable {
        let mut nodes = vec![Node::dir(0)];
        for e in &toc.entries {
            if e.path.is_empty() {
                if e.kind == EntryKind::Dir {
                    nodes[0].set_attrs(e);
                    nodes[0].size = 0;
                }
                continue;
            }
            let (parent_path, name) = match e.path.rsplit_once('/') {
                Some((p, n)) => (p, n),
                None => ("", e.path.as_str()),
            };
            let parent = ensure_dir(&mut nodes, parent_path);
            if name == OPAQUE_WHITEOUT {
                let p = &mut nodes[parent];
                if !p.xattrs.iter().any(|(k, _)| k == OPAQUE_XATTR) {
                    p.xattrs.push((OPAQUE_XATTR.into(), b"y".to_vec()));
                }
                continue;
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                let mut n = Node::from_entry(e, parent);
                n.kind = FileType::CharDevice;
                n.perm = 0;
                n.size = 0;
                n.rdev = 0;
                n.xattrs.clear();
                let idx = push(&mut nodes, n);
                link_child(&mut nodes, parent, OsString::from(hidden), idx, false);
                continue;
            }
            let name = OsString::from(name);
            if e.kind == EntryKind::Hardlink {
                let target = e.link.as_deref().and_then(|t| resolve(&nodes, t));
                match target {
                    Some(t) if nodes[t].kind != FileType::Directory => {
                        link_child(&mut nodes, parent, name, t, true);
                    }
                    _ => warn!(path = %e.path, "hardlink target missing; entry skipped"),
                }
                continue;
            }
            if e.kind == EntryKind::Dir {
                if let Some(&existing) = nodes[parent].children.get(&name) {
                    if nodes[existing].kind == FileType::Directory {
                        // Keep the children, take the new attributes (and xattrs).
                        let opaque = nodes[existing]
                            .xattrs
                            .iter()
                            .any(|(k, _)| k == OPAQUE_XATTR);
                        nodes[existing].set_attrs(e);
                        nodes[existing].size = 0;
                        if opaque {
                            nodes[existing]
                                .xattrs
                                .push((OPAQUE_XATTR.into(), b"y".to_vec()));
                        }
                        continue;
                    }
                }
            }
            let n = Node::from_entry(e, parent);
            let idx = push(&mut nodes, n);
            link_child(&mut nodes, parent, name, idx, false);
        }
        let total_size = nodes
            .iter()
            .filter(|n| n.kind == FileType::RegularFile)
            .map(|n| n.size)
            .sum();
        InodeTable { nodes, total_size }
    }

    fn node(&self, ino: INodeNo) -> Option<&Node> {
        (ino.0 as usize)
            .checked_sub(1)
            .and_then(|i| self.nodes.get(i))
    }

    /// Attributes of inode `ino` as FUSE wants them.
    fn attr(&self, ino: INodeNo, blksize: u32) -> Option<FileAttr> {
        let n = self.node(ino)?;
        let nlink = if n.kind == FileType::Directory {
            2 + n
                .children
                .values()
                .filter(|&&c| {
                    self.nodes[c].kind == FileType::Directory
                        && self.nodes[c].parent == ino.0 as usize - 1
                })
                .count() as u32
        } else {
            n.names.max(1)
        };
        Some(FileAttr {
            ino,
            size: n.size,
            blocks: n.size.div_ceil(512),
            atime: n.mtime,
            mtime: n.mtime,
            ctime: n.mtime,
            crtime: n.mtime,
            kind: n.kind,
            perm: n.perm,
            nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: n.rdev,
            blksize,
            flags: 0,
        })
    }

    /// Number of inodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the table is empty (never: the root is always there).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

fn push(nodes: &mut Vec<Node>, n: Node) -> usize {
    nodes.push(n);
    nodes.len() - 1
}

/// Puts `child` under `parent` as `name`, replacing whatever had that name. `extra_name` is
/// true for a hardlink (another name of an existing inode); fresh nodes start with one name.
fn link_child(nodes: &mut [Node], parent: usize, name: OsString, child: usize, extra_name: bool) {
    match nodes[parent].children.insert(name, child) {
        Some(old) if old == child => return,
        Some(old) => nodes[old].names = nodes[old].names.saturating_sub(1),
        None => {}
    }
    if extra_name {
        nodes[child].names += 1;
    }
    if nodes[child].kind == FileType::Directory {
        nodes[child].parent = parent;
    }
}

/// Index of the directory at `path`, creating missing ones (and replacing non-directories).
fn ensure_dir(nodes: &mut Vec<Node>, path: &str) -> usize {
    let mut cur = 0;
    if path.is_empty() {
        return cur;
    }
    for comp in path.split('/') {
        let name = OsString::from(comp);
        cur = match nodes[cur].children.get(&name) {
            Some(&c) if nodes[c].kind == FileType::Directory => c,
            _ => {
                let idx = push(nodes, Node::dir(cur));
                link_child(nodes, cur, name, idx, false);
                idx
            }
        };
    }
    cur
}

/// The node at `path`, without following symlinks.
fn resolve(nodes: &[Node], path: &str) -> Option<usize> {
    let mut cur = 0;
    if path.is_empty() {
        return Some(0);
    }
    for comp in path.split('/') {
        cur = *nodes[cur].children.get(OsStr::new(comp))?;
    }
    Some(cur)
}

/// The FUSE filesystem of one layer.
pub struct LayerFs {
    table: InodeTable,
    store: Arc<BlockStore>,
    runtime: tokio::runtime::Handle,
    blksize: u32,
    /// The kernel skips open/release when we answer ENOSYS (FUSE_NO_OPEN_SUPPORT): two
    /// fewer round trips per file, and the page cache is kept (the layer is immutable).
    no_open: bool,
}

impl LayerFs {
    /// A filesystem over `store`'s layer; reads run on `runtime`.
    pub fn new(store: Arc<BlockStore>, runtime: tokio::runtime::Handle) -> LayerFs {
        let table = InodeTable::build(store.toc());
        LayerFs {
            table,
            blksize: 4096,
            no_open: false,
            store,
            runtime,
        }
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large readahead: a block is fetched whole anyway.
        let want = self.store.toc().block_size.max(128 * 1024);
        if let Err(max) = config.set_max_readahead(want) {
            let _ = config.set_max_readahead(max);
        }
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // Optional: older kernels lack them.
        for cap in [
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            let _ = config.add_capabilities(cap);
        }
        // Measured: open/release round trips cost ~30% of warm whole-image reads
        // (docs/benchmarks-fuse.md).
        self.no_open = config
            .add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT | InitFlags::FUSE_NO_OPENDIR_SUPPORT)
            .is_ok();
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(p) = self.table.node(parent) else {
            return reply.error(Errno::ENOENT);
        };
        match p.children.get(name) {
            Some(&c) => {
                let attr = self
                    .table
                    .attr(INodeNo(c as u64 + 1), self.blksize)
                    .expect("child inode exists");
                reply.entry(&TTL, &attr, Generation(0));
            }
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.table.attr(ino, self.blksize) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.table.node(ino) {
            Some(n) if n.kind == FileType::Symlink => reply.data(&n.link),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if self.no_open
            && self
                .table
                .node(ino)
                .is_some_and(|n| n.kind != FileType::Directory)
        {
            // Every later open succeeds in the kernel without asking us; the read-only mount
            // still refuses writes.
            return reply.error(Errno::ENOSYS);
        }
        match self.table.node(ino) {
            Some(n) if n.kind == FileType::Directory => reply.error(Errno::EISDIR),
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(n) = self.table.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if n.kind != FileType::RegularFile {
            return reply.error(Errno::EINVAL);
        }
        if offset >= n.size || size == 0 {
            return reply.data(&[]);
        }
        let len = (size as u64).min(n.size - offset) as usize;
        let start = n.data_offset + offset;
        let file_end = n.data_offset + n.size;
        let store = self.store.clone();
        self.runtime.spawn(async move {
            match store.read_at(start, len, file_end).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    warn!(layer = %store.layer().digest, ino = ino.0, offset, error = %e, "read failed");
                    reply.error(Errno::EIO)
                }
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.no_open
            && self
                .table
                .node(ino)
                .is_some_and(|n| n.kind == FileType::Directory)
        {
            return reply.error(Errno::ENOSYS);
        }
        match self.table.node(ino) {
            Some(n) if n.kind == FileType::Directory => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(n) = self.table.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if n.kind != FileType::Directory {
            return reply.error(Errno::ENOTDIR);
        }
        let parent_ino = INodeNo(n.parent as u64 + 1);
        let dots = [
            (ino, FileType::Directory, OsStr::new(".")),
            (parent_ino, FileType::Directory, OsStr::new("..")),
        ];
        let children = n.children.iter().map(|(name, &c)| {
            (
                INodeNo(c as u64 + 1),
                self.table.nodes[c].kind,
                name.as_os_str(),
            )
        });
        for (i, (child, kind, name)) in dots
            .into_iter()
            .chain(children)
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(child, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bsize = 4096u64;
        reply.statfs(
            self.table.total_size.div_ceil(bsize),
            0,
            0,
            self.table.len() as u64,
            0,
            bsize as u32,
            255,
            bsize as u32,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(n) = self.table.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match n.xattrs.iter().find(|(k, _)| k == name) {
            Some((_, v)) if size == 0 => reply.size(v.len() as u32),
            Some((_, v)) if v.len() <= size as usize => reply.data(v),
            Some(_) => reply.error(Errno::ERANGE),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(n) = self.table.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut names = Vec::new();
        for (k, _) in &n.xattrs {
            names.extend_from_slice(k.as_bytes());
            names.push(0);
        }
        if size == 0 {
            reply.size(names.len() as u32)
        } else if names.len() <= size as usize {
            reply.data(&names)
        } else {
            reply.error(Errno::ERANGE)
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Only reached without default_permissions; the layer is read-only.
        match self.table.node(ino) {
            Some(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }
}

/// FUSE mount settings.
#[derive(Clone, Debug)]
pub struct MountSettings {
    /// FUSE worker threads.
    pub threads: usize,
}

impl Default for MountSettings {
    fn default() -> Self {
        MountSettings { threads: 4 }
    }
}

/// A mounted layer. [`LayerMount::unmount`] (or drop) unmounts it, lazily if it is busy.
pub struct LayerMount {
    mountpoint: PathBuf,
    unmounter: Option<fuser::SessionUnmounter>,
    done: Option<std::sync::mpsc::Receiver<()>>,
    store: Arc<BlockStore>,
}

impl LayerMount {
    /// Mounts `store`'s layer at `mountpoint` (an existing directory). Must run inside a
    /// multi-threaded tokio runtime: FUSE reads are answered from tasks on it.
    pub async fn mount(
        store: Arc<BlockStore>,
        mountpoint: &Path,
        settings: MountSettings,
    ) -> Result<LayerMount> {
        let runtime = tokio::runtime::Handle::current();
        let mp = mountpoint.to_path_buf();
        let mount_err = |reason: String| LazyError::Mount {
            mountpoint: mountpoint.display().to_string(),
            reason,
        };
        if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread {
            return Err(mount_err(
                "needs a multi-threaded tokio runtime (FUSE reads run as tasks on it)".into(),
            ));
        }
        let fs_store = store.clone();
        let (unmounter, done) = tokio::task::spawn_blocking(move || {
            let fs = LayerFs::new(fs_store.clone(), runtime);
            let mut config = fuser::Config::default();
            config.mount_options = vec![
                MountOption::RO,
                MountOption::DefaultPermissions,
                MountOption::FSName("faasnet".into()),
                MountOption::Subtype("faasnet".into()),
                MountOption::NoAtime,
            ];
            config.acl = SessionACL::All;
            config.n_threads = Some(settings.threads.max(1));
            config.clone_fd = true;
            let mut session = fuser::Session::new(fs, &mp, &config)?;
            let unmounter = session.unmount_callable();
            let (tx, rx) = std::sync::mpsc::channel();
            let name = format!("fuse-{}", &fs_store.layer().digest_hex()[..12]);
            std::thread::Builder::new().name(name).spawn(move || {
                if let Err(e) = session.run() {
                    warn!(error = %e, "FUSE session ended with an error");
                }
                let _ = tx.send(());
            })?;
            Ok::<_, std::io::Error>((unmounter, rx))
        })
        .await
        .map_err(|e| mount_err(format!("mount task: {e}")))?
        .map_err(|e| mount_err(e.to_string()))?;
        info!(layer = %store.layer(), mountpoint = %mountpoint.display(), "layer mounted");
        Ok(LayerMount {
            mountpoint: mountpoint.to_path_buf(),
            unmounter: Some(unmounter),
            done: Some(done),
            store,
        })
    }

    /// The mountpoint.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The layer's block store.
    pub fn store(&self) -> &Arc<BlockStore> {
        &self.store
    }

    /// Unmounts; when the filesystem is busy, detaches it lazily (it goes away when its last
    /// user does).
    pub async fn unmount(mut self) -> Result<()> {
        let unmounter = self.unmounter.take();
        let done = self.done.take();
        let mp = self.mountpoint.clone();
        tokio::task::spawn_blocking(move || unmount_blocking(&mp, unmounter, done))
            .await
            .map_err(|e| LazyError::Mount {
                mountpoint: self.mountpoint.display().to_string(),
                reason: format!("unmount task: {e}"),
            })?
    }
}

fn unmount_blocking(
    mp: &Path,
    unmounter: Option<fuser::SessionUnmounter>,
    done: Option<std::sync::mpsc::Receiver<()>>,
) -> Result<()> {
    let Some(mut unmounter) = unmounter else {
        return Ok(());
    };
    if let Err(e) = unmounter.unmount() {
        debug!(mountpoint = %mp.display(), error = %e, "unmount failed; detaching lazily");
        nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
            LazyError::Mount {
                mountpoint: mp.display().to_string(),
                reason: format!("lazy unmount: {e}"),
            }
        })?;
        info!(mountpoint = %mp.display(), "layer detached (busy; goes away with its last user)");
        return Ok(());
    }
    // The session thread ends once the kernel drops the connection.
    if let Some(done) = done {
        if done.recv_timeout(Duration::from_secs(5)).is_err() {
            warn!(mountpoint = %mp.display(), "FUSE session thread still running after unmount");
        }
    }
    info!(mountpoint = %mp.display(), "layer unmounted");
    Ok(())
}

impl Drop for LayerMount {
    fn drop(&mut self) {
        if self.unmounter.is_some() {
            if let Err(e) =
                unmount_blocking(&self.mountpoint, self.unmounter.take(), self.done.take())
            {
                warn!(error = %e, "unmount on drop");
            }
        }
    }
}
