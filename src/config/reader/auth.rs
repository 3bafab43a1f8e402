//! `[auth]`: the legacy key lists and `[[auth.keys]]`, each key checked
//! for form and uniqueness; and the rule across sections that a listener
//! off loopback needs a key.

use std::collections::HashMap;

use super::Reader;
use crate::config::schema::{AuthConfig, KeyEntry, KeyRole, ServerConfig, remote_without_keys};

impl Reader {
    pub(super) fn auth(&mut self, table: &toml::Table) -> AuthConfig {
        let a = self.known_section(table, "auth", "auth");
        let auth = AuthConfig {
            api_keys: self.string_list(a, "auth", "api_keys", &[]),
            admin_api_keys: self.string_list(a, "auth", "admin_api_keys", &[]),
            keys: self.key_entries(a),
        };
        self.check_keys(&auth);
        auth
    }

    /// A listener off loopback must not be open to unauthenticated use
    /// unless that is asked for.
    pub(super) fn check_remote_listen(&mut self, server: &ServerConfig, auth: &AuthConfig) {
        if remote_without_keys(server, auth) {
            self.problem(
                "server.listen",
                format!(
                    "{} is not a loopback address and no API key is configured; set auth.api_keys / auth.admin_api_keys, or server.allow_unauthenticated_remote = true",
                    server.listen
                ),
            );
        }
    }

    /// `[[auth.keys]]`: each entry a table of `key`, `role` and (for the
    /// user role, required) `owner_id`.
    fn key_entries(&mut self, auth: &toml::Table) -> Vec<KeyEntry> {
        let items = match auth.get("keys") {
            None => return Vec::new(),
            Some(toml::Value::Array(items)) => items,
            Some(other) => {
                self.problem(
                    "auth.keys",
                    format!(
                        "must be an array of tables ([[auth.keys]]), found {}",
                        other.type_str()
                    ),
                );
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let name = format!("auth.keys[{i}]");
            let Some(t) = item.as_table() else {
                self.problem(&name, format!("must be a table, found {}", item.type_str()));
                continue;
            };
            self.only_keys(&name, t, &["key", "owner_id", "role"]);
            if !t.contains_key("key") {
                self.problem(&format!("{name}.key"), "is required".into());
                continue;
            }
            let key = self.string(t, &name, "key", "");
            let owner = t
                .get("owner_id")
                .map(|_| self.string(t, &name, "owner_id", ""));
            let role = match self.string(t, &name, "role", "user").as_str() {
                "user" => match owner {
                    Some(owner_id) if !owner_id.is_empty() => {
                        if let Err(e) = crate::sandboxes::validate_owner_id(&owner_id) {
                            self.problem(&format!("{name}.owner_id"), e);
                        }
                        KeyRole::User { owner_id }
                    }
                    _ => {
                        self.problem(
                            &format!("{name}.owner_id"),
                            "is required for role = \"user\" (the owner whose sandboxes the key acts on)"
                                .into(),
                        );
                        continue;
                    }
                },
                "admin" => {
                    if owner.is_some() {
                        self.problem(
                            &format!("{name}.owner_id"),
                            "is only for role = \"user\": an admin key acts for every owner".into(),
                        );
                    }
                    KeyRole::Admin
                }
                other => {
                    self.problem(
                        &format!("{name}.role"),
                        format!("must be \"user\" or \"admin\", not {other:?}"),
                    );
                    continue;
                }
            };
            out.push(KeyEntry { key, role });
        }
        out
    }

    /// Every key well-formed and unique across `api_keys`,
    /// `admin_api_keys` and `[[auth.keys]]`. Problems name the places,
    /// never the key.
    fn check_keys(&mut self, auth: &AuthConfig) {
        let places = auth
            .api_keys
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("auth.api_keys[{i}]"), k))
            .chain(
                auth.admin_api_keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (format!("auth.admin_api_keys[{i}]"), k)),
            )
            .chain(
                auth.keys
                    .iter()
                    .enumerate()
                    .map(|(i, e)| (format!("auth.keys[{i}].key"), &e.key)),
            );
        let mut seen: HashMap<&str, String> = HashMap::new();
        for (place, key) in places {
            if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                self.problem(
                    &place,
                    "keys must be non-empty and contain no whitespace".into(),
                );
            } else if let Some(first) = seen.get(key.as_str()) {
                self.problem(
                    &place,
                    format!("the same key as {first}: every key must be unique (a key has one role and one owner)"),
                );
            } else {
                seen.insert(key, place);
            }
        }
    }
}
