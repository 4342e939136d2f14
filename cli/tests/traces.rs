//! Traces over OTLP: a `strata coordinator` process told
//! `OTEL_EXPORTER_OTLP_ENDPOINT` sends its spans (submission, placement,
//! launch, checkpoint commits) and its workers' (each step and its phases,
//! checkpoint copies and writes) to a collector, here an OTLP/gRPC trace
//! service in the test; the workers' spans sit in the trace of the launch
//! that started them.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use strata_proto::v1 as pb;

/// A span as the collector got it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    attrs: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Got>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Any::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let attrs = s
                        .attributes
                        .iter()
                        .filter_map(|kv| {
                            let v = match kv.value.as_ref()?.value.as_ref()? {
                                Any::StringValue(s) => s.clone(),
                                Any::IntValue(i) => i.to_string(),
                                Any::DoubleValue(d) => d.to_string(),
                                Any::BoolValue(b) => b.to_string(),
                                _ => return None,
                            };
                            Some((kv.key.clone(), v))
                        })
                        .collect();
                    got.push(Got {
                        service: service.clone(),
                        name: s.name,
                        trace: s.trace_id,
                        id: s.span_id,
                        parent: s.parent_span_id,
                        attrs,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_s_spans_reach_an_otlp_collector_in_one_trace() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset_40(dir.path()).await;
    let collector = Collector::default();
    let otlp: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve(otlp),
    );
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut coordinator = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--slots", "2"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        // Batches go out every 200 ms rather than 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut cl = connect(&url, &dir.path().join("state")).await;
    // Two pipeline stages, two microbatches, six steps, a checkpoint
    // every three.
    let steps = 6;
    let id = submit(
        &mut cl,
        recipe_ck(&data, steps, (1, 2, 1), &dir.path().join("ck"), 3),
    )
    .await
    .unwrap();
    let j = ended(&mut cl, &id, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    // SIGTERM: the coordinator sends what it still holds as it leaves.
    let _ = Command::new("kill")
        .args(["-TERM", &coordinator.id().to_string()])
        .status();
    coordinator.wait().unwrap();

    let spans = collector.0.lock().unwrap().clone();
    let named = |service: &str, name: &str| -> Vec<&Got> {
        spans
            .iter()
            .filter(|s| s.service == service && s.name == name)
            .collect()
    };
    let c = "strata-coordinator";
    let submit = named(c, "submit");
    assert_eq!(submit.len(), 1, "{spans:#?}");
    assert_eq!(submit[0].attrs.get("job"), Some(&id));
    let launch = named(c, "launch");
    assert_eq!(launch.len(), 1, "{spans:#?}");
    let launch = launch[0];
    assert_eq!(launch.attrs.get("job"), Some(&id));
    assert_eq!(launch.attrs.get("world").map(String::as_str), Some("2"));
    for child in ["place", "start_ranks"] {
        let s = named(c, child);
        assert_eq!(s.len(), 1, "{child}: {spans:#?}");
        assert_eq!(s[0].parent, launch.id, "{child}");
    }
    let commits = named(c, "checkpoint_commit");
    assert_eq!(commits.len(), 2, "{spans:#?}");

    // Each worker's span is a child of the launch, in its trace, and
    // holds its steps; each step its phases.
    let w = "strata-worker";
    let workers = named(w, "worker");
    assert_eq!(workers.len(), 2, "{spans:#?}");
    for wk in &workers {
        assert_eq!(wk.trace, launch.trace);
        assert_eq!(wk.parent, launch.id);
    }
    let steps_of = named(w, "step");
    assert_eq!(steps_of.len(), 2 * steps as usize, "{steps_of:#?}");
    for st in &steps_of {
        assert_eq!(st.trace, launch.trace);
        assert!(workers.iter().any(|wk| wk.id == st.parent), "{st:?}");
        let phases: Vec<&str> = spans
            .iter()
            .filter(|s| s.parent == st.id)
            .map(|s| s.name.as_str())
            .collect();
        for (phase, n) in [
            ("data", 1),
            ("forward", 2),
            ("backward", 2),
            ("all_reduce", 1),
            ("optimizer", 1),
        ] {
            assert_eq!(
                phases.iter().filter(|p| **p == phase).count(),
                n,
                "step {:?}: {phases:?}",
                st.attrs.get("step")
            );
        }
    }
    // Rank 0 reports every step.
    assert_eq!(named(w, "report").len(), steps as usize);
    // Two checkpoints, copied out by both ranks in their steps and written
    // in the background under their worker's span.
    assert_eq!(named(w, "checkpoint_copy").len(), 4);
    let writes = named(w, "checkpoint_write");
    assert_eq!(writes.len(), 4, "{spans:#?}");
    for wr in writes {
        assert!(workers.iter().any(|wk| wk.id == wr.parent), "{wr:?}");
    }
    eprintln!(
        "{} spans: {} from the coordinator, {} from its workers, one trace",
        spans.len(),
        spans.iter().filter(|s| s.service == c).count(),
        spans.iter().filter(|s| s.service == w).count()
    );
}
