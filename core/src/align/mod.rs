//! Alignment on the host side (DESIGN.md steps 3 and 4): token normalisation, vocabulary
//! maps with their cache, and the projection of a source's top-k onto the target's
//! positions. The algorithms themselves (dtw, em, mined) are aligner plugins.

pub mod normalize;
pub mod project;
pub mod stage;
pub mod vocab;

use std::collections::HashMap;

use fusellm_sdk::{Alignment, Params, SparseRows, SparseRowsBuf, Tokenization, VocabMap};

use crate::error::{Error, Result};
use crate::plugins::Entry;
use project::{project, Rule, Side};
use vocab::{FlatStrings, Vocabulary};

/// One tokenization of a document: token ids and, where known, their byte spans.
#[derive(Clone, Copy, Debug)]
pub struct Tokens<'a> {
    pub ids: &'a [u32],
    pub spans: &'a [u32],
}

/// The sequence aligner with the token strings each side shows it: the alignment paths of
/// documents, before any vocabulary map.
pub struct SequencePaths<'a> {
    aligner: &'a Entry,
    params: Params,
    source: Strings<'a>,
    target: Strings<'a>,
}

impl<'a> SequencePaths<'a> {
    pub fn new(
        aligner: &'a Entry,
        params: Params,
        source: &'a Vocabulary,
        target: &'a Vocabulary,
        compat: bool,
    ) -> Self {
        Self { aligner, params, source: Strings::new(source, compat), target: Strings::new(target, compat) }
    }

    /// The alignment path of one document's two tokenizations.
    pub fn path(&self, source: Tokens<'_>, target: Tokens<'_>) -> Result<Alignment> {
        let a = FlatStrings::new(&Strings::pick(&self.source.for_alignment, source.ids)?);
        let b = FlatStrings::new(&Strings::pick(&self.target.for_alignment, target.ids)?);
        Ok(self.aligner.align(
            &self.params,
            Tokenization { strings: a.view(), spans: source.spans },
            Tokenization { strings: b.view(), spans: target.spans },
        )?)
    }
}

/// Aligns documents of one source to the target: the sequence paths, a vocabulary map, and
/// the token strings the projection rule compares.
pub struct DocumentAligner<'a> {
    paths: SequencePaths<'a>,
    map: &'a VocabMap,
    compat: bool,
    /// The map keyed by the source string with the target's marker (compat only).
    by_string: HashMap<String, u32>,
}

/// A vocabulary's strings as the aligner compares them, and as the projection rule does.
struct Strings<'a> {
    vocab: &'a Vocabulary,
    for_alignment: Vec<String>,
    for_rule: Vec<String>,
}

impl<'a> Strings<'a> {
    /// The paper's code aligns strings stripped of their space marker and compares raw
    /// ones; otherwise both are canonical.
    fn new(vocab: &'a Vocabulary, compat: bool) -> Self {
        if compat {
            let stripped =
                vocab.tokens.iter().map(|t| t.replace(vocab.conventions.space_marker.as_str(), "")).collect();
            Self { vocab, for_alignment: stripped, for_rule: vocab.tokens.clone() }
        } else {
            let canonical = vocab.canonical();
            Self { vocab, for_alignment: canonical.clone(), for_rule: canonical }
        }
    }

    fn pick<'s>(strings: &'s [String], ids: &[u32]) -> Result<Vec<&'s str>> {
        let get = |i: u32| strings.get(i as usize).map(String::as_str);
        ids.iter()
            .map(|&i| get(i).ok_or_else(|| Error::msg(format!("token id {i} is outside the vocabulary"))))
            .collect()
    }
}

impl<'a> DocumentAligner<'a> {
    pub fn new(
        aligner: &'a Entry,
        params: Params,
        map: &'a VocabMap,
        source: &'a Vocabulary,
        target: &'a Vocabulary,
        compat: bool,
    ) -> Self {
        let by_string = if compat {
            let swapped = source.with_marker(&target.conventions.space_marker);
            swapped.into_iter().zip(&map.target).filter_map(|(s, t)| t.map(|t| (s, t))).collect()
        } else {
            HashMap::new()
        };
        Self { paths: SequencePaths::new(aligner, params, source, target, compat), map, compat, by_string }
    }

    /// The source's top-k rows (one per source position) projected onto every target
    /// position of one document. Spans (flat `[start, end)` byte offsets per token, as the
    /// tokenizers report them) are needed by the `offsets` aligner only.
    pub fn align(
        &self,
        source: Tokens<'_>,
        target: Tokens<'_>,
        topk: SparseRows<'_>,
    ) -> Result<(SparseRowsBuf, Alignment)> {
        let (source_ids, target_ids) = (source.ids, target.ids);
        if topk.len() != source_ids.len() {
            return Err(Error::msg(format!("{} top-k rows for {} source tokens", topk.len(), source_ids.len())));
        }
        let path = self.paths.path(source, target)?;
        let (source_strings, target_strings) = (&self.paths.source, &self.paths.target);
        let source_rule = Strings::pick(&source_strings.for_rule, source_ids)?;
        let target_rule = Strings::pick(&target_strings.for_rule, target_ids)?;
        let rule = if self.compat {
            Rule::Compat {
                source_marker: &source_strings.vocab.conventions.space_marker,
                target_marker: &target_strings.vocab.conventions.space_marker,
                byte_level_source: source_strings.vocab.conventions.byte_level,
                by_string: &self.by_string,
            }
        } else {
            Rule::Corrected
        };
        let source = Side { ids: source_ids, strings: &source_rule };
        let target = Side { ids: target_ids, strings: &target_rule };
        Ok((project(&rule, &path, &source, &target, topk, self.map), path))
    }
}
