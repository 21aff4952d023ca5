//! Incremental detokenizing for streaming.
//!
//! A token is not a unit of text: byte-level vocabularies cut multi-byte
//! characters between tokens (the first token of "é" decodes to U+FFFD), and
//! SentencePiece decoders drop or add a leading space depending on what comes
//! before. Decoding each token on its own therefore streams garbage. Instead
//! (as vLLM and TGI do) we decode a short window of recent ids twice, with and
//! without the new ones, and emit the difference, holding back while the
//! window's text still ends in an incomplete character.

use attn_models::Tokenizer;
use attn_nn::Result;

/// How many prompt tokens seed the window, so the first generated token is
/// decoded in context (e.g. keeps its leading space).
const CONTEXT_TOKENS: usize = 5;

/// Turns a stream of token ids into a stream of complete text pieces.
///
/// Control tokens are skipped (decoded with `skip_special`).
#[derive(Debug, Clone)]
pub struct Detokenizer {
    /// The window: `ids[..read]` is context whose text was already emitted
    /// (or belongs to the prompt); `ids[read..]` is not emitted yet.
    ids: Vec<u32>,
    read: usize,
}

impl Detokenizer {
    /// `context` is the text's preceding tokens (the prompt); only its last
    /// few are kept, and they are never emitted.
    pub fn new(context: &[u32]) -> Self {
        let ids = context[context.len().saturating_sub(CONTEXT_TOKENS)..].to_vec();
        let read = ids.len();
        Detokenizer { ids, read }
    }

    /// Adds one token; returns the text it completes (often all of its own
    /// text, sometimes nothing yet, sometimes also held-back earlier text).
    pub fn push<T: Tokenizer + ?Sized>(&mut self, tokenizer: &T, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tokenizer.decode(&self.ids[..self.read], true)?;
        let after = tokenizer.decode(&self.ids, true)?;
        if after.len() <= before.len() || after.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        let Some(new) = after.get(before.len()..) else {
            return Ok(String::new()); // the context re-decoded differently; wait for more
        };
        let new = new.to_string();
        self.advance();
        Ok(new)
    }

    /// The text still held back (an incomplete character at the very end),
    /// decoded as the tokenizer does it, with U+FFFD for invalid bytes.
    pub fn flush<T: Tokenizer + ?Sized>(&mut self, tokenizer: &T) -> Result<String> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let before = tokenizer.decode(&self.ids[..self.read], true)?;
        let after = tokenizer.decode(&self.ids, true)?;
        let mut cut = before.len().min(after.len());
        while !after.is_char_boundary(cut) {
            cut += 1;
        }
        self.advance();
        Ok(after[cut..].to_string())
    }

    /// Marks everything pushed as emitted: the ids just emitted become the
    /// context of the next decode, older ones are dropped.
    fn advance(&mut self) {
        self.ids.drain(..self.read);
        self.read = self.ids.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attn_test_support::toy::{ByteTokenizer, FIRST_PIECE};

    fn stream(tok: &impl Tokenizer, context: &[u32], ids: &[u32]) -> Vec<String> {
        let mut d = Detokenizer::new(context);
        let mut pieces: Vec<String> = ids.iter().map(|&id| d.push(tok, id).unwrap()).collect();
        pieces.push(d.flush(tok).unwrap());
        pieces
    }

    #[test]
    fn multi_byte_characters_split_across_byte_tokens() {
        let tok = ByteTokenizer::new();
        let text = "café 🦀!";
        let ids: Vec<u32> = text.bytes().map(u32::from).collect();
        let pieces = stream(&tok, &[], &ids);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat(), text);
        // 'é' (2 bytes) and the crab (4 bytes) each arrive whole, with their last byte.
        let nonempty: Vec<&str> = pieces.iter().map(|s| s.as_str()).filter(|s| !s.is_empty()).collect();
        assert_eq!(nonempty, ["c", "a", "f", "é", " ", "🦀", "!"]);
        assert_eq!(pieces[3], ""); // the first byte of 'é' alone emits nothing
    }

    #[test]
    fn tokens_holding_parts_of_two_characters() {
        let pieces: Vec<&[u8]> = vec![b"caf\xC3", b"\xA9 \xF0\x9F", b"\xA6\x80!"];
        let tok = ByteTokenizer::with_pieces(&pieces);
        let ids = [FIRST_PIECE, FIRST_PIECE + 1, FIRST_PIECE + 2];
        // A token whose text ends in an incomplete character is held back
        // whole until a later token completes it.
        assert_eq!(stream(&tok, &[], &ids), ["", "", "café 🦀!", ""]);
        assert_eq!(stream(&tok, &[], &ids[..2]), ["", "", "café \u{FFFD}"]);
    }

    #[test]
    fn flush_emits_an_incomplete_final_character_as_the_tokenizer_decodes_it() {
        let tok = ByteTokenizer::new();
        assert_eq!(stream(&tok, &[], &[b'a' as u32, 0xC3]), ["a", "", "\u{FFFD}"]);
    }

    /// Decodes like a SentencePiece tokenizer: the leading space of the
    /// decoded text is dropped.
    struct StripLeadingSpace(ByteTokenizer);

    impl Tokenizer for StripLeadingSpace {
        fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
            self.0.encode(text, add_special)
        }
        fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
            let s = self.0.decode(ids, skip_special)?;
            Ok(s.strip_prefix(' ').map(str::to_string).unwrap_or(s))
        }
        fn piece(&self, id: u32) -> Option<String> {
            self.0.piece(id)
        }
        fn vocab_size(&self) -> usize {
            self.0.vocab_size()
        }
        fn bos_id(&self) -> Option<u32> {
            self.0.bos_id()
        }
        fn eos_ids(&self) -> Vec<u32> {
            self.0.eos_ids()
        }
    }

    #[test]
    fn prompt_context_keeps_the_leading_space() {
        let tok = StripLeadingSpace(ByteTokenizer::new());
        let ids: Vec<u32> = " yo".bytes().map(u32::from).collect();
        let prompt: Vec<u32> = "Hi".bytes().map(u32::from).collect();
        assert_eq!(stream(&tok, &prompt, &ids).concat(), " yo");
        // Without context the first token's space is lost, as decode would.
        assert_eq!(stream(&tok, &[], &ids).concat(), "yo");
    }

    #[test]
    fn control_tokens_are_skipped() {
        let tok = ByteTokenizer::new();
        let ids = [attn_test_support::toy::BOS, b'o' as u32, attn_test_support::toy::EOS, b'k' as u32];
        assert_eq!(stream(&tok, &[], &ids).concat(), "ok");
    }
}
