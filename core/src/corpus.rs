//! Corpus files as users have them: JSONL (`.jsonl`, `.ndjson`), JSON arrays (`.json`),
//! Parquet (`.parquet`, the Hugging Face datasets format) and plain text (anything else, one
//! document per file), each text format optionally gzip (`.gz`) or zstd (`.zst`) compressed.
//! Every format is streamed record by record, so a corpus larger than memory works; a
//! record that cannot be read is reported with its place (file and line, element or row),
//! and a file that cannot be read on (a cut-short stream, a damaged Parquet page) stops.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde::de::{DeserializeSeed, Error as _, SeqAccess, Visitor};

use crate::error::{Context, Error, Result};

/// One record: its text, none for a blank JSONL line, or why it cannot be read.
pub type Record = std::result::Result<Option<String>, String>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Jsonl,
    JsonArray,
    Parquet,
    Text,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

/// The format and compression a file's name says.
fn kind(path: &Path) -> (Format, Compression) {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let (rest, compression) = match name.rsplit_once('.') {
        Some((rest, "gz")) => (rest.to_string(), Compression::Gzip),
        Some((rest, "zst" | "zstd")) => (rest.to_string(), Compression::Zstd),
        _ => (name, Compression::None),
    };
    let format = match rest.rsplit_once('.').map(|(_, ext)| ext) {
        Some("jsonl" | "ndjson") => Format::Jsonl,
        Some("json") => Format::JsonArray,
        Some("parquet") => Format::Parquet,
        _ => Format::Text,
    };
    (format, compression)
}

/// The file's bytes, decompressed as its name says.
fn open(path: &Path, compression: Compression) -> Result<Box<dyn BufRead>> {
    let file = File::open(path).context(|| format!("opening {}", path.display()))?;
    Ok(match compression {
        Compression::None => Box::new(BufReader::new(file)),
        // Multi-member: `cat a.gz b.gz` is one valid gzip stream.
        Compression::Gzip => Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file))),
        Compression::Zstd => Box::new(BufReader::new(
            zstd::stream::read::Decoder::new(file).context(|| format!("opening {} as zstd", path.display()))?,
        )),
    })
}

/// The context of a read that failed part-way: for a compressed file most likely cut short.
fn reading(path: &Path, compression: Compression) -> impl FnOnce() -> String + '_ {
    move || match compression {
        Compression::None => format!("reading {}", path.display()),
        _ => format!(
            "reading {} (is the compressed file cut short or damaged? check it with gzip -t / zstd -t)",
            path.display()
        ),
    }
}

/// Calls `f` with the place and the record of every record of `path` in order; `fields`
/// name the text of a JSON object or a Parquet row (joined by newlines).
pub fn for_each_record(path: &Path, fields: &[String], f: &mut dyn FnMut(String, Record) -> Result<()>) -> Result<()> {
    let (format, compression) = kind(path);
    match format {
        Format::Jsonl => {
            for (n, line) in open(path, compression)?.split(b'\n').enumerate() {
                let line = line.context(reading(path, compression))?;
                f(format!("{}:{}", path.display(), n + 1), jsonl_text(&line, fields))?;
            }
            Ok(())
        }
        Format::JsonArray => json_array(path, compression, fields, f),
        Format::Parquet if compression != Compression::None => Err(Error::msg(format!(
            "{}: a Parquet file compresses its pages itself and cannot be read through gzip or zstd; decompress the file",
            path.display()
        ))),
        Format::Parquet => parquet_rows(path, fields, f),
        Format::Text => {
            let mut bytes = Vec::new();
            open(path, compression)?.read_to_end(&mut bytes).context(reading(path, compression))?;
            let text = String::from_utf8(bytes).map(Some).map_err(|e| format!("not UTF-8 text ({e})"));
            f(path.display().to_string(), text)
        }
    }
}

/// The text of one JSONL line; `None` for a blank line.
fn jsonl_text(line: &[u8], fields: &[String]) -> Record {
    let line = std::str::from_utf8(line).map_err(|e| format!("not UTF-8 ({e})"))?;
    // A byte-order mark some editors write at the start of a file is not part of the JSON.
    let line = line.strip_prefix('\u{feff}').unwrap_or(line);
    if line.trim().is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON ({e})"))?;
    json_text(&value, fields).map(Some)
}

/// The named string fields of a JSON object, joined by newlines.
fn json_text(value: &serde_json::Value, fields: &[String]) -> std::result::Result<String, String> {
    let parts: Vec<&str> = fields
        .iter()
        .map(|f| value[f.as_str()].as_str().ok_or_else(|| format!("no string field `{f}`")))
        .collect::<std::result::Result<_, _>>()?;
    Ok(parts.join("\n"))
}

/// A JSON array of objects, element by element (never the whole array in memory).
fn json_array(
    path: &Path,
    compression: Compression,
    fields: &[String],
    f: &mut dyn FnMut(String, Record) -> Result<()>,
) -> Result<()> {
    let mut stopped = None;
    let mut reader = open(path, compression)?;
    // Skip a byte-order mark.
    if reader.fill_buf().context(reading(path, compression))?.starts_with("\u{feff}".as_bytes()) {
        reader.consume(3);
    }
    let mut de = serde_json::Deserializer::from_reader(reader);
    let each = Elements { path, fields, f, stopped: &mut stopped };
    match each.deserialize(&mut de).and_then(|()| de.end()) {
        Ok(()) => Ok(()),
        Err(_) if stopped.is_some() => Err(stopped.expect("checked")),
        Err(e) if e.is_io() => Err(Error::msg(format!("{}: {e}", reading(path, compression)()))),
        Err(e) => Err(Error::msg(format!(
            "{}: not a JSON array of objects ({e}); a .json corpus is one array, `[{{\"text\": ...}}, ...]` (one object per line is .jsonl)",
            path.display()
        ))),
    }
}

/// The visitor of [`json_array`]: calls `f` per element; an error of `f` is kept in
/// `stopped` (serde's error type cannot carry it).
struct Elements<'a, 'f> {
    path: &'a Path,
    fields: &'a [String],
    f: &'a mut (dyn FnMut(String, Record) -> Result<()> + 'f),
    stopped: &'a mut Option<Error>,
}

impl<'de> DeserializeSeed<'de> for Elements<'_, '_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> std::result::Result<(), D::Error> {
        de.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Elements<'_, '_> {
    type Value = ();
    fn expecting(&self, out: &mut std::fmt::Formatter) -> std::fmt::Result {
        out.write_str("an array of objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        let mut n = 0;
        while let Some(value) = seq.next_element::<serde_json::Value>()? {
            n += 1;
            let place = format!("{} element {n}", self.path.display());
            if let Err(e) = (self.f)(place, json_text(&value, self.fields).map(Some)) {
                *self.stopped = Some(e);
                return Err(A::Error::custom("stopped"));
            }
        }
        Ok(())
    }
}

/// A Parquet file row by row (row group by row group), reading only the text columns.
fn parquet_rows(path: &Path, fields: &[String], f: &mut dyn FnMut(String, Record) -> Result<()>) -> Result<()> {
    let file = File::open(path).context(|| format!("opening {}", path.display()))?;
    let damaged = |e: parquet::errors::ParquetError| {
        Error::msg(format!("{}: not a readable Parquet file ({e}); is it complete and undamaged?", path.display()))
    };
    let reader = SerializedFileReader::new(file).map_err(damaged)?;
    let root = reader.metadata().file_metadata().schema_descr().root_schema().clone();
    let columns: Vec<_> = fields
        .iter()
        .map(|name| {
            root.get_fields().iter().find(|c| c.name() == name).cloned().ok_or_else(|| {
                let have: Vec<&str> = root.get_fields().iter().map(|c| c.name()).collect();
                Error::msg(format!(
                    "{} has no column `{name}` (its columns: {}); set `text_fields` in [data] to the text column",
                    path.display(),
                    have.join(", ")
                ))
            })
        })
        .collect::<Result<_>>()?;
    let projection =
        parquet::schema::types::Type::group_type_builder(root.name()).with_fields(columns).build().map_err(damaged)?;
    let mut n = 0;
    for row in reader.get_row_iter(Some(projection)).map_err(damaged)? {
        let row = row.map_err(|e| Error::msg(format!("{} row {}: {e}; the file is damaged", path.display(), n + 1)))?;
        n += 1;
        let mut parts = Vec::with_capacity(fields.len());
        let mut bad = None;
        for (name, field) in row.get_column_iter() {
            match field {
                Field::Str(s) => parts.push(s.as_str()),
                Field::Null => bad = Some(format!("column `{name}` is null")),
                other => bad = Some(format!("column `{name}` is not a string (it holds {other})")),
            }
        }
        let record = match bad {
            Some(why) => Err(why),
            None => Ok(Some(parts.join("\n"))),
        };
        f(format!("{} row {n}", path.display()), record)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_says_the_format_and_the_compression() {
        let k = |name: &str| kind(Path::new(name));
        assert_eq!(k("a/train.jsonl"), (Format::Jsonl, Compression::None));
        assert_eq!(k("train.JSONL.gz"), (Format::Jsonl, Compression::Gzip));
        assert_eq!(k("train.ndjson.zst"), (Format::Jsonl, Compression::Zstd));
        assert_eq!(k("train.json"), (Format::JsonArray, Compression::None));
        assert_eq!(k("train-00000-of-00001.parquet"), (Format::Parquet, Compression::None));
        assert_eq!(k("book.txt.gz"), (Format::Text, Compression::Gzip));
        assert_eq!(k("README"), (Format::Text, Compression::None));
    }
}
