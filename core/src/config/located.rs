//! Where a config's values were written, so that every config error names the file, the
//! line and the key: the parsed document with its spans, serde's errors reworded at the key
//! they point at (unknown keys and values with the nearest valid one suggested).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use fusellm_sdk::suggest::did_you_mean;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A config error, pointing at the file, line and key.
#[derive(Clone, Debug, PartialEq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the offending key (`fusion.params.tau`); empty for the whole file.
    pub key: String,
    /// The `--set key=value` the offending value came from, when it came from one (it has
    /// no line in the file): kept by every error made at this place.
    pub set: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}: ", self.file.display())?,
            line => write!(f, "{}:{line}:{}: ", self.file.display(), self.column)?,
        }
        if !self.key.is_empty() {
            write!(f, "`{}`: ", self.key)?;
        }
        if let Some(set) = &self.set {
            write!(f, "--set {set}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The source text of a config and its path, to turn byte spans into lines. `--set`
/// values are parsed from lines appended past the file's end (`file_len`), one per
/// override in `sets`: an error there names the override instead of a line.
pub struct Doc<'a> {
    pub path: &'a Path,
    pub text: &'a str,
    pub file_len: usize,
    pub sets: &'a [String],
}

impl<'a> Doc<'a> {
    pub fn parse(&self) -> Result<Spanned<DeTable<'a>>, ConfigError> {
        DeTable::parse(self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            self.error(span, "", e.message().trim().to_string())
        })
    }

    /// The file's own text, as written.
    pub fn of_file(path: &'a Path, text: &'a str) -> Self {
        Doc { path, text, file_len: text.len(), sets: &[] }
    }

    pub fn error(&self, span: Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        if span.start > self.file_len {
            // Past the file: a newline, the `--set` table's header, then one line per override.
            let line = self.text[self.file_len..span.start].matches('\n').count();
            let set = self.sets.get(line.saturating_sub(2)).cloned();
            let (file, key, message) = (self.path.to_owned(), key.into(), message.into());
            return ConfigError { file, line: 0, column: 0, key, set, message };
        }
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
        ConfigError { file: self.path.to_owned(), line, column, key: key.into(), set: None, message: message.into() }
    }

    /// Serde's error reading `root` into the config's types, at the key it points at and
    /// in the words of a config error.
    pub fn de_error(&self, root: &DeTable<'_>, e: &toml::de::Error) -> ConfigError {
        let span = e.span().unwrap_or(0..0);
        let key = key_at(root, &span, "");
        let message = e.message().trim();
        let message = match backticked(message).as_slice() {
            [unknown, expected @ ..] if message.starts_with("unknown field") => {
                // The span is the unknown key's own.
                let section = key.rsplit_once('.').map_or("", |(s, _)| s);
                let place = if section.is_empty() { "at the top level".into() } else { format!("in [{section}]") };
                let hint = match did_you_mean(unknown, expected.iter().copied()) {
                    h if !h.is_empty() => h,
                    _ => format!("; expected one of: {}", expected.join(", ")),
                };
                format!("unknown key {place}{hint}")
            }
            [given, options @ ..] if message.starts_with("unknown variant") => {
                let hint = did_you_mean(given, options.iter().copied());
                format!("`{given}` is not one of {}{hint}", options.join(", "))
            }
            _ => reworded(message),
        };
        self.error(span, &key, message)
    }

    /// Where dotted `key` was written, or the innermost written section when it was not.
    pub fn locate(&self, root: &Spanned<DeTable<'_>>, key: &str) -> ConfigError {
        let (mut table, mut span) = (root.get_ref(), root.span());
        for part in key.split('.') {
            match table.get(part).map(|v| (v.get_ref(), v.span())) {
                Some((DeValue::Table(inner), s)) => (table, span) = (inner, s),
                Some((_, s)) => return self.error(s, key, ""),
                None => break,
            }
        }
        self.error(span, key, "")
    }
}

/// The dotted key whose key or value holds `span`.
fn key_at(table: &DeTable<'_>, span: &Range<usize>, prefix: &str) -> String {
    let holds = |s: Range<usize>| s.start <= span.start && span.end <= s.end.max(s.start + 1);
    for (key, value) in table.iter() {
        let path = if prefix.is_empty() { key.get_ref().to_string() } else { format!("{prefix}.{}", key.get_ref()) };
        if holds(key.span()) {
            return path;
        }
        match value.get_ref() {
            DeValue::Table(inner) => {
                let inside = key_at(inner, span, &path);
                if inside != path || holds(value.span()) {
                    return inside;
                }
            }
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let DeValue::Table(inner) = item.get_ref() {
                        let item_path = format!("{path}.{i}");
                        let inside = key_at(inner, span, &item_path);
                        if inside != item_path || holds(item.span()) {
                            return inside;
                        }
                    }
                }
                if holds(value.span()) {
                    return path;
                }
            }
            _ if holds(value.span()) => return path,
            _ => {}
        }
    }
    prefix.to_string()
}

/// The names a serde message quotes in backticks, in order.
fn backticked(message: &str) -> Vec<&str> {
    message.split('`').skip(1).step_by(2).collect()
}

/// Serde's "invalid type: string \"x\", expected i64" as "expected an integer, found
/// string", and its untagged enums by what they accept.
fn reworded(message: &str) -> String {
    if message.contains("untagged enum OneOrMany") {
        return "expected a string or an array of strings".into();
    }
    if message.contains("untagged enum RawPluginName") {
        return "expected a plugin name or { wasm = \"...\" } / { dylib = \"...\" }".into();
    }
    let Some((found, expected)) = message.strip_prefix("invalid type: ").and_then(|m| m.split_once(", expected "))
    else {
        return message.to_string();
    };
    let found = match found.split([' ', '`']).next().unwrap_or(found) {
        "floating" => "float",
        "map" => "table",
        "sequence" => "array",
        other => other,
    };
    let expected = match expected {
        "i64" | "u64" | "usize" | "u32" | "i32" => "an integer",
        "f64" | "f32" => "a number",
        "a sequence" => "an array",
        e if e.starts_with("struct ") || e == "a map" => "a table",
        e => e,
    };
    format!("expected {expected}, found {found}")
}
