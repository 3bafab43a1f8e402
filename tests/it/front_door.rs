//! The HTTP front door under hostile clients: slow heads and bodies,
//! malformed request lines, private relay paths, one client hoarding
//! connections, and a small file-descriptor limit.
//!
//! Every test holds `Turn::alone` (see `serial`): they open many
//! connections and time answers, so no other test of the binary may
//! compete with them for the two cores.

use crate::common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Client, Daemon, Request, assert_error, assert_status, poll_until};

/// Alone in the whole test binary, not only among this module's tests.
fn serial() -> common::Turn {
    common::Turn::alone()
}

/// A raw connection that has written `bytes` and nothing more.
fn raw(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream.set_nodelay(true).unwrap();
    stream.write_all(bytes).expect("write");
    stream
}

/// Reads one response within `within`, then expects the connection to be
/// closed; returns the response.
fn answer_then_close(stream: TcpStream, within: Duration, what: &str) -> common::Response {
    let mut client = Client::from_stream(stream);
    client.set_read_timeout(within);
    let resp = client
        .read_response()
        .unwrap_or_else(|e| panic!("{what}: no answer within {within:?}: {e}"));
    let mut rest = client.stream().try_clone().unwrap();
    rest.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 256];
    match rest.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(n) => panic!(
            "{what}: more bytes after the answer: {:?}\n{resp}",
            String::from_utf8_lossy(&buf[..n])
        ),
        Err(e) => panic!("{what}: connection not closed after the answer: {e}\n{resp}"),
    }
    resp
}

/// `/api/v1/live` on a fresh connection; returns how long it took.
fn timed_live(addr: SocketAddr) -> Duration {
    let start = Instant::now();
    let mut client = Client::connect(addr);
    client.set_read_timeout(Duration::from_secs(5));
    let resp = client
        .send(&Request::get("/api/v1/live"))
        .unwrap_or_else(|e| panic!("/api/v1/live unanswered after {:?}: {e}", start.elapsed()));
    assert_status(&resp, 200);
    start.elapsed()
}

/// Probes `/api/v1/live` for `span`; each probe must answer within 1 s.
/// Returns the slowest.
fn live_keeps_answering(addr: SocketAddr, span: Duration, while_what: &str) -> Duration {
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut probes = 0;
    while start.elapsed() < span {
        let took = timed_live(addr);
        probes += 1;
        assert!(
            took < Duration::from_secs(1),
            "/api/v1/live took {took:?} while {while_what}"
        );
        slowest = slowest.max(took);
    }
    eprintln!("{probes} /api/v1/live probes while {while_what}: slowest {slowest:?}");
    slowest
}

/// Writes one byte of `rest` every 100 ms until it is all sent, the
/// connection breaks, or `stop` is set.
fn trickle(mut stream: TcpStream, rest: Vec<u8>, stop: &'static AtomicBool) {
    thread::spawn(move || {
        for byte in rest {
            if stop.load(Ordering::SeqCst) || stream.write_all(&[byte]).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
}

const DECLARED: &str = "Content-Length: 1048576\r\n";

#[test]
fn slow_bodies_and_heads_do_not_hold_handler_threads() {
    let _serial = serial();
    static STOP: AtomicBool = AtomicBool::new(false);
    // Keys configured, so that a route answers 401; /api/v1/live stays open.
    let daemon = Daemon::builder()
        .config("[auth]\napi_keys = [\"user-key\"]\n")
        .start();
    let addr = daemon.addr;
    let open_route = format!("GET /api/v1/live HTTP/1.1\r\nHost: a\r\n{DECLARED}\r\n");
    let upgrade = format!(
        "GET /api/v1/live HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n{DECLARED}\r\n"
    );
    let refused_route = format!(
        "POST /api/v1/sandboxes HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n{DECLARED}\r\n"
    );
    // 6 of each kind: 30 connections, more than the 16 http threads.
    let mut silent = Vec::new();
    let mut trickling = Vec::new();
    let mut refused = Vec::new();
    let mut slow_heads = Vec::new();
    for _ in 0..6 {
        silent.push(raw(addr, open_route.as_bytes()));
        silent.push(raw(addr, upgrade.as_bytes()));
        let stream = raw(addr, open_route.as_bytes());
        trickle(stream.try_clone().unwrap(), vec![b'x'; 1 << 20], &STOP);
        trickling.push(stream);
        refused.push(raw(addr, refused_route.as_bytes()));
        let stream = raw(addr, b"G");
        trickle(
            stream.try_clone().unwrap(),
            open_route.as_bytes()[1..].to_vec(),
            &STOP,
        );
        slow_heads.push(stream);
    }
    live_keeps_answering(
        addr,
        Duration::from_secs(3),
        "30 clients hold slow heads and bodies",
    );
    // Refused routes are answered at once, without waiting for the body.
    for (i, stream) in refused.into_iter().enumerate() {
        let resp = answer_then_close(stream, Duration::from_secs(2), &format!("401 route #{i}"));
        assert_error(&resp, 401, "UNAUTHORIZED");
    }
    // The slow ones get 408 and are closed (default deadlines: 10 s).
    let started = Instant::now();
    let kinds = [
        ("silent body", silent),
        ("trickled body", trickling),
        ("trickled head", slow_heads),
    ];
    for (what, streams) in kinds {
        for (i, stream) in streams.into_iter().enumerate() {
            let left = Duration::from_secs(30).saturating_sub(started.elapsed());
            let resp = answer_then_close(stream, left, &format!("{what} #{i}"));
            assert_error(&resp, 408, "REQUEST_TIMEOUT");
        }
    }
    STOP.store(true, Ordering::SeqCst);
    eprintln!(
        "all slow clients answered 408 after {:?}",
        started.elapsed()
    );
    timed_live(addr);
}

#[test]
fn body_deadlines_are_configurable_and_a_steady_upload_passes() {
    let _serial = serial();
    let daemon = Daemon::builder()
        .config("[server]\nheader_timeout = \"1s\"\nbody_timeout = \"1s\"\nmin_body_rate = 1024\n")
        .start();
    let addr = daemon.addr;
    let start = Instant::now();
    let silent = raw(
        addr,
        format!("POST /api/v1/admin/workers/w/heartbeat HTTP/1.1\r\nHost: a\r\n{DECLARED}\r\n")
            .as_bytes(),
    );
    let resp = answer_then_close(silent, Duration::from_secs(5), "silent body");
    assert_error(&resp, 408, "REQUEST_TIMEOUT");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "408 before body_timeout: {took:?}"
    );
    eprintln!("silent body answered 408 after {took:?} (body_timeout = 1s)");
    // A body that arrives in pieces faster than the minimum rate passes.
    let body = br#"{"hostname":"steady","capabilities":["a"]}"#;
    let mut client = daemon.client();
    client
        .write_raw(
            format!(
                "POST /api/v1/admin/workers/steady/heartbeat HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
    for piece in body.chunks(8) {
        thread::sleep(Duration::from_millis(150));
        client.write_raw(piece).unwrap();
    }
    assert_status(&client.read_response().unwrap(), 200);
    // And the connection is still usable.
    assert_status(&client.get("/api/v1/live"), 200);
}

#[test]
fn bad_config_deadlines_are_refused() {
    let accepted = "[server]\nheader_timeout = \"2s\"\nbody_timeout = \"30s\"\nmin_body_rate = 1\nmax_connections_per_client = 8\n";
    let dir = common::TempDir::new("front-door-config");
    let path = dir.join("good.toml");
    std::fs::write(&path, accepted).unwrap();
    let finished = common::run(
        common::command()
            .arg("--config")
            .arg(&path)
            .arg("check-config"),
    );
    assert!(
        finished.status.success(),
        "{accepted:?} was refused\n{}",
        finished.output()
    );
    for (text, key) in [
        ("[server]\nheader_timeout = \"0s\"\n", "header_timeout"),
        ("[server]\nbody_timeout = \"soon\"\n", "body_timeout"),
        ("[server]\nmin_body_rate = 0\n", "min_body_rate"),
        (
            "[server]\nmax_connections_per_client = 0\n",
            "max_connections_per_client",
        ),
    ] {
        let mut cmd = common::command();
        let dir = common::TempDir::new("front-door-config");
        let path = dir.join("stacyvmd.toml");
        std::fs::write(&path, text).unwrap();
        cmd.arg("--config").arg(&path).arg("check-config");
        let finished = common::run(&mut cmd);
        assert!(
            !finished.status.success(),
            "{text:?} was accepted\n{}",
            finished.output()
        );
        assert!(
            finished.output().contains(key),
            "the refusal does not name {key}\n{}",
            finished.output()
        );
    }
}

#[test]
fn malformed_request_lines_get_an_answer_and_a_close() {
    let _serial = serial();
    let daemon = Daemon::start();
    let cases: &[(&str, &[u8], u16, &str)] = &[
        (
            "trailing junk after the version",
            b"GET /api/v1/live HTTP/1.1 junk\r\nHost: a\r\n\r\n",
            400,
            "BAD_REQUEST",
        ),
        (
            "HTTP/0.9 (no version at all)",
            b"GET /api/v1/live\r\n",
            400,
            "BAD_REQUEST",
        ),
        (
            "HTTP/0.9 named",
            b"GET /api/v1/live HTTP/0.9\r\n\r\n",
            505,
            "HTTP_VERSION_NOT_SUPPORTED",
        ),
        (
            "HTTP/2.0",
            b"GET /api/v1/live HTTP/2.0\r\nHost: a\r\n\r\n",
            505,
            "HTTP_VERSION_NOT_SUPPORTED",
        ),
        (
            "LF-only request",
            b"GET /api/v1/live HTTP/1.1\nHost: a\n\n",
            400,
            "BAD_REQUEST",
        ),
        (
            "LF-only header line",
            b"GET /api/v1/live HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n",
            400,
            "BAD_REQUEST",
        ),
        (
            "non-ASCII request line",
            "GET /api/v1/l\u{e9}ve HTTP/1.1\r\nHost: a\r\n\r\n".as_bytes(),
            400,
            "BAD_REQUEST",
        ),
        (
            "binary in the method",
            b"G\x00T /api/v1/live HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "BAD_REQUEST",
        ),
        (
            "lowercase version",
            b"GET /api/v1/live http/1.1\r\nHost: a\r\n\r\n",
            400,
            "BAD_REQUEST",
        ),
        (
            "header without a colon",
            b"GET /api/v1/live HTTP/1.1\r\nHost a\r\n\r\n",
            400,
            "BAD_REQUEST",
        ),
        (
            "non-ASCII header",
            "GET /api/v1/live HTTP/1.1\r\nX-N\u{e4}me: v\r\n\r\n".as_bytes(),
            400,
            "BAD_REQUEST",
        ),
        (
            "double space",
            b"GET  /api/v1/live HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "BAD_REQUEST",
        ),
        (
            "target not a path",
            b"GET api/v1/live HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "BAD_REQUEST",
        ),
    ];
    for (what, bytes, status, code) in cases {
        let stream = raw(daemon.addr, bytes);
        let resp = answer_then_close(stream, Duration::from_secs(3), what);
        assert_error(&resp, *status, code);
    }
    // HTTP/1.0 is still served.
    let stream = raw(daemon.addr, b"GET /api/v1/live HTTP/1.0\r\n\r\n");
    let resp = answer_then_close(stream, Duration::from_secs(3), "HTTP/1.0");
    assert_status(&resp, 200);
    assert_status(&daemon.get("/api/v1/live"), 200);
}

#[test]
fn private_relay_paths_are_unreachable_however_encoded() {
    let _serial = serial();
    let daemon = Daemon::start();
    for path in [
        "/-/handoff",
        "/%2D/handoff",
        "/%2d/handoff",
        "/-/%68andoff",
        "/%2D/%68%61ndoff",
        "//-/handoff",
        "/-//handoff",
        "/-/handoff/",
        "/-/handoff?x=1",
        "/./-/handoff",
        "/api/../-/handoff",
        "/-",
        "/-/",
    ] {
        let mut client = daemon.client();
        let resp = client.get(path);
        assert_error(&resp, 404, "NOT_FOUND");
    }
}

/// A client connected from `source` (any 127/8 address is loopback).
fn client_from(source: [u8; 4], to: SocketAddr) -> Client {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from((source, 0)).into())
        .expect("bind the client's source address");
    socket
        .connect_timeout(&to.into(), Duration::from_secs(5))
        .expect("connect");
    Client::from_stream(socket.into())
}

#[test]
fn one_client_holding_every_slot_does_not_lock_out_another() {
    let _serial = serial();
    let daemon = Daemon::builder()
        .config("[server]\nmax_connections = 16\n")
        .start();
    // Client A takes every slot with idle keep-alive connections.
    let mut hoard: Vec<Client> = (0..16)
        .map(|_| client_from([127, 0, 0, 1], daemon.addr))
        .collect();
    for client in &mut hoard {
        assert_status(&client.get("/api/v1/live"), 200);
    }
    // Client B, from another address, is still served: the oldest idle
    // connection makes room.
    for round in 0..4 {
        let mut other = client_from([127, 0, 0, 2], daemon.addr);
        let resp = other
            .send(&Request::get("/api/v1/live"))
            .unwrap_or_else(|e| panic!("round {round}: client B not served: {e}"));
        assert_status(&resp, 200);
    }
}

#[test]
fn a_client_beyond_its_share_is_refused_and_others_are_served() {
    let _serial = serial();
    let daemon = Daemon::builder()
        .config("[server]\nmax_connections = 64\nmax_connections_per_client = 4\n")
        .start();
    let mut held: Vec<Client> = (0..4)
        .map(|_| client_from([127, 0, 0, 1], daemon.addr))
        .collect();
    for client in &mut held {
        assert_status(&client.get("/api/v1/live"), 200);
    }
    let mut fifth = client_from([127, 0, 0, 1], daemon.addr);
    let resp = fifth.send(&Request::get("/api/v1/live")).unwrap();
    let message = assert_error(&resp, 503, "UNAVAILABLE");
    assert!(message.contains("max_connections_per_client"), "{message}");
    let mut other = client_from([127, 0, 0, 3], daemon.addr);
    assert_status(&other.get("/api/v1/live"), 200);
    // The held ones still work.
    for client in &mut held {
        assert_status(&client.get("/api/v1/live"), 200);
    }
}

#[test]
fn a_small_fd_limit_does_not_kill_http() {
    let _serial = serial();
    let daemon = Daemon::builder()
        .wrapper(&["prlimit", "--nofile=256:256", "--"])
        .start();
    let addr = daemon.addr;
    let mut streams = Vec::new();
    let mut refused = 0;
    for _ in 0..500 {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(stream) => streams.push(stream),
            Err(_) => refused += 1,
        }
    }
    let request = Request::get("/api/v1/live").to_bytes();
    let (mut ok, mut unavailable, mut other) = (0, 0, 0);
    for stream in streams.drain(..) {
        let mut client = Client::from_stream(stream);
        client.set_read_timeout(Duration::from_secs(5));
        match client
            .write_raw(&request)
            .and_then(|()| client.read_response())
        {
            Ok(resp) if resp.status == 200 => ok += 1,
            Ok(resp) if resp.status == 503 => unavailable += 1,
            _ => other += 1,
        }
    }
    eprintln!(
        "500 connections under nofile=256: {ok} served, {unavailable} answered 503, {other} closed or reset, {refused} not connected"
    );
    assert!(ok > 0, "no connection was served");
    poll_until(
        Duration::from_secs(10),
        "/api/v1/live after the storm",
        || {
            Client::try_connect(addr)
                .and_then(|mut c| c.send(&Request::get("/api/v1/live")))
                .is_ok_and(|r| r.status == 200)
        },
    );
    assert_status(&daemon.get("/api/v1/ready"), 200);
    assert!(
        daemon.ready_line.contains(" nofile=256")
            && daemon.ready_line.contains(" max_connections="),
        "the readiness line does not report the fd limit and the connection limit: {}",
        daemon.ready_line
    );
}

#[test]
fn a_dead_internal_server_stops_the_daemon_with_failure() {
    let _serial = serial();
    let mut daemon = Daemon::start();
    assert_status(&daemon.get("/api/v1/ready"), 200);
    // The internal listener goes away (as when tiny_http's accept thread
    // dies): new handoffs cannot reach it.
    std::fs::remove_file(daemon.data_dir().join("http.sock")).expect("remove http.sock");
    let status = daemon.wait_exit(Duration::from_secs(30));
    assert!(
        !status.success(),
        "the daemon exited successfully after losing its internal server"
    );
    assert!(
        daemon.stderr_text().contains("internal"),
        "the log does not say why: {}",
        daemon.stderr_text()
    );
}
