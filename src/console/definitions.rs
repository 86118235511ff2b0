//! Definitions: each saga drawn as a diagram (stages in order, a stage's parallel steps side
//! by side, each step's compensation, the pivot and the waits marked), its retries and timeouts
//! in a table, the services it calls and whether anyone serves them, and its versions (any
//! version can be drawn, and its file read).

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use maud::{html, Markup};
use sagaflow_actors::definition::{plan, RetryPolicy, SagaDefinition, Step};
use sagaflow_proto::v1::definition_service_server::DefinitionService;
use sagaflow_proto::v1::saga_service_server::SagaService;
use sagaflow_proto::v1::{
    self, GetDefinitionRequest, ListDefinitionVersionsRequest, ListDefinitionsRequest,
};
use serde::Deserialize;

use super::layout::{self, span, Nav};
use super::session::Viewer;
use super::{Console, Ctx};

fn retry_text(r: &RetryPolicy) -> String {
    let mut s = format!(
        "{} attempt{}",
        r.max_attempts,
        if r.max_attempts == 1 { "" } else { "s" }
    );
    if r.max_attempts > 1 {
        s.push_str(&format!(
            ", backoff {}→{} ×{}",
            span(r.initial_backoff),
            span(r.max_backoff),
            r.multiplier
        ));
    }
    if !r.non_retryable.is_empty() {
        s.push_str(&format!("; not retried: {}", r.non_retryable.join(", ")));
    }
    s
}

fn step_box(step: &Step) -> Markup {
    let mut class = String::from("step");
    if step.pivot {
        class.push_str(" pivot");
    }
    if step.wait_for().is_some() {
        class.push_str(" wait");
    }
    let tip = format!(
        "timeout {}; retries: {}{}",
        span(step.timeout),
        retry_text(&step.retry),
        step.compensation
            .as_ref()
            .map(|_| format!(
                "; compensation retries: {}",
                retry_text(&step.compensation_retry)
            ))
            .unwrap_or_default()
    );
    html! {
        div class=(class) title=(tip) data-step=(step.name) {
            div.step-name {
                (step.name)
                @if step.pivot { " " span.badge.pivot title="The saga's outcome is decided once it succeeds; it cannot be undone" { "PIVOT" } }
                @if step.wait_for().is_some() { " " span.badge.wait { "WAIT" } }
            }
            @if let Some(signal) = step.wait_for() {
                div.act { "waits for " code { (signal) } }
            } @else {
                div.act { code { (step.action) } }
            }
            @match &step.compensation {
                Some(c) => { div.comp { span aria-hidden="true" { "↩ " } span.visually-hidden { "undone by " } code { (c) } } }
                None if step.pivot => { div.comp.none { "cannot be undone" } }
                None => { div.comp.none { "nothing to undo" } }
            }
            div.meta { "timeout " (span(step.timeout)) " · " (retry_text(&step.retry)) }
        }
    }
}

/// A definition drawn: stages top to bottom, a stage's steps side by side.
pub(crate) fn diagram(def: &SagaDefinition) -> Markup {
    html! {
        figure.diagram {
            ol.flow aria-label=(format!("Stages of saga {}", def.name)) {
                @for (i, stage) in def.stages.iter().enumerate() {
                    li.stage {
                        div.stage-head {
                            span.num { (i + 1) }
                            strong { (stage.name) }
                            @if stage.steps.len() > 1 { span.par { (stage.steps.len()) " steps in parallel" } }
                            @if let Some(status) = &stage.status { span.sets { "then status " span.badge.muted { (status) } } }
                        }
                        ul.steps {
                            @for &i in &stage.steps {
                                @if let Some(step) = def.steps.get(i) { li { (step_box(step)) } }
                            }
                        }
                    }
                }
                li.stage.end {
                    div.stage-head { span.num { "✓" } strong { "completed" } span.sets { "status " span.badge.ok { (def.statuses.completed) } } }
                }
            }
            @if let Some(after) = &def.after_compensation {
                div.after {
                    div.stage-head { span.num { "↩" } strong { "after compensation" } span.sets { "status " span.badge.undone { (def.statuses.compensated) } } }
                    ul.steps { li { (step_box(after)) } }
                }
            }
            figcaption {
                "Stages run top to bottom; the steps of one stage run side by side, in parallel. If a step fails for good, the completed steps are undone (↩) in reverse order"
                @if def.after_compensation.is_some() { ", then the after-compensation step runs" }
                ", and the saga ends " (def.statuses.compensated) ". Deadline " (span(def.deadline)) " from the start."
            }
        }
    }
}

/// Every step's policies, as a table.
fn policies(def: &SagaDefinition) -> Markup {
    let steps: Vec<(&str, &Step)> = def
        .steps
        .iter()
        .map(|s| (def.stages.get(s.stage).map_or("", |g| g.name.as_str()), s))
        .chain(
            def.after_compensation
                .iter()
                .map(|s| ("after compensation", s)),
        )
        .collect();
    html! {
        div.scroll {
            table.policies {
                thead { tr {
                    th scope="col" { "Step" } th scope="col" { "Stage" } th scope="col" { "Does" } th scope="col" { "Undone by" }
                    th scope="col" { "Timeout" } th scope="col" { "Retries" } th scope="col" { "Compensation retries" }
                } }
                tbody {
                    @for (stage, s) in steps {
                        tr {
                            th scope="row" { (s.name) @if s.pivot { " " span.badge.pivot { "PIVOT" } } }
                            td { (stage) }
                            td { @if let Some(sig) = s.wait_for() { "wait for " code { (sig) } } @else { code { (s.action) } } }
                            td { @match &s.compensation { Some(c) => { code { (c) } } None => { span.muted { "—" } } } }
                            td { (span(s.timeout)) }
                            td { (retry_text(&s.retry)) }
                            td { @if s.compensation.is_some() { (retry_text(&s.compensation_retry)) } @else { span.muted { "—" } } }
                        }
                    }
                }
            }
        }
    }
}

async fn listed(console: &Console) -> Vec<v1::Definition> {
    match console
        .inner
        .sagas
        .list_definitions(tonic::Request::new(ListDefinitionsRequest {}))
        .await
    {
        Ok(r) => r.into_inner().definitions,
        Err(e) => {
            tracing::debug!(error = %e, "console: list definitions");
            Vec::new()
        }
    }
}

fn services(listed: Option<&v1::Definition>) -> Markup {
    html! {
        @if let Some(d) = listed {
            ul.services aria-label="Services it calls" {
                // A wait step names no service: nothing serves it, nothing needs to.
                @for s in d.services.iter().filter(|s| !s.name.is_empty()) {
                    li class=(if s.consumer { "served" } else { "unserved" }) {
                        strong { (s.name) } " " span.muted { (s.actions.join(", ")) } " "
                        @if s.consumer { span.badge.ok title=(format!("consumer group svc-{}", s.name)) { "served" } }
                        @else { span.badge.bad title=(format!("no consumer group svc-{}: its steps wait until they time out", s.name)) { "no consumer" } }
                    }
                }
            }
        }
    }
}

/// `GET /ui/definitions`.
pub(crate) async fn index(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
) -> Response {
    let console = &ctx.console;
    let mut defs = console.inner.api.definitions();
    defs.sort_by(|a, b| a.name.cmp(&b.name));
    let listed = listed(console).await;
    let body = html! {
        h1 { "Definitions" }
        p.hint { "The active version of each saga: what new sagas start on. Sagas in flight keep the version they started on." }
        @for d in &defs {
            section.card.definition aria-labelledby=(format!("d-{}", d.name)) {
                h2 #(format!("d-{}", d.name)) { a href=(format!("/ui/definitions/{}", d.name)) { (d.name) } " " span.muted.small { "version " code { (plan::version(d)) } } }
                p { (d.description) }
                (services(listed.iter().find(|l| l.name == d.name)))
                (diagram(d))
                p { a href=(format!("/ui/definitions/{}", d.name)) { "Retries, timeouts and versions of " (d.name) " →" } }
            }
        }
    };
    layout::page(
        console,
        &viewer,
        Nav::Definitions,
        "Definitions",
        None,
        body,
    )
    .into_response()
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct VersionQuery {
    #[serde(default)]
    version: String,
}

/// The version `version` of saga `name`: from this node's catalog, else parsed from its stored
/// file.
async fn version_of(
    console: &Console,
    name: &str,
    version: &str,
) -> Result<(std::sync::Arc<SagaDefinition>, String), tonic::Status> {
    let got = console
        .inner
        .definitions
        .get_definition(tonic::Request::new(GetDefinitionRequest {
            name: name.to_string(),
            version: version.to_string(),
        }))
        .await?
        .into_inner();
    let known = u64::from_str_radix(version, 16)
        .ok()
        .and_then(|fp| console.inner.store.catalog().version(name, fp));
    if let Some(def) = known {
        return Ok((def, got.text));
    }
    let file = got.version.map(|v| v.file).unwrap_or_default();
    let def = sagaflow_actors::definition::parse(&got.text, std::path::Path::new(&file)).map_err(
        |errors| {
            tonic::Status::data_loss(format!(
                "version {version} of `{name}` does not parse here: {}",
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        },
    )?;
    Ok((std::sync::Arc::new(def), got.text))
}

/// `GET /ui/definitions/{name}[?version=…]`.
pub(crate) async fn show(
    State(ctx): State<Ctx>,
    Extension(viewer): Extension<Viewer>,
    Path(name): Path<String>,
    Query(q): Query<VersionQuery>,
) -> Response {
    let console = &ctx.console;
    let Some(active) = console.inner.api.definition(&name) else {
        let status = tonic::Status::not_found(format!(
            "no saga definition {} is active",
            sagaflow_actors::ids::quote(&name)
        ));
        return layout::error_page(console, &viewer, Nav::Definitions, "Definition", &status);
    };
    let active_version = plan::version(&active);
    let wanted = if q.version.trim().is_empty() {
        active_version.clone()
    } else {
        q.version.trim().to_string()
    };
    let drawn = version_of(console, &name, &wanted).await;
    let versions = console
        .inner
        .definitions
        .list_definition_versions(tonic::Request::new(ListDefinitionVersionsRequest {
            name: name.clone(),
        }))
        .await
        .map(|r| r.into_inner().versions);
    let listed = listed(console).await;
    let (def, text, error) = match drawn {
        Ok((def, text)) => (def, Some(text), None),
        Err(status) if wanted == active_version => {
            (active.clone(), None, Some(layout::status_text(&status)))
        }
        Err(status) => {
            return layout::error_page(console, &viewer, Nav::Definitions, &name, &status);
        }
    };
    let title = format!("Definition {name}");
    let body = html! {
        nav.crumbs aria-label="Breadcrumb" { a href="/ui/definitions" { "Definitions" } " / " (name) }
        h1 { (name) " " span.muted.small { "version " code { (plan::version(&def)) } }
            @if plan::version(&def) == active_version { " " span.badge.ok { "active" } } @else { " " span.badge.muted { "not active" } } }
        @if let Some(e) = &error { (layout::error_box(e)) }
        p { (def.description) }
        p { a href=(format!("/ui/sagas?definition={name}")) { "Sagas of " (name) " →" } }
        (services(listed.iter().find(|l| l.name == name)))
        section aria-labelledby="diagram-h" {
            h2 #diagram-h { "Diagram" }
            (diagram(&def))
        }
        section aria-labelledby="policies-h" {
            h2 #policies-h { "Retries and timeouts" }
            (policies(&def))
            p.hint { "Statuses: " (def.status_labels().join(" → ")) }
        }
        section aria-labelledby="versions-h" {
            h2 #versions-h { "Versions" }
            @match &versions {
                Err(status) => { (layout::error_box(&layout::status_text(status))) }
                Ok(list) => {
                    div.scroll {
                        table.versions {
                            thead { tr { th scope="col" { "Version" } th scope="col" { "File" } th scope="col" { "Applied by" } th scope="col" { "Applied" } th scope="col" { "Sagas running on it" } } }
                            tbody {
                                @for v in list {
                                    tr {
                                        td {
                                            a href=(format!("/ui/definitions/{name}?version={}", v.version)) aria-current=[(v.version == plan::version(&def)).then_some("true")] { code { (v.version) } }
                                            @if v.active { " " span.badge.ok { "active" } }
                                        }
                                        td { (v.file) }
                                        td { (v.applied_by) }
                                        td { (layout::time(v.applied_at_unix_ms)) }
                                        td { (v.running) }
                                    }
                                }
                            }
                        }
                    }
                    p.hint { "Change definitions with " code { "sagaflow saga plan" } " and " code { "sagaflow saga apply" } "; roll back with " code { "sagaflow saga rollback" } " (docs/saga-config.md)." }
                }
            }
        }
        @if let Some(text) = &text {
            details #source {
                summary { "The file of this version" }
                pre.source { (text) }
            }
        }
    };
    layout::page(console, &viewer, Nav::Definitions, &title, None, body).into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn load(file: &str) -> SagaDefinition {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        sagaflow_actors::definition::parse(&std::fs::read_to_string(&path).unwrap(), &path).unwrap()
    }

    #[test]
    fn the_order_saga_is_drawn_stage_by_stage_with_its_compensations() {
        let html = diagram(&load("sagas/order.toml")).into_string();
        let at = |s: &str| html.find(s).unwrap_or_else(|| panic!("{s} in {html}"));
        // Stages in order, the fulfilment's three steps in one stage, each with its undo.
        assert!(at("payment") < at("fulfilment"));
        assert!(html.contains("3 steps in parallel"));
        assert!(at("payment.charge") < at("payment.refund"));
        assert!(html.contains("inventory.release") && html.contains("shipping.cancel"));
        assert!(
            html.contains("after compensation") && html.contains("notification.send_cancellation")
        );
        assert!(html.contains(
            "5 attempts, backoff 100ms→5s ×2; not retried: declined, out_of_stock, invalid"
        ));
    }

    #[test]
    fn the_pivot_is_marked_as_what_cannot_be_undone() {
        let html = diagram(&load("sagas/trip.toml")).into_string();
        let pivot = html.find("data-step=\"issue_tickets\"").unwrap();
        let after = &html[pivot..];
        assert!(after.contains("PIVOT"), "{html}");
        assert!(after.contains("cannot be undone"), "{html}");
        assert!(html.contains("class=\"step pivot\""), "{html}");
    }

    #[test]
    fn a_wait_step_is_marked() {
        let html = diagram(&load("sagas/delivery.toml")).into_string();
        assert!(html.contains("WAIT"));
        assert!(html.contains("delivery.confirmed"));
        assert!(html.contains("timeout 72h"));
    }
}
