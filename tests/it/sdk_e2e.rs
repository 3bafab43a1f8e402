//! The real client: the unmodified StacyVM Python SDK (`stacyvm` from the
//! Python package index, pinned) drives a live daemon through
//! `tests/sdk/e2e.py` (spawn, list, get, exec in both modes, exec_stream,
//! every file call, extend, destroy, the missing-sandbox errors, and the
//! async client).
//!
//! The SDK lives in a virtual environment under the target directory,
//! keyed by the pinned version and reused between runs; it is rebuilt when
//! it does not import (say, after the base Python changed). Python 3 with
//! `venv` and `pip` is required: missing, the test fails rather than skips
//! (CI installs Debian's `python3-venv`). docs/sdk-compatibility.md
//! explains where the SDK and the API spec disagree.

use crate::common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Daemon, Finished, Request, assert_status, repo_path};
use serde_json::Value;

/// The SDK release the test pins.
const SDK_VERSION: &str = "0.1.1";
const API_KEY: &str = "sdk-e2e-key-4b7d20c9e1";
/// The owner the script names with `X-User-ID` (tests/sdk/e2e.py `OWNER`):
/// the key is bound to it, so the SDK's header is accepted and the script
/// sees only this owner's sandboxes.
const OWNER: &str = "sdk-e2e";
/// The daemon's default exec timeout for this test: short, so the script
/// can check how a streamed exec (which cannot send a timeout) ends at it.
const EXEC_TIMEOUT_SECS: u64 = 2;

/// Creating a venv (ensurepip included).
const VENV_DEADLINE: Duration = Duration::from_secs(120);
/// Downloading and installing the SDK and httpx.
const PIP_DEADLINE: Duration = Duration::from_secs(600);
/// The whole e2e script (it takes about 10 s).
const SCRIPT_DEADLINE: Duration = Duration::from_secs(240);

/// Runs `cmd` (stdin closed, output captured) with a deadline; fails when
/// the program cannot be started at all (`Err`). Panics at the deadline.
fn run_for(cmd: &mut Command, deadline: Duration) -> Result<Finished, std::io::Error> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let end = Instant::now() + deadline;
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= end {
            let _ = child.kill();
            let status = child.wait().expect("wait");
            let finished = Finished {
                status,
                stdout: out.join().expect("stdout reader"),
                stderr: err.join().expect("stderr reader"),
            };
            panic!("{cmd:?} did not finish within {deadline:?}; killed\n{finished}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Ok(Finished {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    })
}

/// True when `python` runs and imports the pinned SDK.
fn sdk_importable(python: &Path) -> bool {
    let check = format!(
        "import importlib.metadata as m, stacyvm, httpx; assert m.version('stacyvm') == '{SDK_VERSION}'"
    );
    python.exists()
        && run_for(Command::new(python).args(["-c", &check]), VENV_DEADLINE)
            .is_ok_and(|f| f.status.success())
}

/// Removes a half-built venv when building it fails (a panic); after the
/// rename into place there is nothing left to remove.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Python of a venv holding `stacyvm==SDK_VERSION`: the cached one, or
/// a new one built beside it and renamed into place (so a half-built venv
/// is never taken for a good one, and two runs at once do not collide).
fn sdk_python() -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-venv");
    let venv = root.join(format!("stacyvm-{SDK_VERSION}"));
    let python = venv.join("bin").join("python");
    let started = Instant::now();
    if sdk_importable(&python) {
        eprintln!(
            "sdk venv: reusing {} (checked in {:.1?})",
            venv.display(),
            started.elapsed()
        );
        return python;
    }
    std::fs::create_dir_all(&root).expect("create the sdk-venv directory");
    let building = root.join(format!(
        "stacyvm-{SDK_VERSION}.building-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&building);
    let _cleanup = RemoveOnDrop(building.clone());

    let made = run_for(
        Command::new("python3").arg("-m").arg("venv").arg(&building),
        VENV_DEADLINE,
    )
    .unwrap_or_else(|e| {
        panic!(
            "cannot run python3 ({e}): the SDK test needs Python 3 with venv on PATH \
             (Debian: apt-get install python3 python3-venv; .ci/run does)"
        )
    });
    assert!(
        made.status.success(),
        "`python3 -m venv` failed: the SDK test needs the venv module with ensurepip \
         (Debian: apt-get install python3-venv; .ci/run does)\n{made}"
    );
    let built_python = building.join("bin").join("python");
    let pip = run_for(
        Command::new(&built_python)
            .args(["-m", "pip", "install", "--no-input", "--quiet"])
            .args(["--disable-pip-version-check"])
            .arg(format!("stacyvm=={SDK_VERSION}")),
        PIP_DEADLINE,
    )
    .expect("run the venv's pip");
    assert!(
        pip.status.success(),
        "pip install stacyvm=={SDK_VERSION} failed (the package index must be reachable)\n{pip}"
    );
    assert!(
        sdk_importable(&built_python),
        "stacyvm {SDK_VERSION} was installed in {} but does not import",
        building.display()
    );
    // A stale or broken cached venv goes; then ours takes its place. If
    // another run got there first, its venv is as good as ours.
    if venv.exists() && !sdk_importable(&python) {
        std::fs::remove_dir_all(&venv).expect("remove the broken cached venv");
    }
    if std::fs::rename(&building, &venv).is_err() {
        let _ = std::fs::remove_dir_all(&building);
    }
    assert!(
        sdk_importable(&python),
        "the venv at {} does not import stacyvm {SDK_VERSION}",
        venv.display()
    );
    eprintln!(
        "sdk venv: created {} with stacyvm {SDK_VERSION} in {:.1?}",
        venv.display(),
        started.elapsed()
    );
    python
}

fn authed(req: Request) -> Request {
    req.header("X-API-Key", API_KEY)
}

/// Destroys every sandbox the daemon still lists: process sandboxes
/// outlive the daemon, so a failed script must not leave any running.
fn destroy_all(daemon: &Daemon) -> Vec<String> {
    let resp = daemon.send(&authed(Request::get("/api/v1/sandboxes")));
    assert_status(&resp, 200);
    let ids: Vec<String> = match resp.json() {
        Value::Array(items) => items
            .iter()
            .filter_map(|s| s["id"].as_str().map(str::to_owned))
            .collect(),
        other => panic!("GET /api/v1/sandboxes is not an array: {other}"),
    };
    for id in &ids {
        let resp = daemon.send(&authed(Request::delete(&format!("/api/v1/sandboxes/{id}"))));
        assert_status(&resp, 200);
    }
    ids
}

#[test]
fn python_sdk_drives_a_live_daemon() {
    let python = sdk_python();
    let daemon = Daemon::builder()
        .config(&format!(
            "[[auth.keys]]\nkey = \"{API_KEY}\"\nowner_id = \"{OWNER}\"\n\n\
             [providers.process]\nexec_timeout = \"{EXEC_TIMEOUT_SECS}s\"\n"
        ))
        .start();

    let started = Instant::now();
    let script = repo_path("tests/sdk/e2e.py");
    let finished = run_for(
        Command::new(&python)
            .arg(&script)
            .current_dir(daemon.dir().path())
            .env("STACYVMD_URL", format!("http://{}", daemon.addr))
            .env("STACYVMD_API_KEY", API_KEY)
            .env("STACYVMD_EXEC_TIMEOUT", EXEC_TIMEOUT_SECS.to_string())
            // httpx honours proxy variables; the daemon is on loopback.
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost")
            .env("PYTHONUNBUFFERED", "1")
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME"),
        SCRIPT_DEADLINE,
    )
    .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let took = started.elapsed();
    let leftover = destroy_all(&daemon);

    assert!(
        finished.status.success(),
        "tests/sdk/e2e.py failed against the live daemon\n{finished}"
    );
    assert!(
        finished.stdout.contains("all SDK checks passed"),
        "tests/sdk/e2e.py exited 0 without finishing\n{finished}"
    );
    assert!(
        leftover.is_empty(),
        "the script left sandboxes behind: {leftover:?}\n{finished}"
    );
    let stderr = daemon.stderr_text();
    assert!(
        !stderr.contains("panicked"),
        "the daemon panicked during the SDK run:\n{stderr}"
    );
    eprintln!("{}sdk e2e script: {took:.1?}", finished.stdout);
}
