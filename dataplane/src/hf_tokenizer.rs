//! strata's built-in tiktoken BPEs as Hugging Face `tokenizer.json` files,
//! so an exported model's folder loads with `AutoTokenizer` (and
//! `lm_eval --model hf`) as it is.
//!
//! The conversion is the one `transformers` makes for tiktoken models
//! (`TikTokenConverter`): every token's bytes become a string through
//! GPT-2's byte-to-character table, and the merges are rebuilt from the
//! ranks: for each token, every split into two tokens of lower rank, in
//! the order of the merged token's rank (ties by the parts' ranks), so a
//! BPE that applies the lowest merge first merges as tiktoken does. The
//! text is split before merging by the tokenizer's own pattern (written
//! without possessive quantifiers, which Oniguruma reads otherwise), and
//! special tokens are added tokens (the unused ids between them reserved,
//! so every special keeps its id).

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::tokenize::TokenizerKind;

/// GPT-2's table from a byte to the character that stands for it in a
/// byte-level BPE's vocabulary.
pub fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut next = 256u32;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).expect("a Latin-1 code point")
        } else {
            let c = char::from_u32(next).expect("a code point past Latin-1");
            next += 1;
            c
        };
    }
    out
}

impl TokenizerKind {
    /// Ids below this are BPE tokens (merged from bytes); the special
    /// tokens come after.
    fn mergeable(self) -> u32 {
        match self {
            TokenizerKind::R50k => 50256,
            TokenizerKind::Cl100k => 100256,
            TokenizerKind::O200k => 199998,
        }
    }

    /// The special tokens and their ids.
    pub fn special_tokens(self) -> &'static [(u32, &'static str)] {
        match self {
            TokenizerKind::R50k => &[(50256, "<|endoftext|>")],
            TokenizerKind::Cl100k => &[
                (100257, "<|endoftext|>"),
                (100258, "<|fim_prefix|>"),
                (100259, "<|fim_middle|>"),
                (100260, "<|fim_suffix|>"),
                (100276, "<|endofprompt|>"),
            ],
            TokenizerKind::O200k => &[(199999, "<|endoftext|>"), (200018, "<|endofprompt|>")],
        }
    }

    /// The pre-tokenizing pattern, as tiktoken's Python source writes it.
    fn pattern(self) -> &'static str {
        match self {
            TokenizerKind::R50k => {
                r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
            }
            TokenizerKind::Cl100k => {
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            }
            TokenizerKind::O200k => concat!(
                r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
            ),
        }
    }

    /// The bytes of every BPE token (the ids below the specials).
    fn bpe_tokens(self) -> Vec<Vec<u8>> {
        let tok = self.load();
        (0..self.mergeable())
            .map(|id| {
                tok.token_bytes(id)
                    .expect("every rank below the specials is a token")
            })
            .collect()
    }

    /// The added tokens' ids and texts: the specials, and the unused ids
    /// between the BPE's and theirs (cl100k's 100256, o200k's 200000…)
    /// reserved — Hugging Face numbers added tokens consecutively, so a
    /// gap would shift the specials.
    fn added_tokens(self) -> Vec<(u32, String)> {
        let n = self.mergeable();
        let last = self.special_tokens().iter().map(|t| t.0).max().unwrap_or(n);
        (n..=last)
            .map(|id| {
                let content = self
                    .special_tokens()
                    .iter()
                    .find(|t| t.0 == id)
                    .map_or_else(|| format!("<|reserved_{id}|>"), |t| t.1.to_string());
                (id, content)
            })
            .collect()
    }

    /// Every id's token as this tokenizer's `tokenizer.json` names it (the
    /// BPE's bytes through GPT-2's table, then the added tokens), by id.
    pub fn hf_vocabulary(self) -> Vec<String> {
        let chars = byte_chars();
        let mut out: Vec<String> = self
            .bpe_tokens()
            .iter()
            .map(|t| t.iter().map(|&b| chars[b as usize]).collect())
            .collect();
        out.extend(self.added_tokens().into_iter().map(|(_, t)| t));
        out
    }

    /// This tokenizer as a Hugging Face `tokenizer.json`.
    pub fn hf_tokenizer_json(self) -> Value {
        let chars = byte_chars();
        let text = |bytes: &[u8]| -> String { bytes.iter().map(|&b| chars[b as usize]).collect() };
        let tokens = self.bpe_tokens();
        let rank: HashMap<&[u8], u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_slice(), i as u32))
            .collect();
        let mut merges: Vec<(u32, u32, u32)> = Vec::new();
        for (r, t) in tokens.iter().enumerate() {
            let mut local: Vec<(u32, u32, u32)> = (1..t.len())
                .filter_map(|i| {
                    let (a, b) = (rank.get(&t[..i])?, rank.get(&t[i..])?);
                    Some((*a, *b, r as u32))
                })
                .collect();
            local.sort();
            merges.extend(local);
        }
        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (text(t), json!(i)))
            .collect();
        let merges: Vec<Value> = merges
            .iter()
            .map(|&(a, b, _)| json!([text(&tokens[a as usize]), text(&tokens[b as usize])]))
            .collect();
        let added: Vec<Value> = self
            .added_tokens()
            .into_iter()
            .map(|(id, content)| {
                json!({
                    "id": id, "content": content, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true
                })
            })
            .collect();
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {
                        "type": "Split",
                        "pattern": { "Regex": self.pattern() },
                        "behavior": "Isolated",
                        "invert": false
                    },
                    {
                        "type": "ByteLevel",
                        "add_prefix_space": false,
                        "trim_offsets": true,
                        "use_regex": false
                    }
                ]
            },
            "post_processor": {
                "type": "ByteLevel",
                "add_prefix_space": true,
                "trim_offsets": false,
                "use_regex": true
            },
            "decoder": {
                "type": "ByteLevel",
                "add_prefix_space": true,
                "trim_offsets": true,
                "use_regex": true
            },
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": merges
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_map_to_gpt2s_characters() {
        let c = byte_chars();
        assert_eq!(c[b'a' as usize], 'a');
        assert_eq!(c[b' ' as usize], 'Ġ');
        assert_eq!(c[b'\n' as usize], 'Ċ');
        assert_eq!(c[0], 'Ā');
        let distinct: std::collections::HashSet<char> = c.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
