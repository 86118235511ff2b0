//! `AnalyticsService`: the demo analytics' sales report, read from its totals in KV (any node
//! answers, whichever node counted the events).

use async_nats::jetstream;
use sagaflow_proto::v1::analytics_service_server::AnalyticsService;
use sagaflow_proto::v1::{GetSalesRequest, SalesReport};
use tonic::{Request, Response, Status};

use crate::demo;

/// `AnalyticsService` implementation.
#[derive(Clone)]
pub struct Analytics {
    js: jetstream::Context,
}

impl std::fmt::Debug for Analytics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analytics").finish_non_exhaustive()
    }
}

impl Analytics {
    /// The service over the node's JetStream context.
    pub fn new(js: jetstream::Context) -> Self {
        Analytics { js }
    }
}

#[tonic::async_trait]
impl AnalyticsService for Analytics {
    async fn get_sales(
        &self,
        _request: Request<GetSalesRequest>,
    ) -> Result<Response<SalesReport>, Status> {
        match demo::sales(&self.js).await {
            Ok(report) => Ok(Response::new(report)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the sales report");
                Err(Status::unavailable(e.to_string()))
            }
        }
    }
}
