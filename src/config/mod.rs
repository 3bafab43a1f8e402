//! Configuration: a TOML file, `STACYVMD_*` environment variables and flags,
//! in rising precedence, validated into one [`Config`].
//!
//! - `schema.rs`: the typed [`Config`] and its sections.
//! - `keys.rs`: every key once, with the field it sets and whether a
//!   SIGHUP may change it; the reader and the reload both follow it.
//! - `reader/`: the TOML reader and validation, one function per section,
//!   collecting every problem as a [`ConfigProblem`] for `check-config`.
//! - `env.rs`: environment variables and command-line [`Overrides`],
//!   layered into the table before it is read.
//! - `reload.rs`: [`Config::reload`] and the swappable [`LiveConfig`].
//!
//! Used by `main` (load, `check-config`) and the supervisor (reload); every
//! thread reads a [`LiveConfig`] snapshot. No thread of its own.

mod env;
mod keys;
mod reader;
mod reload;
mod schema;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;

pub use env::Overrides;
pub use reload::LiveConfig;
pub use schema::{
    AdminConfig, AuthConfig, Config, DATABASE_FILE, DEFAULT_DATA_DIR, DEFAULT_LISTEN,
    KNOWN_PROVIDERS, KeyEntry, KeyRole, LeaseConfig, LogConfig, MockConfig, PlacementPolicy,
    ProcessConfig, ProvidersConfig, QuotaPolicy, SandboxConfig, SchedulerConfig, ServerConfig,
    StoreConfig, WorkerConfig,
};

/// One problem found in the configuration, named by its key.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigProblem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl Config {
    /// Loads file (from the flag, else `STACYVMD_CONFIG`), environment and
    /// flags, and validates the result.
    pub fn load(
        flags: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, Vec<ConfigProblem>> {
        let source = flags.config_path.clone().or_else(|| {
            env("STACYVMD_CONFIG")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        let mut table = match &source {
            Some(path) => reader::read_table(path).map_err(|e| vec![e.into_problem()])?,
            None => toml::Table::new(),
        };
        env::apply_overrides(&mut table, flags, env);
        let state_directory = env("STATE_DIRECTORY").filter(|v| !v.is_empty());
        let runtime_directory = env("RUNTIME_DIRECTORY").filter(|v| !v.is_empty());
        let mut config = Config::from_table_in(
            &table,
            state_directory.as_deref(),
            runtime_directory.as_deref(),
        )?;
        config.source = source;
        Ok(config)
    }

    /// Validates a fully layered table. Every problem is collected.
    pub fn from_table(
        table: &toml::Table,
        state_directory: Option<&str>,
    ) -> Result<Config, Vec<ConfigProblem>> {
        Config::from_table_in(table, state_directory, None)
    }

    /// As `from_table`, with systemd's `RUNTIME_DIRECTORY` (the admin
    /// socket's default home).
    pub fn from_table_in(
        table: &toml::Table,
        state_directory: Option<&str>,
        runtime_directory: Option<&str>,
    ) -> Result<Config, Vec<ConfigProblem>> {
        reader::read(table, state_directory, runtime_directory)
    }
}
