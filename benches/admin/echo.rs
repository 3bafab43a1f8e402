//! The ceiling: a raw Unix-socket NDJSON echo server in this process. Like
//! the admin socket it greets on connect and runs one thread per
//! connection; per request line it parses the JSON with serde_json and
//! writes a small JSON reply line carrying the request's id.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};

use serde_json::{Value, json};

pub struct Echo {
    pub path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Echo {
    pub fn start(path: &Path) -> Result<Echo, String> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)
            .map_err(|error| format!("binding the echo server at {}: {error}", path.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let accept_stop = stop.clone();
        let accept = thread::Builder::new()
            .name("echo-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if accept_stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(stream) = stream else { continue };
                    let _ = thread::Builder::new()
                        .name("echo-conn".into())
                        .spawn(move || serve(stream));
                }
            })
            .map_err(|error| format!("spawning the echo server: {error}"))?;
        Ok(Echo {
            path: path.to_owned(),
            stop,
            accept: Some(accept),
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(stream: UnixStream) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    if writer
        .write_all(b"{\"protocol\":\"echo\",\"version\":1}\n")
        .is_err()
    {
        return;
    }
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = match serde_json::from_slice::<Value>(&line) {
            Ok(request) => json!({"id": request.get("id"), "ok": true, "result": {"status": "ok"}}),
            Err(error) => {
                json!({"id": null, "ok": false, "error": {"code": "parse_error", "message": error.to_string()}})
            }
        };
        let mut out = reply.to_string().into_bytes();
        out.push(b'\n');
        if writer.write_all(&out).is_err() {
            return;
        }
    }
}
