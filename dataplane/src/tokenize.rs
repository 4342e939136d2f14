//! Tokenizers that work offline: the tiktoken BPEs shipped inside the
//! `tiktoken-rs` crate.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tiktoken_rs::CoreBPE;

/// A tokenizer strata can build datasets with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// GPT-2's BPE (`r50k_base`).
    R50k,
    /// `cl100k_base`.
    Cl100k,
    /// `o200k_base`.
    O200k,
}

impl TokenizerKind {
    pub const ALL: [TokenizerKind; 3] = [
        TokenizerKind::R50k,
        TokenizerKind::Cl100k,
        TokenizerKind::O200k,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TokenizerKind::R50k => "r50k",
            TokenizerKind::Cl100k => "cl100k",
            TokenizerKind::O200k => "o200k",
        }
    }

    /// The `<|endoftext|>` id appended to every document.
    pub fn eot_id(self) -> u32 {
        match self {
            TokenizerKind::R50k => 50256,
            TokenizerKind::Cl100k => 100257,
            TokenizerKind::O200k => 199999,
        }
    }

    /// One more than the largest id the tokenizer emits (special tokens included).
    pub fn vocab_size(self) -> u32 {
        match self {
            TokenizerKind::R50k => 50257,
            TokenizerKind::Cl100k => 100277,
            TokenizerKind::O200k => 200019,
        }
    }

    pub fn load(self) -> Tokenizer {
        let bpe: &'static CoreBPE = match self {
            TokenizerKind::R50k => tiktoken_rs::r50k_base_singleton(),
            TokenizerKind::Cl100k => tiktoken_rs::cl100k_base_singleton(),
            TokenizerKind::O200k => tiktoken_rs::o200k_base_singleton(),
        };
        Tokenizer { kind: self, bpe }
    }
}

impl fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TokenizerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TokenizerKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown tokenizer `{s}` (known: r50k, cl100k, o200k)"))
    }
}

/// A loaded tokenizer; cheap to copy and share across threads.
#[derive(Clone, Copy)]
pub struct Tokenizer {
    kind: TokenizerKind,
    bpe: &'static CoreBPE,
}

impl Tokenizer {
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// Token ids of `text`, with special-token text treated as ordinary
    /// text (a document that quotes `<|endoftext|>` does not end there).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.bpe.encode_ordinary(text)
    }

    /// Token ids of one document with the end-of-text id appended.
    pub fn encode_document(&self, text: &str) -> Vec<u32> {
        let mut ids = self.encode(text);
        ids.push(self.kind.eot_id());
        ids
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.bpe.decode_bytes(ids).unwrap_or_default()).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r50k_matches_gpt2() {
        let t = TokenizerKind::R50k.load();
        // GPT-2: "Hello world" = [15496, 995].
        assert_eq!(t.encode("Hello world"), vec![15496, 995]);
        assert_eq!(t.encode_document("Hello world"), vec![15496, 995, 50256]);
        assert_eq!(t.decode(&[15496, 995]), "Hello world");
        // Special-token text in a document is text, not a document end.
        assert!(!t.encode("<|endoftext|>").contains(&50256));
    }

    #[test]
    fn every_tokenizer_round_trips_and_stays_in_its_vocabulary() {
        let text = "Fourscore and seven years ago — 1863, Gettysburg. Ünïcödé 文字";
        for kind in TokenizerKind::ALL {
            let t = kind.load();
            let ids = t.encode_document(text);
            assert_eq!(*ids.last().unwrap(), kind.eot_id());
            assert!(ids.iter().all(|&id| id < kind.vocab_size()), "{kind}");
            assert_eq!(t.decode(&ids[..ids.len() - 1]), text, "{kind}");
            assert_eq!(kind.name().parse::<TokenizerKind>().unwrap(), kind);
        }
        assert!(
            "gpt5"
                .parse::<TokenizerKind>()
                .unwrap_err()
                .contains("gpt5")
        );
    }
}
