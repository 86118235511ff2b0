//! `AdminService`: the cluster as the answering node sees it.
//!
//! Membership and leases come from the node's [`SharedView`] (refreshed every reconciliation
//! round, so at most one `cluster.heartbeat_interval` old); consumer figures are read from
//! JetStream on each call. Any node answers.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use sagaflow_proto::v1::admin_service_server::AdminService;
use sagaflow_proto::v1::{
    ClusterNode, ClusterStatusRequest, ClusterStatusResponse, ConsumerStatus, PartitionStatus,
};
use tonic::{Request, Response, Status};

use crate::cluster::SharedView;
use crate::events::consumer_name;
use crate::topology::{COMMANDS_STREAM, EVENTS_STREAM, STATUS_STREAM};

/// Consumers listed per stream at most (the event stream has one per partition, ≤ 1024).
pub const MAX_CONSUMERS_PER_STREAM: usize = 4096;

/// Bound on listing the consumers of one stream.
const LIST_TIMEOUT: Duration = Duration::from_secs(10);

/// `AdminService` implementation.
#[derive(Clone)]
pub struct Admin {
    js: jetstream::Context,
    view: SharedView,
    node_id: String,
    partitions: u32,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("node_id", &self.node_id)
            .field("partitions", &self.partitions)
            .finish_non_exhaustive()
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Status {
    tracing::warn!(error = %e, "{what}");
    Status::unavailable(format!("{what}: {e}"))
}

impl Admin {
    /// The service over the node's JetStream context and cluster view; `partitions` is the
    /// configured partition count (every partition is listed, leased or not).
    pub fn new(
        js: jetstream::Context,
        view: SharedView,
        node_id: impl Into<String>,
        partitions: u32,
    ) -> Self {
        Admin {
            js,
            view,
            node_id: node_id.into(),
            partitions,
        }
    }

    /// Every consumer of `stream` (at most [`MAX_CONSUMERS_PER_STREAM`]), `evt-p2` before `evt-p10`.
    async fn consumers_of(&self, stream: &str) -> Result<Vec<ConsumerStatus>, Status> {
        let what = format!("cannot list the consumers of {stream}");
        let list = async {
            let s = self
                .js
                .get_stream(stream)
                .await
                .map_err(|e| unavailable(&what, e))?;
            let mut infos = s.consumers().take(MAX_CONSUMERS_PER_STREAM);
            let mut out = Vec::new();
            while let Some(info) = infos.next().await {
                let info = info.map_err(|e| unavailable(&what, e))?;
                out.push(ConsumerStatus {
                    name: info.name,
                    stream: stream.to_string(),
                    pending: info.num_pending,
                    ack_pending: info.num_ack_pending as u64,
                    redelivered: info.num_redelivered as u64,
                });
            }
            Ok::<_, Status>(out)
        };
        let mut out = tokio::time::timeout(LIST_TIMEOUT, list)
            .await
            .map_err(|_| unavailable(&what, format!("no answer within {LIST_TIMEOUT:?}")))??;
        out.sort_by(|a, b| natural_key(&a.name).cmp(&natural_key(&b.name)));
        Ok(out)
    }

    /// The status this node reports.
    pub async fn status(&self) -> Result<ClusterStatusResponse, Status> {
        let view = self.view.read().await.clone();
        let mut consumers = Vec::new();
        for stream in [EVENTS_STREAM, COMMANDS_STREAM, STATUS_STREAM] {
            consumers.extend(self.consumers_of(stream).await?);
        }
        let event_backlog: HashMap<&str, u64> = consumers
            .iter()
            .filter(|c| c.stream == EVENTS_STREAM)
            .map(|c| (c.name.as_str(), c.pending.saturating_add(c.ack_pending)))
            .collect();
        let mut owned: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        let mut partitions = Vec::with_capacity(self.partitions as usize);
        for p in 0..self.partitions {
            let (owner, epoch) = view
                .leases
                .get(&p)
                .map_or((None, 0), |l| (l.owner.as_deref(), l.epoch));
            if let Some(o) = owner {
                owned.entry(o).or_default().push(p);
            }
            partitions.push(PartitionStatus {
                partition: p,
                owner: owner.unwrap_or_default().to_string(),
                epoch,
                pending_events: event_backlog
                    .get(consumer_name(p).as_str())
                    .copied()
                    .unwrap_or(0),
            });
        }
        let nodes = view
            .nodes
            .values()
            .map(|n| ClusterNode {
                node_id: n.node_id.clone(),
                grpc_addr: n.grpc_addr.clone(),
                started_at_unix_ms: n.started_at,
                last_heartbeat_unix_ms: n.heartbeat_at,
                partitions: owned.get(n.node_id.as_str()).cloned().unwrap_or_default(),
            })
            .collect();
        Ok(ClusterStatusResponse {
            answered_by: self.node_id.clone(),
            nodes,
            partitions,
            consumers,
        })
    }
}

/// Sorts `evt-p2` before `evt-p10`: the name without its trailing digits, then their value.
fn natural_key(name: &str) -> (&str, u64, &str) {
    let stem = name.trim_end_matches(|c: char| c.is_ascii_digit());
    let number = name[stem.len()..].parse().unwrap_or(0);
    (stem, number, name)
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.status().await.map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::natural_key;

    #[test]
    fn consumers_sort_naturally() {
        let mut names = vec!["evt-p10", "evt-p2", "analytics", "evt-p1", "svc-x"];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(names, ["analytics", "evt-p1", "evt-p2", "evt-p10", "svc-x"]);
    }
}
