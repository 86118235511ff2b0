//! `sagaflow saga validate FILE...`: parses each file (a folder stands for its `*.toml`) with the
//! same validation a node applies at start, without a node.
//!
//! Prints `ok: FILE (saga NAME, N steps)` on stdout per valid file and every error line
//! (`file:line:column: \`field\`: message`) on stderr for invalid ones; the exit code is 1 when
//! any file is invalid or unreadable.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Validates `paths`; returns the exit code.
pub fn run(paths: &[PathBuf]) -> ExitCode {
    let mut failed = false;
    for path in paths {
        match expand(path) {
            Ok(files) => {
                for file in files {
                    failed |= !validate_file(&file);
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// A file is itself; a folder is its `*.toml` files, sorted.
fn expand(path: &Path) -> Result<Vec<PathBuf>, String> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let entries = std::fs::read_dir(path)
        .map_err(|e| format!("cannot read folder {}: {e}", path.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("no *.toml files in {}", path.display()));
    }
    Ok(files)
}

/// Prints the outcome for one file; true when it is valid.
fn validate_file(file: &Path) -> bool {
    let source = match std::fs::read_to_string(file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            return false;
        }
    };
    match sagaflow_actors::definition::parse(&source, file) {
        Ok(def) => {
            let after = def
                .after_compensation
                .as_ref()
                .map(|s| format!(", and `{}` after a compensation", s.name))
                .unwrap_or_default();
            let line = format!(
                "ok: {} (saga {}, {} steps{after})\n",
                file.display(),
                def.name,
                def.steps.len()
            );
            if let Err(e) = super::emit(&line) {
                eprintln!("error: {e:#}");
            }
            true
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            if errors.is_empty() {
                eprintln!("{}: invalid saga definition", file.display());
            }
            false
        }
    }
}
