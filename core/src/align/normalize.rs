//! Token normalisation shared by all aligners (DESIGN.md step 4): one canonical string per
//! token, whatever the tokenizer family. Sentencepiece's "▁" and byte-level BPE's "Ġ"
//! become a space; byte-level characters ("Ċ") and byte-fallback tokens ("<0x0A>") become
//! the bytes they stand for; the BOS and EOS tokens of every family become one symbol each.

use fusellm_sdk::TokenizerConventions;

/// What BOS tokens (`<s>`, ...) become.
pub const BOS: &str = "\u{2402}";
/// What EOS tokens (`</s>`, `<|endoftext|>`, ...) become.
pub const EOS: &str = "\u{2403}";
/// Bytes that are not part of valid UTF-8 become private-use characters from here on, so
/// that every byte stays distinct and every canonical string is valid UTF-8.
const STRAY_BYTE: u32 = 0xF700;

/// Turns one tokenizer's token strings into canonical ones.
pub struct Normalizer<'a> {
    conventions: &'a TokenizerConventions,
}

impl<'a> Normalizer<'a> {
    pub fn new(conventions: &'a TokenizerConventions) -> Self {
        Self { conventions }
    }

    /// The canonical form of a token string as the vocabulary spells it.
    pub fn canonical(&self, token: &str) -> String {
        let c = self.conventions;
        if c.bos.as_deref() == Some(token) {
            return BOS.into();
        }
        if c.eos.iter().any(|e| e == token) {
            return EOS.into();
        }
        if c.special_tokens.iter().any(|s| s == token) {
            return token.into();
        }
        if c.byte_fallback {
            if let Some(byte) = byte_fallback(token) {
                return bytes_to_text(&[byte]);
            }
        }
        if c.byte_level {
            return byte_level_to_text(token);
        }
        token.replace(c.space_marker.as_str(), " ")
    }
}

/// The byte of a sentencepiece byte-fallback token such as `<0x0A>`.
fn byte_fallback(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// GPT-2's byte-level alphabet read back into bytes. Characters outside it (the raw text
/// of added tokens, such as GPT-NeoX's runs of spaces) stand for themselves.
fn byte_level_to_text(token: &str) -> String {
    let mut out = String::new();
    let mut bytes = Vec::new();
    for ch in token.chars() {
        match byte_of(ch) {
            Some(b) => bytes.push(b),
            None => {
                out.push_str(&bytes_to_text(&bytes));
                bytes.clear();
                out.push(ch);
            }
        }
    }
    out.push_str(&bytes_to_text(&bytes));
    out
}

/// The byte that a character of GPT-2's `bytes_to_unicode` alphabet stands for: printable
/// bytes are themselves, the others were shifted to 256 and up, in byte order.
fn byte_of(ch: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let c = ch as u32;
    if printable(c) {
        return Some(c as u8);
    }
    let shifted = c.checked_sub(256)?;
    (0..=255u32).filter(|&b| !printable(b)).nth(shifted as usize).map(|b| b as u8)
}

/// Bytes as text: valid UTF-8 as it is, stray bytes as private-use characters.
fn bytes_to_text(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        out.extend(chunk.invalid().iter().map(|&b| char::from_u32(STRAY_BYTE + b as u32).expect("private use")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama() -> TokenizerConventions {
        TokenizerConventions {
            space_marker: "\u{2581}".into(),
            byte_fallback: true,
            add_bos: true,
            bos: Some("<s>".into()),
            eos: vec!["</s>".into()],
            special_tokens: vec!["<unk>".into(), "<s>".into(), "</s>".into()],
            ..Default::default()
        }
    }

    fn neox() -> TokenizerConventions {
        TokenizerConventions {
            space_marker: "\u{0120}".into(),
            byte_level: true,
            eos: vec!["<|endoftext|>".into()],
            special_tokens: vec!["<|endoftext|>".into(), "<|padding|>".into()],
            ..Default::default()
        }
    }

    #[test]
    fn both_space_markers_become_a_space() {
        let (l, n) = (llama(), neox());
        assert_eq!(Normalizer::new(&l).canonical("\u{2581}the"), " the");
        assert_eq!(Normalizer::new(&n).canonical("\u{0120}the"), " the");
        assert_eq!(Normalizer::new(&l).canonical("\u{2581}\u{2581}"), "  ");
        assert_eq!(Normalizer::new(&n).canonical("  "), "  ", "an added token of raw spaces");
    }

    #[test]
    fn newlines_and_bytes_meet_in_the_middle() {
        let (l, n) = (llama(), neox());
        assert_eq!(Normalizer::new(&l).canonical("<0x0A>"), "\n");
        assert_eq!(Normalizer::new(&n).canonical("\u{010A}"), "\n"); // "Ċ"
        assert_eq!(Normalizer::new(&n).canonical("\u{010A}\u{0109}"), "\n\t"); // "Ċĉ"
                                                                               // "Ã©" in the byte-level alphabet is the two bytes of "é".
        assert_eq!(Normalizer::new(&n).canonical("\u{00C3}\u{00A9}"), "é");
        // One byte of a multi-byte character stays a distinct symbol.
        assert_eq!(Normalizer::new(&l).canonical("<0xE2>"), "\u{F7E2}");
        assert_eq!(Normalizer::new(&n).canonical("\u{00E2}"), "\u{F7E2}");
    }

    #[test]
    fn special_tokens_of_every_family_meet() {
        let (l, n) = (llama(), neox());
        assert_eq!(Normalizer::new(&l).canonical("</s>"), EOS);
        assert_eq!(Normalizer::new(&n).canonical("<|endoftext|>"), EOS);
        assert_eq!(Normalizer::new(&l).canonical("<s>"), BOS);
        assert_eq!(Normalizer::new(&l).canonical("<unk>"), "<unk>");
    }

    #[test]
    fn the_byte_level_alphabet_round_trips_every_byte() {
        let n = neox();
        for b in 0..=255u8 {
            let ch = (0..0x200u32).filter_map(char::from_u32).find(|&c| byte_of(c) == Some(b)).unwrap();
            assert_eq!(byte_of(ch), Some(b));
            assert_eq!(Normalizer::new(&n).canonical(&ch.to_string()), bytes_to_text(&[b]));
        }
    }
}
