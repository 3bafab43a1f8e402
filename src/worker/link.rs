//! `WorkerLink`: how the control plane reaches a worker. Every worker
//! operation (start a runtime, destroy one, list them, check one runs) goes
//! through it, carrying the lease it acts under; the worker checks that
//! lease against its own [`Fence`] before anything happens.
//!
//! [`LocalLink`] is the worker role inside this daemon: it fences, then
//! runs the provider call on the executor. [`Links`] is the one dispatch:
//! it answers the link for a worker id, or says that the worker is remote
//! and no transport to it exists (remote workers are a later issue).

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use super::executor::{ExecError, ExecutorHandle, Late};
use super::fence::{Fence, FenceError};
use super::ops::{ExecOutcome, ExecRequest, FileStream, FsOp, OpError, Sink};
use crate::leases::Lease;
use crate::providers::{EnterError, Provider, ProviderError, Registry, RuntimeSpec, unsupported};
use crate::time::now_ms;

/// Why a worker operation did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The worker refused the lease it was sent.
    #[error(transparent)]
    Fenced(#[from] FenceError),
    /// The worker has no such provider configured.
    #[error("provider {0:?} is not configured on this worker")]
    NoProvider(String),
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// The worker is not this daemon's and there is no transport to it.
    #[error("worker {worker_id} is remote; remote worker RPC is not available")]
    Remote { worker_id: String },
}

/// The operations the control plane sends a worker.
pub trait WorkerLink: Send + Sync {
    /// The worker's id: the holder of every lease it acts under.
    fn worker_id(&self) -> &str;
    /// Starts the runtime for `spec` under `lease` (the sandbox's).
    fn spawn(
        &self,
        lease: &Lease,
        provider: &str,
        spec: RuntimeSpec,
        deadline: Duration,
    ) -> Result<(), LinkError>;
    /// Destroys the runtime `sandbox_id` under `lease`; `late` runs with
    /// the result if it comes after `deadline`.
    fn destroy(
        &self,
        lease: &Lease,
        provider: &str,
        sandbox_id: &str,
        deadline: Duration,
        late: Option<Late>,
    ) -> Result<(), LinkError>;
    /// Removes what is left of a runtime whose record says it is gone
    /// (`lost`): no lease exists for it any more, so none is checked.
    fn clean_up(
        &self,
        provider: &str,
        sandbox_id: &str,
        deadline: Duration,
    ) -> Result<(), LinkError>;
    /// The runtimes a provider has, for reconciliation.
    fn runtimes(&self, provider: &str) -> Result<Vec<String>, LinkError>;
    /// The sandbox ended: the worker forgets its fence entry.
    fn forget(&self, sandbox_id: &str);
    /// The highest lease generation the worker accepted for a resource.
    fn highest_generation(&self, resource_id: &str) -> u64;
    /// The worker's providers (names, capabilities, health, limits).
    fn providers(&self) -> &Registry;

    /// Refuses exec and files on a sandbox whose provider runs no commands.
    fn check_io(&self, provider: &str) -> Result<(), OpError>;
    /// Whether the runtime of `sandbox_id` runs, before a command.
    fn check_running(&self, provider: &str, sandbox_id: &str) -> Result<(), EnterError>;
    fn validate_exec(
        &self,
        provider: &str,
        sandbox_id: &str,
        req: &ExecRequest,
    ) -> Result<(), OpError>;
    fn exec(
        &self,
        provider: &str,
        sandbox_id: &str,
        req: &ExecRequest,
        sink: Sink<'_>,
    ) -> Result<ExecOutcome, OpError>;
    fn file_op(
        &self,
        provider: &str,
        sandbox_id: &str,
        op: FsOp,
        input: Option<&mut dyn Read>,
    ) -> Result<Vec<u8>, OpError>;
    fn read_file(
        &self,
        provider: &str,
        sandbox_id: &str,
        path: &str,
    ) -> Result<Box<dyn FileStream>, OpError>;
}

/// The worker role in this process.
pub struct LocalLink {
    id: String,
    executor: ExecutorHandle,
    providers: Registry,
    fence: Fence,
}

impl LocalLink {
    pub fn new(id: String, executor: ExecutorHandle, providers: Registry) -> LocalLink {
        LocalLink {
            id,
            executor,
            providers,
            fence: Fence::default(),
        }
    }

    fn provider(&self, name: &str) -> Result<&Arc<dyn Provider>, LinkError> {
        self.providers
            .get(name)
            .ok_or_else(|| LinkError::NoProvider(name.to_owned()))
    }
}

impl WorkerLink for LocalLink {
    fn worker_id(&self) -> &str {
        &self.id
    }

    fn spawn(
        &self,
        lease: &Lease,
        provider: &str,
        spec: RuntimeSpec,
        deadline: Duration,
    ) -> Result<(), LinkError> {
        let provider = self.provider(provider)?;
        self.fence.admit(&self.id, lease, now_ms())?;
        Ok(self.executor.spawn(provider, spec, deadline)?)
    }

    fn destroy(
        &self,
        lease: &Lease,
        provider: &str,
        sandbox_id: &str,
        deadline: Duration,
        late: Option<Late>,
    ) -> Result<(), LinkError> {
        let provider = self.provider(provider)?;
        self.fence.admit(&self.id, lease, now_ms())?;
        Ok(self
            .executor
            .destroy(provider, sandbox_id, deadline, late)?)
    }

    fn clean_up(
        &self,
        provider: &str,
        sandbox_id: &str,
        deadline: Duration,
    ) -> Result<(), LinkError> {
        let provider = self.provider(provider)?;
        Ok(self
            .executor
            .destroy(provider, sandbox_id, deadline, None)?)
    }

    fn runtimes(&self, provider: &str) -> Result<Vec<String>, LinkError> {
        self.provider(provider)?
            .list_runtimes()
            .map_err(|e: ProviderError| LinkError::Exec(ExecError::Provider(e)))
    }

    fn forget(&self, sandbox_id: &str) {
        self.fence.forget(sandbox_id);
    }

    fn highest_generation(&self, resource_id: &str) -> u64 {
        self.fence.highest_generation(resource_id)
    }

    fn providers(&self) -> &Registry {
        &self.providers
    }

    fn check_io(&self, provider: &str) -> Result<(), OpError> {
        match self.providers.get(provider) {
            Some(p) if p.runs_commands() => Ok(()),
            _ => Err(unsupported(provider)),
        }
    }

    fn check_running(&self, provider: &str, sandbox_id: &str) -> Result<(), EnterError> {
        match self.providers.get(provider) {
            Some(p) => p.check_running(sandbox_id),
            None => Err(EnterError::NotRunning(format!(
                "provider {provider} of sandbox {sandbox_id} is not configured"
            ))),
        }
    }

    fn validate_exec(
        &self,
        provider: &str,
        sandbox_id: &str,
        req: &ExecRequest,
    ) -> Result<(), OpError> {
        self.io_provider(provider)?.validate_exec(sandbox_id, req)
    }

    fn exec(
        &self,
        provider: &str,
        sandbox_id: &str,
        req: &ExecRequest,
        sink: Sink<'_>,
    ) -> Result<ExecOutcome, OpError> {
        self.io_provider(provider)?.exec(sandbox_id, req, sink)
    }

    fn file_op(
        &self,
        provider: &str,
        sandbox_id: &str,
        op: FsOp,
        input: Option<&mut dyn Read>,
    ) -> Result<Vec<u8>, OpError> {
        self.io_provider(provider)?.file_op(sandbox_id, op, input)
    }

    fn read_file(
        &self,
        provider: &str,
        sandbox_id: &str,
        path: &str,
    ) -> Result<Box<dyn FileStream>, OpError> {
        self.io_provider(provider)?.read_file(sandbox_id, path)
    }
}

impl LocalLink {
    fn io_provider(&self, provider: &str) -> Result<&Arc<dyn Provider>, OpError> {
        self.providers
            .get(provider)
            .ok_or_else(|| unsupported(provider))
    }
}

/// The one dispatch from a worker id to its link.
#[derive(Clone)]
pub struct Links {
    local: Arc<LocalLink>,
}

impl Links {
    pub fn new(local: LocalLink) -> Links {
        Links {
            local: Arc::new(local),
        }
    }

    /// This daemon's own worker.
    pub fn local(&self) -> &LocalLink {
        &self.local
    }

    /// The link to `worker_id`.
    pub fn get(&self, worker_id: &str) -> Result<Arc<dyn WorkerLink>, LinkError> {
        if worker_id == self.local.id {
            Ok(self.local.clone())
        } else {
            Err(LinkError::Remote {
                worker_id: worker_id.to_owned(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::mock::MockProvider;

    fn link() -> (tempdir::Dir, Links) {
        let dir = tempdir::Dir::new();
        let mock = MockProvider::open(dir.path().to_path_buf(), Duration::ZERO, 0.0).unwrap();
        let registry = Registry::new(vec![Arc::new(mock) as Arc<dyn Provider>], "mock");
        let (notifier, _events) = crate::supervise::ExitNotifier::for_tests();
        let executor = super::super::executor::Executor::start(1, &notifier).unwrap();
        let links = Links::new(LocalLink::new(
            "w1".into(),
            executor.handle.clone(),
            registry,
        ));
        std::mem::forget(executor);
        (dir, links)
    }

    mod tempdir {
        pub struct Dir(std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p =
                    std::env::temp_dir().join(format!("stacyvmd-link-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn lease(holder: &str, generation: u64) -> Lease {
        Lease {
            resource_id: "sb-00000000000000a1".into(),
            resource_type: "sandbox".into(),
            holder_id: holder.into(),
            generation,
            acquired_at_ms: 0,
            renewed_at_ms: 0,
            expires_at_ms: now_ms() + 60_000,
            transitions: 0,
        }
    }

    fn spec() -> RuntimeSpec {
        RuntimeSpec {
            sandbox_id: "sb-00000000000000a1".into(),
            image: "default".into(),
            memory_mb: 64,
            vcpus: 1,
        }
    }

    #[test]
    fn the_local_worker_acts_only_under_a_lease_it_holds() {
        let (_dir, links) = link();
        let w = links.get("w1").unwrap();
        let second = Duration::from_secs(5);
        let refused = w.spawn(&lease("w2", 1), "mock", spec(), second);
        assert!(matches!(
            refused,
            Err(LinkError::Fenced(FenceError::NotHolder { .. }))
        ));
        assert!(
            w.runtimes("mock").unwrap().is_empty(),
            "a refused spawn starts nothing"
        );
        w.spawn(&lease("w1", 2), "mock", spec(), second).unwrap();
        assert_eq!(w.runtimes("mock").unwrap(), vec!["sb-00000000000000a1"]);
        let stale = w.destroy(&lease("w1", 1), "mock", "sb-00000000000000a1", second, None);
        assert!(matches!(
            stale,
            Err(LinkError::Fenced(FenceError::Stale { .. }))
        ));
        assert_eq!(
            w.runtimes("mock").unwrap().len(),
            1,
            "a stale destroy destroys nothing"
        );
        w.destroy(&lease("w1", 2), "mock", "sb-00000000000000a1", second, None)
            .unwrap();
        assert!(w.runtimes("mock").unwrap().is_empty());
    }

    #[test]
    fn another_worker_is_remote_and_unreachable() {
        let (_dir, links) = link();
        assert_eq!(
            links.get("w9").err(),
            Some(LinkError::Remote {
                worker_id: "w9".into()
            })
        );
        assert!(matches!(
            links.get("w1").unwrap().runtimes("nope"),
            Err(LinkError::NoProvider(_))
        ));
    }
}
