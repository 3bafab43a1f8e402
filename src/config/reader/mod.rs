//! The TOML reader: a layered `toml::Table` into a validated [`Config`].
//!
//! Reading is done by hand over the table instead of a serde derive so
//! that `check-config` can report *every* problem at once (unknown keys,
//! wrong types, bad values) rather than stopping at the first. [`read`]
//! walks the sections in a fixed order, one function each (`sections.rs`,
//! `auth.rs`, `providers.rs`), then the checks that span sections; the
//! keys each section accepts come from the one key table (`keys.rs`).
//! Pure: the environment's directories are parameters.

mod auth;
mod providers;
mod sections;

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::keys;
use super::{Config, ConfigProblem, LogConfig};
use crate::time::{parse_duration, parse_duration_within};

/// Why the configuration file could not become a table.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadFileError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid TOML", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

impl ReadFileError {
    /// As `check-config` lists it: the file as the key, the cause as the
    /// message.
    pub(crate) fn into_problem(self) -> ConfigProblem {
        match self {
            ReadFileError::Read { path, source } => ConfigProblem {
                key: path.display().to_string(),
                message: format!("cannot read: {source}"),
            },
            // The message without the excerpt that `Display` adds.
            ReadFileError::Parse { path, source } => ConfigProblem {
                key: path.display().to_string(),
                message: format!("invalid TOML: {}", source.message()),
            },
        }
    }
}

/// The file at `path` as a table.
pub(crate) fn read_table(path: &Path) -> Result<toml::Table, ReadFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReadFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    text.parse::<toml::Table>()
        .map_err(|source| ReadFileError::Parse {
            path: path.to_owned(),
            source,
        })
}

/// Validates a fully layered table. Every problem is collected, in the
/// order of the sections; a value with a problem reads as its default so
/// that the checks after it still run.
pub(crate) fn read(
    table: &toml::Table,
    state_directory: Option<&str>,
    runtime_directory: Option<&str>,
) -> Result<Config, Vec<ConfigProblem>> {
    let mut r = Reader {
        problems: Vec::new(),
    };
    r.only_sections(table, &keys::sections());
    let server = r.server(table);
    let store = r.store(table, state_directory);
    let worker = r.worker(table);
    let auth = r.auth(table);
    r.check_remote_listen(&server, &auth);
    let level = r.log(table);
    let sandboxes = r.sandboxes(table);
    let leases = r.leases(table);
    let scheduler = r.scheduler(table);
    let providers = r.providers(table);
    r.check_worker_providers(&worker);
    let admin = r.admin(table, &store, runtime_directory);
    let quotas = r.quotas(table);
    if r.problems.is_empty() {
        Ok(Config {
            admin,
            quotas,
            server,
            store,
            worker,
            auth,
            log: LogConfig { level },
            sandboxes,
            leases,
            scheduler,
            providers,
            source: None,
        })
    } else {
        Err(r.problems)
    }
}

/// Typed getters over a table that record problems instead of stopping.
struct Reader {
    problems: Vec<ConfigProblem>,
}

static EMPTY: std::sync::LazyLock<toml::Table> = std::sync::LazyLock::new(toml::Table::new);

impl Reader {
    fn problem(&mut self, key: &str, message: String) {
        self.problems.push(ConfigProblem {
            key: key.to_owned(),
            message,
        });
    }

    fn only_sections(&mut self, table: &toml::Table, known: &[&str]) {
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                self.problem(
                    key,
                    format!("unknown section (expected one of {})", known.join(", ")),
                );
            }
        }
    }

    /// The table `name` of `table` (empty when absent), its keys checked
    /// against the key table's list for `section`.
    fn known_section<'t>(
        &mut self,
        table: &'t toml::Table,
        name: &str,
        section: &str,
    ) -> &'t toml::Table {
        let t = self.section(table, name);
        self.only_keys(section, t, &keys::known_in(section));
        t
    }

    fn section<'t>(&mut self, table: &'t toml::Table, name: &str) -> &'t toml::Table {
        match table.get(name) {
            None => &EMPTY,
            Some(toml::Value::Table(t)) => t,
            Some(other) => {
                self.problem(name, format!("must be a table, found {}", other.type_str()));
                &EMPTY
            }
        }
    }

    fn only_keys(&mut self, section: &str, table: &toml::Table, known: &[&str]) {
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("unknown key (expected one of {})", known.join(", ")),
                );
            }
        }
    }

    fn string(&mut self, t: &toml::Table, section: &str, key: &str, default: &str) -> String {
        match t.get(key) {
            None => default.to_owned(),
            Some(toml::Value::String(s)) => s.clone(),
            Some(other) => {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("must be a string, found {}", other.type_str()),
                );
                default.to_owned()
            }
        }
    }

    fn boolean(&mut self, t: &toml::Table, section: &str, key: &str, default: bool) -> bool {
        match t.get(key) {
            None => default,
            Some(toml::Value::Boolean(b)) => *b,
            Some(other) => {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("must be true or false, found {}", other.type_str()),
                );
                default
            }
        }
    }

    fn integer(
        &mut self,
        t: &toml::Table,
        section: &str,
        key: &str,
        default: i64,
        min: i64,
        max: i64,
    ) -> i64 {
        match t.get(key) {
            None => default,
            Some(toml::Value::Integer(i)) if (min..=max).contains(i) => *i,
            Some(toml::Value::Integer(i)) => {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("{i} is out of range {min}..={max}"),
                );
                default
            }
            Some(other) => {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("must be an integer, found {}", other.type_str()),
                );
                default
            }
        }
    }

    /// A duration key, through the one checked parser with this key's
    /// bounds (`min..=max`).
    #[allow(clippy::too_many_arguments)]
    fn duration(
        &mut self,
        t: &toml::Table,
        section: &str,
        key: &str,
        default: &str,
        min: Duration,
        max: Duration,
    ) -> Duration {
        let fallback = parse_duration(default).expect("built-in default durations parse");
        let text = self.string(t, section, key, default);
        match parse_duration_within(&text, min, max) {
            Ok(d) => d,
            Err(e) => {
                self.problem(&format!("{section}.{key}"), e);
                fallback
            }
        }
    }

    fn id_list(&mut self, t: &toml::Table, section: &str, key: &str) -> Vec<u32> {
        match t.get(key) {
            None => Vec::new(),
            Some(toml::Value::Array(items)) => items
                .iter()
                .filter_map(
                    |item| match item.as_integer().and_then(|i| u32::try_from(i).ok()) {
                        Some(id) => Some(id),
                        None => {
                            self.problem(
                                &format!("{section}.{key}"),
                                "items must be numeric uids or gids".into(),
                            );
                            None
                        }
                    },
                )
                .collect(),
            Some(other) => {
                self.problem(
                    &format!("{section}.{key}"),
                    format!("must be an array of numbers, found {}", other.type_str()),
                );
                Vec::new()
            }
        }
    }

    fn string_list(
        &mut self,
        t: &toml::Table,
        section: &str,
        key: &str,
        default: &[&str],
    ) -> Vec<String> {
        let name = format!("{section}.{key}");
        match t.get(key) {
            None => default.iter().map(|s| (*s).to_owned()).collect(),
            Some(toml::Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        toml::Value::String(s) => out.push(s.clone()),
                        other => self.problem(
                            &name,
                            format!("items must be strings, found {}", other.type_str()),
                        ),
                    }
                }
                out
            }
            Some(other) => {
                self.problem(
                    &name,
                    format!("must be an array of strings, found {}", other.type_str()),
                );
                Vec::new()
            }
        }
    }
}
