//! The saga file format: raw serde types and their validation into a [`SagaDefinition`].
//!
//! Loading is two passes, in the quickwit style:
//!
//! 1. `toml` deserializes the text into the `Raw*` types below. They mirror the file one to one,
//!    refuse unknown keys (`deny_unknown_fields`) and keep the byte span of every value
//!    ([`toml::Spanned`]), so later errors can point at `file:line:column`. A syntax or type error
//!    stops here: the `toml` crate reports only the first one.
//! 2. `Validator` walks the raw saga once, collects *every* semantic error (names,
//!    actions, durations, retry bounds, compensation rules, duplicates) and only if there is none
//!    builds the domain types. Errors are sorted by position in the file.
//!
//! # Field paths
//!
//! Each [`Error`] names the offending field as a dotted path, written the way the file spells
//! the keys, with 0-based array indices in file order:
//!
//! | path | means |
//! | --- | --- |
//! | `name`, `deadline` | a top-level key |
//! | `statuses.initial`, `defaults.retry.max_attempts` | a key of a (nested) table |
//! | `stage[1]` | the second `[[stage]]` |
//! | `stage[1].step[0].compensation` | a key of the first `[[stage.step]]` of the second stage |
//! | `after_compensation.action` | a key of the `[after_compensation]` step |
//! | `defaults.retry.non_retryable[2]` | the third element of an array |
//!
//! An error about a missing key names the key it expected (`stage[0].step[0].action`) and
//! points at the table that lacks it.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Action, Error, RetryPolicy, SagaDefinition, Stage, Statuses, Step};
use crate::hash::fnv1a;

/// The only file format version this build reads.
const VERSION: i64 = 1;
/// Step timeout when neither the step nor `[defaults]` sets one.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Saga deadline when the file sets none.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(60 * 60);
/// Longest step timeout accepted: an attempt that may take longer should be split.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest wait for a signal (a carrier's delivery, a customer's approval).
const MAX_WAIT: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Longest saga deadline accepted.
const MAX_DEADLINE: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Longest backoff accepted (initial or maximum).
const MAX_BACKOFF: Duration = Duration::from_secs(60 * 60);
/// Bounds of `max_attempts`: retries are always bounded.
const ATTEMPTS: std::ops::RangeInclusive<i64> = 1..=100;
/// Bounds of `multiplier`.
const MULTIPLIER: std::ops::RangeInclusive<f64> = 1.0..=10.0;

/// Built-in forward retry policy.
fn default_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(10),
        multiplier: 2.0,
        non_retryable: Vec::new(),
    }
}

/// Built-in compensation retry policy: more patient, compensations must eventually succeed.
fn default_compensation_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 10,
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(30),
        multiplier: 2.0,
        non_retryable: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Raw types: the file as written.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSaga {
    version: Spanned<i64>,
    name: Spanned<String>,
    #[serde(default)]
    description: Option<Spanned<String>>,
    #[serde(default)]
    deadline: Option<Spanned<String>>,
    statuses: RawStatuses,
    #[serde(default)]
    defaults: Option<RawDefaults>,
    #[serde(default)]
    stage: Option<Spanned<Vec<Spanned<RawStage>>>>,
    #[serde(default)]
    after_compensation: Option<Spanned<RawStep>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatuses {
    initial: Spanned<String>,
    completed: Spanned<String>,
    compensated: Spanned<String>,
    failed: Spanned<String>,
    #[serde(default)]
    needs_attention: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    retry: Option<Spanned<RawRetry>>,
    #[serde(default)]
    compensation_retry: Option<Spanned<RawRetry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    name: Spanned<String>,
    #[serde(default)]
    status: Option<Spanned<String>>,
    #[serde(default)]
    step: Vec<Spanned<RawStep>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: Spanned<String>,
    #[serde(default)]
    action: Option<Spanned<String>>,
    #[serde(default)]
    wait_for: Option<Spanned<String>>,
    #[serde(default)]
    compensation: Option<Spanned<String>>,
    #[serde(default)]
    pivot: Option<Spanned<bool>>,
    #[serde(default)]
    read_only: Option<Spanned<bool>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    retry: Option<Spanned<RawRetry>>,
    #[serde(default)]
    compensation_retry: Option<Spanned<RawRetry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    #[serde(default)]
    max_attempts: Option<Spanned<i64>>,
    #[serde(default)]
    initial_backoff: Option<Spanned<String>>,
    #[serde(default)]
    max_backoff: Option<Spanned<String>>,
    #[serde(default)]
    multiplier: Option<Spanned<f64>>,
    #[serde(default)]
    non_retryable: Option<Vec<Spanned<String>>>,
}

// ---------------------------------------------------------------------------------------------
// Public entry points.
// ---------------------------------------------------------------------------------------------

/// Parse and validate one saga file.
///
/// `file` is only used for error messages and [`SagaDefinition::source`]. On failure every error
/// found is returned (at least one), sorted by position; a TOML syntax or type error is reported
/// alone, since the `toml` crate stops at the first.
pub fn parse(source: &str, file: &Path) -> Result<SagaDefinition, Vec<Error>> {
    parse_spanned(source, file).map(|(definition, _)| definition)
}

/// Load every `*.toml` file of `dir` (not recursive), sorted by file name.
///
/// Errors of all files are returned together. Two files defining the same saga name is an error
/// pointing at the second file's `name`. An I/O error is reported at line 1, column 1 of the file
/// (or directory) that could not be read.
pub fn load_dir(dir: &Path) -> Result<Vec<SagaDefinition>, Vec<Error>> {
    let io_error = |path: &Path, what: &str, err: std::io::Error| Error {
        file: path.to_path_buf(),
        line: 1,
        column: 1,
        field: None,
        message: format!("cannot read {what}: {}", lowercase_first(&err.to_string())),
    };
    let entries = std::fs::read_dir(dir).map_err(|e| vec![io_error(dir, "directory", e)])?;
    let mut files: Vec<PathBuf> = Vec::new();
    let mut errors = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => {
                let path = entry.path();
                if path.extension().is_some_and(|ext| ext == "toml") && path.is_file() {
                    files.push(path);
                }
            }
            Err(e) => errors.push(io_error(dir, "directory", e)),
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));

    let mut sources = Vec::with_capacity(files.len());
    for path in files {
        match std::fs::read_to_string(&path) {
            Ok(source) => sources.push((path, source)),
            Err(e) => errors.push(io_error(&path, "file", e)),
        }
    }
    match parse_files(&sources) {
        Ok(definitions) if errors.is_empty() => Ok(definitions),
        Ok(_) => Err(errors),
        Err(mut more) => {
            errors.append(&mut more);
            Err(errors)
        }
    }
}

/// Parses a set of definition files given as `(path, text)`, as [`load_dir`] does with a
/// folder's: every file is checked, and the set is refused (with every error) if any file is
/// invalid or two files define the same saga.
pub fn parse_files(files: &[(PathBuf, String)]) -> Result<Vec<SagaDefinition>, Vec<Error>> {
    let mut errors = Vec::new();
    let mut definitions: Vec<SagaDefinition> = Vec::new();
    for (path, source) in files {
        let (path, source) = (path.as_path(), source.as_str());
        match parse_spanned(source, path) {
            Ok((definition, name_span)) => {
                if let Some(first) = definitions.iter().find(|d| d.name == definition.name) {
                    errors.push(Error::at(
                        path,
                        source,
                        name_span.start,
                        Some("name".to_owned()),
                        format!(
                            "duplicate saga name `{}`: already defined in {}",
                            definition.name,
                            first.source.display()
                        ),
                    ));
                } else {
                    definitions.push(definition);
                }
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(definitions)
    } else {
        Err(errors)
    }
}

/// [`parse`], also returning the span of the saga's `name` value (for [`load_dir`]'s duplicates).
fn parse_spanned(source: &str, file: &Path) -> Result<(SagaDefinition, Range<usize>), Vec<Error>> {
    let raw: RawSaga = toml::from_str(source).map_err(|e| vec![toml_error(source, file, &e)])?;
    let name_span = raw.name.span();
    let mut validator = Validator {
        file,
        source,
        errors: Vec::new(),
    };
    match validator.saga(raw) {
        Some(definition) if validator.errors.is_empty() => Ok((definition, name_span)),
        _ => {
            let mut errors = validator.errors;
            if errors.is_empty() {
                // Unreachable by construction (every `None` pushes an error), but never return
                // an empty error list.
                errors.push(Error::at(
                    file,
                    source,
                    0,
                    None,
                    "invalid saga definition".to_owned(),
                ));
            }
            errors.sort_by_key(|e| (e.line, e.column));
            Err(errors)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TOML errors.
// ---------------------------------------------------------------------------------------------

/// Turn a `toml` syntax/type error into ours, finding the field path from the error's span.
fn toml_error(source: &str, file: &Path, err: &toml::de::Error) -> Error {
    let span = err.span().unwrap_or(0..0);
    let message = tidy_message(err.message());
    let missing = missing_field(err.message());
    let field = match missing {
        Some(key) => Some(match table_path_at(source, &span) {
            Some(table) if !table.is_empty() => format!("{table}.{key}"),
            _ => key.to_owned(),
        }),
        None => field_path_at(source, &span),
    };
    Error::at(file, source, span.start, field, message)
}

/// The key named by serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.strip_suffix('`')
}

/// Reword serde's messages where they leak Rust types, and keep them lowercase.
fn tidy_message(message: &str) -> String {
    let mut out = message.trim().trim_end_matches('.').to_owned();
    if let Some(at) = out.find("expected struct ") {
        out.truncate(at);
        out.push_str("expected a table");
    }
    for (rust, toml) in [
        ("expected i64", "expected an integer"),
        ("expected f64", "expected a float"),
        ("expected a sequence", "expected an array"),
    ] {
        out = out.replace(rust, toml);
    }
    lowercase_first(&out)
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Path of the most specific key or value whose span contains `span.start`.
fn field_path_at(source: &str, span: &Range<usize>) -> Option<String> {
    let doc = toml::de::DeTable::parse(source).ok()?;
    let mut best = None;
    let mut score = |at: Range<usize>| {
        let contains = at.start <= span.start && span.start < at.end;
        (contains || (at.is_empty() && at.start == span.start)).then_some(at.len())
    };
    walk_table(doc.get_ref(), "", &mut score, &mut best);
    best.map(|(_, path)| path)
}

/// Path of the table whose span is exactly `span` (serde reports missing keys at the table).
fn table_path_at(source: &str, span: &Range<usize>) -> Option<String> {
    let doc = toml::de::DeTable::parse(source).ok()?;
    let mut best = None;
    walk_table(
        doc.get_ref(),
        "",
        &mut |at| (at == *span).then_some(0),
        &mut best,
    );
    best.map(|(_, path)| path)
}

/// Visit every key and value span under `table`, keeping in `best` the path whose score (the
/// span length, smaller is more specific) is lowest; on ties the deeper path wins.
fn walk_table(
    table: &toml::de::DeTable<'_>,
    prefix: &str,
    score: &mut dyn FnMut(Range<usize>) -> Option<usize>,
    best: &mut Option<(usize, String)>,
) {
    for (key, value) in table.iter() {
        let path = if prefix.is_empty() {
            key.get_ref().to_string()
        } else {
            format!("{prefix}.{}", key.get_ref())
        };
        consider(&path, key.span(), score, best);
        walk_value(value, &path, score, best);
    }
}

fn walk_value(
    value: &Spanned<toml::de::DeValue<'_>>,
    path: &str,
    score: &mut dyn FnMut(Range<usize>) -> Option<usize>,
    best: &mut Option<(usize, String)>,
) {
    consider(path, value.span(), score, best);
    match value.get_ref() {
        toml::de::DeValue::Table(table) => walk_table(table, path, score, best),
        toml::de::DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                walk_value(item, &format!("{path}[{i}]"), score, best);
            }
        }
        _ => {}
    }
}

fn consider(
    path: &str,
    span: Range<usize>,
    score: &mut dyn FnMut(Range<usize>) -> Option<usize>,
    best: &mut Option<(usize, String)>,
) {
    if let Some(s) = score(span) {
        if best.as_ref().is_none_or(|(b, _)| s <= *b) {
            *best = Some((s, path.to_owned()));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------------------------

/// Collects errors while turning raw types into domain types. Every method that returns `None`
/// has pushed at least one error.
struct Validator<'a> {
    file: &'a Path,
    source: &'a str,
    errors: Vec<Error>,
}

/// Resolved `[defaults]`.
struct Defaults {
    timeout: Duration,
    retry: RetryPolicy,
    compensation_retry: RetryPolicy,
}

/// Where a step sits, for paths and messages.
#[derive(Clone, Copy)]
enum Slot {
    Forward { stage: usize, step: usize },
    AfterCompensation,
}

impl Slot {
    fn path(self) -> String {
        match self {
            Slot::Forward { stage, step } => format!("stage[{stage}].step[{step}]"),
            Slot::AfterCompensation => "after_compensation".to_owned(),
        }
    }
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, field: impl Into<String>, message: String) {
        self.errors.push(Error::at(
            self.file,
            self.source,
            span.start,
            Some(field.into()),
            message,
        ));
    }

    fn saga(&mut self, raw: RawSaga) -> Option<SagaDefinition> {
        if *raw.version.get_ref() != VERSION {
            self.error(
                raw.version.span(),
                "version",
                format!(
                    "unsupported version {}; this build reads version {VERSION}",
                    raw.version.get_ref()
                ),
            );
        }
        self.identifier(&raw.name, "name", "saga name", 62);
        let deadline = match &raw.deadline {
            Some(text) => self.duration(text, "deadline", false, MAX_DEADLINE),
            None => Some(DEFAULT_DEADLINE),
        };
        let statuses = self.statuses(&raw.statuses);
        let defaults = self.defaults(raw.defaults.as_ref());

        let mut steps: Vec<Step> = Vec::new();
        let mut stages: Vec<Stage> = Vec::new();
        // Step names are unique across the whole saga, after-compensation step included.
        let mut step_names: HashMap<String, usize> = HashMap::new();
        let mut stage_names: HashMap<String, usize> = HashMap::new();
        let mut complete = true;

        match &raw.stage {
            None => self.error(
                0..0,
                "stage",
                "a saga needs at least one `[[stage]]`".to_owned(),
            ),
            Some(list) if list.get_ref().is_empty() => self.error(
                list.span(),
                "stage",
                "a saga needs at least one `[[stage]]`".to_owned(),
            ),
            Some(_) => {}
        }
        let raw_stages = raw
            .stage
            .as_ref()
            .map(|s| s.get_ref().as_slice())
            .unwrap_or_default();
        for (si, raw_stage) in raw_stages.iter().enumerate() {
            let stage_span = raw_stage.span();
            let raw_stage = raw_stage.get_ref();
            let path = format!("stage[{si}]");
            self.identifier(&raw_stage.name, format!("{path}.name"), "stage name", 62);
            self.unique(
                &mut stage_names,
                &raw_stage.name,
                format!("{path}.name"),
                "stage",
            );
            let status = raw_stage.status.as_ref().map(|status| {
                self.stage_status(status, &format!("{path}.status"), &raw.statuses);
                status.get_ref().clone()
            });
            if raw_stage.step.is_empty() {
                self.error(
                    stage_span,
                    format!("{path}.step"),
                    format!(
                        "stage `{}` has no steps; add a `[[stage.step]]`",
                        raw_stage.name.get_ref()
                    ),
                );
            }
            let mut indices = Vec::new();
            for (ti, raw_step) in raw_stage.step.iter().enumerate() {
                let slot = Slot::Forward {
                    stage: si,
                    step: ti,
                };
                self.unique(
                    &mut step_names,
                    &raw_step.get_ref().name,
                    format!("{}.name", slot.path()),
                    "step",
                );
                if raw_stage.step.len() > 1 && is_true(&raw_step.get_ref().pivot) {
                    self.error(
                        field_span(&raw_step.get_ref().pivot, raw_step.span()),
                        format!("{}.pivot", slot.path()),
                        format!(
                            "pivot step `{}` must be alone in its stage: if a parallel step failed after it \
                             succeeded, it could not be undone",
                            raw_step.get_ref().name.get_ref()
                        ),
                    );
                }
                match (self.step(raw_step, slot, defaults.as_ref()), complete) {
                    (Some(step), true) => {
                        indices.push(steps.len());
                        steps.push(step);
                    }
                    _ => complete = false,
                }
            }
            stages.push(Stage {
                name: raw_stage.name.get_ref().clone(),
                steps: indices,
                status,
            });
        }

        let after_compensation = match &raw.after_compensation {
            Some(raw_step) => {
                let slot = Slot::AfterCompensation;
                self.unique(
                    &mut step_names,
                    &raw_step.get_ref().name,
                    format!("{}.name", slot.path()),
                    "step",
                );
                let step = self.step(raw_step, slot, defaults.as_ref());
                complete &= step.is_some();
                step
            }
            None => None,
        };

        if !complete || !self.errors.is_empty() {
            return None;
        }
        let mut definition = SagaDefinition {
            name: raw.name.get_ref().clone(),
            description: raw.description.map(Spanned::into_inner).unwrap_or_default(),
            statuses: statuses?,
            deadline: deadline?,
            stages,
            steps,
            after_compensation,
            fingerprint: 0,
            source: PathBuf::new(),
        };
        definition.fingerprint = fingerprint(&definition);
        definition.source = self.file.to_path_buf();
        Some(definition)
    }

    fn statuses(&mut self, raw: &RawStatuses) -> Option<Statuses> {
        let default_parked = Spanned::new(0..0, super::DEFAULT_NEEDS_ATTENTION.to_string());
        let fields = [
            ("initial", &raw.initial),
            ("completed", &raw.completed),
            ("compensated", &raw.compensated),
            ("failed", &raw.failed),
            (
                "needs_attention",
                raw.needs_attention.as_ref().unwrap_or(&default_parked),
            ),
        ];
        let mut ok = true;
        for (i, (key, value)) in fields.iter().enumerate() {
            ok &= self.status_label(value, &format!("statuses.{key}"));
            if let Some((other, _)) = fields[..i]
                .iter()
                .find(|(_, v)| v.get_ref() == value.get_ref())
            {
                ok = false;
                self.error(
                    value.span(),
                    format!("statuses.{key}"),
                    format!(
                        "status `{}` is already the `{other}` status; the outcome statuses must differ",
                        value.get_ref()
                    ),
                );
            }
        }
        ok.then(|| Statuses {
            initial: raw.initial.get_ref().clone(),
            completed: raw.completed.get_ref().clone(),
            compensated: raw.compensated.get_ref().clone(),
            failed: raw.failed.get_ref().clone(),
            needs_attention: fields[4].1.get_ref().clone(),
        })
    }

    /// A stage's status: a valid label that is not an outcome reserved for compensation.
    fn stage_status(&mut self, status: &Spanned<String>, field: &str, statuses: &RawStatuses) {
        if !self.status_label(status, field) {
            return;
        }
        let default_parked = Spanned::new(0..0, super::DEFAULT_NEEDS_ATTENTION.to_string());
        for (key, reserved) in [
            ("compensated", &statuses.compensated),
            ("failed", &statuses.failed),
            (
                "needs_attention",
                statuses.needs_attention.as_ref().unwrap_or(&default_parked),
            ),
        ] {
            if status.get_ref() == reserved.get_ref() {
                self.error(
                    status.span(),
                    field,
                    format!(
                        "stage status `{}` is the `statuses.{key}` status; a forward stage cannot set it",
                        status.get_ref()
                    ),
                );
            }
        }
    }

    /// `[A-Z][A-Z0-9_]{0,31}`.
    fn status_label(&mut self, value: &Spanned<String>, field: &str) -> bool {
        let text = value.get_ref();
        let mut chars = text.chars();
        let ok = chars.next().is_some_and(|c| c.is_ascii_uppercase())
            && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            && text.len() <= 32;
        if !ok {
            self.error(
                value.span(),
                field,
                format!(
                    "invalid status `{text}`: expected an uppercase letter followed by up to 31 uppercase \
                     letters, digits or `_` (e.g. `PENDING`)"
                ),
            );
        }
        ok
    }

    /// `[a-z][a-z0-9_]{0,max_rest}`.
    fn identifier(
        &mut self,
        value: &Spanned<String>,
        field: impl Into<String>,
        what: &str,
        max_rest: usize,
    ) -> bool {
        let text = value.get_ref();
        let ok = is_identifier(text, max_rest);
        if !ok {
            self.error(
                value.span(),
                field,
                format!(
                    "invalid {what} `{text}`: expected a lowercase letter followed by up to {max_rest} \
                     lowercase letters, digits or `_`"
                ),
            );
        }
        ok
    }

    /// Record `name` in `seen`, or report it as a duplicate of an earlier one.
    fn unique(
        &mut self,
        seen: &mut HashMap<String, usize>,
        name: &Spanned<String>,
        field: String,
        what: &str,
    ) {
        if let Some(first) = seen.get(name.get_ref()) {
            let (line, _) = super::line_col(self.source, *first);
            self.error(
                name.span(),
                field,
                format!(
                    "duplicate {what} name `{}`: first defined at line {line}",
                    name.get_ref()
                ),
            );
        } else {
            seen.insert(name.get_ref().clone(), name.span().start);
        }
    }

    fn defaults(&mut self, raw: Option<&RawDefaults>) -> Option<Defaults> {
        let empty = RawDefaults::default();
        let raw = raw.unwrap_or(&empty);
        let timeout = match &raw.timeout {
            Some(text) => self.duration(text, "defaults.timeout", false, MAX_TIMEOUT),
            None => Some(DEFAULT_TIMEOUT),
        };
        let retry = match &raw.retry {
            Some(r) => self.retry(r, "defaults.retry", default_retry()),
            None => Some(default_retry()),
        };
        let compensation_retry = match &raw.compensation_retry {
            Some(r) => self.retry(
                r,
                "defaults.compensation_retry",
                default_compensation_retry(),
            ),
            None => Some(default_compensation_retry()),
        };
        Some(Defaults {
            timeout: timeout?,
            retry: retry?,
            compensation_retry: compensation_retry?,
        })
    }

    fn step(
        &mut self,
        raw: &Spanned<RawStep>,
        slot: Slot,
        defaults: Option<&Defaults>,
    ) -> Option<Step> {
        let step_span = raw.span();
        let raw = raw.get_ref();
        let path = slot.path();
        let name = raw.name.get_ref();
        let mut ok = self.identifier(&raw.name, format!("{path}.name"), "step name", 62);

        let waits = raw.wait_for.is_some();
        // A step calls a service (`action`) or waits for a signal (`wait_for`): one of them.
        let action = match (&raw.action, &raw.wait_for) {
            (Some(a), None) => self.action(a, &format!("{path}.action")),
            (None, Some(w)) => {
                let wait = self.wait_for(w, &format!("{path}.wait_for"));
                ok &= self.wait_step(raw, &slot, &path, name, step_span.clone());
                wait
            }
            (Some(_), Some(w)) => {
                self.error(
                    w.span(),
                    format!("{path}.wait_for"),
                    format!("step `{name}` has both `action` and `wait_for`: a step calls a service or waits for a signal, not both"),
                );
                None
            }
            (None, None) => {
                self.error(
                    step_span.clone(),
                    format!("{path}.action"),
                    format!("step `{name}` needs `action` (a service to call, `service.action`) or `wait_for` (a signal to wait for)"),
                );
                None
            }
        };
        let compensation = match &raw.compensation {
            Some(c) => {
                let parsed = self.action(c, &format!("{path}.compensation"));
                ok &= parsed.is_some();
                parsed
            }
            None => None,
        };
        let pivot = is_true(&raw.pivot);
        // A wait step changes nothing: there is nothing to undo.
        let read_only = is_true(&raw.read_only) || waits;

        // The compensation rules: every step that changes state can be undone, or is the pivot.
        match slot {
            Slot::AfterCompensation => {
                if let Some(c) = &raw.compensation {
                    ok = false;
                    self.error(
                        c.span(),
                        format!("{path}.compensation"),
                        format!("after-compensation step `{name}` is never undone; remove its `compensation`"),
                    );
                }
                if let (true, Some(p)) = (pivot, &raw.pivot) {
                    ok = false;
                    self.error(
                        p.span(),
                        format!("{path}.pivot"),
                        format!("after-compensation step `{name}` runs after the saga failed; it cannot be the pivot"),
                    );
                }
            }
            // A wait step's rules are `wait_step`'s.
            Slot::Forward { .. } if waits => {}
            Slot::Forward { .. } => {
                if read_only && pivot {
                    ok = false;
                    self.error(
                        field_span(&raw.pivot, step_span.clone()),
                        format!("{path}.pivot"),
                        format!("step `{name}` is `read_only`: it changes nothing, so it cannot be the pivot"),
                    );
                }
                if let Some(c) = &raw.compensation {
                    if pivot {
                        ok = false;
                        self.error(
                            c.span(),
                            format!("{path}.compensation"),
                            format!(
                                "step `{name}` is the pivot and cannot be undone; remove its `compensation` \
                                 or `pivot = true`"
                            ),
                        );
                    }
                    if read_only {
                        ok = false;
                        self.error(
                            c.span(),
                            format!("{path}.compensation"),
                            format!("step `{name}` is `read_only`: there is nothing to compensate"),
                        );
                    }
                } else if !pivot && !read_only {
                    ok = false;
                    self.error(
                        step_span,
                        format!("{path}.compensation"),
                        format!(
                            "step `{name}` changes state but has no `compensation`; add one or mark it \
                             `pivot = true` (or `read_only = true` if it changes nothing)"
                        ),
                    );
                }
            }
        }
        if let (None, Some(r), false) = (&raw.compensation, &raw.compensation_retry, waits) {
            ok = false;
            self.error(
                r.span(),
                format!("{path}.compensation_retry"),
                format!("step `{name}` has no `compensation`, so `compensation_retry` would never apply"),
            );
        }

        let timeout = match &raw.timeout {
            Some(text) => self.duration(
                text,
                &format!("{path}.timeout"),
                false,
                if waits { MAX_WAIT } else { MAX_TIMEOUT },
            ),
            None => defaults.map(|d| d.timeout),
        };
        let retry = match &raw.retry {
            Some(r) => self.retry(r, &format!("{path}.retry"), default_retry()),
            // A wait ends once: the signal arrives, or its timeout fails the step for good.
            None if waits => Some(RetryPolicy {
                max_attempts: 1,
                ..default_retry()
            }),
            None => defaults.map(|d| d.retry.clone()),
        };
        let compensation_retry = match &raw.compensation_retry {
            Some(r) => self.retry(
                r,
                &format!("{path}.compensation_retry"),
                default_compensation_retry(),
            ),
            None => defaults.map(|d| d.compensation_retry.clone()),
        };
        if !ok {
            return None;
        }
        Some(Step {
            name: name.clone(),
            stage: match slot {
                Slot::Forward { stage, .. } => stage,
                Slot::AfterCompensation => usize::MAX,
            },
            action: action?,
            compensation,
            pivot,
            retry: retry?,
            compensation_retry: compensation_retry?,
            timeout: timeout?,
        })
    }

    /// A signal name: dot-separated parts, each `[a-z][a-z0-9_]*`, 64 bytes at most
    /// (`delivery.confirmed`). A wait step's action has no service and the signal as its name.
    fn wait_for(&mut self, value: &Spanned<String>, field: &str) -> Option<Action> {
        let text = value.get_ref();
        if crate::definition::valid_signal_name(text) {
            return Some(Action {
                service: String::new(),
                name: text.clone(),
            });
        }
        self.error(
            value.span(),
            field,
            format!(
                "invalid signal name `{text}`: expected dot-separated parts, each a lowercase letter \
                 followed by lowercase letters, digits or `_`, 64 bytes at most (e.g. `delivery.confirmed`)"
            ),
        );
        None
    }

    /// What a wait step may not have: a compensation (it changes nothing), `pivot`, `retry`
    /// (it ends once), `read_only` (it is), and the after-compensation slot (it runs once the
    /// saga failed, when nobody waits for the world).
    fn wait_step(
        &mut self,
        raw: &RawStep,
        slot: &Slot,
        path: &str,
        name: &str,
        step_span: std::ops::Range<usize>,
    ) -> bool {
        let mut ok = true;
        if matches!(slot, Slot::AfterCompensation) {
            ok = false;
            self.error(
                step_span,
                format!("{path}.wait_for"),
                format!("after-compensation step `{name}` cannot wait for a signal; it must call a service"),
            );
        }
        let not_for_waits: [(&str, Option<std::ops::Range<usize>>, &str); 5] = [
            (
                "compensation",
                raw.compensation.as_ref().map(Spanned::span),
                "it changes nothing, so there is nothing to undo",
            ),
            (
                "pivot",
                raw.pivot.as_ref().map(Spanned::span),
                "it changes nothing, so it cannot be the point of no return",
            ),
            (
                "retry",
                raw.retry.as_ref().map(Spanned::span),
                "a wait ends once: the signal arrives, or its `timeout` fails the step",
            ),
            (
                "read_only",
                raw.read_only.as_ref().map(Spanned::span),
                "a wait step is read-only already",
            ),
            (
                "compensation_retry",
                raw.compensation_retry.as_ref().map(Spanned::span),
                "it has no compensation",
            ),
        ];
        for (field, span, why) in not_for_waits {
            if let Some(span) = span {
                ok = false;
                self.error(
                    span,
                    format!("{path}.{field}"),
                    format!("step `{name}` waits for a signal and takes no `{field}`: {why}"),
                );
            }
        }
        ok
    }

    /// `service.action`, each part `[a-z][a-z0-9_]{0,31}`.
    fn action(&mut self, value: &Spanned<String>, field: &str) -> Option<Action> {
        let text = value.get_ref();
        match text.split_once('.') {
            Some((service, name)) if is_identifier(service, 31) && is_identifier(name, 31) => {
                Some(Action {
                    service: service.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => {
                self.error(
                    value.span(),
                    field,
                    format!(
                        "invalid action `{text}`: expected `service.action`, each part a lowercase letter \
                         followed by up to 31 lowercase letters, digits or `_` (e.g. `payment.charge`)"
                    ),
                );
                None
            }
        }
    }

    /// A retry table; missing fields take `builtin`'s values.
    fn retry(
        &mut self,
        raw: &Spanned<RawRetry>,
        path: &str,
        builtin: RetryPolicy,
    ) -> Option<RetryPolicy> {
        let table_span = raw.span();
        let raw = raw.get_ref();
        let mut ok = true;
        let mut policy = builtin;
        if let Some(attempts) = &raw.max_attempts {
            let n = *attempts.get_ref();
            match u32::try_from(n) {
                Ok(valid) if ATTEMPTS.contains(&n) => policy.max_attempts = valid,
                _ => {
                    ok = false;
                    let why = if n < 1 {
                        "a step runs at least once"
                    } else {
                        "retries must be bounded"
                    };
                    self.error(
                        attempts.span(),
                        format!("{path}.max_attempts"),
                        format!(
                            "`max_attempts` = {n} is out of range {}..={} ({why})",
                            ATTEMPTS.start(),
                            ATTEMPTS.end()
                        ),
                    );
                }
            }
        }
        if let Some(text) = &raw.initial_backoff {
            match self.duration(text, &format!("{path}.initial_backoff"), true, MAX_BACKOFF) {
                Some(d) => policy.initial_backoff = d,
                None => ok = false,
            }
        }
        if let Some(text) = &raw.max_backoff {
            match self.duration(text, &format!("{path}.max_backoff"), true, MAX_BACKOFF) {
                Some(d) => policy.max_backoff = d,
                None => ok = false,
            }
        }
        if ok && policy.max_backoff < policy.initial_backoff {
            ok = false;
            let (span, key) = match (&raw.max_backoff, &raw.initial_backoff) {
                (Some(max), _) => (max.span(), "max_backoff"),
                (None, Some(initial)) => (initial.span(), "initial_backoff"),
                (None, None) => (table_span, "max_backoff"),
            };
            self.error(
                span,
                format!("{path}.{key}"),
                format!(
                    "`max_backoff` ({}) is shorter than `initial_backoff` ({})",
                    format_duration(policy.max_backoff),
                    format_duration(policy.initial_backoff)
                ),
            );
        }
        if let Some(multiplier) = &raw.multiplier {
            let m = *multiplier.get_ref();
            if MULTIPLIER.contains(&m) {
                policy.multiplier = m;
            } else {
                ok = false;
                self.error(
                    multiplier.span(),
                    format!("{path}.multiplier"),
                    format!(
                        "`multiplier` = {m} is out of range {:.1}..={:.1}",
                        MULTIPLIER.start(),
                        MULTIPLIER.end()
                    ),
                );
            }
        }
        if let Some(kinds) = &raw.non_retryable {
            policy.non_retryable.clear();
            for (i, kind) in kinds.iter().enumerate() {
                if is_identifier(kind.get_ref(), 62) {
                    policy.non_retryable.push(kind.get_ref().clone());
                } else {
                    ok = false;
                    self.error(
                        kind.span(),
                        format!("{path}.non_retryable[{i}]"),
                        format!(
                            "invalid error kind `{}`: expected a lowercase letter followed by up to 62 \
                             lowercase letters, digits or `_`",
                            kind.get_ref()
                        ),
                    );
                }
            }
        }
        ok.then_some(policy)
    }

    /// A duration no longer than `max`, zero refused unless `zero_ok`.
    fn duration(
        &mut self,
        value: &Spanned<String>,
        field: &str,
        zero_ok: bool,
        max: Duration,
    ) -> Option<Duration> {
        let text = value.get_ref();
        let key = field.rsplit('.').next().unwrap_or(field);
        // The same syntax as every other duration Sagaflow reads (node config included).
        let problem = match crate::duration::parse(text) {
            Err(why) => why,
            Ok(d) if d.is_zero() && !zero_ok => format!("`{key}` must be longer than zero"),
            Ok(d) if d > max => format!(
                "`{key}` = {text} is longer than the maximum {}",
                format_duration(max)
            ),
            Ok(d) => return Some(d),
        };
        self.error(value.span(), field, problem);
        None
    }
}

/// The span of an optional field, or `fallback` when it is absent.
fn field_span<T>(field: &Option<Spanned<T>>, fallback: Range<usize>) -> Range<usize> {
    field.as_ref().map_or(fallback, Spanned::span)
}

fn is_true(flag: &Option<Spanned<bool>>) -> bool {
    flag.as_ref().is_some_and(|f| *f.get_ref())
}

/// `[a-z][a-z0-9_]{0,max_rest}`.
fn is_identifier(text: &str, max_rest: usize) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && text.len() <= max_rest + 1
}

/// The shortest [`crate::duration::parse`] spelling of `d` (millisecond precision).
fn format_duration(d: Duration) -> String {
    let mut millis = d.as_millis();
    if millis == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, factor) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        if millis >= factor {
            out.push_str(&format!("{}{unit}", millis / factor));
            millis %= factor;
        }
    }
    out
}

/// FNV-1a of the definition's canonical form: its `Debug` rendering with `source` and
/// `fingerprint` blanked, so the value depends only on the validated content, never on the file
/// path, comments, key order or formatting.
fn fingerprint(definition: &SagaDefinition) -> u64 {
    let canonical = SagaDefinition {
        fingerprint: 0,
        source: PathBuf::new(),
        ..definition.clone()
    };
    fnv1a(format!("{canonical:?}").as_bytes())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::fmt::Write as _;

    use proptest::prelude::*;

    use super::*;

    const ORDER: &str = include_str!("../../../sagas/order.toml");
    const TRIP: &str = include_str!("../../../sagas/trip.toml");

    fn manifest_path(relative: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
    }

    fn ok(source: &str) -> SagaDefinition {
        parse(source, Path::new("test.toml")).unwrap_or_else(|errors| {
            let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
            panic!("expected a valid saga, got:\n{}", text.join("\n"))
        })
    }

    const WAITS: &str = include_str!("../../../sagas/delivery.toml");

    #[test]
    fn a_step_may_wait_for_a_signal_and_takes_nothing_a_call_takes() {
        let def = ok(WAITS);
        let step = &def.steps[1];
        assert_eq!(step.wait_for(), Some("delivery.confirmed"));
        assert_eq!(
            step.action.to_string(),
            "wait for signal `delivery.confirmed`"
        );
        assert_eq!(step.retry.max_attempts, 1, "a wait ends once");
        assert_eq!(step.timeout, Duration::from_secs(72 * 3600));
        assert_eq!(def.steps[0].wait_for(), None);
        assert_eq!(def.signals(), ["delivery.confirmed"]);
        assert_eq!(
            def.services(),
            ["shipping", "notification"],
            "a wait calls no service"
        );

        let with = |extra: &str| {
            let text = WAITS.replace(
                "wait_for = \"delivery.confirmed\"\n",
                &format!("wait_for = \"delivery.confirmed\"\n{extra}\n"),
            );
            parse(&text, Path::new("d.toml"))
                .unwrap_err()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        };
        for (extra, field) in [
            ("compensation = \"x.undo\"", "stage[1].step[0].compensation"),
            ("pivot = true", "stage[1].step[0].pivot"),
            ("retry = { max_attempts = 3 }", "stage[1].step[0].retry"),
            ("read_only = true", "stage[1].step[0].read_only"),
            ("action = \"x.y\"", "stage[1].step[0].wait_for"),
        ] {
            let errors = with(extra);
            assert!(errors.contains(&format!("`{field}`")), "{extra}: {errors}");
            assert_eq!(errors.lines().count(), 1, "{extra}: {errors}");
        }
        let bad_name = WAITS.replace("delivery.confirmed", "Delivery confirmed");
        let errors = parse(&bad_name, Path::new("d.toml")).unwrap_err();
        assert!(
            errors[0].to_string().contains("invalid signal name"),
            "{errors:?}"
        );
        let neither = WAITS.replace("wait_for = \"delivery.confirmed\"\n", "");
        let errors = parse(&neither, Path::new("d.toml")).unwrap_err();
        assert!(
            errors[0].to_string().contains("needs `action`"),
            "{errors:?}"
        );
        // The shipped definitions' versions do not change with the new field.
        let order = ok(ORDER);
        assert!(order.steps.iter().all(|s| s.wait_for().is_none()));
    }

    fn action(text: &str) -> Action {
        let (service, name) = text.split_once('.').unwrap();
        Action {
            service: service.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The smallest valid saga, with `extra` appended to its only step.
    fn minimal(extra: &str) -> String {
        format!(
            "version = 1\nname = \"mini\"\n[statuses]\ninitial = \"A\"\ncompleted = \"B\"\n\
             compensated = \"C\"\nfailed = \"D\"\n[[stage]]\nname = \"one\"\n[[stage.step]]\n\
             name = \"work\"\naction = \"svc.act\"\ncompensation = \"svc.undo\"\n{extra}"
        )
    }

    #[test]
    fn order_saga_parses_with_expected_structure() {
        let path = manifest_path("../sagas/order.toml");
        let saga = parse(ORDER, &path).unwrap();
        assert_eq!(saga.name, "order");
        assert_eq!(saga.source, path);
        assert_eq!(saga.deadline, Duration::from_secs(300));
        assert_eq!(
            saga.statuses,
            Statuses {
                initial: "PENDING".into(),
                completed: "SHIPPED".into(),
                compensated: "CANCELLED".into(),
                failed: "FAILED".into(),
                needs_attention: "NEEDS_ATTENTION".into(),
            }
        );
        let stages: Vec<(&str, &[usize], Option<&str>)> = saga
            .stages
            .iter()
            .map(|s| (s.name.as_str(), s.steps.as_slice(), s.status.as_deref()))
            .collect();
        assert_eq!(
            stages,
            [
                ("payment", &[0][..], Some("PAID")),
                ("fulfilment", &[1, 2, 3][..], None),
            ]
        );
        let steps: Vec<(&str, usize, String, Option<String>, bool)> = saga
            .steps
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    s.stage,
                    s.action.to_string(),
                    s.compensation.as_ref().map(ToString::to_string),
                    s.pivot,
                )
            })
            .collect();
        assert_eq!(
            steps,
            [
                (
                    "charge",
                    0,
                    "payment.charge".into(),
                    Some("payment.refund".into()),
                    false
                ),
                (
                    "reserve",
                    1,
                    "inventory.reserve".into(),
                    Some("inventory.release".into()),
                    false
                ),
                (
                    "prepare_shipment",
                    1,
                    "shipping.prepare".into(),
                    Some("shipping.cancel".into()),
                    false
                ),
                (
                    "notify",
                    1,
                    "notification.send".into(),
                    Some("notification.withdraw".into()),
                    false
                ),
            ]
        );
        for step in &saga.steps {
            assert_eq!(step.timeout, Duration::from_secs(10));
            assert_eq!(step.retry.max_attempts, 5);
            assert_eq!(step.retry.max_backoff, Duration::from_secs(5));
            assert_eq!(
                step.retry.non_retryable,
                ["declined", "out_of_stock", "invalid"]
            );
            assert_eq!(step.compensation_retry.max_attempts, 20);
            assert_eq!(
                step.compensation_retry.initial_backoff,
                Duration::from_millis(200)
            );
            assert!(step.compensation_retry.non_retryable.is_empty());
        }
        let after = saga.after_compensation.as_ref().unwrap();
        assert_eq!(after.name, "notify_cancellation");
        assert_eq!(after.stage, usize::MAX);
        assert_eq!(after.action, action("notification.send_cancellation"));
        assert_eq!(after.compensation, None);
        assert_eq!(
            saga.step(4).map(|s| s.name.as_str()),
            Some("notify_cancellation")
        );
        assert_eq!(saga.step_slots(), 5);
        assert_eq!(
            saga.services(),
            ["payment", "inventory", "shipping", "notification"]
        );
    }

    #[test]
    fn trip_saga_parses() {
        let saga = parse(TRIP, Path::new("sagas/trip.toml")).unwrap();
        assert_eq!(saga.name, "trip");
        assert_eq!(saga.deadline, Duration::from_secs(30 * 60));
        assert_eq!(saga.statuses.completed, "BOOKED");
        let stages: Vec<(&str, usize)> = saga
            .stages
            .iter()
            .map(|s| (s.name.as_str(), s.steps.len()))
            .collect();
        assert_eq!(
            stages,
            [
                ("verify", 1),
                ("reserve", 2),
                ("payment", 1),
                ("ticketing", 1)
            ]
        );
        let names: Vec<&str> = saga.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "verify_traveller",
                "hold_flight",
                "book_hotel",
                "charge",
                "issue_tickets"
            ]
        );

        // A read-only step needs no compensation; its retry table replaces the defaults wholesale,
        // missing fields taking the built-in values.
        let verify = &saga.steps[0];
        assert_eq!(verify.compensation, None);
        assert!(!verify.pivot);
        assert_eq!(
            verify.retry,
            RetryPolicy {
                max_attempts: 3,
                non_retryable: vec!["rejected".into()],
                ..default_retry()
            }
        );
        assert_eq!(saga.steps[1].timeout, Duration::from_secs(15));
        assert_eq!(saga.steps[2].timeout, Duration::from_secs(45));
        assert_eq!(
            saga.steps[3].retry.non_retryable,
            ["declined", "insufficient_funds"]
        );
        assert_eq!(
            saga.steps[3].retry.initial_backoff,
            Duration::from_millis(500)
        );
        assert_eq!(saga.steps[3].compensation_retry.max_attempts, 30);
        let tickets = &saga.steps[4];
        assert!(tickets.pivot);
        assert_eq!(tickets.action, action("flight.issue_tickets"));
        assert_eq!(tickets.timeout, Duration::from_secs(60));
        assert_eq!(
            saga.after_compensation.as_ref().map(|s| s.name.as_str()),
            Some("notify_cancellation")
        );
        assert_eq!(
            saga.services(),
            ["identity", "flight", "hotel", "payment", "notification"]
        );
    }

    #[test]
    fn load_dir_reads_the_shipped_sagas_in_name_order() {
        let sagas = load_dir(&manifest_path("../sagas")).unwrap();
        let names: Vec<&str> = sagas.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["delivery", "order", "trip"]);
    }

    #[test]
    fn load_dir_refuses_a_saga_name_defined_twice() {
        let errors =
            load_dir(&manifest_path("tests/fixtures/definitions/duplicate_saga")).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let error = &errors[0];
        assert!(error.file.ends_with("b.toml"), "{error}");
        assert_eq!(
            (error.line, error.column, error.field.as_deref()),
            (3, 8, Some("name"))
        );
        assert!(
            error
                .message
                .starts_with("duplicate saga name `fixture`: already defined in"),
            "{error}"
        );
        assert!(error.message.ends_with("a.toml"), "{error}");
    }

    #[test]
    fn load_dir_reports_io_errors_at_line_one() {
        let dir = manifest_path("tests/fixtures/definitions/no_such_directory");
        let errors = load_dir(&dir).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(
            (errors[0].line, errors[0].column, errors[0].field.as_ref()),
            (1, 1, None)
        );
        assert_eq!(errors[0].file, dir);
        assert!(
            errors[0]
                .message
                .starts_with("cannot read directory: no such file"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn builtin_defaults_apply_when_nothing_is_set() {
        let saga = ok(&minimal(""));
        assert_eq!(saga.description, "");
        assert_eq!(saga.deadline, DEFAULT_DEADLINE);
        let step = &saga.steps[0];
        assert_eq!(step.timeout, Duration::from_secs(30));
        assert_eq!(step.retry, default_retry());
        assert_eq!(step.compensation_retry, default_compensation_retry());
        assert_eq!(saga.after_compensation, None);
        assert_eq!(saga.step_slots(), 1);
    }

    #[test]
    fn values_accept_every_documented_spelling() {
        let saga = ok(&minimal(
            "timeout = \"1h30m\"\nretry = { multiplier = 3, initial_backoff = \"0ms\", max_backoff = \"1h\" }\n\
             read_only = false\npivot = false\n",
        ));
        let step = &saga.steps[0];
        assert_eq!(step.timeout, Duration::from_secs(5400));
        assert_eq!(step.retry.multiplier, 3.0);
        assert_eq!(step.retry.initial_backoff, Duration::ZERO);
        assert_eq!(step.retry.max_backoff, Duration::from_secs(3600));
    }

    #[test]
    fn error_display_is_file_line_column_field_message() {
        let errors = parse(&minimal("pivot = true\n"), Path::new("sagas/x.toml")).unwrap_err();
        assert_eq!(
            errors[0].to_string(),
            "sagas/x.toml:13:16: `stage[0].step[0].compensation`: step `work` is the pivot and cannot be \
             undone; remove its `compensation` or `pivot = true`"
        );
        let errors = parse("version = [", Path::new("x.toml")).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].field, None);
        assert!(
            errors[0].to_string().starts_with("x.toml:1:12: "),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn fingerprint_depends_on_content_only() {
        let original = parse(ORDER, Path::new("sagas/order.toml")).unwrap();
        // Same content: comments dropped, blank lines and spaces added, another path.
        let reformatted: String = ORDER
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| format!("{}\n\n", l.replacen(" = ", "   =   ", 1)))
            .collect();
        let same = parse(&reformatted, Path::new("elsewhere/other.toml")).unwrap();
        assert_eq!(same.fingerprint, original.fingerprint);
        assert_ne!(same.source, original.source);
        // Spelling a default explicitly changes nothing either.
        let explicit = ORDER.replace("deadline = \"5m\"", "deadline = \"300s\"");
        assert_eq!(
            parse(&explicit, Path::new("a")).unwrap().fingerprint,
            original.fingerprint
        );
        // Different content: a different fingerprint.
        let changed = ORDER.replace("timeout = \"10s\"", "timeout = \"11s\"");
        assert_ne!(
            parse(&changed, Path::new("a")).unwrap().fingerprint,
            original.fingerprint
        );
    }

    /// Every `invalid.<what>.toml` fixture and the errors it must produce, in order:
    /// `(line, column, field, message substring)`.
    #[allow(clippy::type_complexity)]
    const FIXTURES: &[(&str, &[(usize, usize, Option<&str>, &str)])] = &[
        ("after_compensation_with_compensation", &[(21, 16, Some("after_compensation.compensation"), "is never undone; remove its `compensation`")]),
        ("backoff_order", &[(12, 15, Some("defaults.retry.max_backoff"), "`max_backoff` (1s) is shorter than `initial_backoff` (20s)")]),
        ("bad_action", &[(15, 10, Some("stage[0].step[0].action"), "invalid action `payment`: expected `service.action`")]),
        ("bad_compensation_action", &[(16, 16, Some("stage[0].step[0].compensation"), "invalid action `Payment.Refund`")]),
        ("bad_duration", &[(17, 11, Some("stage[0].step[0].timeout"), "invalid duration \"10 seconds\"")]),
        ("bad_error_kind", &[(17, 40, Some("stage[0].step[0].retry.non_retryable[1]"), "invalid error kind `Out Of Stock`")]),
        ("bad_name", &[(2, 8, Some("name"), "invalid saga name `Order`")]),
        ("bad_stage_status", &[(12, 10, Some("stage[0].status"), "a forward stage cannot set it")]),
        ("compensation_retry_without_compensation", &[(17, 22, Some("stage[0].step[0].compensation_retry"), "so `compensation_retry` would never apply")]),
        ("deadline_too_long", &[(3, 12, Some("deadline"), "longer than the maximum 30d")]),
        ("duplicate_after_compensation", &[(19, 8, Some("after_compensation.name"), "duplicate step name `charge`: first defined at line 14")]),
        ("duplicate_stage", &[(19, 8, Some("stage[1].name"), "duplicate stage name `pay`: first defined at line 11")]),
        ("duplicate_status", &[(8, 10, Some("statuses.failed"), "is already the `compensated` status")]),
        ("duplicate_step", &[(27, 8, Some("stage[1].step[1].name"), "duplicate step name `charge`: first defined at line 14")]),
        ("empty_stage", &[(18, 1, Some("stage[1].step"), "stage `ship` has no steps")]),
        ("missing_action", &[(13, 1, Some("stage[0].step[0].action"), "step `charge` needs `action` (a service to call, `service.action`) or `wait_for`")]),
        ("missing_compensation", &[(26, 1, Some("stage[1].step[1].compensation"), "step `ship` changes state but has no `compensation`; add one or mark it `pivot = true`")]),
        ("missing_statuses", &[(1, 1, Some("statuses"), "missing field `statuses`")]),
        ("multiple_errors", &[
            (3, 12, Some("deadline"), "invalid duration \"forever\""),
            (14, 1, Some("stage[0].step[0].compensation"), "step `charge` changes state but has no `compensation`"),
            (19, 8, Some("stage[0].step[1].name"), "duplicate step name `charge`"),
            (22, 26, Some("stage[0].step[1].retry.max_attempts"), "`max_attempts` = 101 is out of range 1..=100"),
        ]),
        ("multiplier_range", &[(11, 14, Some("defaults.compensation_retry.multiplier"), "`multiplier` = 0.5 is out of range 1.0..=10.0")]),
        (
            "not_a_table",
            &[(4, 12, Some("statuses"), "invalid type: string \"PENDING\", expected a table")],
        ),
        ("no_stages", &[(1, 1, Some("stage"), "a saga needs at least one `[[stage]]`")]),
        ("pivot_not_alone", &[(21, 9, Some("stage[0].step[1].pivot"), "pivot step `notify` must be alone in its stage")]),
        ("pivot_with_compensation", &[(16, 16, Some("stage[0].step[0].compensation"), "step `charge` is the pivot and cannot be undone")]),
        ("read_only_pivot", &[(17, 9, Some("stage[0].step[0].pivot"), "cannot be the pivot")]),
        ("read_only_with_compensation", &[(16, 16, Some("stage[0].step[0].compensation"), "there is nothing to compensate")]),
        ("syntax_error", &[(11, 12, None, "invalid basic string")]),
        ("unbounded_retry", &[(11, 16, Some("defaults.retry.max_attempts"), "`max_attempts` = 1000 is out of range 1..=100 (retries must be bounded)")]),
        ("unknown_key", &[(17, 1, Some("stage[0].step[0].compensate"), "unknown field `compensate`")]),
        ("unknown_status_charset", &[(5, 11, Some("statuses.initial"), "invalid status `pending`")]),
        ("version", &[(1, 11, Some("version"), "unsupported version 2")]),
        ("wrong_type", &[(17, 9, Some("stage[0].step[0].pivot"), "invalid type: string \"yes\", expected a boolean")]),
        ("zero_attempts", &[(17, 26, Some("stage[0].step[0].retry.max_attempts"), "`max_attempts` = 0 is out of range")]),
        ("zero_timeout", &[(11, 11, Some("defaults.timeout"), "`timeout` must be longer than zero")]),
    ];

    #[test]
    fn invalid_fixtures_report_the_expected_errors() {
        let dir = manifest_path("tests/fixtures/definitions");
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(what) = file_name
                .strip_prefix("invalid.")
                .and_then(|n| n.strip_suffix(".toml"))
            else {
                continue;
            };
            seen.push(what.to_owned());
            let (_, expected) = FIXTURES
                .iter()
                .find(|(name, _)| *name == what)
                .unwrap_or_else(|| panic!("no expectation for {file_name}"));
            let source = std::fs::read_to_string(&path).unwrap();
            let errors = parse(&source, &path).expect_err(file_name);
            let rendered: Vec<String> = errors.iter().map(ToString::to_string).collect();
            assert_eq!(errors.len(), expected.len(), "{file_name}: {rendered:#?}");
            for (error, (line, column, field, message)) in errors.iter().zip(expected.iter()) {
                assert_eq!(error.file, path);
                assert_eq!((error.line, error.column), (*line, *column), "{error}");
                assert_eq!(error.field.as_deref(), *field, "{error}");
                assert!(
                    error.message.contains(message),
                    "{file_name}: `{}` lacks `{message}`",
                    error.message
                );
                assert!(!error.message.ends_with('.'), "{error}");
                assert!(
                    !error.message.starts_with(|c: char| c.is_uppercase()),
                    "{error}"
                );
            }
        }
        seen.sort();
        let mut listed: Vec<&str> = FIXTURES.iter().map(|(name, _)| *name).collect();
        listed.sort_unstable();
        assert_eq!(
            seen, listed,
            "every fixture has an expectation and every expectation a fixture"
        );
    }

    /// How a generated step avoids needing a compensation, or doesn't.
    #[derive(Debug, Clone, Copy)]
    enum Kind {
        Compensated,
        ReadOnly,
        /// Only honoured for a step alone in its stage; otherwise compensated.
        Pivot,
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            Just(Kind::Compensated),
            Just(Kind::ReadOnly),
            Just(Kind::Pivot)
        ]
    }

    /// A saga of the given shape as TOML text, stages alternately written with `[[stage.step]]`
    /// headers or an inline array of tables.
    fn render(shape: &[Vec<(Kind, bool)>], after: bool) -> String {
        let mut out = minimal("")
            .split("[[stage]]")
            .next()
            .unwrap_or_default()
            .to_owned();
        for (i, stage) in shape.iter().enumerate() {
            write!(out, "\n[[stage]]\nname = \"stage_{i}\"\n").unwrap();
            if i % 2 == 1 {
                writeln!(out, "status = \"S{i}\"").unwrap();
            }
            let inline = i % 3 == 2;
            if inline {
                out.push_str("step = [\n");
            }
            for (j, (kind, retry)) in stage.iter().enumerate() {
                let mut fields = vec![
                    format!("name = \"step_{i}_{j}\""),
                    format!("action = \"svc_{i}.act_{j}\""),
                ];
                match kind {
                    Kind::Pivot if stage.len() == 1 => fields.push("pivot = true".into()),
                    Kind::ReadOnly => fields.push("read_only = true".into()),
                    _ => fields.push(format!("compensation = \"svc_{i}.undo_{j}\"")),
                }
                if *retry {
                    fields.push(format!("retry = {{ max_attempts = {} }}", j + 1));
                }
                if inline {
                    writeln!(out, "  {{ {} }},", fields.join(", ")).unwrap();
                } else {
                    write!(out, "\n[[stage.step]]\n{}\n", fields.join("\n")).unwrap();
                }
            }
            if inline {
                out.push_str("]\n");
            }
        }
        if after {
            out.push_str(
                "\n[after_compensation]\nname = \"after\"\naction = \"notify.cancelled\"\n",
            );
        }
        out
    }

    proptest! {
        #[test]
        fn random_valid_shapes_parse(
            shape in prop::collection::vec(prop::collection::vec((kind(), any::<bool>()), 1..=4), 1..=5),
            after in any::<bool>(),
        ) {
            let text = render(&shape, after);
            let saga = parse(&text, Path::new("gen.toml"))
                .map_err(|e| TestCaseError::fail(format!("{e:#?}\n{text}")))?;
            prop_assert_eq!(saga.stages.len(), shape.len());
            prop_assert_eq!(saga.steps.len(), shape.iter().map(Vec::len).sum::<usize>());
            prop_assert_eq!(saga.after_compensation.is_some(), after);
            let mut index = 0;
            for (i, (stage, want)) in saga.stages.iter().zip(&shape).enumerate() {
                prop_assert_eq!(&stage.steps, &(index..index + want.len()).collect::<Vec<_>>());
                prop_assert_eq!(stage.status.is_some(), i % 2 == 1);
                for (j, (kind, retry)) in want.iter().enumerate() {
                    let step = &saga.steps[index + j];
                    prop_assert_eq!(&step.name, &format!("step_{i}_{j}"));
                    prop_assert_eq!(step.stage, i);
                    let pivot = matches!(kind, Kind::Pivot) && want.len() == 1;
                    prop_assert_eq!(step.pivot, pivot);
                    prop_assert_eq!(step.compensation.is_some(), !pivot && !matches!(kind, Kind::ReadOnly));
                    let attempts = if *retry { u32::try_from(j + 1).unwrap() } else { 3 };
                    prop_assert_eq!(step.retry.max_attempts, attempts);
                }
                index += want.len();
            }
        }

        #[test]
        fn deleting_any_line_never_panics(which in 0usize..2, line in any::<prop::sample::Index>()) {
            let original = [ORDER, TRIP][which];
            let lines: Vec<&str> = original.lines().collect();
            let removed = line.index(lines.len());
            let mutated: String = lines
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != removed)
                .map(|(_, l)| format!("{l}\n"))
                .collect();
            let line_count = mutated.lines().count().max(1);
            match parse(&mutated, Path::new("mutated.toml")) {
                Ok(saga) => {
                    let trivial = lines[removed].trim().is_empty() || lines[removed].trim_start().starts_with('#');
                    if trivial {
                        let fingerprint = parse(original, Path::new("x")).unwrap().fingerprint;
                        prop_assert_eq!(saga.fingerprint, fingerprint);
                    }
                }
                Err(errors) => {
                    prop_assert!(!errors.is_empty());
                    for error in errors {
                        prop_assert!((1..=line_count + 1).contains(&error.line), "{} ({} lines)", error, line_count);
                        prop_assert!(error.column >= 1);
                        prop_assert!(!error.message.is_empty());
                    }
                }
            }
        }

        #[test]
        fn formatted_durations_parse_back(millis in 0u64..40 * 86_400_000) {
            let d = Duration::from_millis(millis);
            prop_assert_eq!(crate::duration::parse(&format_duration(d)), Ok(d));
        }
    }
}
