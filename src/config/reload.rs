//! SIGHUP: which keys a reload may change, and the configuration in force.
//!
//! Which keys are reloadable is not decided here: each entry of the key
//! table (`keys.rs`) says so, and [`Config::reload`] follows it.

use std::sync::{Arc, RwLock};

use super::Config;
use super::keys::KEYS;
use super::schema::remote_without_keys;

impl Config {
    /// Applies the reloadable keys of `new` onto a copy of `self`. Returns the
    /// merged config and the names of changed keys that need a restart.
    pub fn reload(&self, new: &Config) -> (Config, Vec<&'static str>) {
        let mut merged = self.clone();
        let mut ignored = Vec::new();
        for key in KEYS {
            if !(key.differs)(self, new) {
                continue;
            }
            if key.reloadable {
                (key.apply)(&mut merged, new);
            } else {
                ignored.push(key.full_name);
            }
        }
        // A reload must not open a remote listener to unauthenticated use.
        if remote_without_keys(&merged.server, &merged.auth) {
            merged.auth = self.auth.clone();
            ignored.push("auth (removing every key from a non-loopback listener)");
        }
        (merged, ignored)
    }
}

/// The configuration in force, swapped whole on reload. Readers take a
/// cheap `Arc` snapshot per request or tick.
#[derive(Clone)]
pub struct LiveConfig(Arc<RwLock<Arc<Config>>>);

impl LiveConfig {
    pub fn new(config: Config) -> LiveConfig {
        LiveConfig(Arc::new(RwLock::new(Arc::new(config))))
    }

    pub fn get(&self) -> Arc<Config> {
        // A poisoned lock still holds a whole config (writers only swap the Arc).
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, config: Config) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }
}
