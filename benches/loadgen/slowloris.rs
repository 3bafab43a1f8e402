//! SL's slow clients: connections that hold a request open as slowly as the
//! daemon lets them, while `/api/v1/live` is measured beside them.
//!
//! Half of them declare a 1 MiB heartbeat body and send 1 byte of it, then
//! nothing; the other half trickle a request head one byte every
//! [`TRICKLE_INTERVAL`] and never finish it. The daemon closes both kinds
//! with a 408 once `server.header_timeout` or `server.body_timeout` (10 s
//! each by default) has passed, so a measurement must end well within
//! 10 s of [`SlowClients::open`]; [`SlowClients::still_open`] says how many
//! lasted.
//!
//! They connect from 127.0.0.2, 127.0.0.3, ... ([`PER_SOURCE_ADDRESS`] to
//! each; Linux routes all of 127.0.0.0/8 to `lo`), so the per-client limit
//! (`server.max_connections_per_client`, 256) never refuses them and they
//! never count against the measuring client on 127.0.0.1.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use socket2::{Domain, Socket, Type};

/// Declares a 1 MiB body and sends its first byte.
const SILENT_BODY: &[u8] = b"POST /api/v1/admin/workers/slow/heartbeat HTTP/1.1\r\n\
Host: 127.0.0.1\r\nContent-Length: 1048576\r\n\r\n{";
/// The start of a head that is then trickled, a byte at a time, into one
/// header value that never ends.
const TRICKLED_HEAD: &[u8] = b"GET /api/v1/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
pub const TRICKLE_INTERVAL: Duration = Duration::from_secs(2);
/// Slow connections per source address: well under the daemon's default
/// per-client limit of 256.
pub const PER_SOURCE_ADDRESS: usize = 100;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The held connections and the thread that trickles the heads.
pub struct SlowClients {
    streams: Vec<TcpStream>,
    stop: Option<Sender<()>>,
    trickler: Option<JoinHandle<()>>,
}

/// The source address of slow connection `index`: 127.0.0.2 for the first
/// [`PER_SOURCE_ADDRESS`], then 127.0.0.3, and so on.
fn source_address(index: usize) -> Result<SocketAddr, String> {
    let host = 2 + index / PER_SOURCE_ADDRESS;
    let host = u8::try_from(host)
        .ok()
        .filter(|&host| host < 255)
        .ok_or_else(|| {
            format!(
                "more slow connections than 127.0.0.2-254 can carry at {PER_SOURCE_ADDRESS} each"
            )
        })?;
    Ok(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
        0,
    ))
}

fn connect_from(source: SocketAddr, target: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&source.into())?;
    socket.connect_timeout(&target.into(), CONNECT_TIMEOUT)?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket.into())
}

impl SlowClients {
    /// Opens `count` slow connections to `daemon` (a loopback IPv4
    /// address), each with its first bytes sent.
    pub fn open(daemon: SocketAddr, count: usize) -> Result<SlowClients, String> {
        if !matches!(daemon.ip(), IpAddr::V4(ip) if ip.is_loopback()) {
            return Err(format!(
                "slow clients need the daemon on 127.0.0.1, not {daemon}"
            ));
        }
        let mut streams = Vec::with_capacity(count);
        for index in 0..count {
            let source = source_address(index)?;
            let mut stream = connect_from(source, daemon)
                .map_err(|error| format!("slow connection {index} from {source}: {error}"))?;
            let first = if index % 2 == 0 {
                SILENT_BODY
            } else {
                TRICKLED_HEAD
            };
            stream
                .write_all(first)
                .map_err(|error| format!("slow connection {index}: {error}"))?;
            streams.push(stream);
        }
        let trickled = streams
            .iter()
            .skip(1)
            .step_by(2)
            .map(TcpStream::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(|error| format!("cloning a slow connection: {error}"))?;
        let (stop, stopped) = mpsc::channel::<()>();
        let trickler = thread::Builder::new()
            .name("loadgen-trickle".into())
            .spawn(move || {
                let mut trickled = trickled;
                // Waiting on the stop channel paces the trickle and ends it
                // at once when the clients are dropped.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(TRICKLE_INTERVAL) {
                    // A connection the daemon closed fails its write; the
                    // rest keep trickling.
                    trickled.retain_mut(|stream| stream.write_all(b"x").is_ok());
                }
            })
            .map_err(|error| format!("starting the trickle thread: {error}"))?;
        Ok(SlowClients {
            streams,
            stop: Some(stop),
            trickler: Some(trickler),
        })
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// How many connections the daemon has neither answered nor closed: a
    /// non-blocking peek finds no byte and no end of stream.
    pub fn still_open(&self) -> usize {
        self.streams
            .iter()
            .filter(|stream| {
                if stream.set_nonblocking(true).is_err() {
                    return false;
                }
                let mut byte = [0u8; 1];
                let open = matches!(
                    stream.peek(&mut byte),
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock
                );
                let _ = stream.set_nonblocking(false);
                open
            })
            .count()
    }
}

impl Drop for SlowClients {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(trickler) = self.trickler.take() {
            let _ = trickler.join();
        }
    }
}
