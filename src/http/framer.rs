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
mod tests {
    use super::*;

    fn limits(body: u64) -> BodyLimits {
        BodyLimits {
            body,
            upload: body * 10,
        }
    }

    fn no_keys() -> AuthConfig {
        AuthConfig::default()
    }

    struct Run {
        framer: Framer,
        auth: AuthConfig,
        slots: Arc<StreamSlots>,
        body: u64,
        draining: bool,
    }

    impl Run {
        fn new(body: u64) -> Run {
            Run {
                framer: Framer::default(),
                auth: no_keys(),
                slots: StreamSlots::new(1),
                body,
                draining: false,
            }
        }

        fn feed(&mut self, input: &[u8], now: Instant, out: &mut Vec<u8>) -> Result<(), ApiError> {
            let cx = Context {
                limits: limits(self.body),
                draining: self.draining,
                auth: &self.auth,
                slots: &self.slots,
            };
            self.framer.feed(input, now, &cx, out)
        }
    }

    fn feed_all(chunks: &[&[u8]], max_body: u64) -> (Vec<u8>, Result<(), ApiError>) {
        let mut run = Run::new(max_body);
        let mut out = Vec::new();
        let now = Instant::now();
        for chunk in chunks {
            if let Err(r) = run.feed(chunk, now, &mut out) {
                return (out, Err(r));
            }
        }
        (out, Ok(()))
    }

    #[test]
    fn uploads_have_their_own_limit() {
        let l = limits(100);
        assert_eq!(l.for_request("PUT", "/api/v1/sandboxes/sb-1/files"), 1000);
        assert_eq!(l.for_request("POST", "/api/v1/sandboxes/sb-1/files"), 1000);
        assert_eq!(l.for_request("POST", "/api/v1/sandboxes/sb-1/exec"), 100);
        assert_eq!(
            l.for_request("POST", "/api/v1/sandboxes/sb-1/files/move"),
            100
        );
        assert_eq!(l.for_request("GET", "/api/v1/sandboxes/sb-1/files"), 100);
    }

    #[test]
    fn passes_pipelined_requests_split_anywhere() {
        let stream = b"POST /api/v1/sandboxes HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n\r\n";
        for split in 0..stream.len() {
            let (out, verdict) = feed_all(&[&stream[..split], &stream[split..]], 100);
            assert_eq!(verdict, Ok(()));
            assert_eq!(out, stream.to_vec(), "split at {split}");
        }
    }

    #[test]
    fn a_request_is_forwarded_only_when_its_body_is_complete() {
        let mut run = Run::new(100);
        let mut out = Vec::new();
        let t0 = Instant::now();
        let head = b"POST /api/v1/sandboxes HTTP/1.1\r\nContent-Length: 4\r\n\r\n";
        run.feed(head, t0, &mut out).unwrap();
        run.feed(b"ab", t0, &mut out).unwrap();
        assert!(
            out.is_empty(),
            "nothing may reach tiny_http before the body"
        );
        assert!(run.framer.in_request());
        run.feed(b"cd", t0, &mut out).unwrap();
        assert_eq!(out, [&head[..], b"abcd"].concat());
        assert!(!run.framer.in_request());
    }

    #[test]
    fn body_bytes_are_not_read_as_heads() {
        // A body that contains a blank line must not end a head early.
        let stream = b"POST /api/v1/sandboxes HTTP/1.1\r\nContent-Length: 8\r\n\r\n\r\n\r\nabcd";
        let (out, verdict) = feed_all(&[stream], 100);
        assert_eq!(verdict, Ok(()));
        assert_eq!(out, stream.to_vec());
    }

    #[test]
    fn deadlines_follow_the_phase() {
        let d = Deadlines {
            header: Duration::from_secs(10),
            body: Duration::from_secs(5),
            min_rate: 100,
        };
        let mut run = Run::new(1000);
        let mut out = Vec::new();
        let t0 = Instant::now();
        assert_eq!(run.framer.deadline(&d), None);
        run.feed(b"POST /api/v1/sandboxes HTTP/1.1\r\n", t0, &mut out)
            .unwrap();
        assert_eq!(run.framer.deadline(&d), Some(t0 + d.header));
        let t1 = t0 + Duration::from_secs(1);
        run.feed(b"Content-Length: 500\r\n\r\n", t1, &mut out)
            .unwrap();
        assert_eq!(run.framer.deadline(&d), Some(t1 + d.body));
        // 200 bytes earn 2 s at 100 B/s.
        run.feed(&[b'x'; 200], t1, &mut out).unwrap();
        assert_eq!(
            run.framer.deadline(&d),
            Some(t1 + d.body + Duration::from_secs(2))
        );
        run.feed(&[b'x'; 300], t1, &mut out).unwrap();
        assert_eq!(run.framer.deadline(&d), None);
    }

    #[test]
    fn big_uploads_and_100_continue_stream_within_a_slot() {
        let mut run = Run::new(10);
        let mut out = Vec::new();
        let t0 = Instant::now();
        let head =
            b"PUT /api/v1/sandboxes/sb-1/files?path=a HTTP/1.1\r\nContent-Length: 50\r\n\r\n";
        run.feed(head, t0, &mut out).unwrap();
        assert_eq!(out, head.to_vec(), "a streamed head goes through at once");
        assert!(run.framer.streaming());
        // The only slot is taken: a second streamed body is refused.
        let mut other = Run::new(10);
        other.slots = run.slots.clone();
        let refused = other
            .feed(
                b"POST /api/v1/sandboxes HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
                t0,
                &mut Vec::new(),
            )
            .unwrap_err();
        assert_eq!(refused.status, 503);
        run.feed(&[b'x'; 50], t0, &mut out).unwrap();
        assert!(!run.framer.streaming());
        assert_eq!(out.len(), head.len() + 50);
        // The slot is free again.
        other.framer = Framer::default();
        other
            .feed(
                b"POST /api/v1/sandboxes HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
                t0,
                &mut Vec::new(),
            )
            .unwrap();
    }

    #[test]
    fn refusals() {
        let cases: &[(&[u8], u16)] = &[
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999\r\n\r\n",
                413,
            ),
            (b"POST / HTTP/1.1\r\ncontent-length: 101\r\n\r\n", 413),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                411,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 400),
            (b"GET /-/handoff HTTP/1.1\r\n\r\n", 404),
            (b"GET /%2D/handoff HTTP/1.1\r\n\r\n", 404),
            (b"GET /%2d/%68andoff?a HTTP/1.1\r\n\r\n", 404),
            (b"GET //-/handoff HTTP/1.1\r\n\r\n", 404),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (b"GET /x HTTP/1.1 junk\r\n\r\n", 400),
            (b"GET /x\r\n", 400),
            (b"GET /x HTTP/0.9\r\n", 505),
            (b"GET /x HTTP/2.0\r\n", 505),
            (b"GET /x HTTP/2\r\n", 505),
            (b"GET /x HTTP/1.1\n", 400),
            (b"GET /x HTTP/1.1\r\nA: b\n", 400),
            (b"\n", 400),
            (b"GET /x HTTP/1.1\r\n folded\r\n", 400),
            (b"GET /x HTTP/1.1\r\nNo colon\r\n", 400),
            (b"GET /x HTTP/1.1\r\nA: \x01\r\n", 400),
            ("GET /\u{e9} HTTP/1.1\r\n".as_bytes(), 400),
            (b"GET x HTTP/1.1\r\n", 400),
            (b"G(T /x HTTP/1.1\r\n", 400),
            (b"GET /x http/1.1\r\n", 400),
            (b"GET /x HTTP/1.1x\r\n", 400),
            // Known route and method checks happen before the body...
            (b"POST /nope HTTP/1.1\r\nContent-Length: 5\r\n\r\n", 404),
            (
                b"PUT /api/v1/live HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
                405,
            ),
        ];
        for (head, status) in cases {
            let (out, verdict) = feed_all(&[head], 100);
            assert_eq!(
                verdict.map_err(|r| r.status),
                Err(*status),
                "{}",
                String::from_utf8_lossy(head)
            );
            assert!(out.is_empty(), "a refused head must not be forwarded");
        }
        let huge = vec![b'a'; MAX_HEAD + 10];
        assert_eq!(feed_all(&[&huge], 100).1.map_err(|r| r.status), Err(431));
        // ...but a bodiless request to an unknown route is the handler's.
        let (out, verdict) = feed_all(&[b"GET /nope HTTP/1.1\r\n\r\n"], 100);
        assert_eq!(verdict, Ok(()));
        assert!(!out.is_empty());
        // A stray CRLF between requests is skipped.
        let (out, verdict) = feed_all(&[b"\r\nGET /x HTTP/1.0\r\n\r\n"], 100);
        assert_eq!(verdict, Ok(()));
        assert_eq!(out, b"GET /x HTTP/1.0\r\n\r\n".to_vec());
    }

    #[test]
    fn missing_credentials_are_refused_before_the_body() {
        let mut run = Run::new(100);
        run.auth = AuthConfig {
            api_keys: vec!["k".into()],
            ..AuthConfig::default()
        };
        let mut out = Vec::new();
        let now = Instant::now();
        let refused = run
            .feed(
                b"POST /api/v1/sandboxes HTTP/1.1\r\nContent-Length: 50\r\n\r\n",
                now,
                &mut out,
            )
            .unwrap_err();
        assert_eq!(refused.status, 401);
        // Lowercase scheme and the right key: forwarded once the body is in.
        let mut run = Run {
            framer: Framer::default(),
            ..run
        };
        run.feed(
            b"POST /api/v1/sandboxes HTTP/1.1\r\nAuthorization: bearer k\r\nContent-Length: 2\r\n\r\n{}",
            now,
            &mut out,
        )
        .unwrap();
        assert!(out.ends_with(b"{}"));
    }

    #[test]
    fn draining_refuses_new_requests_but_finishes_bodies() {
        let mut run = Run::new(100);
        let mut out = Vec::new();
        let now = Instant::now();
        // A body already under way is still forwarded while draining...
        run.feed(
            b"POST /api/v1/sandboxes HTTP/1.1\r\nContent-Length: 4\r\n\r\nab",
            now,
            &mut out,
        )
        .unwrap();
        run.draining = true;
        run.feed(b"cd", now, &mut out).unwrap();
        assert!(out.ends_with(b"abcd"));
        // ...but the next request is answered 503 by the relay.
        let r = run
            .feed(b"GET /b HTTP/1.1\r\n\r\n", now, &mut out)
            .unwrap_err();
        assert_eq!(r.status, 503);
    }

    #[test]
    fn refusal_echoes_request_id() {
        let mut run = Run::new(10);
        let r = run
            .feed(
                b"POST / HTTP/1.1\r\nX-Request-ID: abc-1\r\nContent-Length: 500\r\n\r\n",
                Instant::now(),
                &mut Vec::new(),
            )
            .unwrap_err();
        let text = String::from_utf8(refusal(&r, run.framer.request_id.as_deref())).unwrap();
        assert!(text.starts_with("HTTP/1.1 413 "));
        assert!(text.contains("X-Request-ID: abc-1\r\n"));
        assert!(text.contains("PAYLOAD_TOO_LARGE"));
        let allow = ApiError::method_not_allowed("GET");
        assert!(
            String::from_utf8(refusal(&allow, None))
                .unwrap()
                .contains("Allow: GET\r\n")
        );
    }

    proptest::proptest! {
        #[test]
        fn framer_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..8)) {
            let refs: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let _ = feed_all(&refs, 32);
        }
    }
}
