//! Corpora as users have them: one corpus as JSONL, gzip JSONL, zstd JSONL, a JSON array and
//! Parquet gives the same documents and the same split pieces; bad files and records name
//! their file and place.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::common::fixtures;
use fusellm_core::split::{for_each_document, OnBadInput};
use parquet::data_type::{ByteArray, ByteArrayType};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;

fn dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusellm-corpus-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Documents of the fixtures' GSM8K corpus (a question and an answer each), as (title, text).
fn documents() -> Vec<(String, String)> {
    let file = fixtures::root().join("corpora/math/gsm8k.valid.jsonl");
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .take(60)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["question"].as_str().unwrap().to_string(), v["answer"].as_str().unwrap().to_string())
        })
        .collect()
}

fn jsonl(docs: &[(String, String)]) -> Vec<u8> {
    docs.iter()
        .map(|(q, a)| serde_json::json!({ "question": q, "answer": a }).to_string() + "\n")
        .collect::<String>()
        .into()
}

/// A Parquet file of two string columns in row groups of `group` rows, snappy-compressed,
/// as the Hugging Face datasets library writes them.
fn parquet(path: &Path, docs: &[(String, String)], group: usize) {
    let schema = parquet::schema::parser::parse_message_type(
        "message doc { required binary question (STRING); optional binary answer (STRING); }",
    )
    .unwrap();
    let props = WriterProperties::builder().set_compression(parquet::basic::Compression::SNAPPY).build();
    let mut writer =
        SerializedFileWriter::new(std::fs::File::create(path).unwrap(), Arc::new(schema), Arc::new(props)).unwrap();
    for chunk in docs.chunks(group) {
        let mut rows = writer.next_row_group().unwrap();
        let mut column = 0;
        while let Some(mut col) = rows.next_column().unwrap() {
            let values: Vec<ByteArray> =
                chunk.iter().map(|(q, a)| ByteArray::from(if column == 0 { q.as_str() } else { a.as_str() })).collect();
            // The optional column: every value defined.
            let levels = vec![1i16; chunk.len()];
            let defs = (column == 1).then_some(levels.as_slice());
            col.typed::<ByteArrayType>().write_batch(&values, defs, None).unwrap();
            col.close().unwrap();
            column += 1;
        }
        rows.close().unwrap();
    }
    writer.close().unwrap();
}

fn texts(file: &Path, fields: &[&str]) -> fusellm_core::error::Result<Vec<(String, String)>> {
    let fields: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
    let mut out = Vec::new();
    for_each_document(&[file.to_owned()], &fields, OnBadInput::Stop(""), |d| {
        out.push((d.source, d.text));
        Ok(())
    })?;
    Ok(out)
}

/// The five versions of one corpus in `dir`.
fn versions(dir: &Path, docs: &[(String, String)]) -> Vec<PathBuf> {
    let plain = dir.join("gsm8k.jsonl");
    std::fs::write(&plain, jsonl(docs)).unwrap();
    let gz = dir.join("gsm8k.jsonl.gz");
    let mut e = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::default());
    e.write_all(&jsonl(docs)).unwrap();
    e.finish().unwrap();
    let zst = dir.join("gsm8k.jsonl.zst");
    std::fs::write(&zst, zstd::encode_all(&jsonl(docs)[..], 3).unwrap()).unwrap();
    let array = dir.join("gsm8k.json");
    let values: Vec<_> = docs.iter().map(|(q, a)| serde_json::json!({ "question": q, "answer": a })).collect();
    std::fs::write(&array, serde_json::to_vec_pretty(&values).unwrap()).unwrap();
    let pq = dir.join("gsm8k.parquet");
    parquet(&pq, docs, 25);
    vec![plain, gz, zst, array, pq]
}

#[test]
fn every_format_gives_the_same_documents_and_the_same_pieces() {
    let dir = dir("same");
    let docs = documents();
    let expected: Vec<String> = docs.iter().map(|(q, a)| format!("{q}\n{a}")).collect();
    let files = versions(&dir, &docs);
    for file in &files {
        let got = texts(file, &["question", "answer"]).unwrap();
        assert_eq!(got.iter().map(|d| d.1.clone()).collect::<Vec<_>>(), expected, "{}", file.display());
    }
    // Places: JSONL lines, array elements, Parquet rows (across its three row groups).
    let last = |i: usize| texts(&files[i], &["question", "answer"]).unwrap().pop().unwrap().0;
    assert!(last(1).ends_with("gsm8k.jsonl.gz:60"), "{}", last(1));
    assert!(last(3).ends_with("gsm8k.json element 60"), "{}", last(3));
    assert!(last(4).ends_with("gsm8k.parquet row 60"), "{}", last(4));

    // `fusellm split` writes the same pieces (ids, documents, texts) from each.
    let tokenizer = fixtures::root().join("tokenizers/llama2/tokenizer.json");
    let pieces: Vec<Vec<serde_json::Value>> = files
        .iter()
        .map(|file| {
            let out = file.with_extension("pieces");
            let status = Command::new(env!("CARGO_BIN_EXE_fusellm"))
                .args(["split", "--max-len", "64", "--text-field", "question", "--text-field", "answer", "--input"])
                .arg(file)
                .arg("--tokenizer")
                .arg(&tokenizer)
                .arg("--out")
                .arg(&out)
                .output()
                .unwrap();
            assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
            std::fs::read_to_string(&out)
                .unwrap()
                .lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    // The source names the file (and its line, element or row): the rest is the same.
                    v.as_object_mut().unwrap().remove("source");
                    v
                })
                .collect()
        })
        .collect();
    assert!(pieces[0].len() > docs.len(), "64-token pieces cut some documents");
    for (file, p) in files.iter().zip(&pieces) {
        assert_eq!(p, &pieces[0], "{}", file.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_files_and_records_name_the_file_and_the_place() {
    let dir = dir("bad");
    let docs = documents();
    let files = versions(&dir, &docs);
    let error = |file: &Path, fields: &[&str]| texts(file, fields).unwrap_err().report();

    // A Parquet file without the named column names the file, the column and the ones it has.
    let e = error(&files[4], &["text"]);
    assert!(e.contains("gsm8k.parquet has no column `text`") && e.contains("question, answer"), "{e}");
    // A damaged page: everything between the magic and the footer overwritten.
    let mut bytes = std::fs::read(&files[4]).unwrap();
    let footer = u32::from_le_bytes(bytes[bytes.len() - 8..bytes.len() - 4].try_into().unwrap()) as usize;
    let end = bytes.len() - footer - 8;
    bytes[4..end].fill(0xa5);
    let damaged = dir.join("damaged.parquet");
    std::fs::write(&damaged, &bytes).unwrap();
    let e = error(&damaged, &["question"]);
    assert!(e.contains("damaged.parquet") && e.contains("damaged"), "{e}");
    // A JSONL line without the field.
    let e = error(&files[0], &["nope"]);
    assert!(e.contains("gsm8k.jsonl:1") && e.contains("no string field `nope`"), "{e}");

    // Compressed files cut short: an error naming the file, never fewer documents.
    for file in [&files[1], &files[2]] {
        let bytes = std::fs::read(file).unwrap();
        let cut = dir.join(format!("cut-{}", file.file_name().unwrap().to_string_lossy()));
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = error(&cut, &["question"]);
        assert!(e.contains(&*cut.file_name().unwrap().to_string_lossy()) && e.contains("cut short"), "{e}");
    }
    // A bad element of an array, and a null in a Parquet column, get their place.
    let array = dir.join("bad.json");
    std::fs::write(&array, r#"[{"question": "a"}, {"question": 7}]"#).unwrap();
    let e = error(&array, &["question"]);
    assert!(e.contains("bad.json element 2") && e.contains("no string field `question`"), "{e}");
    let e = error(&array, &["question"]);
    assert!(!e.contains("element 1"), "{e}");
    std::fs::write(&array, r#"{"question": "not an array"}"#).unwrap();
    assert!(error(&array, &["question"]).contains("not a JSON array of objects"));
    let nulls = dir.join("nulls.parquet");
    let schema =
        parquet::schema::parser::parse_message_type("message doc { optional binary question (STRING); }").unwrap();
    let mut w = SerializedFileWriter::new(
        std::fs::File::create(&nulls).unwrap(),
        Arc::new(schema),
        Arc::new(WriterProperties::builder().build()),
    )
    .unwrap();
    let mut rows = w.next_row_group().unwrap();
    let mut col = rows.next_column().unwrap().unwrap();
    col.typed::<ByteArrayType>().write_batch(&[ByteArray::from("a")], Some(&[1, 0]), None).unwrap();
    col.close().unwrap();
    rows.close().unwrap();
    w.close().unwrap();
    let e = error(&nulls, &["question"]);
    assert!(e.contains("nulls.parquet row 2") && e.contains("column `question` is null"), "{e}");
    // Skipping bad records skips the null row and keeps the other.
    let mut kept = Vec::new();
    let count = for_each_document(&[nulls], &["question".into()], OnBadInput::Skip, |d| {
        kept.push(d.text);
        Ok(())
    })
    .unwrap();
    assert_eq!((kept, count.skipped), (vec!["a".to_string()], 1));
    let _ = std::fs::remove_dir_all(&dir);
}
