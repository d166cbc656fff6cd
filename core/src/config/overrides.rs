//! Values merged into a config before it is read: `--set key=value` overrides, and the
//! variants of a `[sweep]` table (a grid over config keys), each a complete config of its
//! own. The merges are of parsed TOML values that keep where they were written, so an
//! error in a merged value points at its `[sweep]` line or names its `--set`.
//!
//! ```toml
//! [sweep]
//! "fusion.plugin" = ["min_ce", "avg_ce"]
//! "train.lambda" = [0.9, 0.8]
//! ```

use std::path::Path;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::located::Doc;
use super::ConfigError;

/// The table the `--set` values are appended to the config's text under, so that they
/// parse with spans of their own (past the end of the file).
const SET_TABLE: &str = "__fusellm_set";

/// One point of a sweep's grid, with the `--set` overrides.
#[derive(Clone, Debug, PartialEq)]
pub struct Variant {
    /// `key=value` pairs joined with `,`: the variant's name in tables.
    pub name: String,
    /// A folder name made of it.
    pub slug: String,
    /// The config as run, for the run's record: the file's text when nothing is merged.
    pub text: String,
    /// The file's text, with the `--set` values appended under [`SET_TABLE`].
    source: String,
    /// Where the file's text ends in `source`, and the `--set` overrides as given.
    file_len: usize,
    sets: Vec<String>,
    /// Per merged key: where its value is, in `source`.
    merges: Vec<(String, Origin)>,
}

/// Where a merged value is: the `i`-th value of the list at a path of keys in `[sweep]`,
/// or the `i`-th `--set`.
#[derive(Clone, Debug, PartialEq)]
enum Origin {
    Sweep(Vec<String>, usize),
    Set(usize),
}

/// A value as written on the command line: TOML when it parses as TOML (`0.9`, `true`,
/// `"min_ce"`, `[1, 2]`), else the bare text as a string (`min_ce`).
fn as_toml(text: &str) -> String {
    match format!("v = {text}").parse::<toml::Table>() {
        Ok(_) => text.to_string(),
        Err(_) => toml::Value::String(text.into()).to_string(),
    }
}

/// The file's text with the `--set` values appended, and their keys.
fn with_sets(path: &Path, text: &str, sets: &[String]) -> Result<(String, Vec<String>), ConfigError> {
    let mut source = format!("{text}\n[{SET_TABLE}]\n");
    let mut keys = Vec::new();
    for (i, set) in sets.iter().enumerate() {
        let (key, value) = set.split_once('=').ok_or_else(|| ConfigError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            key: String::new(),
            set: Some(set.clone()),
            message: "expected key=value, such as train.lambda=0.8".into(),
        })?;
        source += &format!("\"{i}\" = {}\n", as_toml(value.trim()));
        keys.push(key.trim().to_string());
    }
    Ok((source, keys))
}

/// A list of a `[sweep]` table: its path of keys and its length (nested tables and quoted
/// dotted keys both name dotted config keys).
type Axis = (Vec<String>, usize);

fn grid(doc: &Doc<'_>, prefix: &[String], table: &DeTable<'_>, out: &mut Vec<Axis>) -> Result<(), ConfigError> {
    for (key, value) in table.iter() {
        let path = [prefix, &[key.get_ref().to_string()]].concat();
        match value.get_ref() {
            DeValue::Array(values) if !values.is_empty() => out.push((path, values.len())),
            DeValue::Table(t) => grid(doc, &path, t, out)?,
            _ => {
                let message = "expected a non-empty array of the values to try";
                return Err(doc.error(value.span(), &format!("sweep.{}", path.join(".")), message));
            }
        }
    }
    Ok(())
}

/// A value as a variant's name shows it.
fn show(value: &DeValue<'_>) -> String {
    match value {
        DeValue::String(s) => s.to_string(),
        DeValue::Integer(i) => i.to_string(),
        DeValue::Float(x) => x.to_string(),
        DeValue::Boolean(b) => b.to_string(),
        other => other.type_str().to_string(),
    }
}

/// The variants of the config file `text` (the cartesian product of its `[sweep]` lists,
/// in order; a config without one is its own single variant), each with the `--set`
/// overrides `sets` applied after the sweep's values.
pub fn variants(path: &Path, text: &str, sets: &[String]) -> Result<Vec<Variant>, ConfigError> {
    let (source, set_keys) = with_sets(path, text, sets)?;
    let doc = Doc { path, text: &source, file_len: text.len(), sets };
    let root = doc.parse()?;
    let mut axes = Vec::new();
    match root.get_ref().get("sweep").map(|s| (s.get_ref(), s.span())) {
        Some((DeValue::Table(sweep), _)) => grid(&doc, &[], sweep, &mut axes)?,
        Some((_, span)) => return Err(doc.error(span, "sweep", "expected a table of key = [values]")),
        None => {}
    }
    let mut points: Vec<Vec<Axis>> = vec![Vec::new()];
    for (path, n) in &axes {
        points = points
            .into_iter()
            .flat_map(|p| (0..*n).map(move |i| [p.clone(), vec![(path.clone(), i)]].concat()))
            .collect();
    }
    let set_merges = set_keys.into_iter().enumerate().map(|(i, key)| (key, Origin::Set(i)));
    points
        .into_iter()
        .map(|point| {
            let shown = point.iter().map(|(path, i)| {
                format!("{}={}", path.join("."), show(sweep_value(root.get_ref(), path, *i).get_ref()))
            });
            let name = shown.collect::<Vec<_>>().join(",");
            let slug =
                name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '=' { c } else { '_' }).collect();
            let merges: Vec<(String, Origin)> = point
                .into_iter()
                .map(|(path, i)| (path.join("."), Origin::Sweep(path, i)))
                .chain(set_merges.clone())
                .collect();
            let (file_len, sets) = (text.len(), sets.to_vec());
            let mut variant =
                Variant { name, slug, text: String::new(), source: source.clone(), file_len, sets, merges };
            variant.text = match variant.merges.is_empty() {
                true => text.to_string(),
                false => toml::to_string(&as_table(&doc, variant.merged(&doc)?)?).expect("a TOML table serialises"),
            };
            Ok(variant)
        })
        .collect()
}

/// The `i`-th value of the sweep list at `path`.
fn sweep_value<'t, 'a>(root: &'t DeTable<'a>, path: &[String], i: usize) -> &'t Spanned<DeValue<'a>> {
    let mut value = root.get("sweep").expect("a sweep table").get_ref();
    for part in path {
        value = match value {
            DeValue::Table(t) => t.get(part.as_str()).expect("a key of the grid").get_ref(),
            _ => unreachable!("the grid's keys are tables' keys"),
        };
    }
    match value {
        DeValue::Array(items) => &items[i],
        _ => unreachable!("the grid's values are arrays"),
    }
}

/// The table as `toml` values, to write the config as run.
fn as_table(doc: &Doc<'_>, root: Spanned<DeTable<'_>>) -> Result<toml::Table, ConfigError> {
    use serde::Deserialize;
    let tree = root.get_ref().clone();
    toml::Table::deserialize(toml::de::Deserializer::from(root)).map_err(|e| doc.de_error(&tree, &e))
}

impl Variant {
    /// The document this variant is read from (its `--set` values past the file's end).
    pub(super) fn doc<'a>(&'a self, path: &'a Path) -> Doc<'a> {
        Doc { path, text: &self.source, file_len: self.file_len, sets: &self.sets }
    }

    /// The file's table with this variant's values merged in, `[sweep]` and the `--set`
    /// table removed.
    pub(super) fn merged<'a>(&self, doc: &Doc<'a>) -> Result<Spanned<DeTable<'a>>, ConfigError> {
        let mut root = doc.parse()?;
        let values: Vec<(&String, Spanned<DeValue<'a>>)> = self
            .merges
            .iter()
            .map(|(key, from)| {
                let value = match from {
                    Origin::Sweep(path, i) => sweep_value(root.get_ref(), path, *i),
                    Origin::Set(i) => match root.get_ref().get(SET_TABLE).map(Spanned::get_ref) {
                        Some(DeValue::Table(sets)) => sets.get(i.to_string().as_str()).expect("one value per --set"),
                        _ => unreachable!("the --set table is appended by variants"),
                    },
                };
                (key, value.clone())
            })
            .collect();
        let table = root.get_mut();
        table.remove("sweep");
        table.remove(SET_TABLE);
        for (key, value) in values {
            let at = doc.error(value.span(), key, "");
            let parts: Vec<&str> = key.split('.').collect();
            set(table, &parts, value).map_err(|message| ConfigError { message, ..at })?;
        }
        Ok(root)
    }
}

/// Sets the value at dotted `parts` (numeric parts index arrays of tables: `sources.0.model`).
fn set<'a>(table: &mut DeTable<'a>, parts: &[&str], value: Spanned<DeValue<'a>>) -> Result<(), String> {
    let (last, parents) = parts.split_last().ok_or("an empty key")?;
    let Some((first, rest)) = parents.split_first() else {
        table.insert(Spanned::new(value.span(), last.to_string().into()), value);
        return Ok(());
    };
    if table.get(*first).is_none() {
        table.insert(Spanned::new(0..0, first.to_string().into()), Spanned::new(0..0, DeValue::Table(DeTable::new())));
    }
    let entry = table.get_mut(*first).expect("inserted above").get_mut();
    let tail = [rest, &[*last]].concat();
    match entry {
        DeValue::Table(t) => set(t, &tail, value),
        DeValue::Array(items) => {
            let index: usize = tail
                .first()
                .and_then(|p| p.parse().ok())
                .ok_or(format!("`{first}` is an array: index it, as `{first}.0`"))?;
            match items.get_mut(index).map(Spanned::get_mut) {
                Some(DeValue::Table(t)) => set(t, &tail[1..], value),
                _ => Err(format!("`{first}` has no table at index {index}")),
            }
        }
        _ => Err(format!("`{first}` is a value, not a table")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_and_sweeps_merge_into_the_config() {
        let path = Path::new("x.toml");
        let text = "[fusion]\nplugin = \"min_ce\"\n[[sources]]\nmodel = \"a\"\n[sweep]\n\"fusion.plugin\" = [\"min_ce\", \"avg_ce\"]\ntrain.lambda = [0.9, 1.0]\n";
        let sets = ["fusion.params.tau=0.5".to_string(), "sources.0.model=b".to_string()];
        let v = variants(path, text, &sets).unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[1].name, "fusion.plugin=min_ce,train.lambda=1.0");
        let t: toml::Table = v[3].text.parse().unwrap();
        assert_eq!((t["fusion"]["plugin"].as_str(), t["train"]["lambda"].as_float()), (Some("avg_ce"), Some(1.0)));
        assert_eq!(t["fusion"]["params"]["tau"].as_float(), Some(0.5));
        assert_eq!(t["sources"][0]["model"].as_str(), Some("b"));
        assert!(t.get("sweep").is_none() && t.get(SET_TABLE).is_none());
        assert!(variants(path, text, &["fusion".into()]).unwrap_err().message.contains("key=value"));
        let plain = variants(path, "[fusion]\nplugin = \"min_ce\"\n", &[]).unwrap();
        assert_eq!(plain[0].text, "[fusion]\nplugin = \"min_ce\"\n", "a config without merges is run as written");
    }
}
