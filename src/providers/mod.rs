//! Providers run sandbox runtimes (mock now; process, microVM later). The
//! worker role calls them through its executor (`crate::worker::executor`),
//! never on an HTTP or store thread.

pub mod mock;
pub mod process;

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use crate::worker::ops::{ExecOutcome, ExecRequest, FileStream, FsOp, OpError, OpErrorKind, Sink};

/// What a provider needs to start a runtime. The runtime is named by the
/// sandbox id, so reconciliation can match runtimes to records.
#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeSpec {
    pub sandbox_id: String,
    pub image: String,
    pub memory_mb: u32,
    pub vcpus: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderError(pub String);

impl std::fmt::Display for ProviderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProviderError {}

pub trait Provider: Send + Sync {
    fn name(&self) -> &str;
    fn capabilities(&self) -> Vec<String>;
    /// Starts the runtime; returns when it runs.
    fn spawn(&self, spec: &RuntimeSpec) -> Result<(), ProviderError>;
    /// Stops the runtime and removes its state. Destroying a runtime that
    /// does not exist succeeds (destroy is retried after failures).
    fn destroy(&self, sandbox_id: &str) -> Result<(), ProviderError>;
    /// Every runtime the provider has, for reconciliation, in any order.
    fn list_runtimes(&self) -> Result<Vec<String>, ProviderError>;
    /// How many runtimes it has: for metrics and `GET /api/v1/providers`,
    /// read on every scrape, so without building the list when it can.
    fn runtime_count(&self) -> usize {
        self.list_runtimes().map_or(0, |r| r.len())
    }
    fn health(&self) -> Result<(), ProviderError>;
    /// How sandbox limits are enforced, for `GET /api/v1/providers`.
    fn limits(&self) -> String {
        "none".into()
    }
    /// The limits a spawn names that do not hold for the sandbox as a
    /// whole here (for `GET /api/v1/providers`): empty when all hold.
    fn soft_limits(&self) -> Vec<&'static str> {
        Vec::new()
    }
    /// Refuses an image this provider cannot run, naming the ones it can.
    fn check_image(&self, _image: &str) -> Result<(), String> {
        Ok(())
    }
    /// Whether its sandboxes run commands and hold files (exec and the
    /// file routes); the methods below refuse when not.
    fn runs_commands(&self) -> bool {
        false
    }
    /// Whether the runtime of `sandbox_id` is running, for a command.
    fn check_running(&self, _sandbox_id: &str) -> Result<(), EnterError> {
        Ok(())
    }
    /// Checks an exec request before anything runs (a streamed exec can
    /// then still answer with an error status).
    fn validate_exec(&self, _sandbox_id: &str, _req: &ExecRequest) -> Result<(), OpError> {
        Err(unsupported(self.name()))
    }
    /// Runs a command in the sandbox; a timeout is an outcome, not an error.
    fn exec(
        &self,
        _sandbox_id: &str,
        _req: &ExecRequest,
        _sink: Sink<'_>,
    ) -> Result<ExecOutcome, OpError> {
        Err(unsupported(self.name()))
    }
    /// A file operation whose answer is one JSON document; `input` is a
    /// file's new content.
    fn file_op(
        &self,
        _sandbox_id: &str,
        _op: FsOp,
        _input: Option<&mut dyn Read>,
    ) -> Result<Vec<u8>, OpError> {
        Err(unsupported(self.name()))
    }
    /// Opens a file of the sandbox for reading out.
    fn read_file(&self, _sandbox_id: &str, _path: &str) -> Result<Box<dyn FileStream>, OpError> {
        Err(unsupported(self.name()))
    }
}

/// The refusal of exec and files by a provider that does not run commands.
pub fn unsupported(provider: &str) -> OpError {
    OpError::new(
        OpErrorKind::Unsupported,
        format!(
            "provider {provider:?} does not run commands or hold files; use provider \"process\""
        ),
    )
}

/// Why a command or file operation could not be started in a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnterError {
    /// The sandbox's runtime is not running (killed from outside, or not
    /// on this worker).
    NotRunning(String),
    Failed(String),
}

/// The configured providers, by name, and the default one.
#[derive(Clone)]
pub struct Registry {
    providers: BTreeMap<String, Arc<dyn Provider>>,
    default: String,
}

impl Registry {
    pub fn new(providers: Vec<Arc<dyn Provider>>, default: &str) -> Registry {
        let providers = providers
            .into_iter()
            .map(|p| (p.name().to_owned(), p))
            .collect();
        Registry {
            providers,
            default: default.to_owned(),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.providers.get(name)
    }

    pub fn default_name(&self) -> &str {
        &self.default
    }

    pub fn names(&self) -> Vec<&str> {
        self.providers.keys().map(String::as_str).collect()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Provider>> {
        self.providers.values()
    }
}
