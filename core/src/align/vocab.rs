//! Vocabularies and vocabulary maps on the host side: token strings read from a
//! tokenizer.json, prepared for the mappers (canonical, or the paper's way in compat mode),
//! and the resulting map cached on disk, keyed by both tokenizers' contents.

use std::path::{Path, PathBuf};

use fusellm_sdk::{CooccurrenceBuf, TokenStrings, TokenizerConventions, VocabMap};

use super::normalize::Normalizer;
use crate::checkpoint::Checkpoint;
use crate::error::{Context, Error, Result};
use crate::files::{read_cache, sha256_hex, write_cache};
use crate::plugins::Configured;

/// A tokenizer's vocabulary: every id's string as the tokenizer spells it, added tokens
/// included, with the tokenizer's conventions and a hash of its file.
pub struct Vocabulary {
    pub tokens: Vec<String>,
    pub conventions: TokenizerConventions,
    pub hash: String,
}

impl Vocabulary {
    /// A tokenizer file alone, with the conventions it says itself.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        Self::read(path, None)
    }

    /// A checkpoint's tokenizer with the conventions its adapter gave (the EOS tokens of
    /// config.json among them).
    pub fn from_checkpoint(checkpoint: &Checkpoint) -> Result<Self> {
        Self::read(&checkpoint.dir.join("tokenizer.json"), Some(&checkpoint.spec.tokenizer))
    }

    fn read(path: &Path, conventions: Option<&TokenizerConventions>) -> Result<Self> {
        let text = std::fs::read_to_string(path).context(|| format!("reading {}", path.display()))?;
        let conventions = match conventions {
            Some(c) => c.clone(),
            None => TokenizerConventions::from_tokenizer_json(&text).context(|| path.display().to_string())?,
        };
        let tokenizer = tokenizers::Tokenizer::from_bytes(text.as_bytes()).context(|| path.display().to_string())?;
        let size = tokenizer.get_vocab_size(true) as u32;
        let tokens = (0..size)
            .map(|id| {
                tokenizer.id_to_token(id).ok_or_else(|| Error::msg(format!("{}: no token has id {id}", path.display())))
            })
            .collect::<Result<Vec<_>>>()?;
        // The canonical strings depend on the conventions too: both are in the hash that
        // keys the map cache.
        let conventions_json = serde_json::to_string(&conventions).expect("conventions serialise");
        let hash = sha256_hex([text.as_bytes(), conventions_json.as_bytes()].concat().as_slice());
        Ok(Self { tokens, conventions, hash })
    }

    pub fn canonical(&self) -> Vec<String> {
        let normalizer = Normalizer::new(&self.conventions);
        self.tokens.iter().map(|t| normalizer.canonical(t)).collect()
    }

    /// The canonical strings as a mapping target. A byte-fallback token (`<0x30>`) whose
    /// text also has a regular token (`0`) is never produced by the tokenizer, so a source
    /// token must map to the regular one: the byte token is given a string nothing matches.
    /// (Without this, the first-in-id-order tie rule picks the byte token, which sits at the
    /// start of sentencepiece vocabularies, and fusion teaches ids the target never sees.)
    pub fn target_canonical(&self) -> Vec<String> {
        let canonical = self.canonical();
        if !self.conventions.byte_fallback {
            return canonical;
        }
        let is_byte = |t: &str| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>');
        let regular: std::collections::HashSet<&str> =
            self.tokens.iter().zip(&canonical).filter(|(t, _)| !is_byte(t)).map(|(_, c)| c.as_str()).collect();
        self.tokens
            .iter()
            .zip(&canonical)
            .map(|(t, c)| if is_byte(t) && regular.contains(c.as_str()) { format!("\u{F8FF}{t}") } else { c.clone() })
            .collect()
    }

    /// The strings with this tokenizer's space marker replaced by `marker` (the paper's
    /// only normalisation).
    pub fn with_marker(&self, marker: &str) -> Vec<String> {
        self.tokens.iter().map(|t| t.replace(self.conventions.space_marker.as_str(), marker)).collect()
    }
}

/// Token strings laid out flat for a plugin.
pub struct FlatStrings {
    offsets: Vec<u32>,
    bytes: Vec<u8>,
}

impl FlatStrings {
    pub fn new<S: AsRef<str>>(strings: &[S]) -> Self {
        let mut offsets = Vec::with_capacity(strings.len() + 1);
        offsets.push(0);
        let mut bytes = Vec::new();
        for s in strings {
            bytes.extend_from_slice(s.as_ref().as_bytes());
            offsets.push(bytes.len() as u32);
        }
        Self { offsets, bytes }
    }

    pub fn view(&self) -> TokenStrings<'_> {
        TokenStrings { offsets: &self.offsets, bytes: &self.bytes }
    }
}

/// Maps `source` onto `target` with a vocabulary mapper, through the on-disk cache when
/// `cache` is given. In `compat` mode strings are prepared as the paper's code does (the
/// source's space marker swapped for the target's, nothing else), otherwise canonical. A
/// mapper that reads co-occurrence counts gets `counts` (and the cache is keyed by them).
pub fn map_vocab(
    mapper: &Configured<'_>,
    source: &Vocabulary,
    target: &Vocabulary,
    compat: bool,
    cache: Option<&Path>,
    counts: Option<&CooccurrenceBuf>,
) -> Result<VocabMap> {
    let reads_counts = mapper.entry.info.cooccurrence;
    let counts = match (reads_counts, counts) {
        (true, Some(counts)) => Some(counts),
        (true, None) => {
            return Err(Error::msg(format!(
                "vocabulary mapper {} maps by co-occurrence counts of aligned tokens over a corpus: use it in `fusellm align` or `fusellm run`, which count them",
                mapper.entry.label()
            )))
        }
        (false, _) => None,
    };
    let file = cache.map(|dir| cache_file(dir, mapper, source, target, compat, counts));
    if let Some(map) = file.as_ref().and_then(|f| read_cache(f)).and_then(|b| serde_json::from_slice(&b).ok()) {
        return Ok(map);
    }
    let (src, tgt) = if compat {
        (source.with_marker(&target.conventions.space_marker), target.tokens.clone())
    } else {
        (source.canonical(), target.target_canonical())
    };
    let (src, tgt) = (FlatStrings::new(&src), FlatStrings::new(&tgt));
    let map =
        mapper.entry.map_vocab(&mapper.params, src.view(), tgt.view(), counts.map(|c| c.view()).unwrap_or_default())?;
    if map.target.len() != source.tokens.len()
        || map.target.iter().flatten().any(|&t| t as usize >= target.tokens.len())
    {
        return Err(Error::msg(format!(
            "vocabulary mapper {} returned a map of the wrong shape",
            mapper.entry.label()
        )));
    }
    if let Some(file) = file {
        // The cache only saves time: failing to write it is not an error.
        let _ = write_cache(&file, &serde_json::to_vec(&map).expect("maps serialise"));
    }
    Ok(map)
}

fn cache_file(
    dir: &Path,
    mapper: &Configured<'_>,
    source: &Vocabulary,
    target: &Vocabulary,
    compat: bool,
    counts: Option<&CooccurrenceBuf>,
) -> PathBuf {
    let mut key = format!(
        "{}|{}|{}|{}|{compat}|regular-before-byte-tokens",
        mapper.id(),
        mapper.entry.origin,
        source.hash,
        target.hash
    );
    if let Some(counts) = counts {
        key += &format!("|counts {}", sha256_hex(&serde_json::to_vec(counts).expect("counts serialise")));
    }
    dir.join("vocab-maps").join(format!("{}.json", &sha256_hex(key.as_bytes())[..32]))
}
