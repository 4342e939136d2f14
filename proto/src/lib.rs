//! strata's wire protocol, package `strata.v1`.
//!
//! Generated from `strata.proto` at build time. Only this crate knows
//! protobuf: the coordinator, workers and CLI keep their own domain types and
//! convert at the service edge.

pub mod auth;
pub mod checkpoint;

/// Bytes `m` takes on the wire (to page replies under tonic's 4 MiB).
pub fn encoded_len(m: &impl prost::Message) -> usize {
    m.encoded_len()
}

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("strata.v1");
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1::*;

    #[test]
    fn the_wire_encoding_of_a_job_is_stable() {
        // Field numbers and enum values are the contract with deployed
        // clients: this pins them.
        let job = Job {
            job_id: "j1".into(),
            state: JobState::Running as i32,
            steps_done: 5,
            last_loss: Some(2.5),
            ..Default::default()
        };
        let bytes = job.encode_to_vec();
        assert_eq!(
            bytes,
            [
                0x0a, 0x02, b'j', b'1', // 1: job_id
                0x18, 0x02, // 3: state = RUNNING
                0x28, 0x05, // 5: steps_done
                0x41, 0, 0, 0, 0, 0, 0, 0x04, 0x40, // 8: last_loss = 2.5
            ]
        );
        assert_eq!(Job::decode(bytes.as_slice()).unwrap(), job);
    }

    #[test]
    fn job_states_keep_their_numbers() {
        let states = [
            (JobState::Unspecified, 0),
            (JobState::Queued, 1),
            (JobState::Running, 2),
            (JobState::Succeeded, 3),
            (JobState::Failed, 4),
            (JobState::Cancelled, 5),
        ];
        for (s, n) in states {
            assert_eq!(s as i32, n);
            assert_eq!(JobState::try_from(n).unwrap(), s);
        }
        assert_eq!(JobState::Cancelled.as_str_name(), "JOB_STATE_CANCELLED");
    }

    #[test]
    fn the_worker_messages_keep_their_numbers() {
        // 3: heartbeat_interval_ms.
        let r = HeartbeatResponse {
            heartbeat_interval_ms: 4000,
            ..Default::default()
        };
        assert_eq!(r.encode_to_vec(), [0x18, 0xa0, 0x1f]);
        // 8: activity = EVAL (2).
        let h = HeartbeatRequest {
            activity: WorkerActivity::Eval as i32,
            ..Default::default()
        };
        assert_eq!(h.encode_to_vec(), [0x40, 0x02]);
        // 13: the manifest, a message (its 5: step = 7); 12: a shard.
        let c = ReportCheckpointRequest {
            manifest: Some(CheckpointManifest {
                step: 7,
                ..Default::default()
            }),
            shards: vec![CheckpointShard {
                bytes: 1,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            c.encode_to_vec(),
            [0x62, 0x02, 0x10, 0x01, 0x6a, 0x02, 0x28, 0x07]
        );
    }

    #[test]
    fn an_event_carries_either_a_job_or_a_step() {
        let ev = JobEvent {
            event: Some(job_event::Event::Step(StepMetrics {
                step: 3,
                loss: 4.0,
                ..Default::default()
            })),
        };
        let back = JobEvent::decode(ev.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, ev);
    }
}
