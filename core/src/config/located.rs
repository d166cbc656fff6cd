//! A parsed TOML document that remembers where everything is, so that every config error
//! names the file, the line and the key, and suggests the nearest valid key.

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
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "`{}`: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The source text of a config and its path, to turn byte spans into lines.
pub struct Doc<'a> {
    pub path: &'a Path,
    pub text: &'a str,
}

impl<'a> Doc<'a> {
    pub fn parse(&self) -> Result<Spanned<DeTable<'a>>, ConfigError> {
        DeTable::parse(self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            self.error(span, "", e.message().trim().to_string())
        })
    }

    pub fn error(&self, span: Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
        ConfigError { file: self.path.to_owned(), line, column, key: key.into(), message: message.into() }
    }

    /// The table at `key` of `parent` as a section; errors if it is not a table.
    pub fn section<'d>(&'d self, key: String, value: &'d Spanned<DeValue<'a>>) -> Result<Section<'d, 'a>, ConfigError> {
        match value.get_ref() {
            DeValue::Table(table) => Ok(Section { doc: self, key, table, span: value.span() }),
            other => Err(self.error(value.span(), &key, format!("expected a table, found {}", other.type_str()))),
        }
    }
}

/// One table of the document, with its dotted key.
pub struct Section<'d, 'a> {
    pub doc: &'d Doc<'a>,
    pub key: String,
    pub table: &'d DeTable<'a>,
    pub span: Range<usize>,
}

impl<'d, 'a> Section<'d, 'a> {
    pub fn root(doc: &'d Doc<'a>, table: &'d Spanned<DeTable<'a>>) -> Self {
        Section { doc, key: String::new(), table: table.get_ref(), span: table.span() }
    }

    /// The dotted path of a key of this section.
    pub fn path_of(&self, key: &str) -> String {
        if self.key.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.key)
        }
    }

    /// Refuses keys outside `allowed`, suggesting the nearest allowed one.
    pub fn allow_only(&self, allowed: &[&str]) -> Result<(), ConfigError> {
        match self.table.keys().find(|k| !allowed.contains(&k.get_ref().as_ref())) {
            None => Ok(()),
            Some(k) => {
                let hint = match did_you_mean(k.get_ref(), allowed.iter().copied()) {
                    h if !h.is_empty() => h,
                    _ => format!("; expected one of: {}", allowed.join(", ")),
                };
                let place =
                    if self.key.is_empty() { "at the top level".to_string() } else { format!("in [{}]", self.key) };
                Err(self.doc.error(k.span(), &self.path_of(k.get_ref()), format!("unknown key {place}{hint}")))
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&'d Spanned<DeValue<'a>>> {
        self.table.get(key)
    }

    pub fn required(&self, key: &str) -> Result<&'d Spanned<DeValue<'a>>, ConfigError> {
        self.get(key).ok_or_else(|| self.doc.error(self.span.clone(), &self.path_of(key), "missing required key"))
    }

    pub fn subsection(&self, key: &str) -> Result<Option<Section<'d, 'a>>, ConfigError> {
        self.get(key).map(|v| self.doc.section(self.path_of(key), v)).transpose()
    }

    pub fn error_at(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let span = self.get(key).map(|v| v.span()).unwrap_or_else(|| self.span.clone());
        self.doc.error(span, &self.path_of(key), message)
    }

    pub fn string(&self, key: &str) -> Result<Option<&'d str>, ConfigError> {
        self.typed(key, "a string", |v| v.as_str())
    }

    pub fn float(&self, key: &str) -> Result<Option<f64>, ConfigError> {
        self.typed(key, "a number", |v| {
            scalar(v).and_then(|s| match s {
                fusellm_sdk::ParamValue::Float(x) => Some(x),
                fusellm_sdk::ParamValue::Int(i) => Some(i as f64),
                _ => None,
            })
        })
    }

    pub fn int(&self, key: &str) -> Result<Option<i64>, ConfigError> {
        self.typed(key, "an integer", |v| match scalar(v) {
            Some(fusellm_sdk::ParamValue::Int(i)) => Some(i),
            _ => None,
        })
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        self.typed(key, "a boolean", |v| v.as_bool())
    }

    /// A string or an array of strings.
    pub fn strings(&self, key: &str) -> Result<Option<Vec<String>>, ConfigError> {
        let Some(value) = self.get(key) else { return Ok(None) };
        let bad = || {
            self.error_at(
                key,
                format!("expected a string or an array of strings, found {}", value.get_ref().type_str()),
            )
        };
        match value.get_ref() {
            DeValue::String(s) => Ok(Some(vec![s.to_string()])),
            DeValue::Array(items) => items
                .iter()
                .map(|v| v.get_ref().as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<_, _>>()
                .map(Some),
            _ => Err(bad()),
        }
    }

    /// The tables of an array of tables (`[[key]]`), each a section `key.<i>`.
    pub fn tables(&self, key: &str) -> Result<Vec<Section<'d, 'a>>, ConfigError> {
        let Some(value) = self.get(key) else { return Ok(Vec::new()) };
        match value.get_ref() {
            DeValue::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| self.doc.section(format!("{}.{i}", self.path_of(key)), v))
                .collect(),
            DeValue::Table(_) => Ok(vec![self.doc.section(self.path_of(key), value)?]),
            other => Err(self.error_at(key, format!("expected [[{key}]] tables, found {}", other.type_str()))),
        }
    }

    fn typed<T>(
        &self,
        key: &str,
        what: &str,
        read: impl Fn(&'d DeValue<'a>) -> Option<T>,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => read(v.get_ref())
                .map(Some)
                .ok_or_else(|| self.error_at(key, format!("expected {what}, found {}", v.get_ref().type_str()))),
        }
    }
}

/// A scalar TOML value as a plugin parameter value (`None` for arrays, tables, dates).
pub fn scalar(value: &DeValue<'_>) -> Option<fusellm_sdk::ParamValue> {
    use fusellm_sdk::ParamValue;
    match value {
        DeValue::String(s) => Some(ParamValue::Str(s.to_string())),
        DeValue::Boolean(b) => Some(ParamValue::Bool(*b)),
        DeValue::Integer(i) => i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok().map(ParamValue::Int),
        DeValue::Float(x) => x.as_str().replace('_', "").parse().ok().map(ParamValue::Float),
        _ => None,
    }
}
