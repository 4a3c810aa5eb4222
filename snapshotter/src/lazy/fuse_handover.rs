//! Keeping FUSE connections alive across snapshotter restarts (docs/lazy.md, "Restarts").
//!
//! A FUSE mount lives as long as some process holds a descriptor of its `/dev/fuse`
//! connection. The snapshotter hands a duplicate of every mount's descriptor to a tiny
//! holder process ([`run_holder`], the `snapshotter` binary re-executed with
//! [`HOLDER_ARG`], in its own session), over a unix socket with `SCM_RIGHTS`, as systemd's
//! file descriptor store does. When the snapshotter dies (SIGTERM or `kill -9`) the
//! connections stay up: container reads wait in the kernel instead of failing with
//! "Transport endpoint is not connected". The next snapshotter takes the descriptors back
//! ([`FdStore::list`]) and serves them again ([`resume_session`]), and asks the kernel to
//! resend the requests the dead process had read but not answered (`FUSE_NOTIFY_RESEND`).
//!
//! The holder drops a descriptor when its connection dies (the kernel reports `POLLERR`
//! once the filesystem is unmounted and unused), and exits when it holds nothing and no
//! snapshotter is connected, so it never outlives the mounts.

use std::{
    collections::HashMap,
    ffi::CString,
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::{ffi::OsStrExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// First argument of the `snapshotter` binary that makes it the holder process.
pub const HOLDER_ARG: &str = "__fuse-fd-holder";

/// `FUSE_NOTIFY_RESEND` (include/uapi/linux/fuse.h, Linux >= 6.9): the kernel puts every
/// request that was read from the connection but not answered back in its queue.
const FUSE_NOTIFY_RESEND: i32 = 7;
/// `FUSE_INIT` opcode.
const FUSE_INIT: u32 = 26;
/// `FUSE_INIT_EXT`: `flags2` carries the high 32 capability bits.
const FUSE_INIT_EXT: u32 = 1 << 30;
/// `unique` of the synthetic INIT request (never reaches the kernel).
const SYNTHETIC_UNIQUE: u64 = 0x4641_4153_4e45_5431;
/// Largest control message (one request or reply of the holder protocol).
const MAX_MESSAGE: usize = 64 * 1024;
/// The holder exits after this long holding nothing with no client.
const HOLDER_IDLE_EXIT: Duration = Duration::from_secs(5);

/// What the kernel offered in the FUSE_INIT of a mount: replayed to fuser when the
/// connection is resumed, so the filesystem makes the same choices (e.g. no-open mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitOffer {
    /// Protocol major version (7).
    pub major: u32,
    /// Protocol minor version.
    pub minor: u32,
    /// Capability bits (`flags | flags2 << 32`, without `FUSE_INIT_EXT`).
    pub flags: u64,
    /// Largest read-ahead the kernel allows.
    pub max_readahead: u32,
}

/// One FUSE connection in the holder: what a restarted snapshotter needs to serve it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldMount {
    /// Where the layer was mounted.
    pub mountpoint: PathBuf,
    /// `major:minor` of the mount (mountinfo), to recognise it.
    pub dev: String,
    /// Registry host of the layer.
    pub registry: String,
    /// Repository of the layer.
    pub repository: String,
    /// Layer blob digest.
    pub digest: String,
    /// The kernel's INIT offer.
    pub init: InitOffer,
}

impl HeldMount {
    fn key(&self) -> (PathBuf, String) {
        (self.mountpoint.clone(), self.dev.clone())
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    /// Keep the attached descriptor (replaces an entry with the same mountpoint and dev).
    Put { mount: HeldMount },
    /// Send every entry with a duplicate of its descriptor (the holder keeps them).
    List,
    /// Close the entry's descriptor.
    Drop { mountpoint: PathBuf, dev: String },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
enum Response {
    Ok,
    Entry { mount: HeldMount },
    End,
    Error { message: String },
}

// ---------------------------------------------------------------------------------------
// Unix SOCK_SEQPACKET sockets with SCM_RIGHTS (std has neither).

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path too long: {}", path.display()),
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by socket(2).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket_socket()?;
    let (addr, len) = sockaddr(path)?;
    // SAFETY: addr is a valid sockaddr_un of length len.
    cvt(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        )
    })?;
    Ok(fd)
}

fn listen(path: &Path) -> io::Result<OwnedFd> {
    let fd = seqpacket_socket()?;
    let (addr, len) = sockaddr(path)?;
    // SAFETY: addr is a valid sockaddr_un of length len.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        )
    })?;
    // SAFETY: listen(2) on our socket.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
    Ok(fd)
}

/// A connected pair of SOCK_SEQPACKET sockets.
fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair(2) writes two descriptors into fds.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both were just returned by socketpair(2).
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends one message with `fds` attached.
fn send_msg(sock: BorrowedFd<'_>, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8).max(1)];
    // SAFETY: msghdr is plain old data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE(fd_bytes) long and aligned; the header
        // and data written stay inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one message and the descriptors attached to it. Ok((0, [])) is end of file.
fn recv_msg(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 64];
    // SAFETY: msghdr is plain old data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    let n = loop {
        // SAFETY: msg points at live buffers for the duration of the call.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into cbuf; every SCM_RIGHTS
    // descriptor is new and owned by us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message truncated",
        ));
    }
    Ok((n, fds))
}

// ---------------------------------------------------------------------------------------
// The client.

/// The snapshotter's connection to the holder process.
pub struct FdStore {
    path: PathBuf,
    spawn: fn(&Path) -> io::Result<()>,
    conn: Mutex<Option<OwnedFd>>,
}

impl std::fmt::Debug for FdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdStore").field("path", &self.path).finish()
    }
}

/// Starts the holder: this executable, re-executed with [`HOLDER_ARG`] in a session of its
/// own (so that signals to the snapshotter's process group do not reach it).
pub fn spawn_holder_process(socket: &Path) -> io::Result<()> {
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(HOLDER_ARG)
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    // SAFETY: setsid(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    debug!(pid = child.id(), socket = %socket.display(), "FUSE fd holder started");
    // Not waited for: it outlives us by design (it is reparented when we exit).
    std::mem::forget(child);
    Ok(())
}

impl FdStore {
    /// Connects to the holder listening at `socket`, starting one with `spawn` if there is
    /// none.
    pub fn connect_or_spawn(
        socket: &Path,
        spawn: fn(&Path) -> io::Result<()>,
    ) -> io::Result<FdStore> {
        let store = FdStore {
            path: socket.to_path_buf(),
            spawn,
            conn: Mutex::new(None),
        };
        let conn = store.connect_fresh()?;
        *store.conn.lock().unwrap() = Some(conn);
        Ok(store)
    }

    fn connect_fresh(&self) -> io::Result<OwnedFd> {
        if let Ok(c) = connect(&self.path) {
            return Ok(c);
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        (self.spawn)(&self.path)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match connect(&self.path) {
                Ok(c) => return Ok(c),
                Err(e) if Instant::now() >= deadline => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "FUSE fd holder at {} did not come up: {e}",
                            self.path.display()
                        ),
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// The holder's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One exchange; on a broken connection (the holder exited) reconnects, starting a new
    /// holder, and tries once more.
    fn exchange(
        &self,
        req: &Request,
        fds: &[RawFd],
        mut on_response: impl FnMut(Response, Vec<OwnedFd>) -> io::Result<bool>,
    ) -> io::Result<()> {
        let body = serde_json::to_vec(req).map_err(io::Error::other)?;
        let mut conn = self.conn.lock().unwrap();
        for attempt in 0..2 {
            if conn.is_none() || attempt > 0 {
                *conn = Some(self.connect_fresh()?);
            }
            let c = conn.as_ref().expect("connected").as_fd();
            let result = (|| {
                send_msg(c, &body, fds)?;
                let mut buf = vec![0u8; MAX_MESSAGE];
                loop {
                    let (n, got) = recv_msg(c, &mut buf)?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "FUSE fd holder closed the connection",
                        ));
                    }
                    let resp: Response =
                        serde_json::from_slice(&buf[..n]).map_err(io::Error::other)?;
                    if let Response::Error { message } = resp {
                        return Err(io::Error::other(format!("FUSE fd holder: {message}")));
                    }
                    if !on_response(resp, got)? {
                        return Ok(());
                    }
                }
            })();
            match result {
                Ok(()) => return Ok(()),
                Err(e) if attempt == 0 => {
                    debug!(error = %e, "FUSE fd holder connection lost; reconnecting");
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("two attempts")
    }

    /// Hands a duplicate of `fd` (a mount's `/dev/fuse` descriptor) to the holder.
    pub fn put(&self, mount: &HeldMount, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.exchange(
            &Request::Put {
                mount: mount.clone(),
            },
            &[fd.as_raw_fd()],
            |_, _| Ok(false),
        )
    }

    /// Every connection the holder keeps, each with a duplicate of its descriptor (the
    /// holder keeps its own).
    pub fn list(&self) -> io::Result<Vec<(HeldMount, OwnedFd)>> {
        let mut out = Vec::new();
        self.exchange(&Request::List, &[], |resp, mut fds| match resp {
            Response::Entry { mount } => {
                let fd = fds.pop().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "entry without a descriptor")
                })?;
                out.push((mount, fd));
                Ok(true)
            }
            _ => Ok(false),
        })?;
        Ok(out)
    }

    /// Makes the holder close its descriptor of `mount`.
    pub fn forget(&self, mount: &HeldMount) -> io::Result<()> {
        self.exchange(
            &Request::Drop {
                mountpoint: mount.mountpoint.clone(),
                dev: mount.dev.clone(),
            },
            &[],
            |_, _| Ok(false),
        )
    }
}

// ---------------------------------------------------------------------------------------
// The holder.

struct Held {
    mount: HeldMount,
    fd: OwnedFd,
}

/// The holder process's main loop: keeps the descriptors handed to it on the unix socket
/// `socket`, drops each when its FUSE connection dies, exits when it holds nothing and no
/// client has been connected for a while.
pub fn run_holder(socket: &Path) -> io::Result<()> {
    if connect(socket).is_ok() {
        info!(socket = %socket.display(), "another FUSE fd holder is serving; exiting");
        return Ok(());
    }
    let _ = std::fs::remove_file(socket);
    let listener = listen(socket)?;
    let ino = std::fs::metadata(socket).map(|m| std::os::unix::fs::MetadataExt::ino(&m))?;
    let mut clients: Vec<OwnedFd> = Vec::new();
    let mut held: Vec<Held> = Vec::new();
    let mut idle_since = Some(Instant::now());
    let mut buf = vec![0u8; MAX_MESSAGE];
    info!(socket = %socket.display(), pid = std::process::id(), "FUSE fd holder serving");
    loop {
        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(1 + clients.len() + held.len());
        pfds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for c in &clients {
            pfds.push(libc::pollfd {
                fd: c.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // No events asked: poll still reports POLLERR, which /dev/fuse signals once the
        // connection is gone (unmounted, or aborted).
        for h in &held {
            pfds.push(libc::pollfd {
                fd: h.fd.as_raw_fd(),
                events: 0,
                revents: 0,
            });
        }
        // SAFETY: pfds is a valid array of pollfd for the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 1000) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let (lst, rest) = pfds.split_at(1);
        let (cl, hd) = rest.split_at(clients.len());
        // Dead connections.
        let dead: Vec<usize> = hd
            .iter()
            .enumerate()
            .filter(|(_, p)| p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0)
            .map(|(i, _)| i)
            .collect();
        for i in dead.into_iter().rev() {
            let h = held.remove(i);
            info!(mountpoint = %h.mount.mountpoint.display(), "FUSE connection gone; descriptor dropped");
        }
        // Requests and disconnects.
        let mut gone = Vec::new();
        for (i, p) in cl.iter().enumerate() {
            if p.revents == 0 {
                continue;
            }
            match holder_serve_one(clients[i].as_fd(), &mut held, &mut buf) {
                Ok(true) => {}
                Ok(false) => gone.push(i),
                Err(e) => {
                    debug!(error = %e, "holder client");
                    gone.push(i);
                }
            }
        }
        for i in gone.into_iter().rev() {
            clients.remove(i);
        }
        if lst[0].revents & libc::POLLIN != 0 {
            // SAFETY: accept4(2) on our listening socket.
            let fd = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: fd was just returned by accept4(2).
                clients.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        if clients.is_empty() && held.is_empty() {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= HOLDER_IDLE_EXIT {
                // Remove the socket only if it is still ours.
                let ours = std::fs::metadata(socket)
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m) == ino)
                    .unwrap_or(false);
                if ours {
                    let _ = std::fs::remove_file(socket);
                }
                info!("FUSE fd holder: nothing held, no client; exiting");
                return Ok(());
            }
        } else {
            idle_since = None;
        }
    }
}

/// Serves one request of a client. Ok(false): the client disconnected.
fn holder_serve_one(c: BorrowedFd<'_>, held: &mut Vec<Held>, buf: &mut [u8]) -> io::Result<bool> {
    let (n, mut fds) = recv_msg(c, buf)?;
    if n == 0 {
        return Ok(false);
    }
    let reply = |r: &Response, fds: &[RawFd]| {
        send_msg(c, &serde_json::to_vec(r).map_err(io::Error::other)?, fds)
    };
    let req: Request = match serde_json::from_slice(&buf[..n]) {
        Ok(r) => r,
        Err(e) => {
            reply(
                &Response::Error {
                    message: format!("bad request: {e}"),
                },
                &[],
            )?;
            return Ok(true);
        }
    };
    match req {
        Request::Put { mount } => {
            let Some(fd) = fds.pop() else {
                reply(
                    &Response::Error {
                        message: "put without a descriptor".into(),
                    },
                    &[],
                )?;
                return Ok(true);
            };
            held.retain(|h| h.mount.key() != mount.key());
            info!(mountpoint = %mount.mountpoint.display(), dev = %mount.dev, "holding FUSE connection");
            held.push(Held { mount, fd });
            reply(&Response::Ok, &[])?;
        }
        Request::List => {
            for h in held.iter() {
                reply(
                    &Response::Entry {
                        mount: h.mount.clone(),
                    },
                    &[h.fd.as_raw_fd()],
                )?;
            }
            reply(&Response::End, &[])?;
        }
        Request::Drop { mountpoint, dev } => {
            held.retain(|h| h.mount.key() != (mountpoint.clone(), dev.clone()));
            reply(&Response::Ok, &[])?;
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------
// Resuming a connection with fuser.

/// The FUSE_INIT request the kernel sent at mount time, rebuilt from `offer`.
fn synthetic_init(offer: &InitOffer) -> Vec<u8> {
    let mut m = Vec::with_capacity(104);
    let len: u32 = 40 + 64;
    // fuse_in_header
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&FUSE_INIT.to_ne_bytes());
    m.extend_from_slice(&SYNTHETIC_UNIQUE.to_ne_bytes());
    m.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
    m.extend_from_slice(&[0u8; 16]); // uid, gid, pid, total_extlen + padding
                                     // fuse_init_in
    m.extend_from_slice(&offer.major.to_ne_bytes());
    m.extend_from_slice(&offer.minor.to_ne_bytes());
    m.extend_from_slice(&offer.max_readahead.to_ne_bytes());
    m.extend_from_slice(&((offer.flags as u32) | FUSE_INIT_EXT).to_ne_bytes());
    m.extend_from_slice(&((offer.flags >> 32) as u32).to_ne_bytes());
    m.extend_from_slice(&[0u8; 44]); // unused[11]
    debug_assert_eq!(m.len(), len as usize);
    m
}

/// A fuser session serving `dev` (a `/dev/fuse` descriptor whose connection a previous
/// process initialised), without the INIT handshake the kernel sends only once per mount.
///
/// fuser 0.18 has no such constructor: [`fuser::Session::from_fd`] insists on reading an
/// INIT request. So it is given one end of a socket pair, into which we wrote `offer`
/// replayed as an INIT request; its reply is read and discarded. Then the session's
/// descriptor number is pointed at the FUSE connection with `dup3`, and the kernel is
/// asked to resend whatever the previous process left unanswered. `config.clone_fd` must be
/// false (see [`super::fuse_fs::MountSettings`]).
pub fn resume_session<FS: fuser::Filesystem>(
    fs: FS,
    dev: OwnedFd,
    offer: &InitOffer,
    config: fuser::Config,
) -> io::Result<fuser::Session<FS>> {
    let (ours, theirs) = seqpacket_pair()?;
    send_msg(ours.as_fd(), &synthetic_init(offer), &[])?;
    let session_fd = theirs.as_raw_fd();
    let session = fuser::Session::from_fd(fs, theirs, config.acl, config)?;
    let mut buf = [0u8; 512];
    let (n, _) = recv_msg(ours.as_fd(), &mut buf)?;
    if n < 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short INIT reply",
        ));
    }
    let error = i32::from_ne_bytes(buf[4..8].try_into().expect("4 bytes"));
    let unique = u64::from_ne_bytes(buf[8..16].try_into().expect("8 bytes"));
    if unique != SYNTHETIC_UNIQUE || error != 0 {
        return Err(io::Error::other(format!(
            "filesystem refused the replayed INIT (error {error})"
        )));
    }
    drop(ours);
    // SAFETY: `session_fd` is the session's own descriptor (it owns the socket we gave it)
    // and nothing uses it before `run`; dup3 atomically makes that descriptor number refer
    // to the FUSE connection instead (closing the socket), so the session reads requests
    // from and writes replies to the kernel, and closes the connection's descriptor when
    // it ends. `dev` is then closed: `session_fd` keeps the open file.
    cvt(unsafe { libc::dup3(dev.as_raw_fd(), session_fd, libc::O_CLOEXEC) })?;
    drop(dev);
    // SAFETY: session_fd is open (just dup3'ed) and owned by the session, which lives.
    let borrowed = unsafe { BorrowedFd::borrow_raw(session_fd) };
    match notify_resend(borrowed) {
        Ok(()) => debug!("FUSE_NOTIFY_RESEND sent"),
        Err(e) => {
            warn!(error = %e, "FUSE_NOTIFY_RESEND failed (kernel < 6.9?); reads in flight at the restart may hang")
        }
    }
    Ok(session)
}

/// Asks the kernel to queue again the requests read from this connection but not answered.
pub fn notify_resend(dev: BorrowedFd<'_>) -> io::Result<()> {
    let mut m = [0u8; 16];
    m[0..4].copy_from_slice(&16u32.to_ne_bytes());
    m[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // unique = 0: a notification.
    // SAFETY: write(2) of a local buffer.
    let r = unsafe { libc::write(dev.as_raw_fd(), m.as_ptr() as *const libc::c_void, 16) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Mount helpers.

/// `major:minor` of the last FUSE mount at `mountpoint` in /proc/self/mountinfo.
pub fn fuse_mount_dev(mountpoint: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.as_os_str().as_bytes();
    let mut found = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || sep + 1 >= fields.len() {
            continue;
        }
        let fstype = fields[sep + 1];
        if (fstype == "fuse" || fstype.starts_with("fuse."))
            && unescape_mountinfo(fields[4]) == want
        {
            found = Some(fields[2].to_string());
        }
    }
    found
}

fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push(
                b[i + 1..i + 4]
                    .iter()
                    .fold(0u32, |a, c| a * 8 + u32::from(c - b'0')) as u8,
            );
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// A detached copy of the mount at `path` (`open_tree(OPEN_TREE_CLONE)`): it keeps the
/// filesystem and can be attached again with [`attach_mount`].
pub fn clone_mount(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: open_tree(2) with a valid path; returns a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by open_tree(2).
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Attaches the detached mount `tree` at `path` (`move_mount`).
pub fn attach_mount(tree: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: move_mount(2) with a valid descriptor, empty from-path and a valid to-path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Handed-over connections grouped by mountpoint (one per mountpoint is attached there).
pub fn by_mountpoint(
    entries: Vec<(HeldMount, OwnedFd)>,
) -> HashMap<PathBuf, Vec<(HeldMount, OwnedFd)>> {
    let mut map: HashMap<PathBuf, Vec<(HeldMount, OwnedFd)>> = HashMap::new();
    for (m, fd) in entries {
        map.entry(m.mountpoint.clone()).or_default().push((m, fd));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(mp: &str) -> HeldMount {
        HeldMount {
            mountpoint: PathBuf::from(mp),
            dev: "0:99".into(),
            registry: "r".into(),
            repository: "x".into(),
            digest: "sha256:ab".into(),
            init: InitOffer {
                major: 7,
                minor: 41,
                flags: (1 << 17) | (1 << 39),
                max_readahead: 131072,
            },
        }
    }

    fn spawn_in_thread(socket: &Path) -> io::Result<()> {
        let socket = socket.to_path_buf();
        std::thread::spawn(move || run_holder(&socket));
        Ok(())
    }

    #[test]
    fn holder_keeps_lists_and_drops_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("h.sock");
        let store = FdStore::connect_or_spawn(&sock, spawn_in_thread).unwrap();
        assert!(store.list().unwrap().is_empty());
        // A pipe stands in for /dev/fuse: its read end polls fine while the write end lives.
        let (r, w) = nix::unistd::pipe().unwrap();
        store.put(&held("/a"), r.as_fd()).unwrap();
        drop(r);
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].0, held("/a"));
        // The descriptor we got back is the same pipe.
        nix::unistd::write(&w, b"x").unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            nix::unistd::read(listed[0].1.as_raw_fd(), &mut b).unwrap(),
            1
        );
        // A second client sees the same.
        let other = FdStore::connect_or_spawn(&sock, spawn_in_thread).unwrap();
        assert_eq!(other.list().unwrap().len(), 1);
        other.forget(&held("/a")).unwrap();
        assert!(store.list().unwrap().is_empty());
        drop(w);
    }

    #[test]
    fn holder_drops_dead_connections() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("h.sock");
        let store = FdStore::connect_or_spawn(&sock, spawn_in_thread).unwrap();
        // The write end of a pipe reports POLLERR once the read end is closed, as
        // /dev/fuse does once its connection is gone.
        let (r, w) = nix::unistd::pipe().unwrap();
        store.put(&held("/b"), w.as_fd()).unwrap();
        drop(w);
        assert_eq!(store.list().unwrap().len(), 1);
        drop(r);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !store.list().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "dead descriptor still held");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn synthetic_init_carries_the_offer() {
        let m = synthetic_init(&held("/").init);
        assert_eq!(m.len(), 104);
        assert_eq!(u32::from_ne_bytes(m[4..8].try_into().unwrap()), FUSE_INIT);
        let flags = u32::from_ne_bytes(m[52..56].try_into().unwrap());
        let flags2 = u32::from_ne_bytes(m[56..60].try_into().unwrap());
        assert_eq!(flags, (1 << 17) | FUSE_INIT_EXT);
        assert_eq!(flags2, 1 << 7);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), b"/a b".to_vec());
        assert_eq!(unescape_mountinfo("/plain"), b"/plain".to_vec());
    }
}
