//! `DefinitionService`: saga definitions as live, versioned configuration
//! ([`crate::definitions`]).

use sagaflow_proto::v1::definition_service_server::DefinitionService;
use sagaflow_proto::v1::{
    self, DefinitionFiles, DefinitionPlan, GetDefinitionRequest, GetDefinitionResponse,
    ListDefinitionVersionsRequest, ListDefinitionVersionsResponse, RollbackDefinitionRequest,
};
use tonic::{Request, Response, Status};

use super::{invalid, valid_id, SagaApi};
use crate::auth::Identity;
use crate::definitions::{DefinitionError, DefinitionStore, SagaPlan, VersionInfo};

/// Most files one apply or plan takes.
const MAX_FILES: usize = 256;
/// Largest file, in bytes.
const MAX_FILE: usize = 256 * 1024;

impl From<DefinitionError> for Status {
    fn from(e: DefinitionError) -> Status {
        match e {
            e @ (DefinitionError::Invalid(_) | DefinitionError::Argument { .. }) => {
                Status::invalid_argument(e.to_string())
            }
            DefinitionError::NotFound(m) => Status::not_found(m),
            DefinitionError::Corrupt(m) => Status::data_loss(m),
            e @ DefinitionError::Storage { .. } => {
                let chain = crate::telemetry::error_chain(&e);
                tracing::warn!(error = %chain, "definitions bucket unavailable");
                Status::unavailable(chain)
            }
        }
    }
}

/// `DefinitionService` implementation.
#[derive(Debug, Clone)]
pub struct Definitions {
    store: DefinitionStore,
    api: SagaApi,
}

impl Definitions {
    /// The service over `store`; `api` counts the sagas running on each version.
    pub fn new(store: DefinitionStore, api: SagaApi) -> Self {
        Definitions { store, api }
    }
}

fn files(req: DefinitionFiles) -> Result<Vec<(String, String)>, Status> {
    if req.files.len() > MAX_FILES {
        return Err(invalid("files", format!("at most {MAX_FILES} files")));
    }
    req.files
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            if f.text.len() > MAX_FILE {
                return Err(invalid(
                    &format!("files[{i}].text"),
                    format!("{} bytes, at most {MAX_FILE}", f.text.len()),
                ));
            }
            let path = if f.path.is_empty() {
                format!("files[{i}]")
            } else {
                f.path
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(512)
                    .collect()
            };
            Ok((path, f.text))
        })
        .collect()
}

fn plan(plans: Vec<SagaPlan>) -> DefinitionPlan {
    DefinitionPlan {
        sagas: plans
            .into_iter()
            .map(|p| v1::SagaChanges {
                name: p.name,
                active_version: p.active_version,
                new_version: p.new_version,
                changes: p.changes,
            })
            .collect(),
    }
}

fn who(identity: Option<Identity>) -> String {
    identity.map_or_else(|| "anonymous".to_string(), |i| i.name)
}

fn version(info: VersionInfo, running: u64) -> v1::DefinitionVersion {
    v1::DefinitionVersion {
        name: info.record.name,
        version: info.record.version,
        file: info.record.file,
        applied_by: info.record.applied_by,
        applied_at_unix_ms: info.record.applied_at_unix_ms,
        active: info.active,
        running,
    }
}

fn saga_name(name: &str) -> Result<(), Status> {
    if valid_id(name, 64) {
        Ok(())
    } else {
        Err(invalid("name", "a saga name is 1 to 64 of [A-Za-z0-9_-]"))
    }
}

#[tonic::async_trait]
impl DefinitionService for Definitions {
    async fn plan_definitions(
        &self,
        request: Request<DefinitionFiles>,
    ) -> Result<Response<DefinitionPlan>, Status> {
        let files = files(request.into_inner())?;
        Ok(Response::new(plan(self.store.plan(&files)?)))
    }

    async fn apply_definitions(
        &self,
        request: Request<DefinitionFiles>,
    ) -> Result<Response<DefinitionPlan>, Status> {
        let by = who(request.extensions().get::<Identity>().cloned());
        let files = files(request.into_inner())?;
        let plans = self.store.apply(&files, &by).await?;
        for p in plans.iter().filter(|p| !p.changes.is_empty()) {
            tracing::info!(saga = %p.name, version = %p.new_version, was = %p.active_version, by, "definition applied");
        }
        Ok(Response::new(plan(plans)))
    }

    async fn list_definition_versions(
        &self,
        request: Request<ListDefinitionVersionsRequest>,
    ) -> Result<Response<ListDefinitionVersionsResponse>, Status> {
        let name = request.into_inner().name;
        saga_name(&name)?;
        let versions = self.store.versions(&name).await?;
        let running = self.api.running_versions(&name).await?;
        let versions = versions
            .into_iter()
            .map(|v| {
                let n = u64::from_str_radix(&v.record.version, 16)
                    .ok()
                    .and_then(|fp| running.get(&Some(fp)).copied())
                    .unwrap_or(0);
                version(v, n)
            })
            .collect();
        Ok(Response::new(ListDefinitionVersionsResponse { versions }))
    }

    async fn get_definition(
        &self,
        request: Request<GetDefinitionRequest>,
    ) -> Result<Response<GetDefinitionResponse>, Status> {
        let req = request.into_inner();
        saga_name(&req.name)?;
        let wanted = if req.version.is_empty() {
            self.store
                .active_record(&req.name)
                .await?
                .ok_or_else(|| {
                    Status::not_found(format!("no saga definition `{}` is active", req.name))
                })?
                .version
        } else {
            req.version
        };
        let record = self
            .store
            .record(&req.name, &wanted)
            .await?
            .ok_or_else(|| {
                Status::not_found(format!("saga `{}` has no version {wanted}", req.name))
            })?;
        let active = self
            .store
            .active_record(&req.name)
            .await?
            .map(|a| a.version);
        let text = record.text.clone();
        let info = VersionInfo {
            active: active.as_deref() == Some(record.version.as_str()),
            record,
        };
        Ok(Response::new(GetDefinitionResponse {
            version: Some(version(info, 0)),
            text,
        }))
    }

    async fn rollback_definition(
        &self,
        request: Request<RollbackDefinitionRequest>,
    ) -> Result<Response<DefinitionPlan>, Status> {
        let by = who(request.extensions().get::<Identity>().cloned());
        let req = request.into_inner();
        saga_name(&req.name)?;
        let p = self.store.rollback(&req.name, &req.version, &by).await?;
        tracing::info!(saga = %p.name, version = %p.new_version, was = %p.active_version, by, "definition rolled back");
        Ok(Response::new(plan(vec![p])))
    }
}
