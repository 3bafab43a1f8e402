//! Exec and files moved: the types to `crate::worker::ops`, the process
//! provider's implementation to `providers::process::{exec_io, file_io}`,
//! the NDJSON stream to `http::ndjson`. This path stays for callers that
//! still name it.

pub use crate::worker::ops::*;

/// A file being read out of a sandbox.
pub type FileReader = dyn crate::worker::ops::FileStream;
