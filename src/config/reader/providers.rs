//! `[providers]`, `[providers.mock]` and `[providers.process]`, and the
//! check that `worker.providers` names known providers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{EMPTY, Reader};
use crate::config::keys;
use crate::config::schema::{
    DAY, HOUR, KNOWN_PROVIDERS, MINUTE, MockConfig, ProcessConfig, ProvidersConfig, WorkerConfig,
};

impl Reader {
    pub(super) fn providers(&mut self, table: &toml::Table) -> ProvidersConfig {
        let pr = self.known_section(table, "providers", "providers");
        let default_provider = self.string(pr, "providers", "default", "mock");
        if !KNOWN_PROVIDERS.contains(&default_provider.as_str()) {
            self.problem(
                "providers.default",
                format!(
                    "unknown provider {default_provider:?} (known: {})",
                    KNOWN_PROVIDERS.join(", ")
                ),
            );
        }
        let mk = match pr.get("mock") {
            None => &*EMPTY,
            Some(toml::Value::Table(t)) => t,
            Some(other) => {
                self.problem(
                    "providers.mock",
                    format!("must be a table, found {}", other.type_str()),
                );
                &*EMPTY
            }
        };
        self.only_keys("providers.mock", mk, &keys::known_in("providers.mock"));
        let failure_rate = match mk.get("failure_rate") {
            None => 0.0,
            Some(toml::Value::Float(f)) if (0.0..=1.0).contains(f) => *f,
            Some(toml::Value::Integer(i)) if (0..=1).contains(i) => *i as f64,
            Some(_) => {
                self.problem(
                    "providers.mock.failure_rate",
                    "must be a number from 0 to 1".into(),
                );
                0.0
            }
        };
        let process = self.process_config(pr);
        ProvidersConfig {
            default: default_provider,
            mock: MockConfig {
                latency: self.duration(
                    mk,
                    "providers.mock",
                    "latency",
                    "0ms",
                    Duration::ZERO,
                    MINUTE,
                ),
                failure_rate,
            },
            process,
        }
    }

    pub(super) fn check_worker_providers(&mut self, worker: &WorkerConfig) {
        for p in &worker.providers {
            if !KNOWN_PROVIDERS.contains(&p.as_str()) {
                self.problem(
                    "worker.providers",
                    format!(
                        "unknown provider {p:?} (known: {})",
                        KNOWN_PROVIDERS.join(", ")
                    ),
                );
            }
        }
    }

    fn process_config(&mut self, providers: &toml::Table) -> ProcessConfig {
        const S: &str = "providers.process";
        let t = self.known_section(providers, "process", S);
        let mut images = BTreeMap::new();
        images.insert("host".to_owned(), PathBuf::from("/"));
        match t.get("images") {
            None => {}
            Some(toml::Value::Table(table)) => {
                for (name, value) in table {
                    let key = format!("{S}.images.{name}");
                    if crate::workers::validate_name("image", name).is_err() {
                        self.problem(&key, "is not a valid image name".into());
                        continue;
                    }
                    match value {
                        toml::Value::String(dir) if Path::new(dir).is_absolute() => {
                            images.insert(name.clone(), PathBuf::from(dir));
                        }
                        _ => self.problem(
                            &key,
                            "must be the absolute path of a root filesystem directory".into(),
                        ),
                    }
                }
            }
            Some(other) => self.problem(
                &format!("{S}.images"),
                format!(
                    "must be a table of name = \"/path\", found {}",
                    other.type_str()
                ),
            ),
        }
        let exec_timeout =
            self.duration(t, S, "exec_timeout", "60s", Duration::from_millis(1), DAY);
        let max_exec_timeout = self.duration(
            t,
            S,
            "max_exec_timeout",
            "1h",
            Duration::from_millis(1),
            DAY,
        );
        if exec_timeout > max_exec_timeout {
            self.problem(
                &format!("{S}.exec_timeout"),
                "must not exceed max_exec_timeout".into(),
            );
        }
        let cgroup = self.string(t, S, "cgroup", "auto");
        if cgroup != "auto" && cgroup != "off" && !Path::new(&cgroup).is_absolute() {
            self.problem(
                &format!("{S}.cgroup"),
                "must be \"auto\", \"off\" or an absolute cgroup v2 directory".into(),
            );
        }
        let proc = self.string(t, S, "proc", "masked");
        if proc != "masked" && proc != "pid" {
            self.problem(&format!("{S}.proc"), "must be \"masked\" or \"pid\"".into());
        }
        let uid_base = self.integer(t, S, "uid_base", 1_900_000_000, 1000, 4_000_000_000) as u32;
        let uid_count = self.integer(t, S, "uid_count", 1_000_000, 1, 1 << 31) as u32;
        if u64::from(uid_base) + u64::from(uid_count) > 4_294_967_294 {
            self.problem(
                &format!("{S}.uid_count"),
                "uid_base + uid_count must stay below 4294967295".into(),
            );
        }
        let uid_registry =
            PathBuf::from(self.string(t, S, "uid_registry", "/run/stacyvmd-uids/registry"));
        if !uid_registry.is_absolute() {
            self.problem(
                &format!("{S}.uid_registry"),
                "must be an absolute path".into(),
            );
        }
        ProcessConfig {
            images,
            uid_base,
            uid_count,
            uid_registry,
            max_processes: self.integer(t, S, "max_processes", 256, 8, 1 << 20) as u32,
            max_open_files: self.integer(t, S, "max_open_files", 1024, 64, 1 << 20) as u32,
            max_file_bytes: (self.integer(t, S, "max_file_mb", 1024, 1, 1 << 30) as u64) << 20,
            exec_timeout,
            max_exec_timeout,
            exec_output_bytes: self.integer(t, S, "exec_output_bytes", 1 << 20, 1024, 1 << 30)
                as usize,
            max_upload_bytes: (self.integer(t, S, "max_upload_mb", 256, 1, 1 << 20) as u64) << 20,
            cgroup,
            disk_mb: self.integer(t, S, "disk_mb", 0, 0, 1 << 24) as u64,
            workspace_mb: self.integer(t, S, "workspace_mb", 1024, 1, 1 << 24) as u64,
            workspace_inodes: self.integer(t, S, "workspace_inodes", 65_536, 64, 1 << 32) as u64,
            file_timeout: self.duration(
                t,
                S,
                "file_timeout",
                "30s",
                Duration::from_millis(100),
                HOUR,
            ),
            max_ops_per_sandbox: self.integer(t, S, "max_ops_per_sandbox", 8, 1, 1 << 16) as usize,
            proc,
        }
    }
}
