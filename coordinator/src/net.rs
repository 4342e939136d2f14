//! Listening sockets: a deep accept backlog (16,384 workers connect at
//! once when a large attempt starts), and backing off after accept
//! errors instead of spinning.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The accept backlog of the coordinator's listeners (the kernel caps it
/// at `net.core.somaxconn`).
pub const BACKLOG: u32 = 8192;

/// Binds `addr` with a deep backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Whether a host name (without port; an IPv6 address with or without
/// brackets) names this machine's loopback: `localhost` or a loopback
/// address.
pub fn is_loopback_name(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Backing off after accept errors: out of file descriptors (EMFILE) an
/// accept loop that retries at once spins a core while new workers hang.
#[derive(Default)]
pub struct Backoff {
    pause: Option<Duration>,
    logged: Option<Instant>,
}

impl Backoff {
    /// Waits a little longer each time (5 ms, doubling, up to a second),
    /// logging at most once every ten seconds.
    pub async fn wait(&mut self, what: &str, e: &std::io::Error) {
        let pause = self.pause.map_or(Duration::from_millis(5), |p| {
            (p * 2).min(Duration::from_secs(1))
        });
        self.pause = Some(pause);
        if self.note() {
            tracing::error!(listener = what, error = %e, pause_ms = pause.as_millis() as u64, "cannot accept connections; backing off (out of file descriptors? see the open-files limit)");
        }
        tokio::time::sleep(pause).await;
    }

    pub fn reset(&mut self) {
        self.pause = None;
    }

    /// Whether to log now (at most once every ten seconds).
    pub fn note(&mut self) -> bool {
        let now = Instant::now();
        if self
            .logged
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            return false;
        }
        self.logged = Some(now);
        true
    }
}
