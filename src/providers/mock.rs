//! The `mock` provider: runtimes that do nothing, for tests and benchmarks.
//!
//! Like a real provider's processes, its runtimes outlive the daemon: each
//! is a marker file in `<data_dir>/mock-runtimes/`, so restart
//! reconciliation has something true to compare against. `latency` delays
//! every spawn and destroy; `failure_rate` makes that fraction of spawns fail
//! (deterministically spread, not random), for failure-path tests.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{Provider, ProviderError, RuntimeSpec};

pub struct MockProvider {
    dir: PathBuf,
    running: Mutex<HashSet<String>>,
    latency: Duration,
    /// Spawns that fail per 1,000,000.
    failures_per_million: u64,
    spawns: AtomicU64,
}

impl MockProvider {
    pub fn open(
        dir: PathBuf,
        latency: Duration,
        failure_rate: f64,
    ) -> std::io::Result<MockProvider> {
        std::fs::create_dir_all(&dir)?;
        let mut running = HashSet::new();
        for entry in std::fs::read_dir(&dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if crate::sandboxes::is_sandbox_id(&name) {
                running.insert(name);
            }
        }
        Ok(MockProvider {
            dir,
            running: Mutex::new(running),
            latency,
            failures_per_million: (failure_rate.clamp(0.0, 1.0) * 1_000_000.0) as u64,
            spawns: AtomicU64::new(0),
        })
    }

    fn marker(&self, sandbox_id: &str) -> Result<PathBuf, ProviderError> {
        if !crate::sandboxes::is_sandbox_id(sandbox_id) {
            return Err(ProviderError(format!("not a sandbox id: {sandbox_id:?}")));
        }
        Ok(self.dir.join(sandbox_id))
    }

    fn delay(&self) {
        if !self.latency.is_zero() {
            std::thread::sleep(self.latency);
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Provider for MockProvider {
    fn name(&self) -> &str {
        "mock"
    }

    fn capabilities(&self) -> Vec<String> {
        vec!["spawn".into(), "destroy".into()]
    }

    fn limits(&self) -> String {
        "none (mock provider)".into()
    }

    fn spawn(&self, spec: &RuntimeSpec) -> Result<(), ProviderError> {
        let marker = self.marker(&spec.sandbox_id)?;
        self.delay();
        let n = self.spawns.fetch_add(1, Ordering::Relaxed);
        // Spread failures evenly: spawn n fails when the running total of
        // the failure rate crosses a whole number.
        let failing = (n + 1) * self.failures_per_million / 1_000_000
            > n * self.failures_per_million / 1_000_000;
        if failing {
            return Err(ProviderError(format!(
                "mock: injected failure spawning {}",
                spec.sandbox_id
            )));
        }
        std::fs::write(&marker, b"").map_err(|e| ProviderError(format!("mock: {e}")))?;
        self.running().insert(spec.sandbox_id.clone());
        Ok(())
    }

    fn destroy(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        let marker = self.marker(sandbox_id)?;
        self.delay();
        match std::fs::remove_file(&marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(ProviderError(format!("mock: {e}"))),
        }
        self.running().remove(sandbox_id);
        Ok(())
    }

    /// In no particular order: reconciliation only asks whether a runtime
    /// is among them (sorting 100,000 ids cost startup tens of ms).
    fn list_runtimes(&self) -> Result<Vec<String>, ProviderError> {
        Ok(self.running().iter().cloned().collect())
    }

    fn runtime_count(&self) -> usize {
        self.running().len()
    }

    fn health(&self) -> Result<(), ProviderError> {
        std::fs::metadata(&self.dir)
            .map(|_| ())
            .map_err(|e| ProviderError(format!("mock: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("stacyvmd-mock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn spec(id: &str) -> RuntimeSpec {
        RuntimeSpec {
            sandbox_id: id.into(),
            image: "default".into(),
            memory_mb: 1,
            vcpus: 1,
        }
    }

    #[test]
    fn runtimes_survive_reopen() {
        let d = dir("reopen");
        let p = MockProvider::open(d.clone(), Duration::ZERO, 0.0).unwrap();
        p.spawn(&spec("sb-00000000000000aa")).unwrap();
        p.spawn(&spec("sb-00000000000000bb")).unwrap();
        p.destroy("sb-00000000000000aa").unwrap();
        p.destroy("sb-00000000000000aa").unwrap(); // idempotent
        let reopened = MockProvider::open(d, Duration::ZERO, 0.0).unwrap();
        assert_eq!(
            reopened.list_runtimes().unwrap(),
            vec!["sb-00000000000000bb"]
        );
        assert!(p.spawn(&spec("../../etc/passwd")).is_err());
    }

    #[test]
    fn failure_injection_hits_the_rate() {
        let p = MockProvider::open(dir("failures"), Duration::ZERO, 0.25).unwrap();
        let failed = (0..400u64)
            .filter(|i| p.spawn(&spec(&format!("sb-{i:016x}"))).is_err())
            .count();
        assert_eq!(failed, 100);
    }
}
