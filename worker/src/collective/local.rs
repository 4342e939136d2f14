//! An in-process backend: group members are threads joined by channels. It
//! runs the same ring algorithms as every other backend, so it is the
//! reference the conformance suite checks against and what single-machine
//! tests of parallel layouts use.

use std::sync::mpsc::{Receiver, Sender, channel};

use super::{Collective, CollectiveError, Result, Tag};

/// A message and its tag.
type Message = (Tag, Vec<f32>);

pub struct LocalCollective {
    rank: usize,
    /// `to[p]` sends to member p.
    to: Vec<Sender<Message>>,
    /// `from[p]` receives what member p sent to this member, in order.
    from: Vec<Receiver<Message>>,
}

/// A group of `size` members, one per thread that will use it.
pub fn local_group(size: usize) -> Vec<LocalCollective> {
    assert!(size > 0, "a group has at least one member");
    // One channel per ordered pair: senders[from][to] feeds receivers[to][from].
    let mut senders: Vec<Vec<Sender<Message>>> = (0..size).map(|_| Vec::new()).collect();
    let mut receivers: Vec<Vec<Receiver<Message>>> = (0..size).map(|_| Vec::new()).collect();
    for row in senders.iter_mut() {
        for column in receivers.iter_mut() {
            let (tx, rx) = channel();
            row.push(tx);
            column.push(rx);
        }
    }
    senders
        .into_iter()
        .zip(receivers)
        .enumerate()
        .map(|(rank, (to, from))| LocalCollective { rank, to, from })
        .collect()
}

impl LocalCollective {
    fn check_peer(&self, peer: usize) -> Result<()> {
        if peer < self.to.len() {
            Ok(())
        } else {
            Err(CollectiveError::NoSuchPeer {
                peer,
                size: self.to.len(),
            })
        }
    }
}

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.to.len()
    }

    fn send_tagged(&mut self, peer: usize, tag: Tag, data: &[f32]) -> Result<()> {
        self.check_peer(peer)?;
        self.to[peer]
            .send((tag, data.to_vec()))
            .map_err(|_| CollectiveError::PeerGone { peer })
    }

    fn recv_tagged(&mut self, peer: usize, tag: Tag, out: &mut [f32]) -> Result<()> {
        self.check_peer(peer)?;
        let (got, msg) = self.from[peer]
            .recv()
            .map_err(|_| CollectiveError::PeerGone { peer })?;
        if got != tag {
            return Err(CollectiveError::WrongMessage {
                peer,
                expected: tag,
                got,
            });
        }
        if msg.len() != out.len() {
            return Err(CollectiveError::SizeMismatch {
                peer,
                expected: out.len(),
                got: msg.len(),
            });
        }
        out.copy_from_slice(&msg);
        Ok(())
    }
}
