//! Unit tests of `framer`.

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
    let stream =
        b"POST /api/v1/sandboxes HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n\r\n";
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
    let head = b"PUT /api/v1/sandboxes/sb-1/files?path=a HTTP/1.1\r\nContent-Length: 50\r\n\r\n";
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
