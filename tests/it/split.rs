//! `fusellm split`: pieces fit every tokenizer, concatenate back to the corpus, map back to
//! it, and bad corpus lines get their file and line.

use std::path::PathBuf;
use std::process::Command;

use crate::common::fixtures;
use fusellm_core::split::{for_each_document, OnBadInput, Splitter, RESERVED};
use fusellm_core::tokenizer::Tokenizer;

fn tokenizers() -> Vec<PathBuf> {
    let root = fixtures::root();
    vec![
        root.join("tokenizers/llama2/tokenizer.json"),
        root.join("tokenizers/gpt-neox-20b/tokenizer.json"),
        root.join("models/tiny-openllama"),
    ]
}

fn scratch(name: &str, contents: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusellm-split-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn pieces_fit_every_tokenizer_and_concatenate_to_the_document() {
    let tokenizers: Vec<_> = tokenizers()
        .iter()
        .map(|p| Tokenizer::open(&if p.is_dir() { p.join("tokenizer.json") } else { p.clone() }).unwrap())
        .collect();
    let splitter = Splitter { tokenizers: &tokenizers, max_len: 256, margin: 16 };
    let text = std::fs::read_to_string(fixtures::root().join("corpora/prose/tinyshakespeare.valid.txt")).unwrap();
    let pieces = splitter.split(&text).unwrap();
    assert!(pieces.len() > 10, "a 54 KiB text needs many 256-token pieces");
    assert_eq!(pieces.iter().map(|&(s, e)| &text[s..e]).collect::<String>(), text, "nothing lost or duplicated");
    for &(s, e) in &pieces {
        for t in &tokenizers {
            let n = t.encode_with_spans(&text[s..e]).unwrap().0.len();
            assert!(n + RESERVED <= 256, "a piece of {n} tokens");
        }
    }
    // A short text stays whole; an empty one gives no piece.
    assert_eq!(splitter.split("To be, or not to be.").unwrap(), vec![(0, 20)]);
    assert!(splitter.split(" \n ").unwrap().is_empty());
}

#[test]
fn the_command_writes_an_id_map_back_to_the_corpus() {
    let corpus = scratch("corpus.jsonl", b"{\"text\": \"first\"}\n\n{\"text\": \"second\"}\n");
    let out = corpus.with_file_name("pieces.jsonl");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fusellm"));
    cmd.args(["split", "--max-len", "64", "--input"]).arg(&corpus).arg("--out").arg(&out);
    for t in tokenizers() {
        cmd.arg("--tokenizer").arg(t);
    }
    let status = cmd.output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (lines[1]["id"].as_str(), lines[1]["doc"].as_u64(), lines[1]["text"].as_str()),
        (Some("1.0"), Some(1), Some("second"))
    );
    assert!(lines[1]["source"].as_str().unwrap().ends_with("corpus.jsonl:3"), "the blank line 2 is no document");
}

#[test]
fn a_bad_line_stops_the_run_with_its_place_or_is_skipped() {
    let corpus = scratch(
        "bad.jsonl",
        b"{\"text\": \"good\"}\n{not json\n{\"body\": \"no text field\"}\n\xff\xfe\n{\"text\": \"also good\"}\n",
    );
    let read = |on_bad| {
        let mut texts = Vec::new();
        let count = for_each_document(std::slice::from_ref(&corpus), &["text".to_string()], on_bad, |d| {
            texts.push(d.text);
            Ok(())
        });
        count.map(|c| (c, texts))
    };
    let e = read(OnBadInput::STOP_SPLIT).unwrap_err().report();
    assert!(e.contains("bad.jsonl:2: not valid JSON"), "{e}");
    assert!(e.contains("--skip-bad"), "{e}");
    // A config has no --skip-bad: it is told its key.
    let e = read(OnBadInput::STOP_CONFIG).unwrap_err().report();
    assert!(e.contains("`skip_bad = true` in [data]") && !e.contains("--skip-bad"), "{e}");
    let (count, texts) = read(OnBadInput::Skip).unwrap();
    assert_eq!((count.documents, count.skipped), (2, 3));
    assert_eq!(texts, vec!["good", "also good"]);

    // The command line says what it skipped, each line a warning.
    let tokenizer = fixtures::model_dir("tiny-llama2");
    let out = corpus.with_extension("pieces.jsonl");
    let (corpus, tokenizer, pieces) = (corpus.to_str().unwrap(), tokenizer.to_str().unwrap(), out.to_str().unwrap());
    let args = ["split", "--input", corpus, "--tokenizer", tokenizer, "--max-len", "64", "--skip-bad", "--out", pieces];
    let run = crate::common::fusellm_in(std::path::Path::new("."), &args);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.contains("WARN") && l.contains("skipped") && l.contains("bad.jsonl:")).count(),
        3,
        "{stderr}"
    );
}

#[test]
fn a_text_file_that_is_not_utf8_is_named() {
    let file = scratch("latin1.txt", b"caf\xe9\n");
    let e = for_each_document(&[file], &[], OnBadInput::Stop(""), |_| Ok(())).unwrap_err().report();
    assert!(e.contains("latin1.txt: not UTF-8 text"), "{e}");
}

/// A byte-order mark before the first line (as some editors write it) is not JSON and not
/// the text: the line reads as without it.
#[test]
fn a_jsonl_byte_order_mark_is_not_part_of_the_first_line() {
    let file = scratch("bom.jsonl", b"\xef\xbb\xbf{\"text\": \"first\"}\n{\"text\": \"second\"}\n");
    let mut texts = Vec::new();
    for_each_document(&[file], &["text".to_string()], OnBadInput::Stop(""), |d| {
        texts.push(d.text);
        Ok(())
    })
    .unwrap();
    assert_eq!(texts, ["first", "second"]);
}
