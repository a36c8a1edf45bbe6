//! The `FENCEPOST_*` environment overlay: every setting has a variable.
//!
//! `FENCEPOST_<SECTION>_<KEY>` (or `FENCEPOST_<KEY>` for top-level keys);
//! for the list sections `[[http]]` and `[[postgres]]`,
//! `FENCEPOST_HTTP_<KEY>` sets the first entry and `FENCEPOST_HTTP_<N>_<KEY>`
//! entry N. Values are read as TOML when they parse (numbers, booleans,
//! arrays) and as strings otherwise. The names are a contract: the table
//! below is the whole list, `fencepost serve --help` prints it, and a test
//! checks that it names every field of every section.
//!
//! Written by hand rather than with Figment's `Env` provider: that splits
//! names on one fixed separator, which is ambiguous for keys that contain
//! it (`FENCEPOST_HTTP_MAX_CONNECTIONS`), and has no list index.

use super::ConfigError;

/// `(section, key)` of every setting that has an environment variable.
/// Section "" is the top level.
pub const ENV_KEYS: &[(&str, &str)] = &[
    ("", "store"),
    ("log", "format"),
    ("log", "level"),
    ("admin", "listen"),
    ("admin", "token"),
    ("admin", "resource_labels"),
    ("admin", "tls_cert"),
    ("admin", "tls_key"),
    ("admin", "tls_client_ca"),
    ("admin", "clients"),
    ("elector", "listen"),
    ("elector", "signing_key"),
    ("elector", "default_ttl"),
    ("elector", "min_ttl"),
    ("elector", "max_ttl"),
    ("elector", "lock_delay"),
    ("elector", "token"),
    ("elector", "audit_renewals"),
    ("elector", "tls_cert"),
    ("elector", "tls_key"),
    ("elector", "tls_client_ca"),
    ("elector", "clients"),
    ("elector", "grants"),
    ("audit", "batch_size"),
    ("audit", "flush_interval"),
    ("audit", "queue_capacity"),
    ("audit", "spool"),
    ("audit", "spool_max_bytes"),
    ("fencing", "drain_timeout"),
    ("fencing", "store_timeout"),
    ("fencing", "token_cache_size"),
    ("cluster", "enabled"),
    ("cluster", "replica_ttl"),
    ("http", "listen"),
    ("http", "upstream"),
    ("http", "upstream_ca"),
    ("http", "verify_key"),
    ("http", "allow_plain_tokens"),
    ("http", "write_methods"),
    ("http", "routes"),
    ("http", "max_connections"),
    ("http", "max_concurrent_requests"),
    ("http", "max_header_bytes"),
    ("http", "upstream_timeout"),
    ("http", "header_read_timeout"),
    ("http", "idle_timeout"),
    ("http", "elector_watch"),
    ("http", "elector_token"),
    ("http", "watch_resources"),
    ("http", "data_path"),
    ("http", "workers"),
    ("http", "tls_cert"),
    ("http", "tls_key"),
    ("http", "tls_client_ca"),
    ("postgres", "listen"),
    ("postgres", "upstream"),
    ("postgres", "enforce"),
    ("postgres", "guard_wait"),
    ("postgres", "guard_extension"),
    ("postgres", "verify_key"),
    ("postgres", "allow_plain_tokens"),
    ("postgres", "strict"),
    ("postgres", "write_functions"),
    ("postgres", "max_frame_bytes"),
    ("postgres", "max_connections"),
    ("postgres", "startup_timeout"),
    ("postgres", "workers"),
    ("postgres", "engine"),
    ("postgres", "tls_cert"),
    ("postgres", "tls_key"),
    ("postgres", "tls_client_ca"),
    ("postgres", "upstream_sslmode"),
    ("postgres", "upstream_ca"),
];

/// Settings whose value is always a string, even when it would parse as
/// TOML: addresses, URLs, paths and secrets ("12345" is a fine token).
const TEXT_KEYS: &[(&str, &str)] = &[
    ("admin", "listen"),
    ("admin", "token"),
    ("admin", "tls_cert"),
    ("admin", "tls_key"),
    ("admin", "tls_client_ca"),
    ("elector", "listen"),
    ("elector", "signing_key"),
    ("elector", "token"),
    ("elector", "tls_cert"),
    ("elector", "tls_key"),
    ("elector", "tls_client_ca"),
    ("http", "listen"),
    ("http", "upstream"),
    ("http", "upstream_ca"),
    ("http", "verify_key"),
    ("http", "elector_watch"),
    ("http", "elector_token"),
    ("http", "tls_cert"),
    ("http", "tls_key"),
    ("http", "tls_client_ca"),
    ("postgres", "listen"),
    ("postgres", "upstream"),
    ("postgres", "verify_key"),
    ("postgres", "tls_cert"),
    ("postgres", "tls_key"),
    ("postgres", "tls_client_ca"),
    ("postgres", "upstream_ca"),
];

/// The sections that are lists (`[[http]]`), indexed in variable names.
pub(super) const LIST_SECTIONS: &[&str] = &["http", "postgres"];

/// The TOML value of `raw` for the setting `(section, key)`.
fn env_value(section: &str, key: &str, raw: &str) -> toml::Value {
    let text = || toml::Value::String(raw.into());
    if TEXT_KEYS.contains(&(section, key)) {
        return text();
    }
    // Read as a TOML value when it is one (`true`, `5`, `["a"]`), so lists
    // and numbers work; anything else is a plain string.
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => match t.remove("v") {
            Some(
                v @ (toml::Value::String(_)
                | toml::Value::Boolean(_)
                | toml::Value::Integer(_)
                | toml::Value::Array(_)),
            ) => v,
            // Floats, dates, tables: not what any setting takes as such.
            _ => text(),
        },
        Err(_) => text(),
    }
}

/// Applies one `FENCEPOST_` variable (`rest` is its name after the prefix)
/// to the parsed config table. Unknown names are left alone: the CLI has
/// variables of its own (`FENCEPOST_ADMIN_URL`, `FENCEPOST_ELECTOR_URL`...).
pub(super) fn apply_env(
    root: &mut toml::Table,
    var: &str,
    rest: &str,
    raw: &str,
) -> Result<(), ConfigError> {
    let lower = rest.to_ascii_lowercase();
    for (section, key) in ENV_KEYS {
        if section.is_empty() {
            if lower == *key {
                root.insert((*key).into(), env_value(section, key, raw));
                return Ok(());
            }
            continue;
        }
        let Some(after) = lower.strip_prefix(&format!("{section}_")) else {
            continue;
        };
        if LIST_SECTIONS.contains(section) {
            let (index, k) = match after.split_once('_') {
                Some((n, k)) if n.bytes().all(|b| b.is_ascii_digit()) => (
                    n.parse::<usize>().map_err(|e| ConfigError::Env {
                        var: var.into(),
                        message: e.to_string(),
                    })?,
                    k,
                ),
                _ => (0, after),
            };
            if k != *key {
                continue;
            }
            let list = root
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Array(vec![]));
            let toml::Value::Array(items) = list else {
                return Err(ConfigError::Env {
                    var: var.into(),
                    message: format!("[{section}] must be a list"),
                });
            };
            while items.len() <= index {
                items.push(toml::Value::Table(toml::Table::new()));
            }
            if let toml::Value::Table(t) = &mut items[index] {
                t.insert(k.to_string(), env_value(section, key, raw));
            }
            return Ok(());
        }
        if after == *key {
            let table = root
                .entry(section.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(t) = table else {
                return Err(ConfigError::Env {
                    var: var.into(),
                    message: format!("[{section}] must be a table"),
                });
            };
            t.insert(key.to_string(), env_value(section, key, raw));
            return Ok(());
        }
    }
    Ok(())
}

/// The env var names, for `--help`.
pub fn env_help() -> String {
    let mut out =
        String::from("Environment variables (each overrides the config key beside it):\n");
    for (section, key) in ENV_KEYS {
        let name = if section.is_empty() {
            format!("FENCEPOST_{}", key.to_ascii_uppercase())
        } else if LIST_SECTIONS.contains(section) {
            format!(
                "FENCEPOST_{}_[N_]{}",
                section.to_ascii_uppercase(),
                key.to_ascii_uppercase()
            )
        } else {
            format!(
                "FENCEPOST_{}_{}",
                section.to_ascii_uppercase(),
                key.to_ascii_uppercase()
            )
        };
        let path = if section.is_empty() {
            key.to_string()
        } else {
            format!("{section}.{key}")
        };
        out.push_str(&format!("  {name:<44} {path}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use serde::de::{self, Deserialize, Deserializer, Visitor};

    use super::super::*;
    use super::*;

    /// The field names a struct's `Deserialize` asks for, read by handing
    /// it a deserializer that only records them. This is what the config
    /// file accepts, so the test below cannot drift from the structs.
    fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
        struct Probe<'a>(&'a mut &'static [&'static str]);
        impl<'de> Deserializer<'de> for Probe<'_> {
            type Error = de::value::Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(de::Error::custom("not a struct"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                *self.0 = fields;
                Err(de::Error::custom("probed"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
                bytes byte_buf option unit unit_struct newtype_struct seq tuple
                tuple_struct map enum identifier ignored_any
            }
        }
        let mut fields: &'static [&'static str] = &[];
        let _ = T::deserialize(Probe(&mut fields));
        assert!(
            !fields.is_empty(),
            "{} has no fields",
            std::any::type_name::<T>()
        );
        fields
    }

    #[test]
    fn every_config_field_has_an_environment_variable_and_no_more() {
        let sections: [(&str, &[&str]); 9] = [
            ("log", fields_of::<LogConfig>()),
            ("admin", fields_of::<AdminConfig>()),
            ("elector", fields_of::<ElectorConfig>()),
            ("audit", fields_of::<AuditConfig>()),
            ("fencing", fields_of::<FencingConfig>()),
            ("cluster", fields_of::<ClusterConfig>()),
            ("http", fields_of::<HttpProxyConfig>()),
            ("postgres", fields_of::<PgProxyConfig>()),
            ("", &[]),
        ];
        let mut expected: Vec<(&str, &str)> = Vec::new();
        for top in fields_of::<Config>() {
            match sections.iter().find(|(s, _)| s == top) {
                Some((section, fields)) => {
                    expected.extend(fields.iter().map(|f| (*section, *f)));
                }
                // Not a section: a top-level key.
                None => expected.push(("", top)),
            }
        }
        for (section, _) in &sections[..8] {
            assert!(
                fields_of::<Config>().contains(section),
                "[{section}] is not a section of Config"
            );
        }
        let mut listed = ENV_KEYS.to_vec();
        listed.sort();
        expected.sort();
        assert_eq!(listed, expected, "ENV_KEYS against the config's fields");
        let mut dedup = listed.clone();
        dedup.dedup();
        assert_eq!(dedup, listed, "ENV_KEYS lists a key twice");
        for k in TEXT_KEYS {
            assert!(
                ENV_KEYS.contains(k),
                "{k:?} is read as text but has no variable"
            );
        }
        for s in LIST_SECTIONS {
            assert!(ENV_KEYS.iter().any(|(sec, _)| sec == s), "{s}");
        }
    }

    #[test]
    fn help_names_every_variable() {
        let help = env_help();
        assert!(help.contains("FENCEPOST_STORE "));
        assert!(help.contains("FENCEPOST_HTTP_[N_]MAX_CONNECTIONS"));
        assert!(help.contains("FENCEPOST_FENCING_STORE_TIMEOUT"));
        assert_eq!(help.lines().count(), ENV_KEYS.len() + 1);
    }

    #[test]
    fn text_keys_stay_strings_and_others_parse() {
        assert_eq!(
            env_value("admin", "token", "12345"),
            toml::Value::String("12345".into())
        );
        assert_eq!(
            env_value("http", "max_connections", "7"),
            toml::Value::Integer(7)
        );
        assert_eq!(
            env_value("postgres", "strict", "true"),
            toml::Value::Boolean(true)
        );
        assert_eq!(
            env_value("log", "level", "fencepost=debug"),
            toml::Value::String("fencepost=debug".into())
        );
        assert_eq!(
            env_value("audit", "batch_size", "1.5"),
            toml::Value::String("1.5".into())
        );
    }
}
