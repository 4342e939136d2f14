//! The real Slurm launcher, driven through the Slurm stand-ins and the
//! rank simulator, in a `strata coordinator` process of its own: an
//! `sbatch` that hangs for seconds holds up the job it starts and nothing
//! else — another job's heartbeats are answered as before, and the
//! engine's lock is never held while it waits.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata_coordinator::cluster::sim::{SimFault, SimRequest};
use strata_proto::auth::Bearer;
use strata_proto::v1 as pb;
use strata_proto::v1::job_service_client::JobServiceClient;
use strata_sim::{SimConfig, Simulator, fixture};

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The client token the coordinator is given.
const TOKEN: &str = "sim-slurm-token";

fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    std::io::Read::read_to_string(&mut s, &mut buf).unwrap();
    buf.split_once("\r\n\r\n")
        .map_or(buf.clone(), |b| b.1.to_string())
}

fn gauge(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_sbatch_does_not_delay_another_jobs_heartbeats() {
    strata_coordinator::cluster::limits::raise_open_files_limit();
    let dir = tempfile::tempdir().unwrap();
    let data = fixture::dataset(&dir.path().join("data")).await.unwrap();
    let sim = Simulator::start(
        "127.0.0.1:0".parse().unwrap(),
        SimConfig {
            step_time: Duration::from_millis(200),
            nodes: 16,
            gpus_per_node: 8,
        },
    )
    .await
    .unwrap();
    let strata = std::path::PathBuf::from(env!("CARGO_BIN_EXE_strata"));
    let bin = dir.path().join("slurm-bin");
    strata_sim::slurm::write_standins(&bin, &strata).unwrap();
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::fs::File::create(dir.path().join("coordinator.log")).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let _coordinator = Process(
        Command::new(&strata)
            .args([
                "coordinator",
                "--launcher",
                "slurm",
                "--listen",
                &grpc.to_string(),
                "--http-listen",
                &http.to_string(),
                "--state-dir",
                &dir.path().join("state").display().to_string(),
                "--stop-grace-s",
                "3",
                "--token-file",
                &token_file.display().to_string(),
            ])
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            )
            .env(strata_sim::slurm::SIM_ADDR_VAR, sim.addr.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    let mut cl = loop {
        if let Ok(c) = tonic::transport::Channel::from_shared(format!("http://{grpc}"))
            .unwrap()
            .connect()
            .await
        {
            break JobServiceClient::with_interceptor(c, Bearer::new(Some(TOKEN)).unwrap());
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no coordinator");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let nodes = cl
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nodes.nodes.len(), 16, "sinfo's nodes: {nodes:?}");
    let recipe = |name: &str, ranks: u32| {
        fixture::recipe(
            name,
            &data,
            &dir.path().join("checkpoints"),
            fixture::layout_for(ranks),
            1_000_000,
            1000,
            "",
        )
    };
    let submit = async |cl: &mut JobServiceClient<_>, spec: String| {
        cl.submit_job(pb::SubmitJobRequest {
            spec_toml: spec,
            default_name: "sim".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id
    };
    let a = submit(&mut cl, recipe("steady", 64)).await;
    let job = async |cl: &mut JobServiceClient<_>, id: &str| {
        cl.get_job(pb::GetJobRequest { job_id: id.into() })
            .await
            .unwrap()
            .into_inner()
    };
    let start = Instant::now();
    while job(&mut cl, &a).await.steps_done < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "job {a} did not step: {:?}",
            job(&mut cl, &a).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The next sbatch hangs for 8 s; job B's launch waits on it.
    let hang = 8.0;
    sim.call(SimRequest::Fault(SimFault::HangCommand {
        command: "sbatch".into(),
        job: String::new(),
        seconds: hang,
    }))
    .await;
    let lock_before = gauge(
        &get(http, "/metrics"),
        "strata_engine_lock_hold_max_seconds",
    );
    let _ = sim.stats(true);
    let b = submit(&mut cl, recipe("launching", 8)).await;
    let waited = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(hang * 0.75)).await;
    let stats = sim.stats(false);
    let lock_after = gauge(
        &get(http, "/metrics"),
        "strata_engine_lock_hold_max_seconds",
    );
    // Job B is still being launched: its sbatch has not answered.
    let jb = job(&mut cl, &b).await;
    assert!(
        jb.waiting.contains("starting the ranks"),
        "{jb:?} after {:?}",
        waited.elapsed()
    );
    let beats = &stats.heartbeat_by_job[&a];
    assert!(beats.count >= 64 * 4, "{beats:?}");
    assert!(
        beats.max_ms < 1000.0,
        "job {a}'s heartbeats waited on {b}'s sbatch: {beats:?}"
    );
    // The lock was never held across the command.
    assert!(
        lock_after < 0.5 || lock_after == lock_before,
        "the engine lock was held {lock_after} s"
    );
    // Once sbatch answers, job B runs; job A never stopped.
    let start = Instant::now();
    while job(&mut cl, &b).await.steps_done < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "job {b} never ran"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(waited.elapsed() >= Duration::from_secs_f64(hang));
    let ja = job(&mut cl, &a).await;
    assert_eq!(ja.attempts.len(), 1, "{ja:?}");
    assert_eq!(ja.state(), pb::JobState::Running);
    for id in [&a, &b] {
        cl.cancel_job(pb::CancelJobRequest {
            job_id: id.to_string(),
            reason: "done".into(),
        })
        .await
        .unwrap();
    }
}
