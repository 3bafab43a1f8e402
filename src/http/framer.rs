//! Request framing for the relay (`conn`): finds request boundaries in one
//! client's byte stream, checks every request line and head, holds each
//! request until its whole body is in, and says by when the client must have
//! sent more. Pure: no I/O, and the time is a parameter.
//!
//! Why it holds bodies. tiny_http hands a request to an `http-N` thread as
//! soon as its head is parsed, and the handler then reads the body at the
//! client's pace: a client that declares a body and sends it slowly (or not
//! at all) holds a handler thread, and 16 of them stall the API. So a
//! request reaches tiny_http only whole: head and body, up to
//! `server.max_body_bytes`, at local speed. The only bodies streamed through
//! are those that cannot be held in memory (file uploads above
//! `max_body_bytes`) or whose client waits for `100 Continue`; they take one
//! of a few [`StreamSlots`] and are bounded by the minimum rate.
//!
//! Deadlines ([`Deadlines`]): a head must be complete `header_timeout` after
//! its first byte; a body gets `body_timeout`, extended by 1 / `min_body_rate`
//! seconds per byte received, so a steady slow upload passes and a trickle
//! does not. The relay answers a late client 408 and closes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::api::ApiError;
use super::auth::{Presented, authorize, bearer_token};
use super::router::{RouteError, percent_decode, route};
use crate::config::AuthConfig;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;

/// Request body limits: `body` for every request, `upload` for file
/// uploads (`POST`/`PUT /api/v1/sandboxes/{id}/files`).
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub body: u64,
    pub upload: u64,
}

impl BodyLimits {
    fn for_request(&self, method: &str, path: &str) -> u64 {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let upload = matches!(method, "POST" | "PUT")
            && matches!(segments.as_slice(), ["api", "v1", "sandboxes", _, "files"]);
        if upload { self.upload } else { self.body }
    }
}

/// How long a client may take over a request (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    pub header: Duration,
    pub body: Duration,
    /// Bytes per second; at least 1.
    pub min_rate: u64,
}

/// No deadline is pushed further than this from the start of its phase.
const LONGEST_DEADLINE: Duration = Duration::from_secs(7 * 24 * 3600);

impl Deadlines {
    fn body_deadline(&self, started: Instant, received: u64) -> Instant {
        let earned = Duration::from_secs_f64(received as f64 / self.min_rate.max(1) as f64);
        started + (self.body + earned).min(LONGEST_DEADLINE)
    }
}

/// Bounds how many request bodies are streamed to handler threads at once.
pub struct StreamSlots {
    used: AtomicUsize,
    max: usize,
}

/// One streamed body in progress; freed on drop.
pub struct StreamSlot(Arc<StreamSlots>);

impl StreamSlots {
    pub fn new(max: usize) -> Arc<StreamSlots> {
        Arc::new(StreamSlots {
            used: AtomicUsize::new(0),
            max,
        })
    }

    fn try_take(self: &Arc<Self>) -> Option<StreamSlot> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                (used < self.max).then_some(used + 1)
            })
            .ok()
            .map(|_| StreamSlot(self.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the framer needs besides the bytes.
pub struct Context<'a> {
    pub limits: BodyLimits,
    /// A graceful stop is under way: new requests get 503.
    pub draining: bool,
    /// To refuse a request that will fail authorization before its body.
    pub auth: &'a AuthConfig,
    pub slots: &'a Arc<StreamSlots>,
}

#[derive(Default)]
pub struct Framer {
    /// The head being read.
    head: Vec<u8>,
    /// Where the current line of `head` starts.
    line_start: usize,
    /// A checked head and the part of its body received so far.
    held: Vec<u8>,
    body_left: u64,
    /// Set while a body is streamed through instead of held.
    streaming: Option<StreamSlot>,
    /// When the current head or body started; `None` between requests.
    started: Option<Instant>,
    received: u64,
    /// The X-Request-ID of the head being refused, to echo in the answer.
    pub request_id: Option<String>,
}

/// What a complete, accepted head asks for.
struct Plan {
    length: u64,
    expects_continue: bool,
}

impl Framer {
    /// A request has started and is not yet complete.
    pub fn in_request(&self) -> bool {
        self.started.is_some()
    }

    /// The head of the request under way was forwarded; its body is not.
    pub fn streaming(&self) -> bool {
        self.streaming.is_some()
    }

    /// By when the client must have sent more; `None` between requests
    /// (the idle timeout applies there).
    pub fn deadline(&self, deadlines: &Deadlines) -> Option<Instant> {
        let started = self.started?;
        Some(if self.body_left > 0 {
            deadlines.body_deadline(started, self.received)
        } else {
            started + deadlines.header
        })
    }

    /// Appends to `out` the bytes that may go to tiny_http; an error means
    /// the request under way is refused with that answer, and the
    /// connection ends after the answers before it.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        now: Instant,
        cx: &Context<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), ApiError> {
        while !input.is_empty() {
            if self.body_left > 0 {
                let n = input
                    .len()
                    .min(usize::try_from(self.body_left).unwrap_or(usize::MAX));
                let (chunk, rest) = input.split_at(n);
                if self.streaming.is_some() {
                    out.extend_from_slice(chunk);
                } else {
                    self.held.extend_from_slice(chunk);
                }
                self.body_left -= n as u64;
                self.received += n as u64;
                input = rest;
                if self.body_left == 0 {
                    out.append(&mut self.held);
                    self.streaming = None;
                    self.started = None;
                }
                continue;
            }
            let (part, rest) = match input.iter().position(|&b| b == b'\n') {
                Some(i) => input.split_at(i + 1),
                None => (input, &[][..]),
            };
            input = rest;
            self.started.get_or_insert(now);
            self.head.extend_from_slice(part);
            if self.head.len() > MAX_HEAD {
                return Err(ApiError::new(
                    431,
                    "BAD_REQUEST",
                    format!("request head is larger than {MAX_HEAD} bytes"),
                ));
            }
            if self.head.ends_with(b"\n") {
                self.end_of_line(now, cx, out)?;
            }
        }
        Ok(())
    }

    fn end_of_line(
        &mut self,
        now: Instant,
        cx: &Context<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), ApiError> {
        let newline = self.head.len() - 1;
        if newline == self.line_start || self.head[newline - 1] != b'\r' {
            return Err(ApiError::bad_request(
                "every line of a request head must end with CRLF",
            ));
        }
        let line = &self.head[self.line_start..newline - 1];
        if self.line_start == 0 {
            if line.is_empty() {
                // A stray CRLF between requests (RFC 9112, section 2.2).
                self.head.clear();
                self.started = None;
                return Ok(());
            }
            check_request_line(line)?;
        } else if !line.is_empty() {
            check_header_line(line)?;
        } else {
            self.line_start = 0;
            return self.end_of_head(now, cx, out);
        }
        self.line_start = self.head.len();
        Ok(())
    }

    fn end_of_head(
        &mut self,
        now: Instant,
        cx: &Context<'_>,
        out: &mut Vec<u8>,
    ) -> Result<(), ApiError> {
        let plan = self.check_head(cx)?;
        self.received = 0;
        self.body_left = plan.length;
        if plan.length == 0 {
            out.append(&mut self.head);
            self.started = None;
        } else if plan.length > cx.limits.body || plan.expects_continue {
            let slot = cx.slots.try_take().ok_or_else(|| {
                ApiError::unavailable("too many streamed request bodies in progress; retry later")
            })?;
            self.streaming = Some(slot);
            out.append(&mut self.head);
            self.started = Some(now);
        } else {
            self.held = std::mem::take(&mut self.head);
            self.started = Some(now);
        }
        Ok(())
    }

    /// Checks a complete head (its lines are already checked one by one).
    fn check_head(&mut self, cx: &Context<'_>) -> Result<Plan, ApiError> {
        self.request_id = None;
        // Every byte is printable ASCII by now (see the line checks).
        let text = String::from_utf8_lossy(&self.head);
        let mut lines = text.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let mut words = request_line.split(' ');
        let method = words.next().unwrap_or_default();
        let target = words.next().unwrap_or_default();
        let path = target.split('?').next().unwrap_or_default();
        if is_private(path) {
            return Err(ApiError::not_found(format!("no route for {path}")));
        }
        let mut length: Option<u64> = None;
        let mut expects_continue = false;
        let mut presented = Presented::default();
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim_matches([' ', '\t']);
            if name.eq_ignore_ascii_case("x-request-id") {
                self.request_id = Some(value.to_owned()).filter(|v| super::usable_request_id(v));
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(ApiError::new(
                    411,
                    "BAD_REQUEST",
                    "chunked request bodies are not accepted; send Content-Length",
                ));
            } else if name.eq_ignore_ascii_case("content-length") {
                let parsed = Some(value)
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .filter(|n| length.is_none_or(|l| l == *n));
                let Some(n) = parsed else {
                    return Err(ApiError::bad_request(
                        "invalid or conflicting Content-Length",
                    ));
                };
                length = Some(n);
            } else if name.eq_ignore_ascii_case("expect") {
                expects_continue = value.eq_ignore_ascii_case("100-continue");
            } else if name.eq_ignore_ascii_case("x-api-key") {
                presented.api_key = Some(value);
            } else if name.eq_ignore_ascii_case("x-admin-api-key") {
                presented.admin_key = Some(value);
            } else if name.eq_ignore_ascii_case("authorization") {
                // The handler reads it with the same function: the relay
                // never refuses what the handler would take.
                presented.bearer = bearer_token(value);
            } else if name.eq_ignore_ascii_case("x-user-id") {
                presented.user_id = Some(value);
            }
        }
        let length = length.unwrap_or(0);
        let max_body = cx.limits.for_request(method, path);
        if length > max_body {
            return Err(ApiError::too_large(max_body));
        }
        if cx.draining {
            return Err(ApiError::unavailable("the daemon is shutting down"));
        }
        // A request that will be refused is answered before its body: the
        // client need not send it, and nobody waits for it.
        if length > 0 {
            let route = route(method, path).map_err(|e| match e {
                RouteError::NotFound => ApiError::not_found(format!("no route for {path}")),
                RouteError::MethodNotAllowed(allow) => ApiError::method_not_allowed(allow),
                RouteError::BadPath(why) => ApiError::bad_request(why),
            })?;
            if let Err(e) = authorize(route.access(), cx.auth, &presented) {
                crate::metrics::METRICS.http.auth_failures.inc();
                log::warn!("{method} {path}: {} (answered by the relay)", e.message);
                return Err(e);
            }
        }
        Ok(Plan {
            length,
            expects_continue,
        })
    }
}

/// `/-/...` paths belong to the relay (the handoff probe), however the
/// client spells them.
fn is_private(path: &str) -> bool {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    first == "-" || percent_decode(first).is_some_and(|s| s.trim_start_matches('/') == "-")
}

/// tchar of RFC 9110: what a method or a header name may contain.
fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

/// `METHOD SP origin-form SP HTTP/1.x`, printable ASCII only.
fn check_request_line(line: &[u8]) -> Result<(), ApiError> {
    if !line.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return Err(ApiError::bad_request(
            "the request line may contain only printable ASCII",
        ));
    }
    let words: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
    let [method, target, version] = words.as_slice() else {
        return Err(ApiError::bad_request(
            "the request line must be: METHOD SP /path SP HTTP/1.1",
        ));
    };
    if !is_token(method) {
        return Err(ApiError::bad_request("invalid request method"));
    }
    if !target.starts_with(b"/") {
        return Err(ApiError::bad_request(
            "the request target must be an absolute path (/...)",
        ));
    }
    match *version {
        b"HTTP/1.1" | b"HTTP/1.0" => Ok(()),
        [b'H', b'T', b'T', b'P', b'/', rest @ ..]
            if matches!(rest, [d] | [d, b'.', _] if d.is_ascii_digit())
                && rest.iter().all(|b| b.is_ascii_digit() || *b == b'.') =>
        {
            Err(ApiError::new(
                505,
                "HTTP_VERSION_NOT_SUPPORTED",
                format!(
                    "{} is not supported; use HTTP/1.1",
                    String::from_utf8_lossy(version)
                ),
            ))
        }
        _ => Err(ApiError::bad_request(
            "the request line must end with HTTP/1.1 or HTTP/1.0",
        )),
    }
}

/// `name: value`, printable ASCII (and tabs) only, no line folding.
fn check_header_line(line: &[u8]) -> Result<(), ApiError> {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(ApiError::bad_request("a header line has no colon"));
    };
    if !is_token(&line[..colon]) {
        return Err(ApiError::bad_request(
            "invalid header name (or obsolete line folding)",
        ));
    }
    if !line[colon + 1..]
        .iter()
        .all(|b| b.is_ascii_graphic() || *b == b' ' || *b == b'\t')
    {
        return Err(ApiError::bad_request(
            "header values may contain only printable ASCII",
        ));
    }
    Ok(())
}

/// Ids for answers the relay gives itself when the client sent none.
static RELAY_IDS: AtomicUsize = AtomicUsize::new(0);

/// The relay's own answer to a refused request: JSON like every handler
/// error, and `Connection: close`.
pub fn refusal(error: &ApiError, request_id: Option<&str>) -> Vec<u8> {
    let body = error.body();
    let id = match request_id {
        Some(id) => format!("X-Request-ID: {id}\r\n"),
        None => format!(
            "X-Request-ID: relay-{:x}\r\n",
            RELAY_IDS.fetch_add(1, Ordering::Relaxed)
        ),
    };
    let mut extra = String::new();
    if error.status == 503 {
        extra.push_str("Retry-After: 1\r\n");
    }
    if let Some(allow) = error.allow {
        extra.push_str(&format!("Allow: {allow}\r\n"));
    }
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{id}{extra}Connection: close\r\n\r\n",
        error.status,
        reason(error.status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests;
