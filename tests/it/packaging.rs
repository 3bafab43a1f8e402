//! What ships beside the binary: man pages (mandoc lint), the systemd unit
//! (systemd-analyze verify) and the example config (check-config). A
//! missing tool is a failure, not a skip: CI installs mandoc and systemd.

use crate::common;

use std::path::PathBuf;
use std::process::Command;

use common::{TempDir, command, repo_path, run};

#[test]
fn man_pages_are_lint_clean() {
    let dir = repo_path("man");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("read man/ entry").path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("8" | "7" | "5")
            )
        })
        .collect();
    pages.sort();
    for wanted in ["stacyvmd.8", "stacyvmd-admin.7", "stacyvmd.toml.5"] {
        assert!(
            pages.iter().any(|p| p.ends_with(wanted)),
            "man/{wanted} is missing: {pages:?}"
        );
    }
    let out = Command::new("mandoc")
        .args(["-Tlint", "-W", "warning"])
        .args(&pages)
        .output()
        .unwrap_or_else(|e| panic!("cannot run mandoc (apt-get install mandoc): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "mandoc -Tlint -W warning {pages:?} ({}):\n{text}",
        out.status
    );
}

#[test]
fn systemd_unit_verifies() {
    let unit = repo_path("contrib/systemd/stacyvmd.service");
    let text =
        std::fs::read_to_string(&unit).unwrap_or_else(|e| panic!("read {}: {e}", unit.display()));
    // Point ExecStart at the binary under test, keeping its arguments.
    let mut rewrote = 0;
    let patched: String = text
        .lines()
        .map(|line| match line.strip_prefix("ExecStart=") {
            Some(rest) => {
                rewrote += 1;
                let args = rest.split_once(' ').map(|(_, a)| a).unwrap_or("");
                format!("ExecStart={} {args}\n", common::bin())
            }
            None => format!("{line}\n"),
        })
        .collect();
    assert_eq!(rewrote, 1, "the unit must have exactly one ExecStart=");
    assert!(
        patched.contains("Type=notify"),
        "the unit must be Type=notify"
    );

    let dir = TempDir::new("unit");
    let copy = dir.join("stacyvmd.service");
    std::fs::write(&copy, &patched).unwrap();
    // The process-sandbox drop-in is verified with the unit: systemd-analyze
    // reads drop-ins from <unit>.d/ beside the unit file it is given.
    let dropin_dir = dir.join("stacyvmd.service.d");
    std::fs::create_dir_all(&dropin_dir).unwrap();
    let dropin = repo_path("contrib/systemd/stacyvmd.service.d/process-sandboxes.conf");
    std::fs::copy(&dropin, dropin_dir.join("process-sandboxes.conf"))
        .unwrap_or_else(|e| panic!("copy {}: {e}", dropin.display()));
    // Documentation=man:... is checked with man(1): let it find the pages
    // shipped in man/ rather than requiring them to be installed.
    let manpath = dir.join("man");
    for page in std::fs::read_dir(repo_path("man")).expect("read man/") {
        let page = page.expect("man/ entry").path();
        let Some(section) = page.extension().and_then(|e| e.to_str()) else {
            continue;
        };
        let section_dir = manpath.join(format!("man{section}"));
        std::fs::create_dir_all(&section_dir).unwrap();
        std::fs::copy(&page, section_dir.join(page.file_name().unwrap())).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .env("MANPATH", &manpath)
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap_or_else(|e| panic!("cannot run systemd-analyze (apt-get install systemd): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let about_unit: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("stacyvmd.service")
                || l.contains(&*copy.to_string_lossy())
                || l.contains("process-sandboxes.conf")
        })
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify ({}):\n{text}\n----- unit -----\n{patched}",
        out.status
    );
}

#[test]
fn example_config_passes_check_config() {
    let example = repo_path("contrib/stacyvmd.toml.example");
    assert!(example.exists(), "{} is missing", example.display());
    let dir = TempDir::new("example");
    let out = run(command()
        .current_dir(dir.path())
        .arg("--config")
        .arg(&example)
        .arg("check-config"));
    assert_eq!(out.status.code(), Some(0), "{out}");
}
