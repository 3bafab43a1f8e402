//! Unit tests of the configuration: reading, layering, reload.

use std::path::PathBuf;

use super::env::apply_overrides;
use super::*;

fn parse(text: &str) -> Result<Config, Vec<ConfigProblem>> {
    Config::from_table(&text.parse::<toml::Table>().unwrap(), None)
}

#[test]
fn empty_config_is_the_embedded_default() {
    let c = parse("").unwrap();
    assert_eq!(c.server.listen, DEFAULT_LISTEN.parse().unwrap());
    assert_eq!(
        c.store.path,
        PathBuf::from(DEFAULT_DATA_DIR).join(DATABASE_FILE)
    );
    assert_eq!(c.worker.id, "local");
    assert!(!c.auth.enabled());
}

#[test]
fn reports_every_problem() {
    let problems = parse(
        "bogus = 1\n[server]\nlisten = 'nope'\nhttp_threads = 0\nextra = true\n[worker]\nstale_after = '5x'\nid = 'a/b'\n[log]\nlevel = 7\n",
    )
    .unwrap_err();
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "bogus",
        "server.listen",
        "server.http_threads",
        "server.extra",
        "worker.stale_after",
        "worker.id",
        "log.level",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
}

#[test]
fn refuses_remote_listen_without_keys() {
    let problems = parse("[server]\nlisten = '0.0.0.0:7423'\n").unwrap_err();
    assert_eq!(problems[0].key, "server.listen");
    assert!(parse("[server]\nlisten = '0.0.0.0:7423'\n[auth]\napi_keys = ['k1']\n").is_ok());
    assert!(
        parse("[server]\nlisten = '0.0.0.0:7423'\nallow_unauthenticated_remote = true\n").is_ok()
    );
}

#[test]
fn flags_beat_environment_beat_file() {
    let mut table: toml::Table = "[server]\nlisten = '127.0.0.1:1'\n[log]\nlevel='warn'\n"
        .parse()
        .unwrap();
    let env = |k: &str| match k {
        "STACYVMD_LISTEN" => Some("127.0.0.1:2".to_owned()),
        "STACYVMD_LOG_LEVEL" => Some("debug".to_owned()),
        "STACYVMD_API_KEYS" => Some("a, b,".to_owned()),
        _ => None,
    };
    let flags = Overrides {
        listen: Some("127.0.0.1:3".into()),
        ..Default::default()
    };
    apply_overrides(&mut table, &flags, &env);
    let c = Config::from_table(&table, None).unwrap();
    assert_eq!(c.server.listen.port(), 3);
    assert_eq!(c.log.level, log::LevelFilter::Debug);
    assert_eq!(c.auth.api_keys, vec!["a", "b"]);
}

#[test]
fn state_directory_is_the_default_data_dir() {
    let c = Config::from_table(&toml::Table::new(), Some("/var/lib/stacyvmd")).unwrap();
    assert_eq!(c.store.path, PathBuf::from("/var/lib/stacyvmd/stacyvmd.db"));
}

#[test]
fn reload_applies_only_reloadable_keys() {
    let old = parse("").unwrap();
    let new = parse("[server]\nlisten='127.0.0.1:9'\nmax_body_bytes=10\n[log]\nlevel='debug'\n[auth]\napi_keys=['k']\n").unwrap();
    let (merged, ignored) = old.reload(&new);
    assert_eq!(merged.server.listen, old.server.listen);
    assert_eq!(merged.server.max_body_bytes, 10);
    assert_eq!(merged.log.level, log::LevelFilter::Debug);
    assert_eq!(merged.auth.api_keys, vec!["k"]);
    assert_eq!(ignored, vec!["server.listen"]);
}

#[test]
fn the_uid_registry_must_be_an_absolute_path() {
    let c = parse("").unwrap();
    assert_eq!(
        c.providers.process.uid_registry,
        PathBuf::from("/run/stacyvmd-uids/registry")
    );
    let e = parse("[providers.process]\nuid_registry = 'uids.lock'\n").unwrap_err();
    assert!(
        format!("{e:?}").contains("providers.process.uid_registry"),
        "{e:?}"
    );
}

#[test]
fn debug_never_shows_keys() {
    let c =
        parse("[auth]\napi_keys=['supersecret']\n[[auth.keys]]\nkey='topsecret'\nowner_id='a'\n")
            .unwrap();
    assert!(!format!("{c:?}").contains("supersecret"));
    assert!(!format!("{c:?}").contains("topsecret"));
}

#[test]
fn owner_keys() {
    let c =
        parse("[[auth.keys]]\nkey='k1'\nowner_id='alice'\n[[auth.keys]]\nkey='k2'\nrole='admin'\n")
            .unwrap();
    assert!(c.auth.enabled());
    assert_eq!(
        c.auth.keys[0].role,
        KeyRole::User {
            owner_id: "alice".into()
        }
    );
    assert_eq!(c.auth.keys[1].role, KeyRole::Admin);
    for (text, key) in [
        ("[[auth.keys]]\nkey='k'\n", "auth.keys[0].owner_id"),
        (
            "[[auth.keys]]\nkey='k'\nowner_id=''\n",
            "auth.keys[0].owner_id",
        ),
        (
            "[[auth.keys]]\nkey='k'\nrole='admin'\nowner_id='a'\n",
            "auth.keys[0].owner_id",
        ),
        (
            "[[auth.keys]]\nkey='k'\nowner_id='a'\nrole='x'\n",
            "auth.keys[0].role",
        ),
        ("[[auth.keys]]\nowner_id='a'\n", "auth.keys[0].key"),
        (
            "[[auth.keys]]\nkey='a b'\nowner_id='a'\n",
            "auth.keys[0].key",
        ),
        ("[auth]\nkeys = 'k'\n", "auth.keys"),
        (
            "[auth]\napi_keys=['k']\n[[auth.keys]]\nkey='k'\nowner_id='a'\n",
            "auth.keys[0].key",
        ),
        ("[auth]\napi_keys=['k','k']\n", "auth.api_keys[1]"),
    ] {
        let problems = parse(text).unwrap_err();
        assert!(
            problems.iter().any(|p| p.key == key),
            "{text}: {problems:?}"
        );
    }
    // The environment form, and a reload carries the keys.
    let mut table = toml::Table::new();
    let env = |k: &str| (k == "STACYVMD_OWNER_KEYS").then(|| "alice=k=1, bob=k2,".to_owned());
    apply_overrides(&mut table, &Overrides::default(), &env);
    let from_env = Config::from_table(&table, None).unwrap();
    assert_eq!(from_env.auth.keys.len(), 2);
    assert_eq!(from_env.auth.keys[0].key, "k=1");
    assert_eq!(
        from_env.auth.keys[1].role,
        KeyRole::User {
            owner_id: "bob".into()
        }
    );
    let (merged, ignored) = parse("").unwrap().reload(&from_env);
    assert_eq!(merged.auth, from_env.auth);
    assert!(ignored.is_empty(), "{ignored:?}");
}
