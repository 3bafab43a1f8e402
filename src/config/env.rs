//! The layers over the file: `STACYVMD_*` environment variables, then the
//! command-line [`Overrides`]. Both are written into the table before it is
//! read, so that they are validated by exactly the same code as the file.

use std::path::PathBuf;

/// Flags given on the command line; they win over everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_path: Option<PathBuf>,
    pub listen: Option<String>,
    pub data_dir: Option<String>,
    pub log_level: Option<String>,
    pub worker_id: Option<String>,
}

/// Environment variable, section and key it sets, and how its text
/// becomes a TOML value.
type EnvKey = (
    &'static str,
    &'static str,
    &'static str,
    fn(String) -> toml::Value,
);

/// Every `STACYVMD_*` variable that sets a key (`STACYVMD_CONFIG` names
/// the file instead).
pub(crate) const ENV_KEYS: [EnvKey; 7] = [
    ("STACYVMD_LISTEN", "server", "listen", toml::Value::String),
    (
        "STACYVMD_DATA_DIR",
        "store",
        "data_dir",
        toml::Value::String,
    ),
    ("STACYVMD_LOG_LEVEL", "log", "level", toml::Value::String),
    ("STACYVMD_WORKER_ID", "worker", "id", toml::Value::String),
    ("STACYVMD_API_KEYS", "auth", "api_keys", list),
    ("STACYVMD_ADMIN_API_KEYS", "auth", "admin_api_keys", list),
    ("STACYVMD_OWNER_KEYS", "auth", "keys", owner_keys),
];

/// Writes the environment, then the flags, over `table`.
pub(crate) fn apply_overrides(
    table: &mut toml::Table,
    flags: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) {
    for (var, section, key, convert) in ENV_KEYS {
        if let Some(value) = env(var).filter(|v| !v.is_empty()) {
            set(table, section, key, convert(value));
        }
    }
    let flag_keys = [
        (&flags.listen, "server", "listen"),
        (&flags.data_dir, "store", "data_dir"),
        (&flags.log_level, "log", "level"),
        (&flags.worker_id, "worker", "id"),
    ];
    for (value, section, key) in flag_keys {
        if let Some(value) = value {
            set(table, section, key, toml::Value::String(value.clone()));
        }
    }
}

/// `a, b,` into `["a", "b"]`.
fn list(v: String) -> toml::Value {
    toml::Value::Array(
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| toml::Value::String(s.to_owned()))
            .collect(),
    )
}

/// `owner=key,owner=key` into `[[auth.keys]]` tables; owner ids hold no
/// `=` or `,` (a key may hold `=`). A pair without `=` becomes a table
/// without `owner_id`, which validation reports.
fn owner_keys(v: String) -> toml::Value {
    toml::Value::Array(
        v.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|pair| {
                let mut entry = toml::Table::new();
                let key = match pair.split_once('=') {
                    Some((owner, key)) => {
                        entry.insert("owner_id".into(), owner.trim().to_owned().into());
                        key.trim()
                    }
                    None => pair,
                };
                entry.insert("key".into(), key.to_owned().into());
                toml::Value::Table(entry)
            })
            .collect(),
    )
}

fn set(table: &mut toml::Table, section: &str, key: &str, value: toml::Value) {
    let entry = table
        .entry(section)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = entry {
        t.insert(key.to_owned(), value);
    }
    // A non-table section is reported by the reader; the override is dropped
    // with it rather than hiding that problem.
}
