//! The ceiling: a bare tiny_http server that answers every request with one
//! fixed body, Nagle off, served by a few `recv` threads like the daemon's
//! pool. Nothing else runs per request, so the daemon's figure over this one
//! is the share of the HTTP ceiling its own work leaves.

use std::io::Cursor;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};

use socket2::{Domain, Protocol, Socket, Type};
use tiny_http::{Header, Response, Server, StatusCode};

pub struct Baseline {
    pub addr: SocketAddr,
    server: Arc<Server>,
    stopping: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Baseline {
    /// Binds 127.0.0.1:0 and starts `thread_count` threads answering `body`.
    pub fn start(body: Vec<u8>, thread_count: usize) -> Result<Baseline, String> {
        let listener = nodelay_listener().map_err(|error| format!("baseline listener: {error}"))?;
        let addr = listener
            .local_addr()
            .map_err(|error| format!("baseline address: {error}"))?;
        let server = Arc::new(
            Server::from_listener(listener, None)
                .map_err(|error| format!("baseline server: {error}"))?,
        );
        let stopping = Arc::new(AtomicBool::new(false));
        let body: Arc<[u8]> = body.into();
        let content_type =
            Header::from_bytes("Content-Type", "application/json").expect("a valid header");
        let threads = (0..thread_count)
            .map(|index| {
                let server = Arc::clone(&server);
                let stopping = Arc::clone(&stopping);
                let body = Arc::clone(&body);
                let content_type = content_type.clone();
                thread::Builder::new()
                    .name(format!("baseline-{index}"))
                    .spawn(move || serve(&server, &stopping, &body, &content_type))
                    .map_err(|error| format!("spawning a baseline thread: {error}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Baseline {
            addr,
            server,
            stopping,
            threads,
        })
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        for _ in &self.threads {
            self.server.unblock();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Accepted sockets inherit TCP_NODELAY from the listener on Linux, so
/// setting it once here covers every connection tiny_http accepts.
fn nodelay_listener() -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn serve(server: &Server, stopping: &AtomicBool, body: &Arc<[u8]>, content_type: &Header) {
    loop {
        match server.recv() {
            Ok(request) => {
                let response = Response::new(
                    StatusCode(200),
                    vec![content_type.clone()],
                    Cursor::new(Arc::clone(body)),
                    Some(body.len()),
                    None,
                );
                // A client that hung up mid-response is its own problem.
                let _ = request.respond(response);
            }
            Err(_) if stopping.load(Ordering::SeqCst) => return,
            Err(_) => {}
        }
    }
}
