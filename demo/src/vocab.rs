//! The three tokenizer families of the demo, trained with the tokenizers crate on the
//! demo's own text, one per source family of the paper:
//! - `spm-bpe`: sentencepiece-style BPE with "▁" and byte fallback (as Llama-2);
//! - `byte-bpe`: byte-level BPE with "Ġ" (as GPT-NeoX, MPT's tokenizer);
//! - `spm-bpe-small`: the same style with another vocabulary, trained on another mix (as
//!   OpenLLaMA's own tokenizer).

use std::collections::HashSet;
use std::path::Path;
use std::str::FromStr;

use fusellm_core::error::{Context, Result};
use tokenizers::models::bpe::BpeTrainerBuilder;
use tokenizers::models::TrainerWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// A tokenizer family and its vocabulary size.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    pub name: &'static str,
    pub byte_level: bool,
    pub vocab: usize,
}

const TRAINING: fn() -> String = || "training a demo tokenizer".into();

/// The untrained pipeline of a family, as tokenizer.json.
fn template(byte_level: bool) -> serde_json::Value {
    let empty_bpe = |byte_fallback: bool, unk: Option<&str>| {
        serde_json::json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": byte_fallback, "byte_fallback": byte_fallback,
            "ignore_merges": false, "vocab": {}, "merges": []})
    };
    if byte_level {
        let bl = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        return serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": bl, "post_processor": bl, "decoder": bl, "model": empty_bpe(false, None)});
    }
    let metaspace =
        serde_json::json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": true});
    let bos = |type_id: u32| serde_json::json!({"SpecialToken": {"id": "<s>", "type_id": type_id}});
    let seq = |id: &str, type_id: u32| serde_json::json!({"Sequence": {"id": id, "type_id": type_id}});
    serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": metaspace,
        "post_processor": {"type": "TemplateProcessing", "single": [bos(0), seq("A", 0)],
            "pair": [bos(0), seq("A", 0), bos(1), seq("B", 1)],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": empty_bpe(true, Some("<unk>"))})
}

/// Trains `family` on `texts` and writes its tokenizer.json to `out`.
pub fn train(family: Family, texts: &[String], out: &Path) -> Result<()> {
    let mut tokenizer = Tokenizer::from_str(&template(family.byte_level).to_string()).context(TRAINING)?;
    let specials: Vec<&str> = if family.byte_level { vec!["<|endoftext|>"] } else { vec!["<unk>", "<s>", "</s>"] };
    // Sentencepiece-style vocabularies also hold the 256 byte tokens, added below.
    let merges_budget = if family.byte_level { family.vocab } else { family.vocab - 256 };
    let alphabet: HashSet<char> = match family.byte_level {
        true => tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet().into_iter().collect(),
        false => HashSet::new(),
    };
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(merges_budget)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.iter().map(|s| AddedToken::from(s.to_string(), true)).collect())
        .initial_alphabet(alphabet)
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    tokenizer.train(&mut trainer, texts.iter()).context(TRAINING)?;
    let mut json: serde_json::Value =
        serde_json::from_str(&tokenizer.to_string(false).context(TRAINING)?).context(TRAINING)?;
    if !family.byte_level {
        insert_byte_tokens(&mut json, specials.len());
    }
    std::fs::write(out, serde_json::to_string(&json).expect("JSON")).context(|| format!("writing {}", out.display()))
}

/// Puts `<0x00>`..`<0xFF>` right after the special tokens, as Llama-2's vocabulary has
/// them, so that byte fallback can spell any character.
fn insert_byte_tokens(json: &mut serde_json::Value, specials: usize) {
    let vocab = json["model"]["vocab"].as_object_mut().expect("a BPE vocabulary");
    let entries: Vec<(String, u64)> = vocab.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect();
    vocab.clear();
    for (token, id) in entries {
        let id = if id < specials as u64 { id } else { id + 256 };
        vocab.insert(token, id.into());
    }
    for b in 0..256u64 {
        vocab.insert(format!("<0x{b:02X}>"), (specials as u64 + b).into());
    }
}

/// The vocabulary size of a trained tokenizer.json.
pub fn vocab_size(path: &Path) -> Result<usize> {
    let tokenizer = Tokenizer::from_file(path).context(TRAINING)?;
    Ok(tokenizer.get_vocab_size(true))
}
