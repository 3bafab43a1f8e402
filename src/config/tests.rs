//! Unit tests of the configuration: reading, layering, reload.

use std::path::PathBuf;

use super::env::apply_overrides;
use super::keys;
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

/// A valid value, other than the default, for every key of the table
/// (`quotas.<owner>` as owner `alice`). All of them together are valid too.
const SAMPLES: &[(&str, &str)] = &[
    ("server.listen", "'127.0.0.1:9'"),
    ("server.allow_unauthenticated_remote", "true"),
    ("server.http_threads", "3"),
    ("server.max_connections", "10"),
    ("server.max_connections_per_client", "5"),
    ("server.max_body_bytes", "10"),
    ("server.idle_timeout", "'1s'"),
    ("server.header_timeout", "'2s'"),
    ("server.body_timeout", "'3s'"),
    ("server.min_body_rate", "100"),
    ("server.shutdown_timeout", "'1s'"),
    ("store.data_dir", "'/srv/data'"),
    ("store.path", "'/srv/db/a.db'"),
    ("store.checkpoint_interval", "'2s'"),
    ("store.wal_size_limit", "1"),
    ("store.max_batch", "2"),
    ("store.reserve_bytes", "0"),
    ("store.retention", "'1d'"),
    ("worker.id", "'w2'"),
    ("worker.hostname", "'h.example'"),
    ("worker.providers", "['mock']"),
    ("worker.capabilities", "['gpu']"),
    ("worker.max_sandboxes", "3"),
    ("worker.heartbeat_interval", "'1s'"),
    ("worker.stale_after", "'20s'"),
    ("worker.down_after", "'2m'"),
    ("auth.api_keys", "['k1']"),
    ("auth.admin_api_keys", "['k2']"),
    ("auth.keys", "[{ key = 'k3', owner_id = 'alice' }]"),
    ("log.level", "'debug'"),
    ("sandboxes.default_image", "'img'"),
    ("sandboxes.default_ttl", "'1h'"),
    ("sandboxes.max_ttl", "'2d'"),
    ("sandboxes.max_sandboxes", "5"),
    ("sandboxes.max_per_owner", "2"),
    ("sandboxes.default_memory_mb", "256"),
    ("sandboxes.max_memory_mb", "1024"),
    ("sandboxes.default_vcpus", "2"),
    ("sandboxes.max_vcpus", "4"),
    ("sandboxes.provider_timeout", "'5s'"),
    ("sandboxes.reap_interval", "'2s'"),
    ("leases.ttl", "'40s'"),
    ("leases.renew_interval", "'5s'"),
    ("leases.max_ttl", "'2d'"),
    ("scheduler.policy", "'binpack'"),
    ("providers.default", "'process'"),
    ("providers.mock.latency", "'5ms'"),
    ("providers.mock.failure_rate", "0.5"),
    ("providers.process.images", "{ img = '/srv/img' }"),
    ("providers.process.uid_base", "2000000000"),
    ("providers.process.max_processes", "100"),
    ("providers.process.max_open_files", "100"),
    ("providers.process.max_file_mb", "10"),
    ("providers.process.exec_timeout", "'30s'"),
    ("providers.process.max_exec_timeout", "'2h'"),
    ("providers.process.exec_output_bytes", "2048"),
    ("providers.process.max_upload_mb", "10"),
    ("providers.process.cgroup", "'off'"),
    ("providers.process.disk_mb", "100"),
    ("providers.process.uid_count", "1000"),
    ("providers.process.workspace_mb", "100"),
    ("providers.process.workspace_inodes", "1000"),
    ("providers.process.file_timeout", "'10s'"),
    ("providers.process.max_ops_per_sandbox", "2"),
    ("providers.process.proc", "'pid'"),
    ("providers.process.uid_registry", "'/run/x/registry'"),
    ("admin.enabled", "false"),
    ("admin.socket", "'/run/s/admin.sock'"),
    ("admin.socket_gid", "5"),
    ("admin.admin_uids", "[1]"),
    ("admin.admin_gids", "[2]"),
    ("admin.read_uids", "[3]"),
    ("admin.read_gids", "[4]"),
    ("admin.max_connections", "10"),
    ("admin.max_connections_per_client", "3"),
    ("admin.max_line_bytes", "100"),
    ("admin.idle_timeout", "'1m'"),
    ("admin.line_timeout", "'1s'"),
    ("quotas.<owner>.max_sandboxes", "2"),
    ("quotas.<owner>.max_ttl", "'1h'"),
];

fn sample(key: &keys::Key) -> &'static str {
    SAMPLES
        .iter()
        .find(|(name, _)| *name == key.full_name)
        .map(|(_, value)| *value)
        .unwrap_or_else(|| panic!("{} has no entry in SAMPLES", key.full_name))
}

/// Sets `key` to the TOML `value` in `table`, creating its sections.
fn set_sample(table: &mut toml::Table, key: &keys::Key, value: &str) {
    let value = format!("v = {value}")
        .parse::<toml::Table>()
        .unwrap()
        .remove("v")
        .unwrap();
    let section = key.section.replace("<owner>", "alice");
    let mut t = table;
    for part in section.split('.') {
        t = t
            .entry(part)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .unwrap();
    }
    t.insert(key.name.to_owned(), value);
}

fn with_samples<'k>(keys: impl IntoIterator<Item = &'k keys::Key>) -> Config {
    let mut table = toml::Table::new();
    for key in keys {
        set_sample(&mut table, key, sample(key));
    }
    Config::from_table(&table, None).unwrap_or_else(|e| panic!("{e:?}"))
}

/// Each key, changed alone, is applied by a reload exactly when the table
/// marks it reloadable, and otherwise named as needing a restart. A key
/// whose `differs`/`apply` pointed at another field, or a field the
/// reload handled outside the table, fails here.
#[test]
fn every_key_reloads_as_its_table_entry_says() {
    let old = parse("").unwrap();
    for key in keys::KEYS {
        let new = with_samples([key]);
        assert!(
            (key.differs)(&old, &new),
            "{}: the sample changes nothing",
            key.full_name
        );
        let (merged, ignored) = old.reload(&new);
        if key.reloadable {
            assert!(ignored.is_empty(), "{}: {ignored:?}", key.full_name);
            assert!(
                !(key.differs)(&merged, &new),
                "{}: not applied",
                key.full_name
            );
        } else {
            assert!(
                ignored.contains(&key.full_name),
                "{}: {ignored:?}",
                key.full_name
            );
            assert_eq!(
                merged, old,
                "{}: applied, though it needs a restart",
                key.full_name
            );
        }
    }
}

/// Every field the file can set belongs to some key: applying every
/// entry turns the defaults into the config with every key changed.
#[test]
fn the_key_table_covers_every_field() {
    let old = parse("").unwrap();
    let new = with_samples(keys::KEYS);
    let mut merged = old.clone();
    for key in keys::KEYS {
        (key.apply)(&mut merged, &new);
    }
    assert_eq!(merged, new);
    for (name, _) in SAMPLES {
        assert!(
            keys::KEYS.iter().any(|k| k.full_name == *name),
            "{name} is in SAMPLES but not a key"
        );
    }
}

/// stacyvmd.toml(5) says "reloadable" of exactly the keys the table marks
/// so: for `.It Cm key No (... reloadable)` or a section whose
/// introduction says it is reloadable as a whole.
#[test]
fn the_man_page_marks_the_reloadable_keys() {
    let man = include_str!("../../man/stacyvmd.toml.5");
    let mut documented: Vec<(String, bool)> = Vec::new();
    let mut section = String::new();
    let mut whole_section = false;
    let mut in_intro = false;
    for line in man.lines() {
        if let Some(name) = line
            .strip_prefix(".Ss [")
            .and_then(|rest| rest.strip_suffix(']'))
        {
            section = name.replace("quotas.owner", keys::QUOTAS);
            whole_section = false;
            in_intro = true;
        } else if line.starts_with(".Ss ") || line.starts_with(".Sh ") {
            section.clear();
        } else if line.starts_with(".Bl") {
            in_intro = false;
        } else if in_intro && line.trim_end_matches(['.', ';', ',']) == "reloadable" {
            whole_section = true;
        } else if let Some(rest) = line.strip_prefix(".It Cm ")
            && let Some((name, spec)) = rest.split_once(" No (")
            && !section.is_empty()
        {
            let reloadable = whole_section || spec.contains("reloadable");
            documented.push((format!("{section}.{name}"), reloadable));
        }
    }
    for key in keys::KEYS {
        let entry = documented.iter().find(|(name, _)| name == key.full_name);
        let Some((_, reloadable)) = entry else {
            panic!("{} is not described in stacyvmd.toml(5)", key.full_name);
        };
        assert_eq!(
            *reloadable, key.reloadable,
            "{}: the man page and the key table disagree on reloadable",
            key.full_name
        );
    }
}

#[test]
fn every_environment_variable_sets_a_known_key() {
    for (var, section, key, _) in super::env::ENV_KEYS {
        assert!(
            keys::known_in(section).contains(&key),
            "{var} sets {section}.{key}, which is not a key"
        );
    }
}

#[test]
fn the_key_table_lists_sections_and_their_keys_in_order() {
    assert_eq!(
        keys::sections(),
        [
            "server",
            "store",
            "worker",
            "auth",
            "log",
            "sandboxes",
            "leases",
            "scheduler",
            "providers",
            "admin",
            "quotas"
        ]
    );
    assert_eq!(keys::known_in("providers"), ["default", "mock", "process"]);
    assert_eq!(
        keys::known_in("providers.mock"),
        ["latency", "failure_rate"]
    );
    assert_eq!(keys::known_in(keys::QUOTAS), ["max_sandboxes", "max_ttl"]);
    assert_eq!(keys::known_in("log"), ["level"]);
    assert!(keys::known_in("nothing").is_empty());
    let problems = parse("[log]\nlevel = 'info'\ncolour = true\n").unwrap_err();
    assert_eq!(problems[0].key, "log.colour");
    assert_eq!(problems[0].message, "unknown key (expected one of level)");
}

#[test]
fn a_file_that_cannot_be_read_or_parsed_is_one_problem_named_by_the_file() {
    let dir = std::env::temp_dir().join(format!("stacyvmd-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.toml");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[server\n").unwrap();
    let flags = |path: &std::path::Path| Overrides {
        config_path: Some(path.to_owned()),
        ..Default::default()
    };
    let problems = Config::load(&flags(&missing), &|_| None).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].key, missing.display().to_string());
    assert!(
        problems[0].message.starts_with("cannot read: "),
        "{problems:?}"
    );
    let problems = Config::load(&flags(&bad), &|_| None).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].key, bad.display().to_string());
    assert!(
        problems[0].message.starts_with("invalid TOML: "),
        "{problems:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The listen address needs a restart, so a reload that moves it to
/// loopback and drops every key would leave the running remote listener
/// open: the keys are kept.
#[test]
fn a_reload_keeps_the_keys_of_a_remote_listener() {
    let old = parse("[server]\nlisten = '0.0.0.0:7423'\n[auth]\napi_keys = ['k']\n").unwrap();
    let new = parse("[server]\nlisten = '127.0.0.1:7423'\n").unwrap();
    let (merged, ignored) = old.reload(&new);
    assert_eq!(merged.auth, old.auth);
    assert_eq!(
        ignored,
        [
            "server.listen",
            "auth (removing every key from a non-loopback listener)"
        ]
    );
}
