//! The CPU backend: group members linked by TCP connections, usable
//! across machines.
//!
//! Every worker binds one [`TcpEndpoint`] and publishes its address; a
//! group is then joined with the members' addresses in group-rank order
//! ([`TcpEndpoint::join`]). Joining connects nothing: a link is made when
//! it is first used, so a member holds links to the peers it talks to
//! (its ring neighbours, the log₂ n partners of the small-message
//! algorithms, its pipeline neighbours), not to every member of every
//! group. Links are one-way: the sender connects to the receiver's
//! endpoint and introduces itself (group name, size, its rank and the rank
//! it means to reach); the receiver's listener accepts it on its own
//! threads, so a send never waits on what the receiver is doing, and one
//! listener serves every group a worker belongs to. Before a link carries
//! anything, both ends prove they hold the job's secret (an HMAC over a
//! nonce from each side, the group, its size and both ranks); handshakes
//! are read with a deadline, so a stray, idle or forged connection is
//! dropped without touching any group. Tensors then travel in clear: the
//! link is authenticated, not encrypted.
//!
//! Each link is one descriptor at each end, and no link has a thread:
//! a send writes what the socket takes at once and leaves the rest to the
//! endpoint's one I/O thread, which polls every link with bytes still to
//! go. So sends are asynchronous, as in the in-process backend (a ring in
//! which every member sends before it receives cannot deadlock, and a
//! member's send overlaps its receive), and messages on a link arrive in
//! order. Receives read on the caller's thread.

use std::collections::{HashMap, VecDeque};
use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use super::backend::{CollectiveBackend, GroupPlan, JoinError};
use super::{Collective, CollectiveError, Result, Tag};

/// Elements per piece of a message (1 MiB): large messages are encoded,
/// written, read and decoded piece by piece, so the stages overlap.
const PIECE: usize = 1 << 18;

/// First bytes of every connection, so a stray client is refused at once.
const MAGIC: &[u8; 8] = b"strata4\0";

/// Bytes of each side's nonce, and of a handshake tag (HMAC-SHA256).
const NONCE: usize = 32;
const TAG: usize = 32;

/// The longest group name a hello may carry.
const MAX_GROUP_NAME: u64 = 4096;

/// How long a peer has to finish its handshake once connected; an idle or
/// slow connection is dropped then, and never holds up anyone else's.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// Handshakes in progress at once; connections past this are dropped (a
/// flood of idle connections cannot exhaust the worker's threads).
const MAX_HANDSHAKES: usize = 256;

/// How long a closing link waits for its queued messages to go out.
const DRAIN_DEADLINE: Duration = Duration::from_secs(60);

/// How links are made and waited on.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// How long a sender keeps trying to reach a peer's endpoint (which may
    /// not be listening yet).
    pub connect_timeout: Duration,
    /// How long a receive waits for its peer before failing (a peer that
    /// never connects, or stops sending, is reported, not waited on
    /// forever).
    pub recv_timeout: Option<Duration>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            connect_timeout: Duration::from_secs(120),
            recv_timeout: Some(Duration::from_secs(600)),
        }
    }
}

/// An authenticated connection that arrived for a group, waiting for this
/// worker's member to read from it.
struct Pending {
    stream: TcpStream,
    /// The group size and the rank the peer meant to reach, both covered
    /// by its handshake tag.
    size: usize,
    target: usize,
    addr: SocketAddr,
}

/// Authenticated connections by (group, the connecting peer's rank).
type Stash = HashMap<(String, usize), Pending>;

/// What the endpoint's accept thread shares with its groups.
struct Shared {
    key: hmac::Key,
    stash: Mutex<Stash>,
    arrived: Condvar,
    closed: AtomicBool,
    handshakes: AtomicUsize,
}

/// A worker's listening socket for collectives.
///
/// Every link is authenticated before anything on it is used: both ends
/// prove they hold the job's secret with an HMAC-SHA256 tag over a nonce
/// from each side, the group's name and size and both ranks. Connections
/// are accepted and their handshakes read on their own threads, each with
/// a deadline, so an idle, slow or forged connection is dropped without
/// delaying or failing any group. The endpoint lives as long as the
/// groups joined through it.
pub struct TcpEndpoint {
    inner: Arc<Inner>,
    /// What groups joined through [`CollectiveBackend`] get.
    opts: TcpOptions,
}

/// The endpoint's threads and state, shared with its groups; the last
/// owner to go stops the threads.
struct Inner {
    shared: Arc<Shared>,
    io: Arc<Io>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
    io_thread: Option<JoinHandle<()>>,
}

impl TcpEndpoint {
    /// Listens on `addr` (port 0 picks a free one). `secret` is the job's
    /// token: only peers holding the same one are let in, and peers are
    /// only trusted once they have proved it.
    pub fn bind(addr: SocketAddr, secret: &[u8]) -> std::io::Result<TcpEndpoint> {
        if secret.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the collective needs the job's secret to authenticate its peers; it is empty",
            ));
        }
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            key: link_key(secret),
            stash: Mutex::new(HashMap::new()),
            arrived: Condvar::new(),
            closed: AtomicBool::new(false),
            handshakes: AtomicUsize::new(0),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("collective-accept".into())
                .spawn(move || accept_loop(&listener, &shared))?
        };
        let (io, wake) = Io::new()?;
        let io_thread = {
            let io = io.clone();
            std::thread::Builder::new()
                .name("collective-io".into())
                .spawn(move || io.run(wake))?
        };
        Ok(TcpEndpoint {
            inner: Arc::new(Inner {
                shared,
                io,
                addr,
                acceptor: Some(acceptor),
                io_thread: Some(io_thread),
            }),
            opts: TcpOptions::default(),
        })
    }

    /// The options groups joined as a [`CollectiveBackend`] get.
    pub fn with_options(mut self, opts: TcpOptions) -> TcpEndpoint {
        self.opts = opts;
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.inner.addr)
    }

    /// Joins group `group` as member `rank`; `addrs[r]` is member r's
    /// endpoint. Every member must join with the same name and addresses.
    /// Nothing is connected yet: each link is made on its first use, and a
    /// member that never comes is named by the first operation that needs
    /// it.
    pub fn join(
        &self,
        group: &str,
        rank: usize,
        addrs: &[SocketAddr],
        opts: &TcpOptions,
    ) -> std::result::Result<TcpCollective, JoinError> {
        let size = addrs.len();
        if rank >= size {
            return Err(JoinError::BadGroup {
                group: group.to_string(),
                rank,
                size,
                addrs: addrs.len(),
            });
        }
        Ok(TcpCollective {
            rank,
            group: group.to_string(),
            addrs: addrs.to_vec(),
            opts: opts.clone(),
            outs: HashMap::new(),
            ins: HashMap::new(),
            endpoint: self.inner.clone(),
        })
    }
}

impl CollectiveBackend for TcpEndpoint {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn join(&self, plan: &GroupPlan) -> std::result::Result<Box<dyn Collective>, JoinError> {
        let addrs = plan
            .members
            .iter()
            .map(|m| {
                m.addr
                    .parse::<SocketAddr>()
                    .map_err(|e| JoinError::Address {
                        group: plan.name.clone(),
                        rank: m.rank,
                        addr: m.addr.clone(),
                        why: e.to_string(),
                    })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Box::new(TcpEndpoint::join(
            self, &plan.name, plan.me, &addrs, &self.opts,
        )?))
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.io.close();
        if let Some(t) = self.io_thread.take() {
            let _ = t.join();
        }
        // Wake the blocking accept with a connection of our own.
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let woke = TcpStream::connect_timeout(
            &SocketAddr::new(ip, self.addr.port()),
            Duration::from_secs(1),
        )
        .is_ok();
        if let Some(t) = self.acceptor.take()
            && woke
        {
            let _ = t.join();
        }
    }
}

/// The key every link's tags are made with, derived from the job's secret
/// (never the secret itself, which also authenticates to the coordinator).
fn link_key(secret: &[u8]) -> hmac::Key {
    let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let derived = hmac::sign(&root, b"strata collective link key v1");
    hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref())
}

/// What a connecting peer says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hello {
    group: String,
    size: usize,
    /// The connecting peer's rank.
    rank: usize,
    /// The rank it means to reach (the accepting side's).
    target: usize,
}

/// The tag one side sends: over its role, the hello and both nonces.
fn tag(key: &hmac::Key, role: &[u8], h: &Hello, nonce_c: &[u8], nonce_a: &[u8]) -> hmac::Tag {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(role);
    ctx.update(&(h.group.len() as u64).to_le_bytes());
    ctx.update(h.group.as_bytes());
    for n in [h.size, h.rank, h.target] {
        ctx.update(&(n as u64).to_le_bytes());
    }
    ctx.update(nonce_c);
    ctx.update(nonce_a);
    ctx.sign()
}

const CONNECTOR: &[u8] = b"strata collective connector";
const ACCEPTOR: &[u8] = b"strata collective acceptor";

fn nonce() -> [u8; NONCE] {
    let mut n = [0u8; NONCE];
    SystemRandom::new()
        .fill(&mut n)
        .expect("the system's random source");
    n
}

/// A hello on the wire: the magic, the group name (its length first),
/// size, rank and target (little-endian u64s), then the nonce.
fn encode_hello(h: &Hello, nonce_c: &[u8; NONCE]) -> Vec<u8> {
    let mut hello = Vec::with_capacity(40 + h.group.len() + NONCE);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(h.group.len() as u64).to_le_bytes());
    hello.extend_from_slice(h.group.as_bytes());
    for n in [h.size, h.rank, h.target] {
        hello.extend_from_slice(&(n as u64).to_le_bytes());
    }
    hello.extend_from_slice(nonce_c);
    hello
}

/// The connecting side: hello and nonce out, the acceptor's nonce and tag
/// in (checked), our tag out.
fn handshake_connect(
    s: &mut TcpStream,
    key: &hmac::Key,
    h: &Hello,
) -> std::result::Result<(), String> {
    let deadline = Instant::now() + HANDSHAKE_DEADLINE;
    let nonce_c = nonce();
    s.write_all(&encode_hello(h, &nonce_c))
        .map_err(|e| format!("could not be sent our hello: {e}"))?;
    let mut reply = [0u8; NONCE + TAG];
    read_by(s, &mut reply, deadline)
        .map_err(|e| format!("did not answer our hello within {HANDSHAKE_DEADLINE:?}: {e}"))?;
    let (nonce_a, tag_a) = reply.split_at(NONCE);
    let expected = tag(key, ACCEPTOR, h, &nonce_c, nonce_a);
    if !constant_time_eq(expected.as_ref(), tag_a) {
        return Err(
            "failed to prove it holds this job's secret (another job's worker, or not a worker)"
                .into(),
        );
    }
    s.write_all(tag(key, CONNECTOR, h, &nonce_c, nonce_a).as_ref())
        .map_err(|e| format!("went away during the handshake: {e}"))?;
    s.set_read_timeout(None)
        .map_err(|e| format!("socket: {e}"))?;
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Fills `buf` from `s` by `deadline`, however the peer trickles it.
fn read_by(s: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut buf[at..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads a connecting peer's hello with `fill` (which fills a buffer
/// whole, or fails). Nothing is sized by what the peer claims beyond a
/// group name of at most [`MAX_GROUP_NAME`] bytes.
fn read_hello(
    fill: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<(Hello, [u8; NONCE])> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let word = |fill: &mut dyn FnMut(&mut [u8]) -> std::io::Result<()>| {
        let mut b = [0u8; 8];
        fill(&mut b).map(|()| u64::from_le_bytes(b))
    };
    let mut magic = [0u8; 8];
    fill(&mut magic)?;
    if &magic != MAGIC {
        return Err(bad("not a strata collective peer (or another version)"));
    }
    let len = word(fill)?;
    if len > MAX_GROUP_NAME {
        return Err(bad("group name longer than 4096 bytes"));
    }
    let mut name = vec![0u8; len as usize];
    fill(&mut name)?;
    let group = String::from_utf8(name).map_err(|_| bad("group name is not UTF-8"))?;
    let size = word(fill)?;
    let rank = word(fill)?;
    let target = word(fill)?;
    if rank >= size || target >= size || rank == target {
        return Err(bad("ranks outside their group"));
    }
    let mut nonce_c = [0u8; NONCE];
    fill(&mut nonce_c)?;
    let (size, rank, target) = (size as usize, rank as usize, target as usize);
    Ok((
        Hello {
            group,
            size,
            rank,
            target,
        },
        nonce_c,
    ))
}

/// The accepting side of a handshake, on its own thread: the peer's hello,
/// our nonce and tag, the peer's tag (checked). Only then does the
/// connection wait for its group's join.
fn handshake_accept(
    s: &mut TcpStream,
    key: &hmac::Key,
) -> std::result::Result<Hello, std::io::Error> {
    let deadline = Instant::now() + HANDSHAKE_DEADLINE;
    let (h, nonce_c) = read_hello(&mut |buf| read_by(s, buf, deadline))?;
    let nonce_a = nonce();
    let mut reply = [0u8; NONCE + TAG];
    reply[..NONCE].copy_from_slice(&nonce_a);
    reply[NONCE..].copy_from_slice(tag(key, ACCEPTOR, &h, &nonce_c, &nonce_a).as_ref());
    s.write_all(&reply)?;
    let mut tag_c = [0u8; TAG];
    read_by(s, &mut tag_c, deadline)?;
    let expected = tag(key, CONNECTOR, &h, &nonce_c, &nonce_a);
    if !constant_time_eq(expected.as_ref(), &tag_c) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "claimed rank {} of group `{}` without this job's secret",
                h.rank, h.group
            ),
        ));
    }
    s.set_read_timeout(None)?;
    Ok(h)
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = listener.accept();
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        let (mut stream, addr) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // Out of descriptors, say: wait, do not spin.
                tracing::warn!(error = %e, "collective listener: accept failed");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if shared.handshakes.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
            shared.handshakes.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%addr, "collective listener: {MAX_HANDSHAKES} handshakes in progress; connection dropped");
            continue;
        }
        let worker = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("collective-hello".into())
            .spawn(move || {
                let outcome = handshake_accept(&mut stream, &worker.key);
                worker.handshakes.fetch_sub(1, Ordering::SeqCst);
                match outcome {
                    Ok(h) => {
                        let key = (h.group, h.rank);
                        let mut stash = worker.stash.lock().expect("stash lock");
                        if stash.contains_key(&key) {
                            tracing::warn!(group = %key.0, rank = key.1, %addr, "a second connection for the same group rank replaces the first");
                        }
                        stash.insert(
                            key,
                            Pending {
                                stream,
                                size: h.size,
                                target: h.target,
                                addr,
                            },
                        );
                        worker.arrived.notify_all();
                    }
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "refused a collective connection");
                    }
                }
            });
        if let Err(e) = spawned {
            shared.handshakes.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(%addr, error = %e, "collective listener: no thread for a handshake; connection dropped");
        }
    }
}

fn connect_until(addr: SocketAddr, deadline: Instant) -> std::io::Result<TcpStream> {
    let mut wait = Duration::from_millis(5);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            // The peer may not be listening yet.
            Err(e) if Instant::now() + wait > deadline => return Err(e),
            Err(_) => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(500));
            }
        }
    }
}

fn read_u64(s: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// One link's outgoing bytes: whole encoded messages in order, the first
/// perhaps partly written.
struct Outbox {
    /// The link's one descriptor, non-blocking.
    stream: TcpStream,
    queue: VecDeque<Vec<u8>>,
    /// Bytes of the first message already written.
    written: usize,
    /// The first write failure, reported by the next send.
    failed: Option<std::io::Error>,
    /// Written buffers, for reuse (fresh large buffers cost page faults on
    /// every message).
    spare: Vec<Vec<u8>>,
}

impl Outbox {
    /// Writes what the socket takes now, without waiting.
    fn write_some(&mut self) {
        while let Some(front) = self.queue.front() {
            match (&self.stream).write(&front[self.written..]) {
                Ok(0) => {
                    self.fail(std::io::ErrorKind::WriteZero.into());
                    return;
                }
                Ok(n) => {
                    self.written += n;
                    if self.written == front.len() {
                        let done = self.queue.pop_front().expect("the front message");
                        self.written = 0;
                        if self.spare.len() < 4 {
                            self.spare.push(done);
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    fn fail(&mut self, e: std::io::Error) {
        self.failed = Some(e);
        self.queue.clear();
        self.written = 0;
    }

    /// Whether the I/O thread still has work on this link.
    fn busy(&self) -> bool {
        !self.queue.is_empty() && self.failed.is_none()
    }
}

/// The endpoint's I/O thread's side: links with bytes still to go, handed
/// over by the sends that could not finish them.
struct Io {
    handed: Mutex<Vec<Arc<Mutex<Outbox>>>>,
    /// A byte here wakes the thread from its poll.
    wake: UnixStream,
    closed: AtomicBool,
}

impl Io {
    fn new() -> std::io::Result<(Arc<Io>, UnixStream)> {
        let (wake, woken) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        woken.set_nonblocking(true)?;
        let io = Arc::new(Io {
            handed: Mutex::new(Vec::new()),
            wake,
            closed: AtomicBool::new(false),
        });
        Ok((io, woken))
    }

    fn poke(&self) {
        // A full pipe already holds a wake-up.
        let _ = (&self.wake).write(&[1]);
    }

    /// Gives the thread a link whose queue a send left non-empty.
    fn hand(&self, outbox: Arc<Mutex<Outbox>>) {
        self.handed.lock().expect("io queue").push(outbox);
        self.poke();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.poke();
    }

    /// The thread: polls the wake-up and every link it holds for room to
    /// write, writes what fits, and lets a link go once its queue is empty
    /// (a send hands it back when it next leaves bytes behind).
    fn run(&self, woken: UnixStream) {
        let mut held: Vec<Arc<Mutex<Outbox>>> = Vec::new();
        let mut fds: Vec<libc::pollfd> = Vec::new();
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return;
            }
            for o in self.handed.lock().expect("io queue").drain(..) {
                if !held.iter().any(|h| Arc::ptr_eq(h, &o)) {
                    held.push(o);
                }
            }
            fds.clear();
            fds.push(libc::pollfd {
                fd: woken.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for o in &held {
                fds.push(libc::pollfd {
                    fd: o.lock().expect("outbox").stream.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                });
            }
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the
            // duration of the call.
            #[allow(unsafe_code)] // poll(2): std has no readiness wait
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::warn!(error = %e, "collective I/O: poll failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            if fds[0].revents != 0 {
                let mut sink = [0u8; 64];
                while matches!((&woken).read(&mut sink), Ok(n) if n > 0) {}
            }
            for (o, fd) in held.iter().zip(&fds[1..]) {
                if fd.revents != 0 {
                    o.lock().expect("outbox").write_some();
                }
            }
            held.retain(|o| o.lock().expect("outbox").busy());
        }
    }
}

/// A link this member sends on.
struct OutLink {
    peer: usize,
    outbox: Arc<Mutex<Outbox>>,
}

impl OutLink {
    /// Connects to `peer` at `addr` and proves this member's identity.
    fn connect(
        group: &str,
        (rank, peer, size): (usize, usize, usize),
        addr: SocketAddr,
        key: &hmac::Key,
        opts: &TcpOptions,
    ) -> Result<OutLink> {
        let unreachable = |why: String| CollectiveError::Unreachable {
            peer,
            why: format!("group `{group}`: {addr}: {why}"),
        };
        let deadline = Instant::now() + opts.connect_timeout;
        let mut stream = connect_until(addr, deadline).map_err(|e| {
            unreachable(format!(
                "could not connect within {} s: {e}",
                opts.connect_timeout.as_secs()
            ))
        })?;
        let hello = Hello {
            group: group.to_string(),
            size,
            rank,
            target: peer,
        };
        handshake_connect(&mut stream, key, &hello).map_err(unreachable)?;
        let setup = |e: std::io::Error| unreachable(format!("socket: {e}"));
        stream.set_nodelay(true).map_err(setup)?;
        stream.set_nonblocking(true).map_err(setup)?;
        Ok(OutLink {
            peer,
            outbox: Arc::new(Mutex::new(Outbox {
                stream,
                queue: VecDeque::new(),
                written: 0,
                failed: None,
                spare: Vec::new(),
            })),
        })
    }

    /// A message is its length and tag (8 bytes each, little-endian), then
    /// its elements, encoded and queued piece by piece: what the socket
    /// takes goes at once, the rest is the I/O thread's, so the caller
    /// encodes the next piece (or receives) meanwhile.
    fn send(&mut self, io: &Io, tag: Tag, data: &[f32]) -> Result<()> {
        let mut first = true;
        let mut pieces = data.chunks(PIECE);
        loop {
            let piece = match pieces.next() {
                Some(p) => p,
                None if first => &[][..],
                None => break,
            };
            let mut o = self.outbox.lock().expect("outbox");
            if let Some(e) = o.failed.take() {
                return Err(link_error(self.peer, e));
            }
            let mut msg = o.spare.pop().unwrap_or_default();
            drop(o);
            msg.clear();
            let head = if first { 16 } else { 0 };
            msg.resize(head + piece.len() * 4, 0);
            if first {
                msg[..8].copy_from_slice(&(data.len() as u64).to_le_bytes());
                msg[8..16].copy_from_slice(&tag.0.to_le_bytes());
                first = false;
            }
            // Element-wise over exact chunks: compiled to a plain copy.
            for (b, x) in msg[head..].chunks_exact_mut(4).zip(piece) {
                b.copy_from_slice(&x.to_le_bytes());
            }
            let mut o = self.outbox.lock().expect("outbox");
            let idle = o.queue.is_empty();
            o.queue.push_back(msg);
            if idle {
                o.write_some();
                if o.busy() {
                    drop(o);
                    io.hand(self.outbox.clone());
                }
            }
        }
        Ok(())
    }
}

impl Drop for OutLink {
    fn drop(&mut self) {
        // Let queued messages go out, then close our side.
        let deadline = Instant::now() + DRAIN_DEADLINE;
        loop {
            let o = self.outbox.lock().expect("outbox");
            if !o.busy() {
                let _ = o.stream.shutdown(Shutdown::Write);
                return;
            }
            drop(o);
            if Instant::now() >= deadline {
                tracing::warn!(
                    peer = self.peer,
                    "closing a collective link with messages still queued"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A link this member receives on: the connection the peer made.
struct InLink {
    peer: usize,
    reader: BufReader<TcpStream>,
    scratch: Vec<u8>,
}

impl InLink {
    /// Waits for `peer`'s connection to this member to arrive (a peer
    /// connects when it first sends), within the receive timeout.
    fn accept(
        shared: &Shared,
        group: &str,
        (rank, peer, size): (usize, usize, usize),
        opts: &TcpOptions,
    ) -> Result<InLink> {
        let deadline = opts.recv_timeout.map(|t| Instant::now() + t);
        let key = (group.to_string(), peer);
        let mut stash = shared.stash.lock().expect("stash lock");
        let p = loop {
            if let Some(p) = stash.remove(&key) {
                if p.size == size && p.target == rank {
                    break p;
                }
                // Authenticated, so a member of this job: its view of the
                // group differs from ours. Say so, and go on waiting for a
                // connection that agrees.
                tracing::warn!(
                    group, peer, addr = %p.addr, size = p.size, target = p.target,
                    "a peer linked to this group as one of {} for rank {}; this member is rank {rank} of {size}: dropped",
                    p.size, p.target
                );
                continue;
            }
            let wait = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(CollectiveError::Unreachable {
                            peer,
                            why: format!(
                                "group `{group}`: it did not connect to this member (rank {rank}) within {} s",
                                opts.recv_timeout.unwrap_or_default().as_secs()
                            ),
                        });
                    }
                    d - now
                }
                None => Duration::from_secs(3600),
            };
            stash = shared
                .arrived
                .wait_timeout(stash, wait)
                .expect("stash lock")
                .0;
        };
        drop(stash);
        let io = |e: std::io::Error| link_error(peer, e);
        p.stream.set_nodelay(true).map_err(io)?;
        p.stream.set_read_timeout(opts.recv_timeout).map_err(io)?;
        Ok(InLink {
            peer,
            reader: BufReader::with_capacity(1 << 16, p.stream),
            scratch: Vec::new(),
        })
    }

    fn recv(&mut self, tag: Tag, out: &mut [f32]) -> Result<()> {
        let peer = self.peer;
        let len = read_u64(&mut self.reader).map_err(|e| link_error(peer, e))? as usize;
        let got = Tag(read_u64(&mut self.reader).map_err(|e| link_error(peer, e))?);
        if got != tag {
            return Err(CollectiveError::WrongMessage {
                peer,
                expected: tag,
                got,
            });
        }
        if len != out.len() {
            return Err(CollectiveError::SizeMismatch {
                peer,
                expected: out.len(),
                got: len,
            });
        }
        for piece in out.chunks_mut(PIECE) {
            self.scratch.resize(piece.len() * 4, 0);
            self.reader
                .read_exact(&mut self.scratch)
                .map_err(|e| link_error(peer, e))?;
            for (x, b) in piece.iter_mut().zip(self.scratch.chunks_exact(4)) {
                *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Ok(())
    }
}

fn link_error(peer: usize, e: std::io::Error) -> CollectiveError {
    use std::io::ErrorKind::*;
    match e.kind() {
        UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted => {
            CollectiveError::PeerGone { peer }
        }
        _ => CollectiveError::Io { peer, source: e },
    }
}

/// One member of a group joined over TCP.
pub struct TcpCollective {
    rank: usize,
    group: String,
    addrs: Vec<SocketAddr>,
    opts: TcpOptions,
    /// Links made so far, by peer: those this member sends on and those it
    /// receives on.
    outs: HashMap<usize, OutLink>,
    ins: HashMap<usize, InLink>,
    endpoint: Arc<Inner>,
}

impl TcpCollective {
    fn check_peer(&self, peer: usize) -> Result<()> {
        let size = self.addrs.len();
        if peer >= size || peer == self.rank {
            return Err(CollectiveError::NoSuchPeer { peer, size });
        }
        Ok(())
    }

    /// The links this member holds now: (sending, receiving).
    pub fn links(&self) -> (usize, usize) {
        (self.outs.len(), self.ins.len())
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.addrs.len()
    }

    fn send_tagged(&mut self, peer: usize, tag: Tag, data: &[f32]) -> Result<()> {
        self.check_peer(peer)?;
        let link = match self.outs.entry(peer) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(OutLink::connect(
                &self.group,
                (self.rank, peer, self.addrs.len()),
                self.addrs[peer],
                &self.endpoint.shared.key,
                &self.opts,
            )?),
        };
        link.send(&self.endpoint.io, tag, data)
    }

    fn recv_tagged(&mut self, peer: usize, tag: Tag, out: &mut [f32]) -> Result<()> {
        self.check_peer(peer)?;
        let link = match self.ins.entry(peer) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(InLink::accept(
                &self.endpoint.shared,
                &self.group,
                (self.rank, peer, self.addrs.len()),
                &self.opts,
            )?),
        };
        link.recv(tag, out)
    }
}

/// A group of `size` members over loopback, each with its own endpoint
/// (as separate worker processes would be), for tests and benchmarks.
pub fn loopback_group(group: &str, size: usize) -> std::io::Result<Vec<TcpCollective>> {
    loopback_group_with(group, size, &TcpOptions::default())
}

/// [`loopback_group`] with `opts`.
pub fn loopback_group_with(
    group: &str,
    size: usize,
    opts: &TcpOptions,
) -> std::io::Result<Vec<TcpCollective>> {
    let secret = nonce();
    let endpoints = (0..size)
        .map(|_| TcpEndpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0)), &secret))
        .collect::<std::io::Result<Vec<_>>>()?;
    let addrs = endpoints
        .iter()
        .map(TcpEndpoint::local_addr)
        .collect::<std::io::Result<Vec<_>>>()?;
    endpoints
        .iter()
        .enumerate()
        .map(|(r, e)| {
            e.join(group, r, &addrs, opts)
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn from_bytes(bytes: &[u8]) -> std::io::Result<(Hello, [u8; NONCE])> {
        let mut rest = bytes;
        read_hello(&mut |buf| rest.read_exact(buf))
    }

    proptest! {
        /// Any bytes at all: a hello or a named error, never a panic, and
        /// no buffer sized by a claimed length past the cap.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = from_bytes(&bytes);
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&bytes);
            let _ = from_bytes(&framed);
        }

        #[test]
        fn hellos_round_trip(group in "[a-z0-9/]{0,40}", size in 2usize..10_000, a in 0usize..10_000, b in 0usize..10_000) {
            let (rank, target) = (a % size, b % size);
            prop_assume!(rank != target);
            let h = Hello { group, size, rank, target };
            let (got, nonce_c) = from_bytes(&encode_hello(&h, &[3; NONCE])).unwrap();
            prop_assert_eq!(got, h);
            prop_assert_eq!(nonce_c, [3; NONCE]);
        }

        /// A tag made for one hello fails for any other field changed.
        #[test]
        fn tags_bind_every_field(which in 0usize..6) {
            let key = link_key(b"token");
            let h = Hello { group: "job/a1/tp".into(), size: 4, rank: 2, target: 1 };
            let (nc, na) = ([1u8; NONCE], [2u8; NONCE]);
            let good = tag(&key, CONNECTOR, &h, &nc, &na);
            let mut h2 = h.clone();
            let (mut nc2, mut na2, mut role) = (nc, na, CONNECTOR);
            match which {
                0 => h2.group.push('x'),
                1 => h2.size = 5,
                2 => h2.rank = 3,
                3 => h2.target = 0,
                4 => { nc2[0] ^= 1; na2[31] ^= 1; }
                _ => role = ACCEPTOR,
            }
            let other = tag(&key, role, &h2, &nc2, &na2);
            prop_assert!(!constant_time_eq(good.as_ref(), other.as_ref()));
        }
    }

    #[test]
    fn claimed_lengths_are_capped_and_ranks_checked() {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = from_bytes(&b).unwrap_err();
        assert!(err.to_string().contains("longer than 4096"), "{err}");
        let h = Hello {
            group: "g".into(),
            size: 2,
            rank: 1,
            target: 1,
        };
        let err = from_bytes(&encode_hello(&h, &[0; NONCE])).unwrap_err();
        assert!(err.to_string().contains("outside"), "{err}");
        let err = from_bytes(b"GET / HTTP/1.1\r\n").unwrap_err();
        assert!(err.to_string().contains("not a strata"), "{err}");
    }
}
