//! Finding one another: the address this rank's collective listener is
//! published at, the plan of the groups it joins (derived from the
//! coordinator's assignment: tensor, pipeline and data parallel, then the
//! tied embedding's and an interleaved pipeline's end groups) and joining
//! them through whatever [`CollectiveBackend`] the worker was given.

use std::net::{IpAddr, SocketAddr};

use strata_recipe::{Coords, Layout};

use super::WorkerError;
use super::report::AssignedGroups;
use crate::collective::{CollectiveBackend, GroupPlan};
use crate::train::{GroupKind, Groups, TrainError};

/// The address the other ranks reach a listener bound at `bound` at: that
/// address itself, unless it is every interface (0.0.0.0 or ::); then the
/// one `advertise` names (an IP, or `iface:NAME`), or else the address of
/// the interface this machine reaches the coordinator through.
pub fn advertised(
    bound: SocketAddr,
    advertise: Option<&str>,
    coordinator: &str,
) -> Result<SocketAddr, WorkerError> {
    let setup = |m: String| WorkerError::Setup(m);
    let ip = match advertise {
        Some(a) => {
            if let Some(name) = a.strip_prefix("iface:") {
                interface_ipv4(name).ok_or_else(|| {
                    setup(format!(
                        "--advertise {a}: no network interface {name} with an IPv4 address"
                    ))
                })?
            } else {
                a.parse::<IpAddr>().map_err(|e| {
                    setup(format!(
                        "--advertise {a:?}: not an IP address or iface:NAME ({e})"
                    ))
                })?
            }
        }
        None if !bound.ip().is_unspecified() => return Ok(bound),
        None => route_to(coordinator).map_err(|e| {
            setup(format!(
                "cannot tell which address reaches the coordinator {coordinator} (give --advertise): {e}"
            ))
        })?,
    };
    Ok(SocketAddr::new(ip, bound.port()))
}

/// This machine's address on the route to `url`'s host: a UDP socket
/// "connected" there (no packet is sent) is bound to it.
fn route_to(url: &str) -> std::io::Result<IpAddr> {
    let host = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let target = std::net::ToSocketAddrs::to_socket_addrs(host)?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{host} resolves to no address")))?;
    let any: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = std::net::UdpSocket::bind(any)?;
    sock.connect(target)?;
    Ok(sock.local_addr()?.ip())
}

/// The IPv4 address of network interface `name`.
#[allow(unsafe_code)]
fn interface_ipv4(name: &str) -> Option<IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that stays valid
    // until freeifaddrs, which is called once below; every pointer read
    // is checked for null first.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return None;
        }
        let mut found = None;
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null()
                && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
                && std::ffi::CStr::from_ptr(ifa.ifa_name).to_str() == Ok(name)
            {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                found = Some(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ));
                break;
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
        found
    }
}

pub(super) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The world ranks of each joined group's members, to name a failed peer
/// by its world rank.
pub(super) struct Members(Vec<(GroupKind, Vec<u32>)>);

impl Members {
    /// A step's failure, naming the group and the peer's world rank.
    pub(super) fn describe(&self, e: &TrainError) -> String {
        let peer = e.source.peer();
        let world = self
            .0
            .iter()
            .find(|(k, _)| *k == e.group)
            .and_then(|(_, ranks)| ranks.get(peer?));
        match (peer, world) {
            (Some(p), Some(w)) => format!("{e} (group rank {p} is world rank {w})"),
            _ => e.to_string(),
        }
    }
}

/// The groups a rank joins, in the order every rank joins them: the
/// tensor-parallel, pipeline and data-parallel groups of the assignment,
/// then on the first and last stages the embedding group of a tied model
/// and the wrap-around group of an interleaved pipeline. `job` names the
/// attempt (`JOB/aN`), so that a worker of an ended attempt cannot join
/// the next one's groups.
pub(super) fn plans(
    job: &str,
    c: Coords,
    layout: Layout,
    assigned: &AssignedGroups,
    tied: bool,
    interleaved: bool,
) -> Vec<(GroupKind, GroupPlan)> {
    let plan = |name: String, members: &[crate::collective::Member], me: u32| GroupPlan {
        name,
        members: members.to_vec(),
        me: me as usize,
    };
    let mut out = vec![
        (
            GroupKind::Tensor,
            plan(
                format!("{job}/tp/dp{}-pp{}", c.dp, c.pp),
                &assigned.tensor,
                c.tp,
            ),
        ),
        (
            GroupKind::Pipeline,
            plan(
                format!("{job}/pp/dp{}-tp{}", c.dp, c.tp),
                &assigned.pipeline,
                c.pp,
            ),
        ),
        (
            GroupKind::Data,
            plan(
                format!("{job}/dp/pp{}-tp{}", c.pp, c.tp),
                &assigned.data,
                c.dp,
            ),
        ),
    ];
    let stages = &assigned.pipeline;
    let at_an_end = layout.pp > 1 && (c.pp == 0 || c.pp + 1 == layout.pp);
    if at_an_end && !stages.is_empty() {
        let ends = [stages[0].clone(), stages[stages.len() - 1].clone()];
        let me = u32::from(c.pp != 0);
        for (wanted, kind, name) in [
            (tied, GroupKind::Embedding, "emb"),
            (interleaved, GroupKind::Wrap, "wrap"),
        ] {
            if wanted {
                let name = format!("{job}/{name}/dp{}-tp{}", c.dp, c.tp);
                out.push((kind, plan(name, &ends, me)));
            }
        }
    }
    out
}

/// Joins `plans` (as [`plans`] orders them) through `backend`.
pub(super) fn join_groups(
    backend: &dyn CollectiveBackend,
    plans: &[(GroupKind, GroupPlan)],
) -> Result<(Groups, Members), WorkerError> {
    let mut joined = Vec::new();
    let (mut tp, mut pp, mut dp, mut emb, mut wrap) = (None, None, None, None, None);
    for (kind, plan) in plans {
        let g = backend
            .join(plan)
            .map_err(|e| WorkerError::Setup(format!("{kind} group: {e}")))?;
        *match kind {
            GroupKind::Tensor => &mut tp,
            GroupKind::Pipeline => &mut pp,
            GroupKind::Data => &mut dp,
            GroupKind::Embedding => &mut emb,
            GroupKind::Wrap => &mut wrap,
        } = Some(g);
        joined.push((*kind, plan.members.iter().map(|m| m.rank).collect()));
    }
    let missing = |kind: GroupKind| WorkerError::Setup(format!("no {kind} group was planned"));
    Ok((
        Groups {
            tp: tp.ok_or_else(|| missing(GroupKind::Tensor))?,
            pp: pp.ok_or_else(|| missing(GroupKind::Pipeline))?,
            dp: dp.ok_or_else(|| missing(GroupKind::Data))?,
            emb,
            wrap,
        },
        Members(joined),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_address_is_one_peers_can_reach() {
        let bound: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:4000".parse().unwrap();
        let coord = "http://127.0.0.1:7070";
        // A specific address is published as bound.
        assert_eq!(advertised(bound, None, coord).unwrap(), bound);
        // Every interface: the one that reaches the coordinator, …
        assert_eq!(advertised(any, None, coord).unwrap(), bound);
        // … a named interface's, or an explicit IP, with the bound port.
        assert_eq!(advertised(any, Some("iface:lo"), coord).unwrap(), bound);
        assert_eq!(
            advertised(any, Some("10.1.2.3"), coord).unwrap(),
            "10.1.2.3:4000".parse().unwrap()
        );
        let err = advertised(any, Some("iface:nope0"), coord)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no network interface nope0"), "{err}");
        let err = advertised(any, Some("a host"), coord)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an IP address or iface:NAME"), "{err}");
    }

    /// Every rank of a (2,2,2) layout, tied and interleaved, plans its
    /// groups from what the coordinator assigns and joins them through
    /// the in-process backend: each group's members agree on who is in it
    /// (their world ranks, gathered over the group itself), and the end
    /// groups hold the first and last stages.
    #[test]
    fn every_rank_joins_the_groups_its_plan_names() {
        use crate::collective::{LocalHub, Member};
        let layout = Layout::new(2, 2, 2);
        let member = |r: strata_recipe::Rank| Member {
            rank: r.0,
            addr: format!("rank-{}", r.0),
        };
        let hub = LocalHub::new();
        std::thread::scope(|s| {
            for rank in 0..layout.world_size() {
                let hub = &hub;
                s.spawn(move || {
                    let c = layout.coords(strata_recipe::Rank(rank)).unwrap();
                    let world = strata_recipe::Rank(rank);
                    let assigned = AssignedGroups {
                        tensor: layout.tp_group(world).into_iter().map(member).collect(),
                        pipeline: layout.pp_group(world).into_iter().map(member).collect(),
                        data: layout.dp_group(world).into_iter().map(member).collect(),
                    };
                    let plans = plans("job/a1", c, layout, &assigned, true, true);
                    // pp = 2: both stages are ends, so both end groups.
                    assert_eq!(plans.len(), 5);
                    let (mut groups, _) = join_groups(hub, &plans).unwrap();
                    let check = |g: &mut dyn crate::collective::Collective, plan: &GroupPlan| {
                        assert_eq!(g.rank(), plan.me);
                        let mut all = vec![0f32; g.size()];
                        g.all_gather(&[rank as f32], &mut all).unwrap();
                        let want: Vec<f32> = plan.members.iter().map(|m| m.rank as f32).collect();
                        assert_eq!(all, want, "rank {rank}: {}", plan.name);
                    };
                    check(groups.tp.as_mut(), &plans[0].1);
                    check(groups.pp.as_mut(), &plans[1].1);
                    check(groups.dp.as_mut(), &plans[2].1);
                    check(groups.emb.as_deref_mut().unwrap(), &plans[3].1);
                    check(groups.wrap.as_deref_mut().unwrap(), &plans[4].1);
                });
            }
        });
        // A member that joins twice, or a group planned with another size,
        // is named.
        let plan = |me: usize, n: u32| GroupPlan {
            name: "g".into(),
            members: (0..n).map(|r| member(strata_recipe::Rank(r))).collect(),
            me,
        };
        hub.join(&plan(0, 3)).unwrap();
        let twice = hub.join(&plan(0, 3)).err().unwrap().to_string();
        assert!(twice.contains("member 0 joined it twice"), "{twice}");
        let size = hub.join(&plan(1, 2)).err().unwrap().to_string();
        assert!(size.contains("2 members planned"), "{size}");
    }
}
