//! `SagaService`: any saga defined in `sagas/*.toml`.

use futures::StreamExt;
use sagaflow_actors::machine::{Happening, Intervention, OperatorAction, Phase, Saga};
use sagaflow_actors::wire::Control;
use sagaflow_proto::v1::saga_service_server::SagaService;
use sagaflow_proto::v1::{
    self, GetSagaRequest, InterveneSagaRequest, InterveneSagaResponse, ListDefinitionsRequest,
    ListDefinitionsResponse, ListSagasNeedingAttentionRequest, ListSagasNeedingAttentionResponse,
    StartSagaRequest, StartSagaResponse,
};
use tonic::{Request, Response, Status};

use crate::auth::Identity;

use super::{invalid, render, valid_id, BoxStream, SagaApi};
use crate::index::Listed;

use super::MAX_INPUT;

/// Longest `operator`, `reason` or `request_id` of an intervention.
const MAX_TEXT: usize = 1024;

/// How long `InterveneSaga` waits for the saga's owner to apply the action.
const INTERVENE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most sagas `ListSagasNeedingAttention` returns.
const MAX_ATTENTION: u32 = 1000;
/// Unfinished sagas one `ListSagasNeedingAttention` page loads at most (the page may then
/// hold fewer than its limit, with a token for the rest).
const ATTENTION_EXAMINED: usize = 5000;

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

impl Sagas {
    /// The command stream's consumer names (which services somebody serves), or `None` if
    /// they cannot be listed now (bounded: a listing never waits long for them).
    async fn served(&self) -> Option<std::collections::HashSet<String>> {
        match tokio::time::timeout(
            std::time::Duration::from_secs(2),
            self.api.command_consumers(),
        )
        .await
        {
            Ok(Ok(c)) => Some(c),
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::telemetry::error_chain(&e), "cannot list the command consumers");
                None
            }
            Err(_) => {
                tracing::warn!("listing the command consumers timed out");
                None
            }
        }
    }
}

fn validate_saga_id(id: &str) -> Result<(), Status> {
    if !valid_id(id, sagaflow_actors::ids::MAX_SAGA_ID) {
        return Err(invalid(
            "saga_id",
            "must be 1 to 128 characters of A-Z, a-z, 0-9, `_` or `-`",
        ));
    }
    Ok(())
}

fn text(field: &str, value: String, required: bool) -> Result<String, Status> {
    if required && value.trim().is_empty() {
        return Err(invalid(field, "required"));
    }
    if value.len() > MAX_TEXT {
        return Err(invalid(field, format!("at most {MAX_TEXT} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(value)
}

/// What became of intervention `request_id`: `Some("")` applied, `Some(why)` refused, `None`
/// not applied yet.
fn outcome_of(saga: &sagaflow_actors::machine::Saga, request_id: &str) -> Option<String> {
    saga.history.iter().rev().find_map(|h| match &h.what {
        Happening::Intervened { id, refused, .. } if id == request_id => Some(refused.clone()),
        _ => None,
    })
}

/// The answer to an intervention its saga's owner applied or refused.
fn answered(
    saga_id: String,
    request_id: String,
    refused: String,
    saga: v1::Saga,
) -> Response<InterveneSagaResponse> {
    Response::new(InterveneSagaResponse {
        saga_id,
        request_id,
        applied: refused.is_empty(),
        refused,
        saga: Some(saga),
    })
}

/// The services `def` calls, with their actions, and whether each has a consumer group.
fn definition_services(
    def: &sagaflow_actors::definition::SagaDefinition,
    consumers: &std::collections::HashSet<String>,
) -> Vec<v1::CalledService> {
    let mut out: Vec<v1::CalledService> = Vec::new();
    let steps = def.steps.iter().chain(def.after_compensation.as_ref());
    let actions = steps.flat_map(|s| std::iter::once(&s.action).chain(s.compensation.as_ref()));
    // A wait step's action names a signal, not a service.
    for action in actions.filter(|a| !a.service.is_empty()) {
        let i = match out.iter().position(|s| s.name == action.service) {
            Some(i) => i,
            None => {
                out.push(v1::CalledService {
                    name: action.service.clone(),
                    actions: Vec::new(),
                    consumer: consumers.contains(&format!("svc-{}", action.service)),
                });
                out.len() - 1
            }
        };
        if !out[i].actions.contains(&action.name) {
            out[i].actions.push(action.name.clone());
        }
    }
    out
}

#[tonic::async_trait]
impl SagaService for Sagas {
    async fn intervene_saga(
        &self,
        request: Request<InterveneSagaRequest>,
    ) -> Result<Response<InterveneSagaResponse>, Status> {
        // With authentication, the operator is whoever the token names; without, the caller
        // says who they are.
        let identity = request.extensions().get::<Identity>().cloned();
        let req = request.into_inner();
        validate_saga_id(&req.saga_id)?;
        let operator = match identity {
            Some(id) => id.name,
            None => text("operator", req.operator, true)?,
        };
        let reason = text("reason", req.reason, false)?;
        let request_id = text("request_id", req.request_id, false)?;
        let request_id = if request_id.is_empty() {
            format!("op-{:016x}", rand::random::<u64>())
        } else {
            request_id
        };
        let (saga, rev) = self.api.get(&req.saga_id).await?;
        // A repeated request (same id) answers with what became of the first one.
        if let Some(refused) = outcome_of(&saga, &request_id) {
            let def = self.api.definition_of(&saga);
            let saga = render::saga(&saga, rev, def.as_deref());
            return Ok(answered(req.saga_id, request_id, refused, saga));
        }
        let def = self.api.definition_of(&saga).ok_or_else(|| {
            Status::failed_precondition(format!(
                "saga definition `{}` is not loaded on this node",
                saga.definition
            ))
        })?;
        let step = |required: bool| -> Result<Option<usize>, Status> {
            if req.step.is_empty() {
                return if required {
                    Err(invalid("step", "required for this action"))
                } else {
                    Ok(None)
                };
            }
            let index =
                (0..def.step_slots()).find(|&i| def.step(i).is_some_and(|st| st.name == req.step));
            match index {
                Some(i) => Ok(Some(i)),
                None => Err(invalid(
                    "step",
                    format!(
                        "saga `{}` has no step {:?}",
                        def.name,
                        req.step.chars().take(64).collect::<String>()
                    ),
                )),
            }
        };
        let action = match req.action.as_str() {
            "retry" => OperatorAction::Retry { step: step(false)? },
            "skip" | "settle" => {
                let output = if req.output_json.is_empty() {
                    Vec::new()
                } else {
                    if req.output_json.len() > MAX_INPUT {
                        return Err(invalid("output_json", format!("at most {MAX_INPUT} bytes")));
                    }
                    serde_json::from_str::<serde_json::Value>(&req.output_json)
                        .map_err(|e| invalid("output_json", format!("not JSON: {e}")))?;
                    req.output_json.into_bytes()
                };
                let step = step(true)?.unwrap_or_default();
                if req.action == "settle" {
                    OperatorAction::Settle { step, output }
                } else {
                    OperatorAction::Skip { step, output }
                }
            }
            "compensate" => OperatorAction::Compensate,
            "cancel" => OperatorAction::Cancel,
            "abandon" => OperatorAction::Abandon,
            other => {
                return Err(invalid(
                    "action",
                    format!(
                        "{:?} is not one of retry, skip, settle, compensate, cancel, abandon",
                        other.chars().take(32).collect::<String>()
                    ),
                ))
            }
        };
        saga.check(&def, &action)
            .map_err(|why| Status::failed_precondition(format!("{}: {why}", action.name())))?;
        let intervention = Intervention {
            id: request_id.clone(),
            action,
            operator,
            reason,
        };
        self.api
            .publish_control(
                &req.saga_id,
                "intervene",
                &Control::Intervene {
                    intervention,
                    at: self.api.now_ms(),
                },
                format!("intervene/{}/{request_id}", req.saga_id),
            )
            .await?;
        // Wait (bounded) for the owner to journal it.
        let deadline = tokio::time::Instant::now() + INTERVENE_WAIT;
        loop {
            let (saga, rev) = self.api.get(&req.saga_id).await?;
            if let Some(refused) = outcome_of(&saga, &request_id) {
                let saga = render::saga(&saga, rev, Some(&def));
                return Ok(answered(req.saga_id, request_id, refused, saga));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(InterveneSagaResponse {
                    saga_id: req.saga_id,
                    request_id,
                    applied: false,
                    refused: String::new(),
                    saga: None,
                }));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    async fn list_sagas_needing_attention(
        &self,
        request: Request<ListSagasNeedingAttentionRequest>,
    ) -> Result<Response<ListSagasNeedingAttentionResponse>, Status> {
        let req = request.into_inner();
        if !req.saga_name.is_empty() && self.api.definition(&req.saga_name).is_none() {
            return Err(invalid("saga_name", "no saga with this name is defined"));
        }
        let limit = match req.limit {
            0 => 100,
            n => n.min(MAX_ATTENTION),
        } as usize;
        let after = super::orders::parse_token(&req.page_token)?;
        let now = self.api.now_ms();
        let name = req.saga_name.as_str();
        // Finished sagas are never candidates: only unfinished ones are loaded.
        let keep = |l: &Listed| {
            l.headers
                .as_ref()
                .is_none_or(|h| !h.phase.is_terminal() && (name.is_empty() || h.definition == name))
        };
        // A saga waiting on a step whose service nobody serves waits for ever: listed too
        // (one look at the command stream's consumers per page).
        let consumers = self.served().await;
        let unserved = |saga: &Saga| {
            let consumers = consumers.as_ref()?;
            let def = self.api.definition_of(saga)?;
            render::unserved(saga, &def, consumers)
        };
        let accept = |saga: &Saga| {
            if !name.is_empty() && saga.definition != name {
                return false;
            }
            let stuck = self
                .api
                .definition_of(saga)
                .as_deref()
                .and_then(|d| saga.stuck_at(d, crate::config::STUCK_MULTIPLE))
                .is_some_and(|at| now >= at);
            saga.phase == Phase::NeedsAttention || stuck || unserved(saga).is_some()
        };
        let (sagas, next) = self
            .api
            .list_page(after.as_ref(), limit, ATTENTION_EXAMINED, keep, accept)
            .await?;
        let out = sagas
            .iter()
            .map(|s| {
                let mut v = render::saga(s, 0, self.api.definition_of(s).as_deref());
                if let Some(why) = unserved(s) {
                    v.progress = format!("{why}; {}", v.progress);
                }
                v
            })
            .collect();
        Ok(Response::new(ListSagasNeedingAttentionResponse {
            sagas: out,
            next_page_token: next.map(|c| c.token()).unwrap_or_default(),
        }))
    }

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
        let def = self.api.definition_of(&saga);
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
            item.map_err(Status::from).map(|(saga, rev)| {
                let def = api.definition_of(&saga);
                render::saga(&saga, rev, def.as_deref())
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_definitions(
        &self,
        _request: Request<ListDefinitionsRequest>,
    ) -> Result<Response<ListDefinitionsResponse>, Status> {
        // Which services somebody serves (bounded: a definitions list never waits long).
        let consumers = match tokio::time::timeout(
            std::time::Duration::from_secs(2),
            self.api.command_consumers(),
        )
        .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::telemetry::error_chain(&e), "cannot list the command consumers");
                Default::default()
            }
            Err(_) => {
                tracing::warn!("listing the command consumers timed out");
                Default::default()
            }
        };
        let mut definitions: Vec<v1::Definition> = self
            .api
            .definitions()
            .iter()
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
                services: definition_services(d, &consumers),
                fingerprint: d.fingerprint,
            })
            .collect();
        definitions.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(ListDefinitionsResponse { definitions }))
    }

    async fn signal_saga(
        &self,
        request: Request<v1::SignalSagaRequest>,
    ) -> Result<Response<v1::SignalSagaResponse>, Status> {
        let req = request.into_inner();
        validate_saga_id(&req.saga_id)?;
        let done = self
            .api
            .signal(
                &req.saga_id,
                &req.name,
                req.payload_json.into_bytes(),
                req.signal_id,
            )
            .await?;
        Ok(Response::new(v1::SignalSagaResponse {
            saga_id: req.saga_id,
            signal_id: done.signal_id,
            duplicate: done.duplicate,
        }))
    }
}
