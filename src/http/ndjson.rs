//! The NDJSON body of a streamed exec: one `{"stream","data"}` line per
//! piece of output, keep-alive blank lines, and an `exit` line.

use std::io::{self, Write};

use crate::worker::ops::{ExecOutcome, OpError, Stream};

/// Writes NDJSON lines of a streamed exec, keeping a partial UTF-8
/// character for the next piece of the same stream.
#[derive(Default)]
pub struct NdjsonLines {
    carry: [Vec<u8>; 2],
}

impl NdjsonLines {
    /// Writes one piece of output; an empty piece is a keep-alive, sent as
    /// a blank line (NDJSON readers skip blank lines).
    pub fn chunk(&mut self, out: &mut dyn Write, stream: Stream, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            out.write_all(b"\n")?;
            return out.flush();
        }
        let carry = &mut self.carry[stream as usize];
        carry.extend_from_slice(data);
        let valid = match std::str::from_utf8(carry) {
            Ok(_) => carry.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => carry.len(), // invalid bytes: sent as replacement characters
        };
        if valid == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&carry[..valid]).into_owned();
        carry.drain(..valid);
        line(out, stream.as_str(), &text)
    }

    /// Flushes what is left of both streams, then the exit line.
    pub fn finish(&mut self, out: &mut dyn Write, outcome: &ExecOutcome) -> io::Result<()> {
        for (i, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
            if !self.carry[i].is_empty() {
                let text = String::from_utf8_lossy(&self.carry[i]).into_owned();
                self.carry[i].clear();
                line(out, stream.as_str(), &text)?;
            }
        }
        if outcome.timed_out {
            line(
                out,
                "stderr",
                &format!(
                    "stacyvmd: command timed out after {}; its process group was killed\n",
                    crate::time::format_duration(outcome.timeout)
                ),
            )?;
        }
        let exit = serde_json::json!({
            "stream": "exit",
            "data": outcome.exit_code.to_string(),
            "timed_out": outcome.timed_out,
            "duration": crate::time::format_duration(outcome.duration),
        });
        emit(out, &exit)
    }

    /// Ends a stream that could not run its command.
    pub fn fail(&mut self, out: &mut dyn Write, e: &OpError) -> io::Result<()> {
        line(
            out,
            "stderr",
            &format!("stacyvmd: {} ({})\n", e.message, e.code()),
        )?;
        emit(
            out,
            &serde_json::json!({"stream": "exit", "data": "-1", "error": e.code()}),
        )
    }
}

/// One NDJSON line in one write, then a flush: each line reaches the
/// client as soon as it is produced.
fn line(out: &mut dyn Write, stream: &str, data: &str) -> io::Result<()> {
    emit(out, &serde_json::json!({"stream": stream, "data": data}))
}

fn emit(out: &mut dyn Write, value: &serde_json::Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(value).map_err(io::Error::other)?;
    bytes.push(b'\n');
    out.write_all(&bytes)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ndjson_keeps_split_characters_whole() {
        let mut lines = NdjsonLines::default();
        let mut out = Vec::new();
        let e_acute = "é".as_bytes();
        lines
            .chunk(&mut out, Stream::Stdout, &[b'a', e_acute[0]])
            .unwrap();
        lines
            .chunk(&mut out, Stream::Stdout, &[e_acute[1], b'b'])
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        let data: Vec<String> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["data"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(data.concat(), "aéb");
        assert!(!data.iter().any(|d| d.contains('\u{fffd}')));
    }
}
