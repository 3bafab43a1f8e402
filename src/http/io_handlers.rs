//! Exec and file handlers: parse, find the sandbox's worker, send it the
//! operation through its `WorkerLink`, answer. The sandbox must be running
//! and its provider one that runs commands (`process`).

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;

use serde_json::{Value, json};

use super::Ctx;
use super::api::{ApiError, to_json};
use super::handlers::{Reply, Streamed};
use super::ndjson::NdjsonLines;
use super::router::{FileRoute, query_pairs};
use crate::providers::EnterError;
use crate::sandboxes::{OwnerScope, SandboxState};
use crate::worker::ops::{ExecMode, ExecRequest, FsOp, OpError, OpErrorKind, Sink};
use crate::worker::{LinkError, WorkerLink};

/// The one mapping of a sandbox operation's failure to HTTP.
impl From<OpError> for ApiError {
    fn from(e: OpError) -> ApiError {
        let status = match e.kind {
            OpErrorKind::BadRequest | OpErrorKind::Unsupported | OpErrorKind::NotARegularFile => {
                400
            }
            OpErrorKind::Forbidden => 403,
            OpErrorKind::NotFound => 404,
            OpErrorKind::Timeout => 408,
            OpErrorKind::Conflict => 409,
            OpErrorKind::TooLarge => 413,
            OpErrorKind::TooMany => 429,
            OpErrorKind::Internal => 500,
        };
        ApiError::new(status, e.kind.code(), e.message)
    }
}

/// A running sandbox's worker, and the provider it runs under there.
struct Target {
    worker: Arc<dyn WorkerLink>,
    provider: String,
}

/// The running sandbox's worker, checked to run commands and to have the
/// sandbox's runtime running.
fn target(ctx: &Ctx, scope: &OwnerScope, id: &str) -> Result<Target, ApiError> {
    let sandbox = ctx.lifecycle.get(scope, id)?;
    if sandbox.state != SandboxState::Running {
        return Err(ApiError::conflict(format!(
            "sandbox {id} is {}, not running",
            sandbox.state.as_str()
        )));
    }
    let worker = ctx
        .lifecycle
        .links()
        .get(&sandbox.worker_id)
        .map_err(|e| match e {
            LinkError::Remote { worker_id } => ApiError::conflict(format!(
                "sandbox {id} runs on worker {worker_id}, not on this one ({}); remote worker RPC is not available",
                ctx.live.get().worker.id
            )),
            other => ApiError::internal(other.to_string()),
        })?;
    worker.check_io(&sandbox.provider)?;
    if let Err(EnterError::NotRunning(why)) = worker.check_running(&sandbox.provider, id) {
        let marked = ctx.lifecycle.runtime_vanished(&sandbox);
        return Err(ApiError::conflict(if marked {
            format!("{why}; the sandbox is now marked lost")
        } else {
            why
        }));
    }
    Ok(Target {
        worker,
        provider: sandbox.provider,
    })
}

fn object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match super::api::json_body(body)? {
        Value::Object(map) => Ok(map),
        _ => Err(ApiError::bad_request("the body must be a JSON object")),
    }
}

fn string<'v>(field: &str, value: &'v Value) -> Result<&'v str, ApiError> {
    value
        .as_str()
        .ok_or_else(|| ApiError::bad_request(format!("field `{field}` must be a string")))
}

pub fn parse_exec(body: &[u8]) -> Result<ExecRequest, ApiError> {
    let mut req = ExecRequest {
        command: String::new(),
        args: Vec::new(),
        mode: ExecMode::Shell,
        env: BTreeMap::new(),
        workdir: None,
        timeout: None,
        stream: false,
        background: false,
    };
    let mut command = None;
    for (key, value) in &object(body)? {
        match key.as_str() {
            "command" => command = Some(string("command", value)?.to_owned()),
            "args" => {
                let items = value.as_array().ok_or_else(|| {
                    ApiError::bad_request("field `args` must be an array of strings")
                })?;
                req.args = items
                    .iter()
                    .map(|a| string("args", a).map(str::to_owned))
                    .collect::<Result<_, _>>()?;
            }
            "mode" => {
                req.mode = match string("mode", value)? {
                    "" | "shell" => ExecMode::Shell,
                    "argv" => ExecMode::Argv,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "field `mode` must be \"shell\" or \"argv\", not {other:?}"
                        )));
                    }
                }
            }
            "env" => {
                let map = value.as_object().ok_or_else(|| {
                    ApiError::bad_request("field `env` must be an object of strings")
                })?;
                for (k, v) in map {
                    req.env
                        .insert(k.clone(), string(&format!("env.{k}"), v)?.to_owned());
                }
            }
            "workdir" => req.workdir = Some(string("workdir", value)?.to_owned()),
            "timeout" => {
                let text = string("timeout", value)?;
                if !text.is_empty() {
                    req.timeout = Some(
                        // `sandbox_io` checks it against
                        // `max_exec_timeout`, which it knows.
                        crate::time::parse_duration_within(
                            text,
                            std::time::Duration::ZERO,
                            crate::time::MAX_DURATION,
                        )
                        .map_err(|e| ApiError::bad_request(format!("field `timeout`: {e}")))?,
                    );
                }
            }
            "stream" => {
                req.stream = value
                    .as_bool()
                    .ok_or_else(|| ApiError::bad_request("field `stream` must be true or false"))?
            }
            "background" => {
                req.background = value.as_bool().ok_or_else(|| {
                    ApiError::bad_request("field `background` must be true or false")
                })?
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown field `{other}` (expected command, args, mode, env, workdir, timeout, stream, background)"
                )));
            }
        }
    }
    req.command = command.ok_or_else(|| ApiError::bad_request("field `command` is required"))?;
    Ok(req)
}

pub fn exec(ctx: &Ctx, scope: &OwnerScope, id: &str, body: &[u8]) -> Result<Reply, ApiError> {
    let req = parse_exec(body)?;
    let t = target(ctx, scope, id)?;
    if req.stream {
        t.worker.validate_exec(&t.provider, id, &req)?;
        let id = id.to_owned();
        let run = move |out: &mut dyn std::io::Write| {
            let mut lines = NdjsonLines::default();
            let mut send = |stream, data: &[u8]| lines.chunk(out, stream, data);
            let result = t
                .worker
                .exec(&t.provider, &id, &req, Sink::Stream(&mut send));
            let mut lines = NdjsonLines::default();
            let ended = match result {
                Ok(outcome) if outcome.abandoned => {
                    log::debug!("exec stream in {id}: the client went away; command killed");
                    Ok(())
                }
                Ok(outcome) => lines.finish(out, &outcome),
                Err(e) => lines.fail(out, &e),
            };
            if let Err(e) = ended {
                log::debug!("exec stream in {id}: could not finish the stream: {e}");
            }
        };
        return Ok(Reply::streamed(
            200,
            "application/x-ndjson",
            Streamed::Ndjson(Box::new(run)),
        ));
    }
    let outcome = t.worker.exec(&t.provider, id, &req, Sink::Capture)?;
    if outcome.timed_out {
        return Err(ApiError::new(
            408,
            "TIMEOUT",
            format!(
                "command timed out after {}; its process group was killed",
                crate::time::format_duration(outcome.timeout)
            ),
        ));
    }
    Ok(Reply::json(
        200,
        to_json(&json!({
            "exit_code": outcome.exit_code,
            "stdout": outcome.stdout.text(),
            "stderr": outcome.stderr.text(),
            "duration": crate::time::format_duration(outcome.duration),
            "duration_ms": outcome.duration.as_secs_f64() * 1000.0,
            "stdout_truncated": outcome.stdout.truncated(),
            "stderr_truncated": outcome.stderr.truncated(),
        })),
    ))
}

/// A file mode: an octal string (`"755"`, `"0644"`) or a number.
fn parse_mode(value: &Value) -> Result<u32, ApiError> {
    let mode = match value {
        Value::String(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8).ok(),
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        _ => None,
    };
    mode.filter(|m| *m <= 0o7777).ok_or_else(|| {
        ApiError::bad_request("field `mode` must be an octal string such as \"644\"")
    })
}

pub(super) fn query_value(query: &str, name: &str) -> Result<Option<String>, ApiError> {
    let pairs = query_pairs(query).map_err(ApiError::bad_request)?;
    Ok(pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v))
}

fn required(query: &str, name: &str) -> Result<String, ApiError> {
    query_value(query, name)?
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("query parameter `{name}` is required")))
}

fn json_reply(out: Vec<u8>) -> Reply {
    Reply::json(200, out)
}

/// Every file route. `body` is the request body reader (for uploads) and
/// `read_body` reads a bounded JSON body.
pub fn files(
    ctx: &Ctx,
    scope: &OwnerScope,
    id: &str,
    op: FileRoute,
    query: &str,
    body: &mut dyn Read,
    body_length: Option<usize>,
) -> Result<Reply, ApiError> {
    let upload_limit = ctx.live.get().providers.process.max_upload_bytes;
    let t = target(ctx, scope, id)?;
    let run = |op: FsOp, input: Option<&mut dyn Read>| -> Result<Reply, ApiError> {
        Ok(json_reply(t.worker.file_op(&t.provider, id, op, input)?))
    };
    match op {
        FileRoute::Read => {
            let path = required(query, "path")?;
            let reader = t.worker.read_file(&t.provider, id, &path)?;
            Ok(Reply::streamed(
                200,
                "application/octet-stream",
                Streamed::File(reader),
            ))
        }
        FileRoute::Write => {
            let bytes = super::handlers::read_body(body, body_length, upload_limit)?;
            let fields = object(&bytes)?;
            let (mut path, mut content, mut mode) = (None, None, None);
            for (key, value) in &fields {
                match key.as_str() {
                    "path" => path = Some(string("path", value)?.to_owned()),
                    "content" => content = Some(string("content", value)?),
                    "mode" => mode = Some(parse_mode(value)?),
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "unknown field `{other}` (expected path, content, mode)"
                        )));
                    }
                }
            }
            let path = path.ok_or_else(|| ApiError::bad_request("field `path` is required"))?;
            let content =
                content.ok_or_else(|| ApiError::bad_request("field `content` is required"))?;
            let mut input = content.as_bytes();
            run(FsOp::Write { path, mode }, Some(&mut input))
        }
        FileRoute::Upload => {
            let path = required(query, "path")?;
            let mode = match query_value(query, "mode")? {
                Some(m) => Some(parse_mode(&Value::String(m))?),
                None => None,
            };
            if body_length.is_some_and(|n| n as u64 > upload_limit) {
                return Err(ApiError::too_large(upload_limit));
            }
            let mut limited = body.take(upload_limit);
            run(FsOp::Write { path, mode }, Some(&mut limited))
        }
        FileRoute::Delete => {
            let path = required(query, "path")?;
            let recursive = match query_value(query, "recursive")?.as_deref() {
                None | Some("") | Some("false") | Some("0") => false,
                Some("true") | Some("1") => true,
                Some(other) => {
                    return Err(ApiError::bad_request(format!(
                        "query parameter `recursive` must be true or false, not {other:?}"
                    )));
                }
            };
            run(FsOp::Delete { path, recursive }, None)
        }
        FileRoute::List => {
            let path = query_value(query, "path")?
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/workspace".into());
            run(FsOp::List { path }, None)
        }
        FileRoute::Stat => run(
            FsOp::Stat {
                path: required(query, "path")?,
            },
            None,
        ),
        FileRoute::Glob => run(
            FsOp::Glob {
                pattern: required(query, "pattern")?,
            },
            None,
        ),
        FileRoute::Move | FileRoute::Chmod => {
            let limit = ctx.live.get().server.max_body_bytes;
            let bytes = super::handlers::read_body(body, body_length, limit)?;
            let fields = object(&bytes)?;
            let field = |name: &str| -> Result<&Value, ApiError> {
                fields
                    .get(name)
                    .ok_or_else(|| ApiError::bad_request(format!("field `{name}` is required")))
            };
            let known: &[&str] = if op == FileRoute::Move {
                &["old_path", "new_path"]
            } else {
                &["path", "mode"]
            };
            if let Some(other) = fields.keys().find(|k| !known.contains(&k.as_str())) {
                return Err(ApiError::bad_request(format!(
                    "unknown field `{other}` (expected {})",
                    known.join(", ")
                )));
            }
            let action = if op == FileRoute::Move {
                FsOp::Move {
                    from: string("old_path", field("old_path")?)?.to_owned(),
                    to: string("new_path", field("new_path")?)?.to_owned(),
                }
            } else {
                FsOp::Chmod {
                    path: string("path", field("path")?)?.to_owned(),
                    mode: parse_mode(field("mode")?)?,
                }
            };
            run(action, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_bodies() {
        let r = parse_exec(br#"{"command":"echo hi"}"#).unwrap();
        assert_eq!(
            (r.command.as_str(), r.mode, r.stream),
            ("echo hi", ExecMode::Shell, false)
        );
        let r = parse_exec(
            br#"{"command":"ls","args":["-l"],"mode":"argv","env":{"A":"1"},"workdir":"/tmp","timeout":"5s","stream":true}"#,
        )
        .unwrap();
        assert_eq!(r.mode, ExecMode::Argv);
        assert_eq!(r.args, vec!["-l"]);
        assert_eq!(r.timeout, Some(std::time::Duration::from_secs(5)));
        assert!(r.stream);
        for (body, field) in [
            (&br#"{}"#[..], "command"),
            (br#"{"command":1}"#, "command"),
            (br#"{"command":"x","mode":"ARGV"}"#, "mode"),
            (br#"{"command":"x","args":"a"}"#, "args"),
            (br#"{"command":"x","env":{"A":1}}"#, "env.A"),
            (br#"{"command":"x","timeout":"soon"}"#, "timeout"),
            (br#"{"command":"x","nope":1}"#, "nope"),
            (br#"[1]"#, "object"),
            (br#"{"command":"#, "JSON"),
        ] {
            let e = parse_exec(body).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(field), "{field}: {}", e.message);
        }
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode(&json!("755")).unwrap(), 0o755);
        assert_eq!(parse_mode(&json!("0644")).unwrap(), 0o644);
        assert_eq!(parse_mode(&json!(420)).unwrap(), 0o644);
        for bad in [json!("9"), json!("77777"), json!(true), json!("rwx")] {
            assert!(parse_mode(&bad).is_err(), "{bad}");
        }
    }
}
