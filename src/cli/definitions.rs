//! `sagaflow saga plan|apply|versions|show|rollback`: saga definitions as live, versioned
//! configuration (`DefinitionService`, see `crate::definitions`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use sagaflow_proto::v1::definition_service_client::DefinitionServiceClient;
use sagaflow_proto::v1::{
    DefinitionFile, DefinitionFiles, DefinitionPlan, DefinitionVersion, GetDefinitionRequest,
    ListDefinitionVersionsRequest, RollbackDefinitionRequest,
};

use super::remote::{call, connect, print_json};
use super::{emit, SagaCommand};

/// Exit code of `saga plan` when there are changes (0: none; 1: errors).
pub const CHANGES: u8 = 2;

/// Runs a definitions command.
pub async fn run(command: SagaCommand) -> anyhow::Result<ExitCode> {
    match command {
        SagaCommand::Plan {
            server,
            files,
            json,
        } => {
            let files = read(&files)?;
            let mut client = DefinitionServiceClient::new(connect(&server).await?);
            let plan = call(client.plan_definitions(files)).await?;
            let changed = plan.sagas.iter().any(|s| !s.changes.is_empty());
            if json.json {
                print_json(&plan_json(&plan))?;
            } else {
                emit(&plan_text(&plan, false))?;
            }
            Ok(if changed {
                ExitCode::from(CHANGES)
            } else {
                ExitCode::SUCCESS
            })
        }
        SagaCommand::Apply {
            server,
            files,
            json,
        } => {
            let files = read(&files)?;
            let mut client = DefinitionServiceClient::new(connect(&server).await?);
            let plan = call(client.apply_definitions(files)).await?;
            if json.json {
                print_json(&plan_json(&plan))?;
            } else {
                emit(&plan_text(&plan, true))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        SagaCommand::Versions { server, name, json } => {
            let mut client = DefinitionServiceClient::new(connect(&server).await?);
            let versions =
                call(client.list_definition_versions(ListDefinitionVersionsRequest { name }))
                    .await?
                    .versions;
            if json.json {
                let list: Vec<_> = versions.iter().map(version_json).collect();
                print_json(&serde_json::json!({ "versions": list }))?;
            } else {
                emit(&versions_text(&versions))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        SagaCommand::Show {
            server,
            name,
            version,
        } => {
            let mut client = DefinitionServiceClient::new(connect(&server).await?);
            let got = call(client.get_definition(GetDefinitionRequest {
                name,
                version: version.unwrap_or_default(),
            }))
            .await?;
            if let Some(v) = &got.version {
                emit(&format!(
                    "# saga {} version {}{} (applied by {} at {}, from {})\n",
                    v.name,
                    v.version,
                    if v.active { ", active" } else { "" },
                    v.applied_by,
                    super::render::time(v.applied_at_unix_ms),
                    v.file
                ))?;
            }
            emit(&got.text)?;
            Ok(ExitCode::SUCCESS)
        }
        SagaCommand::Rollback {
            server,
            name,
            to,
            json,
        } => {
            let mut client = DefinitionServiceClient::new(connect(&server).await?);
            let plan =
                call(client.rollback_definition(RollbackDefinitionRequest { name, version: to }))
                    .await?;
            if json.json {
                print_json(&plan_json(&plan))?;
            } else {
                emit(&plan_text(&plan, true))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        _ => bail!("not a definitions command"),
    }
}

/// The files of `paths` (a folder stands for its `*.toml`, sorted), with their texts.
fn read(paths: &[PathBuf]) -> anyhow::Result<DefinitionFiles> {
    let mut files = Vec::new();
    for path in paths {
        let listed: Vec<PathBuf> = if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot read folder {}", path.display()))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
                .collect();
            found.sort();
            if found.is_empty() {
                bail!("no *.toml files in {}", path.display());
            }
            found
        } else {
            vec![path.clone()]
        };
        for file in listed {
            files.push(DefinitionFile {
                path: display(&file),
                text: std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?,
            });
        }
    }
    Ok(DefinitionFiles { files })
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// A plan (or what an apply or rollback did), one block per saga.
pub fn plan_text(plan: &DefinitionPlan, applied: bool) -> String {
    let mut out = String::new();
    for saga in &plan.sagas {
        let from = if saga.active_version.is_empty() {
            "new".to_string()
        } else {
            saga.active_version.clone()
        };
        if saga.changes.is_empty() {
            out.push_str(&format!(
                "saga `{}`: no changes (version {})\n",
                saga.name, saga.new_version
            ));
            continue;
        }
        let n = saga.changes.len();
        let verb = if applied { "applied" } else { "would apply" };
        out.push_str(&format!(
            "saga `{}`: {n} change{} ({from} → {}), {verb}\n",
            saga.name,
            if n == 1 { "" } else { "s" },
            saga.new_version
        ));
        for change in &saga.changes {
            out.push_str(&format!("  {change}\n"));
        }
    }
    if !applied {
        let changed = plan.sagas.iter().filter(|s| !s.changes.is_empty()).count();
        out.push_str(&match changed {
            0 => "nothing to apply\n".to_string(),
            n => format!(
                "{n} saga{} to change: `sagaflow saga apply` with the same files applies it\n",
                if n == 1 { "" } else { "s" }
            ),
        });
    }
    out
}

fn plan_json(plan: &DefinitionPlan) -> serde_json::Value {
    serde_json::json!({
        "sagas": plan.sagas.iter().map(|s| serde_json::json!({
            "name": s.name,
            "active_version": s.active_version,
            "new_version": s.new_version,
            "changes": s.changes,
        })).collect::<Vec<_>>()
    })
}

fn version_json(v: &DefinitionVersion) -> serde_json::Value {
    serde_json::json!({
        "name": v.name,
        "version": v.version,
        "file": v.file,
        "applied_by": v.applied_by,
        "applied_at_unix_ms": v.applied_at_unix_ms,
        "active": v.active,
        "running": v.running,
    })
}

/// A table of versions, oldest first.
pub fn versions_text(versions: &[DefinitionVersion]) -> String {
    let mut out = format!(
        "{:<18} {:<7} {:>8}  {:<24} {}\n",
        "VERSION", "ACTIVE", "RUNNING", "APPLIED", "BY"
    );
    for v in versions {
        out.push_str(&format!(
            "{:<18} {:<7} {:>8}  {:<24} {}\n",
            v.version,
            if v.active { "yes" } else { "" },
            v.running,
            super::render::time(v.applied_at_unix_ms),
            v.applied_by
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use sagaflow_actors::definition::{parse, plan};
    use sagaflow_proto::v1::SagaChanges;

    use super::*;

    /// The plan `saga plan` prints for `tests/fixtures/sagas/versions/v2` against v1, checked
    /// against its golden file (`UPDATE_GOLDEN=1` rewrites it after a deliberate change).
    #[test]
    fn the_plan_text_matches_its_golden_file() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sagas/versions");
        let load = |v: &str| {
            let path = root.join(v).join("pin.toml");
            parse(&std::fs::read_to_string(&path).unwrap(), &path).unwrap()
        };
        let (v1, v2) = (load("v1"), load("v2"));
        let changes =
            |from: Option<&sagaflow_actors::definition::SagaDefinition>, to| SagaChanges {
                name: "pin".into(),
                active_version: from.map(plan::version).unwrap_or_default(),
                new_version: plan::version(to),
                changes: plan::diff(from, to)
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            };
        let text = [
            plan_text(
                &DefinitionPlan {
                    sagas: vec![changes(Some(&v1), &v2)],
                },
                false,
            ),
            plan_text(
                &DefinitionPlan {
                    sagas: vec![changes(Some(&v2), &v2)],
                },
                false,
            ),
            plan_text(
                &DefinitionPlan {
                    sagas: vec![changes(None, &v1)],
                },
                true,
            ),
        ]
        .join("---\n")
        // Versions are content hashes: stable, but named here so the file reads as a plan.
        .replace(&plan::version(&v1), "<v1>")
        .replace(&plan::version(&v2), "<v2>");
        let golden = root.join("plan.golden");
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden, &text).unwrap();
        }
        assert_eq!(text, std::fs::read_to_string(&golden).unwrap());
    }
}
