//! The L1 peers: PostgreSQL 15 and etcd, installed, started and stopped by
//! `benches/fleet/peers.sh` in a scratch directory, on 127.0.0.1 ports
//! picked here. PostgreSQL is driven by pgbench (a custom script with the
//! conditional lease upsert, prepared statements, one resource per client);
//! etcd by this bench's own keep-alive client through etcd's v3 JSON gateway.
//! A peer that cannot be installed or started is reported, not fatal.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::drive::{self, Measurement, Plan};

pub struct Peers {
    script: PathBuf,
    dir: PathBuf,
    pub pg: Result<u16, String>,
    pub etcd: Result<SocketAddr, String>,
}

/// One pgbench run.
#[derive(Clone, Copy)]
pub struct PgFigure {
    pub tps: f64,
    pub latency_ms: f64,
}

impl Peers {
    /// Installs what is missing (apt-get, as root) and starts both peers.
    pub fn start(script: &Path, dir: &Path) -> Peers {
        let mut peers = Peers {
            script: script.to_owned(),
            dir: dir.to_owned(),
            pg: Err("not started".into()),
            etcd: Err("not started".into()),
        };
        if let Err(error) = std::fs::create_dir_all(dir) {
            let why = format!("creating {}: {error}", dir.display());
            peers.pg = Err(why.clone());
            peers.etcd = Err(why);
            return peers;
        }
        if let Err(error) = peers.run(&["install"]) {
            // Start what is there anyway; each start names what is missing.
            eprintln!("fleet: {error}");
        }
        let dir_text = dir.display().to_string();
        peers.pg = free_port().and_then(|port| {
            peers
                .run(&["pg-start", &dir_text, &port.to_string()])
                .map(|_| port)
        });
        peers.etcd = free_port().and_then(|client| {
            let peer = free_port()?;
            peers
                .run(&[
                    "etcd-start",
                    &dir_text,
                    &client.to_string(),
                    &peer.to_string(),
                ])
                .map(|_| SocketAddr::from(([127, 0, 0, 1], client)))
        });
        peers
    }

    fn run(&self, arguments: &[&str]) -> Result<String, String> {
        let output = Command::new("bash")
            .arg(&self.script)
            .args(arguments)
            .output()
            .map_err(|error| format!("running {}: {error}", self.script.display()))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        for line in stderr.lines().filter(|line| line.starts_with("peers.sh: ")) {
            eprintln!("{line}");
        }
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            let last = stderr.lines().last().unwrap_or("").to_owned();
            Err(format!(
                "peers.sh {} failed ({}): {last}",
                arguments.first().unwrap_or(&""),
                output.status
            ))
        }
    }

    /// pgbench with `clients` connections for `duration` (whole seconds);
    /// `mode` is `renew` (each client upserts its own lease) or `refused`
    /// (a rival holds every lease, so the upsert's WHERE refuses).
    pub fn pg_bench(
        &self,
        clients: usize,
        duration: Duration,
        mode: &str,
    ) -> Result<PgFigure, String> {
        let port = self.pg.as_ref().map_err(Clone::clone)?;
        let seconds = duration.as_secs().max(1).to_string();
        let output = self.run(&[
            "pg-bench",
            &self.dir.display().to_string(),
            &port.to_string(),
            &clients.to_string(),
            &seconds,
            mode,
        ])?;
        let field = |name: &str| -> Option<f64> {
            output
                .split_whitespace()
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                .and_then(|value| value.parse().ok())
        };
        let failed = field("failed").unwrap_or(0.0);
        if failed > 0.0 {
            return Err(format!("pgbench: {failed} failed transactions"));
        }
        Ok(PgFigure {
            tps: field("tps").ok_or_else(|| format!("no tps in {output:?}"))?,
            latency_ms: field("latency_ms").unwrap_or(0.0),
        })
    }

    /// Conditional upsert as one etcd transaction per request, each
    /// connection on its own key: if the key's value is this holder, put it
    /// again (attached to the holder's etcd lease, which carries the
    /// expiry); else, if the key does not exist, create it; else read it.
    /// Every put is a Raft entry fsynced to etcd's WAL before the answer.
    pub fn etcd_txn(&self, plan: Plan) -> Result<Measurement, String> {
        let addr = *self.etcd.as_ref().map_err(Clone::clone)?;
        let bodies: Vec<String> = (0..plan.connections)
            .map(|c| {
                let lease = etcd_grant(addr)?;
                let body = etcd_txn_body(&format!("etcd-r-{c}"), &format!("h-{c}"), &lease);
                // The first one creates the key (the nested branch).
                let (status, answer) = drive::once(addr, &etcd_post("/v3/kv/txn", &body))?;
                if status != 200 {
                    return Err(format!("etcd txn setup: {status} {answer}"));
                }
                Ok(body)
            })
            .collect::<Result<_, String>>()?;
        drive::drive(
            addr,
            plan,
            |status, body| status == 200 && contains(body, br#""succeeded":true"#),
            |c| vec![etcd_post("/v3/kv/txn", &bodies[c])],
        )
    }

    /// Lease keepalive through the gateway (one request, one answer, on a
    /// keep-alive connection): what an etcd client does to keep a lock.
    /// etcd keeps lease expiry in the leader's memory; a keepalive is not a
    /// Raft write (checkpointing is off by default in 3.4), so this is the
    /// cheaper, non-durable peer figure.
    pub fn etcd_keepalive(&self, plan: Plan) -> Result<Measurement, String> {
        let addr = *self.etcd.as_ref().map_err(Clone::clone)?;
        let leases: Vec<String> = (0..plan.connections)
            .map(|_| etcd_grant(addr))
            .collect::<Result<_, String>>()?;
        drive::drive(
            addr,
            plan,
            |status, body| status == 200 && contains(body, br#""TTL""#),
            |c| {
                vec![etcd_post(
                    "/v3/lease/keepalive",
                    &format!(r#"{{"ID":"{}"}}"#, leases[c]),
                )]
            },
        )
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        if let Err(error) = self.run(&["stop", &self.dir.display().to_string()]) {
            eprintln!("fleet: stopping the peers: {error}");
        }
    }
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|error| format!("finding a free loopback port: {error}"))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn etcd_post(path: &str, json: &str) -> Vec<u8> {
    crate::client::post_json(path, json)
}

/// Grants an etcd lease that outlives the bench; its id as the gateway
/// spells it (a decimal string).
fn etcd_grant(addr: SocketAddr) -> Result<String, String> {
    let (status, body) = drive::once(addr, &etcd_post("/v3/lease/grant", r#"{"TTL":3600}"#))?;
    let value: serde_json::Value = serde_json::from_str(&body)
        .map_err(|error| format!("etcd lease grant: {error}: {body}"))?;
    match (status, value.get("ID").and_then(|id| id.as_str())) {
        (200, Some(id)) => Ok(id.to_owned()),
        _ => Err(format!("etcd lease grant: {status} {body}")),
    }
}

fn etcd_txn_body(key: &str, holder: &str, lease: &str) -> String {
    let key = base64(key.as_bytes());
    let holder = base64(holder.as_bytes());
    let put =
        format!(r#"{{"request_put":{{"key":"{key}","value":"{holder}","lease":"{lease}"}}}}"#);
    format!(
        concat!(
            r#"{{"compare":[{{"key":"{key}","target":"VALUE","result":"EQUAL","value":"{holder}"}}],"#,
            r#""success":[{put}],"#,
            r#""failure":[{{"request_txn":{{"#,
            r#""compare":[{{"key":"{key}","target":"CREATE","result":"EQUAL","create_revision":"0"}}],"#,
            r#""success":[{put}],"#,
            r#""failure":[{{"request_range":{{"key":"{key}"}}}}]}}}}]}}"#
        ),
        key = key,
        holder = holder,
        put = put,
    )
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
