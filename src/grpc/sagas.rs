//! `SagaService`: any saga defined in `sagas/*.toml`.

use futures::StreamExt;
use sagaflow_proto::v1::saga_service_server::SagaService;
use sagaflow_proto::v1::{
    self, GetSagaRequest, ListDefinitionsRequest, ListDefinitionsResponse, StartSagaRequest,
    StartSagaResponse,
};
use tonic::{Request, Response, Status};

use super::{invalid, render, valid_id, BoxStream, SagaApi};

const MAX_INPUT: usize = 256 * 1024;

/// `SagaService` implementation.
#[derive(Debug, Clone)]
pub struct Sagas {
    api: SagaApi,
}

impl Sagas {
    /// Sagas over `api`.
    pub fn new(api: SagaApi) -> Self {
        Sagas { api }
    }
}

fn validate_saga_id(id: &str) -> Result<(), Status> {
    if !valid_id(id, 128) {
        return Err(invalid(
            "saga_id",
            "must be 1 to 128 characters of A-Z, a-z, 0-9, `_` or `-`",
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl SagaService for Sagas {
    async fn start_saga(
        &self,
        request: Request<StartSagaRequest>,
    ) -> Result<Response<StartSagaResponse>, Status> {
        let req = request.into_inner();
        let def = self.api.definition(&req.saga_name).ok_or_else(|| {
            invalid(
                "saga_name",
                format!(
                    "no saga named {:?} is defined",
                    req.saga_name.chars().take(64).collect::<String>()
                ),
            )
        })?;
        if req.input_json.len() > MAX_INPUT {
            return Err(invalid("input_json", format!("at most {MAX_INPUT} bytes")));
        }
        let value: serde_json::Value = serde_json::from_str(&req.input_json)
            .map_err(|e| invalid("input_json", format!("not JSON: {e}")))?;
        if !value.is_object() {
            return Err(invalid("input_json", "must be a JSON object"));
        }
        let id = if req.saga_id.is_empty() {
            format!("{}-{:016x}", def.name, rand::random::<u64>())
        } else {
            req.saga_id
        };
        validate_saga_id(&id)?;
        let (created, _) = self
            .api
            .start(&def, &id, req.input_json.into_bytes())
            .await?;
        Ok(Response::new(StartSagaResponse {
            saga_id: id,
            created,
        }))
    }

    async fn get_saga(
        &self,
        request: Request<GetSagaRequest>,
    ) -> Result<Response<v1::Saga>, Status> {
        let id = request.into_inner().saga_id;
        validate_saga_id(&id)?;
        let (saga, rev) = self.api.get(&id).await?;
        let def = self.api.definition(&saga.definition);
        Ok(Response::new(render::saga(&saga, rev, def.as_deref())))
    }

    type WatchSagaStream = BoxStream<v1::Saga>;

    async fn watch_saga(
        &self,
        request: Request<GetSagaRequest>,
    ) -> Result<Response<Self::WatchSagaStream>, Status> {
        let id = request.into_inner().saga_id;
        validate_saga_id(&id)?;
        let api = self.api.clone();
        let stream = self.api.watch(&id).await?.map(move |item| {
            item.map(|(saga, rev)| {
                let def = api.definition(&saga.definition);
                render::saga(&saga, rev, def.as_deref())
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_definitions(
        &self,
        _request: Request<ListDefinitionsRequest>,
    ) -> Result<Response<ListDefinitionsResponse>, Status> {
        let mut definitions: Vec<v1::Definition> = self
            .api
            .definitions()
            .values()
            .map(|d| v1::Definition {
                name: d.name.clone(),
                description: d.description.clone(),
                source: d.source.display().to_string(),
                stages: d
                    .stages
                    .iter()
                    .map(|s| v1::DefinitionStage {
                        name: s.name.clone(),
                        steps: s
                            .steps
                            .iter()
                            .filter_map(|&i| d.steps.get(i))
                            .map(|st| st.name.clone())
                            .collect(),
                        status: s.status.clone().unwrap_or_default(),
                    })
                    .collect(),
                after_compensation: d
                    .after_compensation
                    .as_ref()
                    .map(|s| s.name.clone())
                    .unwrap_or_default(),
                fingerprint: d.fingerprint,
            })
            .collect();
        definitions.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(ListDefinitionsResponse { definitions }))
    }
}
