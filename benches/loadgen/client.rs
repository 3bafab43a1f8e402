//! A minimal keep-alive HTTP/1.1 client over `std::net::TcpStream`, just
//! enough of the protocol to drive the daemon and the baseline server:
//! pre-rendered requests go out in one write, responses are read with
//! `Content-Length` or chunked framing into a buffer the client reuses, so the
//! load loop neither formats nor allocates per request.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Renders a `GET` request.
pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").into_bytes()
}

/// Renders a `POST` request with a JSON body.
pub fn post_json(path: &str, json: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{json}",
        json.len()
    )
    .into_bytes()
}

/// One response; `body` borrows the client's buffer until the next exchange.
pub struct Response<'a> {
    pub status: u16,
    pub body: &'a [u8],
}

/// One keep-alive connection with Nagle off (as the ceilings in
/// PERFORMANCE.md were measured: with Nagle on, small writes wait 40 ms on
/// delayed ACKs and every figure collapses).
pub struct Client {
    reader: BufReader<TcpStream>,
    line: Vec<u8>,
    body: Vec<u8>,
    closed_by_server: bool,
}

impl Client {
    /// Connects; `io_timeout` bounds every later read and write, so a stuck
    /// server fails the measurement instead of hanging the benchmark.
    pub fn connect(addr: SocketAddr, io_timeout: Duration) -> io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(io_timeout))?;
        stream.set_write_timeout(Some(io_timeout))?;
        Ok(Client {
            reader: BufReader::with_capacity(64 * 1024, stream),
            line: Vec::with_capacity(256),
            body: Vec::with_capacity(64 * 1024),
            closed_by_server: false,
        })
    }

    /// Sends one pre-rendered request.
    pub fn send(&mut self, request: &[u8]) -> io::Result<()> {
        if self.closed_by_server {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the server closed this keep-alive connection (Connection: close)",
            ));
        }
        self.reader.get_mut().write_all(request)
    }

    /// Reads the response to the oldest request sent and not yet answered.
    pub fn receive(&mut self) -> io::Result<Response<'_>> {
        read_line(&mut self.reader, &mut self.line)?;
        let status = parse_status_line(&self.line)?;
        let mut content_length = None;
        let mut chunked = false;
        loop {
            read_line(&mut self.reader, &mut self.line)?;
            if self.line.is_empty() {
                break;
            }
            let (name, value) = split_header(&self.line)?;
            if name.eq_ignore_ascii_case(b"content-length") {
                content_length = Some(parse_decimal(value)?);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                chunked = value.eq_ignore_ascii_case(b"chunked");
            } else if name.eq_ignore_ascii_case(b"connection") {
                self.closed_by_server = value.eq_ignore_ascii_case(b"close");
            }
        }
        self.body.clear();
        if chunked {
            read_chunked_body(&mut self.reader, &mut self.line, &mut self.body)?;
        } else if let Some(length) = content_length {
            read_exactly(&mut self.reader, length, &mut self.body)?;
        } else {
            return Err(invalid(
                "response has neither Content-Length nor chunked framing",
            ));
        }
        Ok(Response {
            status,
            body: &self.body,
        })
    }

    /// Sends one request and reads its response.
    pub fn exchange(&mut self, request: &[u8]) -> io::Result<Response<'_>> {
        self.send(request)?;
        self.receive()
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// Reads one line into `line` without its CRLF; EOF is an error because every
/// caller expects more of the response.
fn read_line(reader: &mut BufReader<TcpStream>, line: &mut Vec<u8>) -> io::Result<()> {
    line.clear();
    if reader.read_until(b'\n', line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection",
        ));
    }
    while line
        .last()
        .is_some_and(|&byte| byte == b'\n' || byte == b'\r')
    {
        line.pop();
    }
    Ok(())
}

fn read_exactly(
    reader: &mut BufReader<TcpStream>,
    length: usize,
    body: &mut Vec<u8>,
) -> io::Result<()> {
    let start = body.len();
    body.resize(start + length, 0);
    reader.read_exact(&mut body[start..])
}

fn read_chunked_body(
    reader: &mut BufReader<TcpStream>,
    line: &mut Vec<u8>,
    body: &mut Vec<u8>,
) -> io::Result<()> {
    loop {
        read_line(reader, line)?;
        let size_field = line.split(|&byte| byte == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(size_field)
            .ok()
            .and_then(|text| usize::from_str_radix(text.trim(), 16).ok())
            .ok_or_else(|| invalid("bad chunk size"))?;
        if size == 0 {
            // Trailer fields, then the blank line that ends the message.
            loop {
                read_line(reader, line)?;
                if line.is_empty() {
                    return Ok(());
                }
            }
        }
        read_exactly(reader, size, body)?;
        read_line(reader, line)?;
    }
}

fn parse_status_line(line: &[u8]) -> io::Result<u16> {
    // "HTTP/1.1 200 OK"
    let mut fields = line.split(|&byte| byte == b' ');
    match (fields.next(), fields.next()) {
        (Some(version), Some(code)) if version.starts_with(b"HTTP/1.") => {
            u16::try_from(parse_decimal(code)?).map_err(|_| invalid("bad status code"))
        }
        _ => Err(invalid("bad status line")),
    }
}

fn split_header(line: &[u8]) -> io::Result<(&[u8], &[u8])> {
    let colon = line
        .iter()
        .position(|&byte| byte == b':')
        .ok_or_else(|| invalid("header line without a colon"))?;
    Ok((&line[..colon], line[colon + 1..].trim_ascii()))
}

fn parse_decimal(field: &[u8]) -> io::Result<usize> {
    std::str::from_utf8(field)
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .ok_or_else(|| invalid("bad decimal number"))
}
