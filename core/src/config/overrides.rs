//! Config text rewritten before it is read: `--set key=value` overrides, and the variants
//! of a `[sweep]` table (a grid over config keys), each a complete config of its own.
//!
//! ```toml
//! [sweep]
//! "fusion.plugin" = ["min_ce", "avg_ce"]
//! "train.lambda" = [0.9, 0.8]
//! ```

use std::path::Path;

use toml::{Table, Value};

use super::ConfigError;

fn error(path: &Path, key: &str, message: String) -> ConfigError {
    ConfigError { file: path.to_owned(), line: 0, column: 0, key: key.into(), message }
}

/// A value as written on the command line: TOML when it parses as TOML (`0.9`, `true`,
/// `"min_ce"`, `[1, 2]`), else the bare text as a string (`min_ce`).
fn parse_value(text: &str) -> Value {
    toml::from_str::<Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(text.into()))
}

/// Sets dotted `key` (numeric parts index arrays of tables: `sources.0.model`).
fn set(table: &mut Table, key: &str, value: Value) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    let (last, parents) = parts.split_last().ok_or("an empty key")?;
    let mut here = table;
    for (i, part) in parents.iter().enumerate() {
        let entry = here.entry(part.to_string()).or_insert_with(|| Value::Table(Table::new()));
        let next = match entry {
            Value::Array(items) => {
                let index: usize = parts
                    .get(i + 1)
                    .and_then(|p| p.parse().ok())
                    .ok_or(format!("`{part}` is an array: index it, as `{part}.0`"))?;
                return match items.get_mut(index) {
                    Some(Value::Table(t)) => set(t, &parts[i + 2..].join("."), value),
                    _ => Err(format!("`{part}` has no table at index {index}")),
                };
            }
            Value::Table(t) => t,
            _ => return Err(format!("`{}` is a value, not a table", parts[..=i].join("."))),
        };
        here = next;
    }
    here.insert(last.to_string(), value);
    Ok(())
}

fn parse_table(path: &Path, text: &str) -> Result<Table, ConfigError> {
    text.parse::<Table>().map_err(|e| {
        let (line, column) = e
            .span()
            .map(|s| {
                let before = &text[..s.start.min(text.len())];
                (before.matches('\n').count() + 1, before.chars().rev().take_while(|&c| c != '\n').count() + 1)
            })
            .unwrap_or((0, 0));
        ConfigError { file: path.to_owned(), line, column, key: String::new(), message: e.message().trim().into() }
    })
}

/// The config text with `key=value` overrides applied. Locations in later errors refer to
/// the rewritten text, so overridden configs are reported by key.
pub fn apply_overrides(path: &Path, text: &str, overrides: &[String]) -> Result<String, ConfigError> {
    if overrides.is_empty() {
        return Ok(text.to_string());
    }
    let mut table = parse_table(path, text)?;
    for o in overrides {
        let (key, value) = o
            .split_once('=')
            .ok_or_else(|| error(path, o, format!("--set {o}: expected key=value, such as train.lambda=0.8")))?;
        set(&mut table, key.trim(), parse_value(value.trim()))
            .map_err(|m| error(path, key.trim(), format!("--set {o}: {m}")))?;
    }
    Ok(toml::to_string(&table).expect("a TOML table serialises"))
}

/// One point of a sweep's grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// `key=value` pairs joined with `,`: the variant's name in tables.
    pub name: String,
    /// A folder name made of it.
    pub slug: String,
    /// The config of this variant, without the `[sweep]` table.
    pub text: String,
}

/// Dotted keys and value lists of a `[sweep]` table (nested tables flatten to dotted keys).
fn grid(prefix: &str, table: &Table, out: &mut Vec<(String, Vec<Value>)>) -> Result<(), String> {
    for (key, value) in table {
        let key = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match value {
            Value::Array(values) if !values.is_empty() => out.push((key, values.clone())),
            Value::Table(t) => grid(&key, t, out)?,
            _ => return Err(format!("[sweep] `{key}`: expected a non-empty array of the values to try")),
        }
    }
    Ok(())
}

fn show(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The variants of a config with a `[sweep]` table (the cartesian product of its lists, in
/// order); a config without one is its own single variant.
pub fn variants(path: &Path, text: &str) -> Result<Vec<Variant>, ConfigError> {
    let mut table = parse_table(path, text)?;
    let Some(sweep) = table.remove("sweep") else {
        return Ok(vec![Variant { name: String::new(), slug: String::new(), text: text.to_string() }]);
    };
    let Value::Table(sweep) = sweep else {
        return Err(error(path, "sweep", "expected a table of key = [values]".into()));
    };
    let mut axes = Vec::new();
    grid("", &sweep, &mut axes).map_err(|m| error(path, "sweep", m))?;
    let mut points: Vec<Vec<(String, Value)>> = vec![Vec::new()];
    for (key, values) in &axes {
        points = points
            .into_iter()
            .flat_map(|p| values.iter().map(move |v| [p.clone(), vec![(key.clone(), v.clone())]].concat()))
            .collect();
    }
    points
        .into_iter()
        .map(|point| {
            let mut t = table.clone();
            for (key, value) in &point {
                set(&mut t, key, value.clone()).map_err(|m| error(path, &format!("sweep.{key}"), m))?;
            }
            let name = point.iter().map(|(k, v)| format!("{k}={}", show(v))).collect::<Vec<_>>().join(",");
            let slug =
                name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '=' { c } else { '_' }).collect();
            Ok(Variant { name, slug, text: toml::to_string(&t).expect("a TOML table serialises") })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_and_sweeps_rewrite_the_config() {
        let path = Path::new("x.toml");
        let text = "[fusion]\nplugin = \"min_ce\"\n[[sources]]\nmodel = \"a\"\n[sweep]\n\"fusion.plugin\" = [\"min_ce\", \"avg_ce\"]\ntrain.lambda = [0.9, 1.0]\n";
        let set = apply_overrides(path, text, &["fusion.params.tau=0.5".into(), "sources.0.model=b".into()]).unwrap();
        let t: Table = set.parse().unwrap();
        assert_eq!(t["fusion"]["params"]["tau"].as_float(), Some(0.5));
        assert_eq!(t["sources"][0]["model"].as_str(), Some("b"));
        assert!(apply_overrides(path, text, &["fusion".into()]).unwrap_err().message.contains("key=value"));
        let v = variants(path, text).unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[1].name, "fusion.plugin=min_ce,train.lambda=1.0");
        let t: Table = v[3].text.parse().unwrap();
        assert_eq!((t["fusion"]["plugin"].as_str(), t["train"]["lambda"].as_float()), (Some("avg_ce"), Some(1.0)));
        assert!(t.get("sweep").is_none());
    }
}
