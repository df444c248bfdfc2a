//! The live config as JSON for the admin API, with secrets taken out.

use serde_json::{Map, Value};
use toml_edit::{Document, Item, Table, TableLike};

use crate::Config;

/// What replaces a secret.
const REDACTED: &str = "(redacted)";

/// `config` as JSON, in the shape of its TOML file, with passwords in URLs and any key that names
/// a secret itself (not a file holding one) replaced by `"(redacted)"`.
pub fn redacted_json(config: &Config) -> Value {
    match Document::parse(config.text.as_str()) {
        Ok(document) => table(document.as_table()),
        // A config was validated from this text, so it parses; say so rather than panic.
        Err(_) => Value::String("(the config text does not parse)".into()),
    }
}

fn table(table: &Table) -> Value {
    table_like(table)
}

fn table_like(table: &dyn TableLike) -> Value {
    let mut object = Map::new();
    for (key, item) in table.iter() {
        let value = if is_secret_key(key) {
            Value::String(REDACTED.into())
        } else {
            item_value(item)
        };
        object.insert(key.to_string(), value);
    }
    Value::Object(object)
}

fn item_value(item: &Item) -> Value {
    match item {
        Item::None => Value::Null,
        Item::Value(value) => value_json(value),
        Item::Table(inner) => table(inner),
        Item::ArrayOfTables(array) => Value::Array(array.iter().map(table).collect()),
    }
}

fn value_json(value: &toml_edit::Value) -> Value {
    match value {
        toml_edit::Value::String(text) => Value::String(redact_url_password(text.value())),
        toml_edit::Value::Integer(number) => Value::from(*number.value()),
        toml_edit::Value::Float(number) => Value::from(*number.value()),
        toml_edit::Value::Boolean(flag) => Value::Bool(*flag.value()),
        toml_edit::Value::Datetime(datetime) => Value::String(datetime.value().to_string()),
        toml_edit::Value::Array(array) => Value::Array(array.iter().map(value_json).collect()),
        toml_edit::Value::InlineTable(inline) => table_like(inline),
    }
}

/// Keys whose value is a secret itself; `*_file` keys only name where one is kept.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    !key.ends_with("_file")
        && ["password", "secret", "token", "hmac"]
            .iter()
            .any(|word| key.contains(word))
}

/// `scheme://user:password@host...` with the password replaced; other text as it is.
fn redact_url_password(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else {
        return text.to_string();
    };
    let rest = &text[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return text.to_string();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
    if user.len() == userinfo.len() && !userinfo.is_empty() && !text.starts_with("redis") {
        // A user name alone is no secret.
        return text.to_string();
    }
    format!(
        "{}{user}:{REDACTED}@{}",
        &text[..scheme_end + 3],
        &rest[at + 1..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact_url_password("redis://:hunter2@127.0.0.1:6379/0"),
            "redis://:(redacted)@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url_password("redis://bouncer:hunter2@redis.internal"),
            "redis://bouncer:(redacted)@redis.internal"
        );
        assert_eq!(
            redact_url_password("https://acme.example/directory"),
            "https://acme.example/directory"
        );
        assert_eq!(
            redact_url_password("/var/cache/bouncer"),
            "/var/cache/bouncer"
        );
    }

    #[test]
    fn a_secret_key_is_redacted_but_a_file_name_is_kept() {
        assert!(is_secret_key("secret"));
        assert!(is_secret_key("eab_hmac_key"));
        assert!(!is_secret_key("secret_file"));
        assert!(!is_secret_key("token_file"));
        assert!(!is_secret_key("bind"));
    }

    #[test]
    fn the_config_keeps_its_shape() {
        let text = "[cluster]\nredis = \"redis://:pw@127.0.0.1:6379\"\n\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:8080\"\n\n[[routes]]\nupstream = \"app\"\n\n[upstreams.app]\nservers = [\"127.0.0.1:3001\"]\n";
        let config = crate::parse(std::path::Path::new("test.toml"), text).expect("valid");
        let json = redacted_json(&config);
        assert_eq!(json["listeners"][0]["bind"], "127.0.0.1:8080");
        assert_eq!(json["upstreams"]["app"]["servers"][0], "127.0.0.1:3001");
        assert_eq!(
            json["cluster"]["redis"],
            "redis://:(redacted)@127.0.0.1:6379"
        );
    }
}
