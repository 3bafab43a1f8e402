//! The `stacyvmd` binary: arguments, configuration, logging, then
//! `daemon::run`, and the exit code.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use stacyvmd::config::{Config, Overrides};
use stacyvmd::daemon::{self, Outcome};

const USAGE: &str = "\
usage: stacyvmd [OPTIONS] <COMMAND>

commands:
  serve          run the daemon
  check-config   validate the configuration and print every problem

options:
  -c, --config FILE      TOML configuration file (env STACYVMD_CONFIG)
      --listen ADDR      HTTP listen address (server.listen), default 127.0.0.1:7423
      --data-dir DIR     data directory (store.data_dir), default ./stacyvmd-data
      --log-level LEVEL  error, warn, info, debug or trace (log.level)
      --worker-id ID     id of this daemon's local worker (worker.id)
  -h, --help             print this help
  -V, --version          print the version

Flags win over STACYVMD_* environment variables, which win over the file.
See stacyvmd(8) and stacyvmd.toml(5).";

enum Command {
    Serve,
    CheckConfig,
    Help,
    Version,
}

/// Exit codes: 0 clean stop, 1 runtime failure, 2 usage or configuration,
/// 3 no room on the database's filesystem at start (see stacyvmd(8)).
const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_STORAGE_FULL: u8 = 3;

fn parse_args(args: impl Iterator<Item = String>) -> Result<(Command, Overrides), String> {
    let mut overrides = Overrides::default();
    let mut command = None;
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok((Command::Help, overrides)),
            "-V" | "--version" => return Ok((Command::Version, overrides)),
            "-c" | "--config" => overrides.config_path = Some(PathBuf::from(value(&flag)?)),
            "--listen" => overrides.listen = Some(value(&flag)?),
            "--data-dir" => overrides.data_dir = Some(value(&flag)?),
            "--log-level" => overrides.log_level = Some(value(&flag)?),
            "--worker-id" => overrides.worker_id = Some(value(&flag)?),
            "serve" | "check-config" if command.is_none() => {
                command = Some(if flag == "serve" {
                    Command::Serve
                } else {
                    Command::CheckConfig
                });
            }
            other if other.starts_with('-') => return Err(format!("unknown option {other}")),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    command
        .map(|c| (c, overrides))
        .ok_or_else(|| "missing command (serve or check-config)".into())
}

/// Internal entry points of the `process` provider, run by the daemon
/// itself (never by hand): the sandbox's init and the enter helper. They
/// take no configuration and do no logging.
fn internal(args: &[String]) -> Option<ExitCode> {
    use stacyvmd::providers::process::{enter, init};
    match args.first().map(String::as_str) {
        Some("sandbox-init") => {
            let message = match init::InitArgs::parse(&args[1..]) {
                Ok(a) => init::run(&a),
                Err(e) => format!("sandbox-init: {e}"),
            };
            eprintln!("{message}");
            Some(ExitCode::from(EXIT_FAILURE))
        }
        Some("sandbox-enter") if args.len() == 1 => {
            let code = enter::run();
            Some(ExitCode::from(u8::try_from(code).unwrap_or(EXIT_FAILURE)))
        }
        _ => None,
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = internal(&args) {
        return code;
    }
    let (command, overrides) = match parse_args(args.into_iter()) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("stacyvmd: {e}\n\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match command {
        Command::Help => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            println!("stacyvmd {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Command::Serve | Command::CheckConfig => {}
    }
    let config = match Config::load(&overrides, &|k| std::env::var(k).ok()) {
        Ok(config) => config,
        Err(problems) => {
            for p in &problems {
                eprintln!("error: {p}");
            }
            eprintln!("stacyvmd: configuration has {} problem(s)", problems.len());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Command::CheckConfig = command {
        let source = config
            .source
            .as_ref()
            .map_or("built-in defaults".into(), |p| p.display().to_string());
        println!("configuration ok ({source})");
        return ExitCode::SUCCESS;
    }

    // The filter lets everything through; the level is set (and reloaded)
    // with log::set_max_level. RUST_LOG, when set, still filters by module.
    let mut logger = env_logger::Builder::new();
    logger
        .filter_level(log::LevelFilter::Trace)
        .format_timestamp_millis();
    if let Ok(spec) = std::env::var("RUST_LOG") {
        logger.parse_filters(&spec);
    }
    logger.init();
    log::set_max_level(config.log.level);

    log::info!(
        "stacyvmd {} starting; config {:?}",
        env!("CARGO_PKG_VERSION"),
        config
    );
    match daemon::run(config, overrides, &log::set_max_level) {
        Ok(Outcome::Stopped) => ExitCode::SUCCESS,
        Ok(Outcome::ComponentFailed(name)) => {
            log::error!("exiting with failure: component {name} died");
            ExitCode::from(EXIT_FAILURE)
        }
        Err(e) => {
            log::error!("{e}");
            ExitCode::from(if e.storage_full {
                EXIT_STORAGE_FULL
            } else {
                EXIT_FAILURE
            })
        }
    }
}
