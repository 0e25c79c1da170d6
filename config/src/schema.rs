//! The config file's JSON schema, and the reference page generated from it (`docs/config.md`).
//!
//! The schema comes from the same types the relay parses with, so the reference cannot describe a key the
//! relay does not know; a test regenerates the page and fails when the committed one is stale.

use std::borrow::Cow;
use std::fmt::Write;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde_json::{Map, Value};

use crate::Config;

/// A duration as written in the file: `30s`, `5m`, `4h`, `5d`, `1h 30m`.
pub(crate) struct HumanDuration;

impl JsonSchema for HumanDuration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration such as 30s, 5m, 4h, 5d or \"1h 30m\".",
        })
    }
}

/// An IP network in CIDR notation.
pub(crate) struct Network;

impl JsonSchema for Network {
    fn schema_name() -> Cow<'static, str> {
        "Network".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "An IP network in CIDR notation, such as 10.0.0.0/8 or ::1/128.",
        })
    }
}

/// One value, or a list of them.
pub(crate) struct OneOrMany<T>(std::marker::PhantomData<T>);

impl<T: JsonSchema> JsonSchema for OneOrMany<T> {
    fn schema_name() -> Cow<'static, str> {
        format!("OneOrMany_{}", T::schema_name()).into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let one = generator.subschema_for::<T>();
        json_schema!({
            "anyOf": [one.clone(), { "type": "array", "items": one }],
        })
    }
}

/// The JSON schema of the whole config file.
pub fn json_schema() -> Value {
    schemars::schema_for!(Config).to_value()
}

/// The config reference in Markdown: one row per key, with its type, default and description.
pub fn reference_markdown() -> String {
    let schema = json_schema();
    let defs = schema
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut rows = Vec::new();
    walk(&schema, "", &defs, &mut rows, 0);
    let mut out = String::from(
        "<!-- Generated from the herald-config crate's schema by `HERALD_BLESS=1 cargo test -p herald-config`; \
         do not edit by hand. -->\n\n\
         # herald-relay config reference\n\n\
         The relay reads one YAML file (`--config FILE`; without it, an embedded loopback default). Unknown keys \
         are errors, and `herald-relay check-config --config FILE` names the first bad field. `[]` in a key \
         stands for each element of a list. A config change is applied on SIGHUP or when the file (or a key \
         file it names) changes; see [operations](operations.md#reloading-the-config) for what can change \
         live.\n\n\
         | key | type | default | description |\n\
         | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} |",
            r.key,
            r.kind,
            r.default.map_or_else(String::new, |d| format!("`{d}`")),
            r.description.replace('|', "\\|").replace('\n', " ")
        );
    }
    out
}

struct Row {
    key: String,
    kind: String,
    default: Option<String>,
    description: String,
}

/// Follows `$ref` and the `anyOf [T, null]` that an `Option<T>` becomes, to the schema of `T`.
fn resolve<'a>(mut s: &'a Value, defs: &'a Map<String, Value>) -> &'a Value {
    for _ in 0..8 {
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            match r.strip_prefix("#/$defs/").and_then(|n| defs.get(n)) {
                Some(d) => s = d,
                None => return s,
            }
        } else if let Some(any) = s.get("anyOf").and_then(Value::as_array)
            && any.len() == 2
            && any
                .iter()
                .any(|v| v.get("type") == Some(&Value::from("null")))
        {
            match any
                .iter()
                .find(|v| v.get("type") != Some(&Value::from("null")))
            {
                Some(inner) => s = inner,
                None => return s,
            }
        } else {
            return s;
        }
    }
    s
}

fn kind(s: &Value, defs: &Map<String, Value>) -> String {
    let s = resolve(s, defs);
    if let Some(values) = enum_values(s) {
        return values.join(" \\| ");
    }
    if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
        return any
            .iter()
            .map(|v| kind(v, defs))
            .collect::<Vec<_>>()
            .join(" or ");
    }
    if s.get("description")
        .and_then(Value::as_str)
        .is_some_and(|d| d.starts_with("A duration"))
    {
        return "duration".into();
    }
    if s.get("description")
        .and_then(Value::as_str)
        .is_some_and(|d| d.starts_with("An IP network"))
    {
        return "network".into();
    }
    match s.get("type") {
        Some(Value::String(t)) if t == "array" => {
            format!(
                "list of {}",
                s.get("items").map_or("any".into(), |i| kind(i, defs))
            )
        }
        Some(Value::String(t)) if t == "object" => "mapping".into(),
        Some(Value::String(t)) => t.clone(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "any".into(),
    }
}

/// The allowed values of an enumeration, whichever of the forms schemars gives it.
fn enum_values(s: &Value) -> Option<Vec<String>> {
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        return Some(
            e.iter()
                .map(|v| format!("`{}`", v.as_str().unwrap_or_default()))
                .collect(),
        );
    }
    let alts = s.get("oneOf").and_then(Value::as_array)?;
    alts.iter()
        .map(|a| {
            a.get("const")
                .or_else(|| a.get("enum").and_then(|e| e.get(0)))
                .and_then(Value::as_str)
                .map(|v| format!("`{v}`"))
        })
        .collect()
}

fn walk(s: &Value, prefix: &str, defs: &Map<String, Value>, rows: &mut Vec<Row>, depth: usize) {
    if depth > 8 {
        return;
    }
    let s = resolve(s, defs);
    let Some(props) = s.get("properties").and_then(Value::as_object) else {
        return;
    };
    let required: Vec<&str> = s
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (name, prop) in props {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        let target = resolve(prop, defs);
        // A field's own doc comment, else its type's (but not the generic one of a duration or network).
        let description = prop
            .get("description")
            .or_else(|| {
                target
                    .get("description")
                    .filter(|_| target.get("properties").is_some() || enum_values(target).is_some())
            })
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let default = prop
            .get("default")
            .filter(|d| !d.is_null() && !d.is_object())
            .map(|d| d.to_string().trim_matches('"').to_owned());
        rows.push(Row {
            key: key.clone(),
            kind: kind(prop, defs),
            default,
            description: if required.contains(&name.as_str()) {
                format!("**Required.** {description}")
            } else {
                description
            },
        });
        if target.get("properties").is_some() {
            walk(target, &key, defs, rows, depth + 1);
        } else if let Some(items) = target.get("items") {
            let items = resolve(items, defs);
            if items.get("properties").is_some() {
                walk(items, &format!("{key}[]"), defs, rows, depth + 1);
            }
        } else if let Some(any) = target.get("anyOf").and_then(Value::as_array) {
            // `dkim`: one mapping or a list of them; the keys are the mapping's.
            if let Some(one) = any
                .iter()
                .map(|a| resolve(a, defs))
                .find(|a| a.get("properties").is_some())
            {
                walk(one, &key, defs, rows, depth + 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/config.md` is this crate's schema rendered; regenerate with `HERALD_BLESS=1`.
    #[test]
    fn config_reference_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config.md");
        let want = reference_markdown();
        if std::env::var_os("HERALD_BLESS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/config.md is stale: run `HERALD_BLESS=1 cargo test -p herald-config` and commit it"
        );
    }

    #[test]
    fn every_key_has_a_description() {
        let schema = json_schema();
        let defs = schema["$defs"].as_object().cloned().unwrap_or_default();
        let mut rows = Vec::new();
        walk(&schema, "", &defs, &mut rows, 0);
        let bare: Vec<_> = rows
            .iter()
            .filter(|r| {
                r.description
                    .trim_start_matches("**Required.**")
                    .trim()
                    .is_empty()
            })
            .map(|r| r.key.as_str())
            .collect();
        assert!(bare.is_empty(), "keys without a doc comment: {bare:?}");
    }

    #[test]
    fn every_key_of_the_design_example_is_documented() {
        let page = reference_markdown();
        for key in [
            "`hostname`",
            "`listeners[].allow_networks`",
            "`domains[].dkim.selector`",
            "`delivery.retry.factor`",
            "`limits.max_line_length`",
            "`bounces.rules[].category`",
            "`events.webhook.secret_file`",
        ] {
            assert!(page.contains(key), "{key} missing from the reference");
        }
    }
}
