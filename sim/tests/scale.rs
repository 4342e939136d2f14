//! The coordinator at scale through the rank simulator, in one process:
//! a 1,024-rank job runs, loses a rank, restarts from its checkpoint away
//! from the node it failed on, and finishes; a node the job failed on is
//! not placed again while the job fits without it; a reconnecting event
//! stream gets no step twice; views stay bounded.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_cluster::SimJobLauncher;
use strata_cluster::sim::{SimFault, SimRequest, SimResponse};
use strata_coordinator::{Coordinator, CoordinatorConfig, Inventory};
use strata_proto::v1 as pb;
use strata_proto::v1::job_service_client::JobServiceClient;
use strata_sim::{SimConfig, Simulator, fixture};
use tonic::transport::Channel;

struct Harness {
    dir: tempfile::TempDir,
    data: String,
    sim: Simulator,
    c: Coordinator,
    cl: JobServiceClient<Channel>,
}

async fn harness(nodes: u32, step_ms: u64) -> Harness {
    strata_cluster::limits::raise_open_files_limit();
    let dir = tempfile::tempdir().unwrap();
    let data = fixture::dataset(&dir.path().join("data")).await.unwrap();
    let sim = Simulator::start(
        "127.0.0.1:0".parse().unwrap(),
        SimConfig {
            step_time: Duration::from_millis(step_ms),
            nodes,
            gpus_per_node: 8,
        },
    )
    .await
    .unwrap();
    let mut cfg = CoordinatorConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("state"),
        Inventory::local(1).unwrap(),
        "/bin/false".into(),
    );
    cfg.heartbeat_timeout = Duration::from_secs(5);
    cfg.stop_grace = Duration::from_secs(2);
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let c = Coordinator::start_with(cfg, Arc::new(SimJobLauncher::new(sim.addr, nodes, 8)))
        .await
        .unwrap();
    let cl = JobServiceClient::connect(format!("http://{}", c.addr))
        .await
        .unwrap();
    Harness {
        dir,
        data,
        sim,
        c,
        cl,
    }
}

impl Harness {
    fn recipe(&self, name: &str, ranks: u32, steps: u64, every: u64) -> String {
        fixture::recipe(
            name,
            &self.data,
            &self.dir.path().join("checkpoints"),
            fixture::layout_for(ranks),
            steps,
            every,
            "",
        )
    }

    async fn submit(&mut self, spec: String) -> String {
        self.cl
            .submit_job(pb::SubmitJobRequest {
                spec_toml: spec,
                default_name: "sim".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .job_id
    }

    async fn job(&mut self, id: &str) -> pb::Job {
        self.cl
            .get_job(pb::GetJobRequest { job_id: id.into() })
            .await
            .unwrap()
            .into_inner()
    }

    async fn until(&mut self, id: &str, secs: u64, f: impl Fn(&pb::Job) -> bool) -> pb::Job {
        let start = Instant::now();
        loop {
            let j = self.job(id).await;
            if f(&j) {
                return j;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs),
                "job {id} did not get there in {secs} s: {j:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn fault(&self, f: SimFault) {
        match self.sim.call(SimRequest::Fault(f)).await {
            SimResponse::Ok => {}
            other => panic!("{other:?}"),
        }
    }
}

/// A plain HTTP GET on loopback: status and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut buf = String::new();
    std::io::Read::read_to_string(&mut s, &mut buf).unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

/// The node rank `rank` of job `id` runs on now, from the job page's
/// rank list.
fn node_of(http: SocketAddr, id: &str, rank: u32) -> String {
    let (code, body) = get(http, &format!("/api/jobs/{id}/ranks?offset={rank}&limit=1"));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["ranks"][0]["node"].as_str().unwrap().to_string()
}

/// Every node the live attempt of job `id` runs on.
fn nodes_now(http: SocketAddr, id: &str) -> Vec<String> {
    let (code, body) = get(http, &format!("/api/jobs/{id}/ranks?limit=1000"));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut nodes: Vec<String> = v["ranks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

async fn all_steps(cl: &mut JobServiceClient<Channel>, id: &str) -> Vec<u64> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let page = cl
            .get_metrics(pb::GetMetricsRequest {
                job_id: id.into(),
                from_step: from,
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(page.steps.iter().map(|s| s.step));
        if page.next_from_step == 0 {
            return out;
        }
        from = page.next_from_step;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_1024_rank_job_fails_a_rank_restarts_away_from_its_node_and_finishes() {
    // 136 nodes of 8: the job takes 128, a restart has room elsewhere.
    let mut h = harness(136, 100).await;
    let http = h.c.http_addr.unwrap();
    let id = h.submit(h.recipe("big", 1024, 40, 10)).await;
    h.until(&id, 240, |j| j.steps_done >= 12).await;
    // Bounded views: the job page sums the ranks up and lists a page;
    // /metrics has quantiles and the five slowest ranks, not 1,024 series.
    let (code, body) = get(http, &format!("/api/jobs/{id}"));
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ranks_summary"]["ranks"], 1024, "{body}");
    assert_eq!(v["ranks"]["total"], 1024);
    assert_eq!(v["ranks"]["ranks"].as_array().unwrap().len(), 50);
    assert!(
        body.len() < 64 << 10,
        "the job page is {} bytes",
        body.len()
    );
    let (_, metrics) = get(http, "/metrics");
    let per_rank = metrics
        .lines()
        .filter(|l| l.starts_with("strata_job_slowest_rank_step_seconds{"))
        .count();
    assert!(per_rank <= 5, "{per_rank} per-rank series");

    let victim = 517;
    let node = node_of(http, &id, victim);
    h.fault(SimFault::Exit {
        job: id.clone(),
        rank: victim,
        code: 9,
        signal: true,
    })
    .await;
    let j = h
        .until(&id, 240, |j| {
            j.state() == pb::JobState::Succeeded || j.state() == pb::JobState::Failed
        })
        .await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    assert_eq!(j.steps_done, 40);
    assert_eq!(j.attempts.len(), 2, "{:?}", j.attempts);
    let first = &j.attempts[0];
    assert!(
        first
            .cause
            .starts_with("rank 517 ended (killed by signal 9)"),
        "{}",
        first.cause
    );
    // The restart continued from the last checkpoint before the fault.
    let second = &j.attempts[1];
    assert!(
        second.from_step >= 10 && second.from_step % 10 == 0,
        "{second:?}"
    );
    // The node it failed on is blamed, shown by ListNodes, and was not
    // placed again.
    assert_eq!(j.blamed_nodes.len(), 1, "{:?}", j.blamed_nodes);
    assert_eq!(j.blamed_nodes[0].node, node);
    // Each step is recorded once: the restart's steps replaced the
    // abandoned attempt's.
    let steps = all_steps(&mut h.cl, &id).await;
    assert_eq!(steps, (1..=40).collect::<Vec<u64>>());
    h.c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blamed_node_is_not_placed_again_while_the_job_fits_without_it() {
    // 3 nodes of 8; the job (16 ranks, tp 8) needs 2.
    let mut h = harness(3, 200).await;
    let http = h.c.http_addr.unwrap();
    let id = h.submit(h.recipe("blame", 16, 100_000, 1000)).await;
    h.until(&id, 60, |j| j.steps_done >= 2).await;
    let before = nodes_now(http, &id);
    assert_eq!(before.len(), 2, "{before:?}");
    let lost = node_of(http, &id, 0);
    h.fault(SimFault::LoseNode {
        job: id.clone(),
        node: lost.clone(),
    })
    .await;
    let j = h
        .until(&id, 60, |j| j.attempts.len() == 2 && j.steps_done >= 1)
        .await;
    assert!(
        j.attempts[0].cause.contains(&format!("lost node {lost}")),
        "{}",
        j.attempts[0].cause
    );
    assert_eq!(j.blamed_nodes.len(), 1);
    assert_eq!(j.blamed_nodes[0].node, lost);
    let after = nodes_now(http, &id);
    assert!(!after.contains(&lost), "{lost} placed again: {after:?}");
    // `strata nodes` shows why.
    let nodes =
        h.cl.list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
    let n = nodes.iter().find(|n| n.name == lost).unwrap();
    assert_eq!(n.excluded.len(), 1, "{n:?}");
    assert!(
        n.excluded[0].starts_with(&format!("job {id} attempt 1: simulated allocation")),
        "{:?}",
        n.excluded
    );
    // A second lost node leaves one node the job was not blamed on, too
    // few: a job that fits only with nodes it failed on runs there rather
    // than not at all.
    let other = after[0].clone();
    h.fault(SimFault::LoseNode {
        job: id.clone(),
        node: other.clone(),
    })
    .await;
    let j = h
        .until(&id, 60, |j| {
            j.attempts.len() == 3 && j.state() == pb::JobState::Running && j.steps_done >= 1
        })
        .await;
    assert_eq!(j.blamed_nodes.len(), 2);
    assert_eq!(nodes_now(http, &id).len(), 2);
    h.c.stop().await;
}

/// Reads server-sent events from `stream` until `want` steps have come
/// (or `end`); the steps and the last event id.
fn read_events(r: &mut BufReader<TcpStream>, want: usize) -> (Vec<u64>, Option<u64>, bool) {
    let mut steps = Vec::new();
    let (mut event, mut data, mut id) = (String::new(), String::new(), None);
    let mut ended = false;
    let mut line = String::new();
    while steps.len() < want && !ended {
        line.clear();
        if r.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            if event == "steps" {
                let v: serde_json::Value = serde_json::from_str(&data).unwrap();
                steps.extend(
                    v.as_array()
                        .unwrap()
                        .iter()
                        .map(|s| s["step"].as_u64().unwrap()),
                );
            }
            ended |= event == "end";
            event.clear();
            data.clear();
        } else if let Some(e) = l.strip_prefix("event: ").or(l.strip_prefix("event:")) {
            event = e.trim().to_string();
        } else if let Some(d) = l.strip_prefix("data: ").or(l.strip_prefix("data:")) {
            data.push_str(d);
        } else if let Some(i) = l.strip_prefix("id: ").or(l.strip_prefix("id:")) {
            id = i.trim().parse().ok();
        }
    }
    (steps, id, ended)
}

fn open_events(http: SocketAddr, path: &str, last: Option<u64>) -> BufReader<TcpStream> {
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let resume = last.map_or(String::new(), |l| format!("Last-Event-ID: {l}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {http}\r\nAccept: text/event-stream\r\n{resume}\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    // The headers.
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconnecting_event_stream_gets_no_step_twice() {
    let mut h = harness(2, 20).await;
    let http = h.c.http_addr.unwrap();
    let id = h.submit(h.recipe("watch", 8, 400, 1000)).await;
    h.until(&id, 60, |j| j.steps_done >= 40).await;
    let path = format!("/api/jobs/{id}/events");
    let (first, last, _) = tokio::task::spawn_blocking({
        let path = path.clone();
        move || read_events(&mut open_events(http, &path, None), 60)
    })
    .await
    .unwrap();
    let last = last.expect("events carry ids");
    assert_eq!(last, *first.last().unwrap());
    // The connection drops; the browser reconnects with Last-Event-ID.
    let (second, _, ended) = tokio::task::spawn_blocking(move || {
        read_events(&mut open_events(http, &path, Some(last)), 10_000)
    })
    .await
    .unwrap();
    assert!(ended, "the stream ends with the job");
    let mut all = first.clone();
    all.extend(&second);
    assert_eq!(
        second.first(),
        Some(&(last + 1)),
        "resumed right after {last}"
    );
    assert_eq!(
        all,
        (1..=400).collect::<Vec<u64>>(),
        "each step once, none missing"
    );
    // A long history comes thinned for the charts.
    let (thin, _, _) = tokio::task::spawn_blocking({
        let path = format!("/api/jobs/{id}/events?points=50");
        move || read_events(&mut open_events(http, &path, None), 10_000)
    })
    .await
    .unwrap();
    assert!(thin.len() <= 52, "{} steps", thin.len());
    assert_eq!(thin.last(), Some(&400));
    assert!(thin.windows(2).all(|w| w[0] < w[1]));
    h.c.stop().await;
}
