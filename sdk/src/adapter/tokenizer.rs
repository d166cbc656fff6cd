//! Tokenizer conventions read from tokenizer.json itself.

use super::{HfConfig, TokenizerConventions};

/// The names the families give the token that ends a text, where config.json says nothing.
const END_OF_TEXT: &[&str] = &["</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"];

impl TokenizerConventions {
    /// Reads the conventions from a tokenizers `tokenizer.json`: the space marker and byte
    /// handling from its normalizer, pre-tokenizer and model; the BOS policy from its
    /// post-processor (a template that starts with a special token adds a BOS); the
    /// special tokens from its added tokens; the EOS by the families' usual names.
    pub fn from_tokenizer_json(json: &str) -> Result<Self, String> {
        Ok(Self::from_doc(&parse(json)?))
    }

    fn from_doc(doc: &serde_json::Value) -> Self {
        let text = |v: &serde_json::Value| v.to_string();
        let pre = text(&doc["pre_tokenizer"]);
        let byte_level = pre.contains("\"ByteLevel\"");
        let metaspace = pre.contains("\"Metaspace\"") || text(&doc["normalizer"]).contains('\u{2581}');
        // The template of a TemplateProcessing post-processor, alone or in a Sequence.
        let post = &doc["post_processor"];
        let templates = std::iter::once(post).chain(post["processors"].as_array().into_iter().flatten());
        let bos = templates.filter_map(|p| p["single"][0]["SpecialToken"]["id"].as_str()).next().map(str::to_string);
        let special_tokens: Vec<String> = doc["added_tokens"]
            .as_array()
            .map(|tokens| {
                tokens
                    .iter()
                    .filter(|t| t["special"].as_bool() == Some(true))
                    .filter_map(|t| t["content"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        // Beyond the template, the families' usual names say which specials are BOS and EOS.
        let named = |names: &[&str]| special_tokens.iter().find(|t| names.contains(&t.as_str())).cloned();
        let marker = if byte_level {
            "\u{0120}"
        } else if metaspace {
            "\u{2581}"
        } else {
            " "
        };
        Self {
            space_marker: marker.into(),
            byte_fallback: doc["model"]["byte_fallback"].as_bool().unwrap_or(false),
            byte_level,
            add_bos: bos.is_some(),
            bos: bos.or_else(|| named(&["<s>", "<bos>", "<|startoftext|>", "<|begin_of_text|>"])),
            eos: named(END_OF_TEXT).into_iter().collect(),
            special_tokens,
        }
    }

    /// The conventions of a checkpoint: tokenizer.json's, with the EOS tokens config.json
    /// names by id (`eos_token_id`, one or a list: Llama 3 ends texts with three tokens)
    /// where tokenizer.json has them as added tokens. Ids it lacks (a stand-in tokenizer)
    /// leave the EOS that the names give.
    pub fn from_checkpoint(tokenizer_json: &str, config: &HfConfig) -> Result<Self, String> {
        let doc = parse(tokenizer_json)?;
        let mut conventions = Self::from_doc(&doc);
        let added = doc["added_tokens"].as_array().map(Vec::as_slice).unwrap_or_default();
        let named: Vec<String> = config
            .id_list("eos_token_id")?
            .into_iter()
            .filter_map(|id| added.iter().find(|t| t["id"].as_u64() == Some(id)))
            .filter_map(|t| t["content"].as_str().map(str::to_string))
            .collect();
        if !named.is_empty() {
            conventions.eos = named;
        }
        Ok(conventions)
    }
}

fn parse(json: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(json).map_err(|e| format!("tokenizer.json is not valid JSON: {e}"))
}
