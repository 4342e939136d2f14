//! The CPU backend: group members joined by TCP connections, one per pair,
//! usable across machines.
//!
//! Every worker binds one [`TcpEndpoint`] and publishes its address; a
//! group is then joined with the members' addresses in group-rank order
//! ([`TcpEndpoint::join`]). The higher rank of each pair connects and
//! introduces itself (group name, size, rank); the lower rank accepts, so
//! one listener serves every group a worker belongs to, joined in any order.
//!
//! Sends are asynchronous, as in the in-process backend: a message is
//! queued to the link's writer thread and `send` returns, so a ring in which
//! every member sends before it receives cannot deadlock, and a member's
//! send overlaps its receive. Messages on a link arrive in order.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Collective, CollectiveError, Result, Tag};

/// Elements per piece of a message (1 MiB): large messages are encoded,
/// written, read and decoded piece by piece, so the stages overlap.
const PIECE: usize = 1 << 18;

/// First bytes of every connection, so a stray client is refused at once.
const MAGIC: &[u8; 8] = b"strata2\0";

/// How a group is joined.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// How long to wait for every member to connect.
    pub connect_timeout: Duration,
    /// How long a receive waits for its peer before failing (a peer that
    /// stops sending is reported, not waited on forever).
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

/// Connections that arrived for a group this worker has not joined yet.
type Stash = HashMap<(String, usize), TcpStream>;

/// A worker's listening socket for collectives.
pub struct TcpEndpoint {
    listener: TcpListener,
    stash: Mutex<Stash>,
}

/// Why joining a group failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(
        "group `{group}`: rank {rank} of {size} has {addrs} member addresses (one per member, in rank order)"
    )]
    BadGroup {
        group: String,
        rank: usize,
        size: usize,
        addrs: usize,
    },
    #[error(
        "group `{group}`: could not connect to rank {peer} at {addr} within {secs} s: {source}"
    )]
    Connect {
        group: String,
        peer: usize,
        addr: SocketAddr,
        secs: u64,
        source: std::io::Error,
    },
    #[error("group `{group}`: ranks {missing:?} did not connect within {secs} s")]
    Timeout {
        group: String,
        missing: Vec<usize>,
        secs: u64,
    },
    #[error("group `{group}`: a peer at {addr} claims {what}")]
    BadHello {
        group: String,
        addr: SocketAddr,
        what: String,
    },
}

impl TcpEndpoint {
    /// Listens on `addr` (port 0 picks a free one).
    pub fn bind(addr: SocketAddr) -> std::io::Result<TcpEndpoint> {
        let listener = TcpListener::bind(addr)?;
        Ok(TcpEndpoint {
            listener,
            stash: Mutex::new(HashMap::new()),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Joins group `group` as member `rank`; `addrs[r]` is member r's
    /// endpoint. Every member must join with the same name and addresses.
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
        let deadline = Instant::now() + opts.connect_timeout;
        let mut streams: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        // Lower ranks accept; connect to them.
        for (peer, &addr) in addrs.iter().enumerate().take(rank) {
            let mut stream =
                connect_until(addr, deadline).map_err(|source| JoinError::Connect {
                    group: group.to_string(),
                    peer,
                    addr,
                    secs: opts.connect_timeout.as_secs(),
                    source,
                })?;
            write_hello(&mut stream, group, size, rank)?;
            streams[peer] = Some(stream);
        }
        // Higher ranks connect to us.
        let mut missing: Vec<usize> = (rank + 1..size).collect();
        self.listener.set_nonblocking(true)?;
        while !missing.is_empty() {
            {
                let mut stash = self.stash.lock().expect("stash lock");
                missing.retain(|&peer| match stash.remove(&(group.to_string(), peer)) {
                    Some(s) => {
                        streams[peer] = Some(s);
                        false
                    }
                    None => true,
                });
            }
            if missing.is_empty() {
                break;
            }
            match self.listener.accept() {
                Ok((mut stream, addr)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let (g, n, r) = match read_hello(&mut stream) {
                        Ok(h) => h,
                        Err(e) => {
                            tracing::warn!(%addr, error = %e, "refused a collective connection");
                            continue;
                        }
                    };
                    if g == group && n != size {
                        return Err(JoinError::BadHello {
                            group: group.to_string(),
                            addr,
                            what: format!("a group of {n}, this member has {size}"),
                        });
                    }
                    self.stash
                        .lock()
                        .expect("stash lock")
                        .insert((g, r), stream);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(JoinError::Timeout {
                            group: group.to_string(),
                            missing,
                            secs: opts.connect_timeout.as_secs(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let links = streams
            .into_iter()
            .enumerate()
            .map(|(peer, s)| s.map(|s| Link::new(s, peer, opts.recv_timeout)).transpose())
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(TcpCollective { rank, links })
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

fn write_hello(s: &mut TcpStream, group: &str, size: usize, rank: usize) -> std::io::Result<()> {
    let mut hello = Vec::with_capacity(32 + group.len());
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(group.len() as u64).to_le_bytes());
    hello.extend_from_slice(group.as_bytes());
    hello.extend_from_slice(&(size as u64).to_le_bytes());
    hello.extend_from_slice(&(rank as u64).to_le_bytes());
    s.write_all(&hello)
}

fn read_u64(s: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_hello(s: &mut TcpStream) -> std::io::Result<(String, usize, usize)> {
    let bad = |why: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, why.to_string());
    let mut magic = [0u8; 8];
    s.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(bad("not a strata collective peer"));
    }
    let len = read_u64(s)?;
    if len > 4096 {
        return Err(bad("group name too long"));
    }
    let mut name = vec![0u8; len as usize];
    s.read_exact(&mut name)?;
    let name = String::from_utf8(name).map_err(|_| bad("group name is not UTF-8"))?;
    let size = read_u64(s)? as usize;
    let rank = read_u64(s)? as usize;
    if rank >= size {
        return Err(bad("rank outside its group"));
    }
    Ok((name, size, rank))
}

/// One peer: a reader on this thread, a writer thread fed by a queue.
struct Link {
    peer: usize,
    reader: BufReader<TcpStream>,
    scratch: Vec<u8>,
    queue: Option<Sender<Vec<u8>>>,
    /// Buffers the writer has sent, for reuse (fresh large buffers cost
    /// page faults on every message).
    spent: Receiver<Vec<u8>>,
    writer: Option<JoinHandle<()>>,
    /// The writer's first failure, reported by the next operation.
    failed: Arc<Mutex<Option<std::io::Error>>>,
    stream: TcpStream,
}

impl Link {
    fn new(
        stream: TcpStream,
        peer: usize,
        recv_timeout: Option<Duration>,
    ) -> std::io::Result<Link> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(recv_timeout)?;
        let (tx, rx): (Sender<Vec<u8>>, Receiver<Vec<u8>>) = channel();
        let failed = Arc::new(Mutex::new(None));
        let write_half = stream.try_clone()?;
        let failed_w = failed.clone();
        let (spent_tx, spent) = channel();
        let writer = std::thread::Builder::new()
            .name(format!("collective-send-{peer}"))
            .spawn(move || {
                let mut w = BufWriter::with_capacity(1 << 16, write_half);
                // A burst of queued messages is written together and flushed
                // once the queue is empty; a lone small message goes at once.
                while let Ok(first) = rx.recv() {
                    let mut result = w.write_all(&first);
                    let _ = spent_tx.send(first);
                    while result.is_ok() {
                        match rx.try_recv() {
                            Ok(msg) => {
                                result = w.write_all(&msg);
                                let _ = spent_tx.send(msg);
                            }
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = result.and_then(|()| w.flush()) {
                        *failed_w.lock().expect("failure slot") = Some(e);
                        return;
                    }
                }
            })?;
        Ok(Link {
            peer,
            reader: BufReader::with_capacity(1 << 16, stream.try_clone()?),
            scratch: Vec::new(),
            queue: Some(tx),
            spent,
            writer: Some(writer),
            failed,
            stream,
        })
    }

    fn error(&self, e: std::io::Error) -> CollectiveError {
        use std::io::ErrorKind::*;
        match e.kind() {
            UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted => {
                CollectiveError::PeerGone { peer: self.peer }
            }
            _ => CollectiveError::Io {
                peer: self.peer,
                source: e,
            },
        }
    }

    fn check_writer(&self) -> Result<()> {
        match self.failed.lock().expect("failure slot").take() {
            Some(e) => Err(self.error(e)),
            None => Ok(()),
        }
    }

    /// A message is its length and tag (8 bytes each, little-endian), then
    /// its elements.
    fn send(&mut self, tag: Tag, data: &[f32]) -> Result<()> {
        self.check_writer()?;
        // The message goes out in pieces: the writer sends one while the
        // next is encoded, and the receiver decodes one while the next
        // arrives. The bytes on the wire are the same either way.
        let mut first = true;
        let mut pieces = data.chunks(PIECE);
        loop {
            let piece = match pieces.next() {
                Some(p) => p,
                None if first => &[][..],
                None => break,
            };
            let mut msg = self.spent.try_recv().unwrap_or_default();
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
            self.queue
                .as_ref()
                .expect("queue open while the link lives")
                .send(msg)
                .map_err(|_| CollectiveError::PeerGone { peer: self.peer })?;
        }
        Ok(())
    }

    fn recv(&mut self, tag: Tag, out: &mut [f32]) -> Result<()> {
        self.check_writer()?;
        let len = read_u64(&mut self.reader).map_err(|e| self.error(e))? as usize;
        let got = Tag(read_u64(&mut self.reader).map_err(|e| self.error(e))?);
        if got != tag {
            return Err(CollectiveError::WrongMessage {
                peer: self.peer,
                expected: tag,
                got,
            });
        }
        if len != out.len() {
            return Err(CollectiveError::SizeMismatch {
                peer: self.peer,
                expected: out.len(),
                got: len,
            });
        }
        for piece in out.chunks_mut(PIECE) {
            self.scratch.resize(piece.len() * 4, 0);
            self.reader
                .read_exact(&mut self.scratch)
                .map_err(|e| self.error(e))?;
            for (x, b) in piece.iter_mut().zip(self.scratch.chunks_exact(4)) {
                *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Ok(())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Let queued messages go out, then close our sending side.
        drop(self.queue.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

/// One member of a group joined over TCP.
pub struct TcpCollective {
    rank: usize,
    /// `links[p]` reaches member p; `None` at this member's own index.
    links: Vec<Option<Link>>,
}

impl TcpCollective {
    fn link(&mut self, peer: usize) -> Result<&mut Link> {
        let size = self.links.len();
        self.links
            .get_mut(peer)
            .and_then(Option::as_mut)
            .ok_or(CollectiveError::NoSuchPeer { peer, size })
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.links.len()
    }

    fn send_tagged(&mut self, peer: usize, tag: Tag, data: &[f32]) -> Result<()> {
        self.link(peer)?.send(tag, data)
    }

    fn recv_tagged(&mut self, peer: usize, tag: Tag, out: &mut [f32]) -> Result<()> {
        self.link(peer)?.recv(tag, out)
    }
}

/// A group of `size` members joined over loopback, each with its own
/// endpoint (as separate worker processes would be), for tests and
/// benchmarks.
pub fn loopback_group(group: &str, size: usize) -> std::io::Result<Vec<TcpCollective>> {
    let endpoints = (0..size)
        .map(|_| TcpEndpoint::bind(SocketAddr::from(([127, 0, 0, 1], 0))))
        .collect::<std::io::Result<Vec<_>>>()?;
    let addrs = endpoints
        .iter()
        .map(TcpEndpoint::local_addr)
        .collect::<std::io::Result<Vec<_>>>()?;
    let opts = TcpOptions::default();
    std::thread::scope(|s| {
        let handles: Vec<_> = endpoints
            .iter()
            .enumerate()
            .map(|(r, e)| {
                let (addrs, opts) = (&addrs, &opts);
                s.spawn(move || e.join(group, r, addrs, opts))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .expect("joining thread")
                    .map_err(|e| std::io::Error::other(e.to_string()))
            })
            .collect()
    })
}
