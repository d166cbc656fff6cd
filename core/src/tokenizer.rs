//! A model's tokenizer with the conventions of its spec: the BOS policy, and ids that must
//! fit the embedding.

use std::path::Path;

use fusellm_sdk::ModelSpec;

use crate::error::{Context, Error, Result};

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
}

impl Tokenizer {
    /// Loads tokenizer.json and checks it against the model: its base vocabulary must fit
    /// the embedding (added special tokens beyond it, such as OpenLLaMA's `[PAD]`, are
    /// refused only if a text produces them).
    pub fn load(path: &Path, spec: &ModelSpec) -> Result<Self> {
        let inner = Self::open(path)?.inner;
        let base = inner.get_vocab_size(false);
        if base > spec.vocab_size {
            return Err(Error::msg(format!(
                "{}: the tokenizer's vocabulary has {base} tokens but the model's embedding only {} rows; is it the model's own tokenizer?",
                path.display(),
                spec.vocab_size
            )));
        }
        let bos = match (&spec.tokenizer.bos, spec.tokenizer.add_bos) {
            (Some(token), true) => Some(inner.token_to_id(token).ok_or_else(|| {
                Error::msg(format!("{}: the BOS token {token:?} is not in the vocabulary", path.display()))
            })?),
            _ => None,
        };
        Ok(Self { inner, bos })
    }

    /// A tokenizer.json on its own, with no BOS policy and no model to check against.
    pub fn open(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).context(|| path.display().to_string())?;
        Ok(Self { inner, bos: None })
    }

    /// Token ids of `text` as the model's own pipeline makes them (BOS first where the
    /// convention has one, no EOS), and each token's byte span in the text, flat
    /// `[start, end)` pairs as the `offsets` aligner takes them (the BOS spans nothing).
    pub fn encode_with_spans(&self, text: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let encoding = self.inner.encode(text, false).context(|| "tokenizing".into())?;
        let ids = self.bos.into_iter().chain(encoding.get_ids().iter().copied()).collect();
        let bos_span = self.bos.map(|_| [0, 0]).into_iter().flatten();
        let spans = bos_span.chain(encoding.get_offsets().iter().flat_map(|&(s, e)| [s as u32, e as u32])).collect();
        Ok((ids, spans))
    }

    /// Token ids of `text` as the model's own pipeline makes them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_with_spans(text)?.0)
    }

    /// The ids a text can produce: the vocabulary with its added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).context(|| "decoding".into())
    }
}
