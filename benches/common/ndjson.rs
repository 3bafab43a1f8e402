//! A client of the daemon's admin socket (or any NDJSON line server), shared
//! by the bench programs: one Unix-socket connection that reads the greeting
//! line on connect, then writes one request line and reads one reply line
//! per round trip.

// Each bench program includes this file and uses part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Longest one read or write may take before the round trip fails.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One NDJSON connection: reads the greeting, then one reply per request.
pub struct LineClient {
    reader: BufReader<UnixStream>,
    line: Vec<u8>,
}

impl LineClient {
    pub fn connect(path: &Path) -> Result<LineClient, String> {
        let stream = UnixStream::connect(path)
            .map_err(|error| format!("connecting to {}: {error}", path.display()))?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).ok();
        stream.set_write_timeout(Some(IO_TIMEOUT)).ok();
        let mut client = LineClient {
            reader: BufReader::with_capacity(64 * 1024, stream),
            line: Vec::with_capacity(4096),
        };
        client.read_line()?;
        Ok(client)
    }

    fn read_line(&mut self) -> Result<&[u8], String> {
        self.line.clear();
        match self.reader.read_until(b'\n', &mut self.line) {
            Ok(0) => Err("the server closed the connection".to_owned()),
            Ok(_) => Ok(&self.line),
            Err(error) => Err(format!("reading a reply: {error}")),
        }
    }

    /// One request line (with its newline) and its reply; an error reply
    /// is an error.
    pub fn round_trip(&mut self, request: &[u8]) -> Result<(), String> {
        self.reader
            .get_mut()
            .write_all(request)
            .map_err(|error| format!("writing a request: {error}"))?;
        let reply = self.read_line()?;
        if reply.windows(9).any(|w| w == b"\"ok\":true") {
            Ok(())
        } else {
            Err(format!(
                "error reply to {}: {}",
                String::from_utf8_lossy(request).trim_end(),
                String::from_utf8_lossy(reply).trim_end()
            ))
        }
    }
}
