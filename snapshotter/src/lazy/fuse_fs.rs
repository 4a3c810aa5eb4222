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

use super::{
    block_store::BlockStore,
    fuse_handover::{self, FdStore, HeldMount, InitOffer},
    LazyError, Result,
};

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

/// The block store of a filesystem, possibly set after the filesystem started serving: a
/// connection resumed at startup answers lookups at once (they need only the TOC) while
/// its reads wait until the restored snapshot says which upstream the layer uses.
pub struct StoreSlot {
    store: std::sync::OnceLock<Arc<BlockStore>>,
    set: tokio::sync::Notify,
}

impl StoreSlot {
    /// A slot holding `store`, or empty.
    pub fn new(store: Option<Arc<BlockStore>>) -> Arc<StoreSlot> {
        let slot = StoreSlot {
            store: std::sync::OnceLock::new(),
            set: tokio::sync::Notify::new(),
        };
        if let Some(s) = store {
            let _ = slot.store.set(s);
        }
        Arc::new(slot)
    }

    /// Sets the store (once; later calls are ignored) and wakes the waiting reads.
    pub fn set(&self, store: Arc<BlockStore>) {
        let _ = self.store.set(store);
        self.set.notify_waiters();
    }

    /// The store, if set.
    pub fn get(&self) -> Option<&Arc<BlockStore>> {
        self.store.get()
    }

    async fn wait(&self) -> Arc<BlockStore> {
        loop {
            // Registered before the check: a set() in between still wakes us.
            let notified = self.set.notified();
            if let Some(s) = self.store.get() {
                return s.clone();
            }
            notified.await;
        }
    }
}

/// The FUSE filesystem of one layer.
///
/// Inode numbers are TOC order (index in [`InodeTable`] + 1), file handles are always 0
/// and no per-open state exists: a process that serves the same TOC again (after a
/// restart) answers the kernel exactly as the previous one did for the node ids it caches.
pub struct LayerFs {
    table: InodeTable,
    slot: Arc<StoreSlot>,
    runtime: tokio::runtime::Handle,
    blksize: u32,
    /// The kernel skips open/release when we answer ENOSYS (FUSE_NO_OPEN_SUPPORT): two
    /// fewer round trips per file, and the page cache is kept (the layer is immutable).
    no_open: bool,
    block_size: u32,
    /// What the kernel offered at INIT, recorded for a later resume.
    offer: Arc<std::sync::Mutex<Option<InitOffer>>>,
}

impl LayerFs {
    /// A filesystem over `store`'s layer; reads run on `runtime`.
    pub fn new(store: Arc<BlockStore>, runtime: tokio::runtime::Handle) -> LayerFs {
        let toc = store.toc();
        let (table, block_size) = (InodeTable::build(toc), toc.block_size);
        LayerFs::with_slot(table, block_size, StoreSlot::new(Some(store)), runtime)
    }

    /// A filesystem with the inode table of `toc`, reading from whatever `slot` holds.
    pub fn with_slot(
        table: InodeTable,
        block_size: u32,
        slot: Arc<StoreSlot>,
        runtime: tokio::runtime::Handle,
    ) -> LayerFs {
        LayerFs {
            table,
            blksize: 4096,
            no_open: false,
            block_size,
            slot,
            runtime,
            offer: Default::default(),
        }
    }

    /// Where [`Filesystem::init`] records the kernel's offer.
    fn offer_cell(&self) -> Arc<std::sync::Mutex<Option<InitOffer>>> {
        self.offer.clone()
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let max_readahead = match config.set_max_readahead(u32::MAX) {
            Err(max) => max,
            Ok(_) => u32::MAX,
        };
        let abi = config.kernel_abi();
        *self.offer.lock().unwrap() = Some(InitOffer {
            major: abi.0,
            minor: abi.1,
            flags: config.capabilities().bits(),
            max_readahead,
        });
        // Large readahead: a block is fetched whole anyway.
        let want = self.block_size.max(128 * 1024);
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
        let file_start = n.data_offset;
        let slot = self.slot.clone();
        self.runtime.spawn(async move {
            let store = slot.wait().await;
            store.record_file_read(file_start);
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

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Read-only: nothing to flush (fuser's default logs a warning on every mount).
        reply.ok()
    }
}

/// FUSE mount settings.
#[derive(Clone, Debug)]
pub struct MountSettings {
    /// FUSE worker threads. They share the mount's one `/dev/fuse` descriptor (no
    /// `FUSE_DEV_IOC_CLONE`): the kernel fails the requests in flight on a cloned descriptor
    /// when it is closed, so with clones a snapshotter killed mid-read would fail those
    /// reads instead of having them resent to its successor.
    pub threads: usize,
    /// Where to hand the mount's FUSE connection over, so it outlives this process.
    pub handover: Option<Arc<FdStore>>,
}

impl Default for MountSettings {
    fn default() -> Self {
        MountSettings {
            threads: 4,
            handover: None,
        }
    }
}

fn session_config(settings: &MountSettings) -> fuser::Config {
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
    config.clone_fd = false;
    config
}

/// Runs `session` on a thread named after the layer; the receiver gets a message when it
/// ends (the connection is gone).
fn run_session<FS: Filesystem>(
    session: fuser::Session<FS>,
    digest_hex: &str,
) -> std::io::Result<std::sync::mpsc::Receiver<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let name = format!("fuse-{}", &digest_hex[..12.min(digest_hex.len())]);
    std::thread::Builder::new().name(name).spawn(move || {
        if let Err(e) = session.run() {
            warn!(error = %e, "FUSE session ended with an error");
        }
        let _ = tx.send(());
    })?;
    Ok(rx)
}

/// How a mount is taken down.
enum Unmounter {
    /// fuser mounted it.
    Fuser(fuser::SessionUnmounter),
    /// A resumed connection: umount(2) ourselves.
    Syscall,
}

/// A mounted layer. [`LayerMount::unmount`] (or drop) unmounts it, lazily if it is busy;
/// [`LayerMount::leave_mounted`] leaves it to the next process.
pub struct LayerMount {
    mountpoint: PathBuf,
    unmounter: Option<Unmounter>,
    done: Option<std::sync::mpsc::Receiver<()>>,
    store: Arc<BlockStore>,
    resumed: bool,
}

impl LayerMount {
    /// Mounts `store`'s layer at `mountpoint` (an existing directory). Must run inside a
    /// multi-threaded tokio runtime: FUSE reads are answered from tasks on it. With
    /// `settings.handover`, the connection is handed over right after the mount.
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
            let offer = fs.offer_cell();
            let config = session_config(&settings);
            let mut session = fuser::Session::new(fs, &mp, &config)?;
            let unmounter = session.unmounter_for_layer();
            if let Some(handover) = &settings.handover {
                let offer = *offer.lock().unwrap();
                hand_over(handover, &session, &mp, fs_store.layer(), offer);
            }
            let done = run_session(session, fs_store.layer().digest_hex())?;
            Ok::<_, std::io::Error>((unmounter, done))
        })
        .await
        .map_err(|e| mount_err(format!("mount task: {e}")))?
        .map_err(|e| mount_err(e.to_string()))?;
        info!(layer = %store.layer(), mountpoint = %mountpoint.display(), "layer mounted");
        Ok(LayerMount {
            mountpoint: mountpoint.to_path_buf(),
            unmounter: Some(Unmounter::Fuser(unmounter)),
            done: Some(done),
            store,
            resumed: false,
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

    /// Whether this mount was resumed from a previous process.
    pub fn resumed(&self) -> bool {
        self.resumed
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

    /// Leaves the layer mounted (for the next snapshotter process, which takes its
    /// connection over from the holder). The session keeps serving until this process ends.
    pub fn leave_mounted(mut self) {
        self.unmounter = None;
    }
}

trait UnmounterForLayer {
    fn unmounter_for_layer(&mut self) -> fuser::SessionUnmounter;
}

impl<FS: Filesystem> UnmounterForLayer for fuser::Session<FS> {
    fn unmounter_for_layer(&mut self) -> fuser::SessionUnmounter {
        self.unmount_callable()
    }
}

/// Hands a duplicate of `session`'s descriptor to the holder; failures are logged (the
/// mount then does not survive a restart, as before handover existed).
fn hand_over<FS: Filesystem>(
    handover: &FdStore,
    session: &fuser::Session<FS>,
    mountpoint: &Path,
    layer: &super::LayerRef,
    offer: Option<InitOffer>,
) {
    use std::os::fd::AsFd;
    let Some(init) = offer else {
        warn!(mountpoint = %mountpoint.display(), "no INIT offer recorded; mount not handed over");
        return;
    };
    let Some(dev) = fuse_handover::fuse_mount_dev(mountpoint) else {
        warn!(mountpoint = %mountpoint.display(), "mount not in mountinfo; not handed over");
        return;
    };
    let held = HeldMount {
        mountpoint: mountpoint.to_path_buf(),
        dev,
        registry: layer.registry.clone(),
        repository: layer.repository.clone(),
        digest: layer.digest.clone(),
        init,
    };
    match handover.put(&held, session.as_fd()) {
        Ok(()) => {
            debug!(mountpoint = %mountpoint.display(), dev = %held.dev, "FUSE connection handed over")
        }
        Err(e) => {
            warn!(mountpoint = %mountpoint.display(), error = %e, "cannot hand the FUSE connection over; a restart will remount this layer")
        }
    }
}

/// A FUSE connection taken back from the holder and served again, before the snapshot it
/// belongs to is restored (which decides the layer's upstream: reads wait until then).
pub struct ResumedSession {
    held: HeldMount,
    slot: Arc<StoreSlot>,
    done: std::sync::mpsc::Receiver<()>,
    /// A detached copy of the mount, taken while it was still attached at its mountpoint
    /// (the daemon detaches remote snapshots' mountpoints before restoring them).
    tree: Option<std::os::fd::OwnedFd>,
}

impl ResumedSession {
    /// Serves `dev` (the connection of `held`) with the inode table of `toc`, and asks the
    /// kernel to resend the requests the previous process left unanswered.
    pub async fn resume(
        held: HeldMount,
        dev: std::os::fd::OwnedFd,
        toc: Arc<faasnet_format::Toc>,
        settings: MountSettings,
    ) -> Result<ResumedSession> {
        let runtime = tokio::runtime::Handle::current();
        let err = |reason: String| LazyError::Mount {
            mountpoint: held.mountpoint.display().to_string(),
            reason,
        };
        let slot = StoreSlot::new(None);
        let (fs_slot, h) = (slot.clone(), held.clone());
        let (done, tree) = tokio::task::spawn_blocking(move || {
            let table = InodeTable::build(&toc);
            let fs = LayerFs::with_slot(table, toc.block_size, fs_slot, runtime);
            let session = fuse_handover::resume_session(fs, dev, &h.init, session_config(&settings))?;
            let digest_hex = h.digest.rsplit(':').next().unwrap_or("layer").to_string();
            let done = run_session(session, &digest_hex)?;
            // Served now: the path walk to the mountpoint cannot block on it.
            let tree = match fuse_handover::fuse_mount_dev(&h.mountpoint) {
                Some(dev) if dev == h.dev => match fuse_handover::clone_mount(&h.mountpoint) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        warn!(mountpoint = %h.mountpoint.display(), error = %e, "cannot keep a copy of the resumed mount");
                        None
                    }
                },
                _ => None,
            };
            Ok::<_, std::io::Error>((done, tree))
        })
        .await
        .map_err(|e| err(format!("resume task: {e}")))?
        .map_err(|e| err(format!("resume: {e}")))?;
        info!(mountpoint = %held.mountpoint.display(), dev = %held.dev, attached = tree.is_some(), "resumed FUSE session of the previous process");
        Ok(ResumedSession {
            held,
            slot,
            done,
            tree,
        })
    }

    /// What the holder knows about it.
    pub fn held(&self) -> &HeldMount {
        &self.held
    }

    /// Starts reading through `store`.
    pub fn set_store(&self, store: Arc<BlockStore>) {
        self.slot.set(store);
    }

    /// Reads through `store` and puts the mount back at `mountpoint` (where it was):
    /// the resumed mount serves new containers too. Fails (giving the session back) when
    /// no copy of the mount was kept or it cannot be attached.
    pub fn attach(
        mut self,
        store: Arc<BlockStore>,
        mountpoint: &Path,
    ) -> std::result::Result<LayerMount, Box<(ResumedSession, String)>> {
        self.slot.set(store.clone());
        let Some(tree) = self.tree.take() else {
            return Err(Box::new((self, "no copy of the mount was kept".into())));
        };
        // Still there (no detach happened): nothing to do.
        let attached =
            fuse_handover::fuse_mount_dev(mountpoint).as_deref() == Some(self.held.dev.as_str());
        if !attached {
            if let Err(e) = fuse_handover::attach_mount(std::os::fd::AsFd::as_fd(&tree), mountpoint)
            {
                return Err(Box::new((self, format!("move_mount: {e}"))));
            }
        }
        info!(mountpoint = %mountpoint.display(), "resumed mount attached");
        Ok(LayerMount {
            mountpoint: mountpoint.to_path_buf(),
            unmounter: Some(Unmounter::Syscall),
            done: Some(self.done),
            store,
            resumed: true,
        })
    }

    /// Whether a copy of the mount was kept to put it back at its mountpoint.
    pub fn attached_copy(&self) -> bool {
        self.tree.is_some()
    }

    /// Gives up the copy of the mount: the session serves whoever still uses the
    /// filesystem, which goes away with its last user.
    pub fn into_detached(mut self) -> ResumedSession {
        self.tree = None;
        self
    }

    /// Whether its connection has ended (its filesystem is gone).
    pub fn ended(&self) -> bool {
        !matches!(
            self.done.try_recv(),
            Err(std::sync::mpsc::TryRecvError::Empty)
        )
    }
}

fn unmount_blocking(
    mp: &Path,
    unmounter: Option<Unmounter>,
    done: Option<std::sync::mpsc::Receiver<()>>,
) -> Result<()> {
    let result = match unmounter {
        None => return Ok(()),
        Some(Unmounter::Fuser(mut u)) => u.unmount(),
        Some(Unmounter::Syscall) => {
            nix::mount::umount2(mp, nix::mount::MntFlags::empty()).map_err(std::io::Error::from)
        }
    };
    if let Err(e) = result {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_are_a_function_of_the_toc() {
        use faasnet_format::{EntryKind, TocEntry};
        let entry = |path: &str, kind: EntryKind| TocEntry {
            path: path.into(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            mtime_nsec: 0,
            link: None,
            xattrs: Default::default(),
            devmajor: 0,
            devminor: 0,
            offset: 0,
        };
        let mut toc = Toc {
            version: 1,
            block_size: 4096,
            tar_size: 0,
            diff_id: String::new(),
            original: None,
            blocks: Vec::new(),
            entries: Vec::new(),
            start_blocks: 0,
        };
        toc.entries = vec![
            entry("b", EntryKind::Dir),
            entry("b/x", EntryKind::File),
            entry("a", EntryKind::File),
            entry("b/.wh.y", EntryKind::File),
        ];
        let names = |t: &InodeTable| -> Vec<(OsString, usize)> {
            t.nodes
                .iter()
                .flat_map(|n| n.children.iter().map(|(k, v)| (k.clone(), *v)))
                .collect()
        };
        let (one, two) = (InodeTable::build(&toc), InodeTable::build(&toc));
        assert_eq!(names(&one), names(&two));
        assert_eq!(one.len(), 5);
    }
}
