//! Configuration: YAML files, one domain each, validated into [`Limits`].
//!
//! A path is a file or a directory. In a directory every `*.yaml` and
//! `*.yml` file is read, except names starting with a dot: Kubernetes
//! mounts a ConfigMap as such a directory, with hidden `..data` and
//! timestamped entries that must not load twice.

pub mod compile;
pub mod file;
pub mod model;

use std::path::{Path, PathBuf};

pub use compile::Problem;
pub use model::{DomainLimits, Limit, Limits, Meter, NameMap, Rule, Unit};

/// A configuration that cannot be used: every problem, with its file and key path.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", list(.problems))]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

fn list(problems: &[Problem]) -> String {
    problems.iter().map(|problem| format!("  {problem}")).collect::<Vec<_>>().join("\n")
}

/// Loads every domain under `paths` (files or directories).
pub fn load(paths: &[PathBuf]) -> Result<Limits, ConfigError> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for path in paths {
        match yaml_files(path) {
            Ok(found) => files.extend(found),
            Err(problem) => problems.push(problem),
        }
    }
    if files.is_empty() && problems.is_empty() {
        let names = paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
        problems.push(Problem {
            file: names,
            path: String::new(),
            message: "no *.yaml or *.yml file found; point --config at a file or a directory of them".to_owned(),
        });
    }

    let mut domains = Vec::new();
    for file in &files {
        let source = file.display().to_string();
        match std::fs::read_to_string(file) {
            Ok(text) => match parse(&text, &source) {
                Ok(domain) => domains.push(domain),
                Err(found) => problems.extend(found),
            },
            Err(error) => problems.push(Problem {
                file: source,
                path: String::new(),
                message: format!("cannot read the file: {error}"),
            }),
        }
    }

    match compile::index_domains(domains) {
        Ok(domains) if problems.is_empty() => Ok(Limits { domains }),
        Ok(_) => Err(ConfigError { problems }),
        Err(found) => {
            problems.extend(found);
            Err(ConfigError { problems })
        }
    }
}

/// Parses and validates one file's text.
pub fn parse(text: &str, source: &str) -> Result<DomainLimits, Vec<Problem>> {
    let file: file::DomainFile = serde_saphyr::from_str(text).map_err(|error| {
        vec![Problem { file: source.to_owned(), path: String::new(), message: format!("invalid YAML: {error}") }]
    })?;
    compile::compile(file, source)
}

/// The YAML files a path names, sorted so loads are repeatable.
fn yaml_files(path: &Path) -> Result<Vec<PathBuf>, Problem> {
    let problem = |message: String| Problem { file: path.display().to_string(), path: String::new(), message };
    let metadata = std::fs::metadata(path).map_err(|error| problem(format!("cannot read: {error}")))?;
    if metadata.is_file() {
        return Ok(vec![path.to_owned()]);
    }

    let entries = std::fs::read_dir(path).map_err(|error| problem(format!("cannot list the directory: {error}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| problem(format!("cannot list the directory: {error}")))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        // Follow symlinks: ConfigMap files are links into `..data`.
        let is_file = std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file());
        if is_yaml && is_file && !name.starts_with('.') {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}
