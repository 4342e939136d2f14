//! Tokenizers that work offline: the tiktoken BPEs shipped inside the
//! `tiktoken-rs` crate, and Hugging Face `tokenizer.json` files.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tiktoken_rs::CoreBPE;

use crate::bpe::R50k;

/// A tiktoken BPE strata can build datasets with.
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
        let inner = match self {
            TokenizerKind::R50k => Inner::R50k(R50k::get()),
            TokenizerKind::Cl100k => Inner::Tiktoken(tiktoken_rs::cl100k_base_singleton()),
            TokenizerKind::O200k => Inner::Tiktoken(tiktoken_rs::o200k_base_singleton()),
        };
        Tokenizer {
            name: self.name().to_string(),
            eot_id: self.eot_id(),
            vocab_size: self.vocab_size(),
            inner,
        }
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

/// What `--tokenizer` names: a built-in BPE, or a `tokenizer.json` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSpec {
    Tiktoken(TokenizerKind),
    HuggingFace(PathBuf),
}

impl FromStr for TokenizerSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(kind) = s.parse::<TokenizerKind>() {
            return Ok(TokenizerSpec::Tiktoken(kind));
        }
        if s.ends_with(".json") || Path::new(s).is_file() {
            return Ok(TokenizerSpec::HuggingFace(PathBuf::from(s)));
        }
        Err(format!(
            "unknown tokenizer `{s}`: use r50k, cl100k, o200k or the path of a Hugging Face tokenizer.json"
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: cannot load tokenizer: {why}")]
    Load { path: PathBuf, why: String },
    #[error("{path}: no end-of-text token (looked for {looked_for})")]
    NoEndOfText { path: PathBuf, looked_for: String },
}

/// End-of-text (or end-of-sequence) tokens, in order of preference.
pub(crate) const EOT_CANDIDATES: [&str; 6] = [
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|im_end|>",
    "[SEP]",
];

impl TokenizerSpec {
    pub fn load(&self) -> Result<Tokenizer, TokenizerError> {
        match self {
            TokenizerSpec::Tiktoken(kind) => Ok(kind.load()),
            TokenizerSpec::HuggingFace(path) => {
                let hf =
                    tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
                        path: path.clone(),
                        why: e.to_string(),
                    })?;
                let eot_id = EOT_CANDIDATES
                    .iter()
                    .find_map(|t| hf.token_to_id(t))
                    .ok_or_else(|| TokenizerError::NoEndOfText {
                        path: path.clone(),
                        looked_for: EOT_CANDIDATES.join(", "),
                    })?;
                Ok(Tokenizer {
                    name: format!("hf:{}", path.display()),
                    eot_id,
                    vocab_size: hf.get_vocab_size(true) as u32,
                    inner: Inner::HuggingFace(Arc::new(hf)),
                })
            }
        }
    }
}

#[derive(Clone)]
enum Inner {
    /// r50k through strata's own split (the same ids, several times faster).
    R50k(&'static R50k),
    Tiktoken(&'static CoreBPE),
    HuggingFace(Arc<tokenizers::Tokenizer>),
}

/// A loaded tokenizer; cheap to clone and share across threads.
#[derive(Clone)]
pub struct Tokenizer {
    name: String,
    eot_id: u32,
    vocab_size: u32,
    inner: Inner,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tokenizer({})", self.name)
    }
}

impl Tokenizer {
    /// `r50k`, `cl100k`, `o200k`, or `hf:<path>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id appended to every document.
    pub fn eot_id(&self) -> u32 {
        self.eot_id
    }

    pub fn vocab_size(&self) -> u32 {
        self.vocab_size
    }

    /// Token ids of `text`, with special-token text treated as ordinary
    /// text where the tokenizer allows (a document that quotes
    /// `<|endoftext|>` does not end there), and no added BOS/EOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match &self.inner {
            Inner::R50k(r50k) => {
                let mut ids = Vec::with_capacity(text.len() / 4);
                r50k.encode(text, &mut ids);
                ids
            }
            Inner::Tiktoken(bpe) => bpe.encode_ordinary(text),
            Inner::HuggingFace(hf) => hf
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                // The fancy-regex backend fails only on pathological
                // backtracking; such a document yields no tokens and is dropped.
                .unwrap_or_default(),
        }
    }

    /// Token ids of one document with the end-of-text id appended.
    pub fn encode_document(&self, text: &str) -> Vec<u32> {
        let mut ids = self.encode(text);
        ids.push(self.eot_id);
        ids
    }

    /// A built-in BPE's special tokens (none for a Hugging Face one).
    fn builtin_specials(&self) -> &'static [(u32, &'static str)] {
        self.name
            .parse::<TokenizerKind>()
            .map_or(&[], TokenizerKind::special_tokens)
    }

    /// The id of the token whose text is `token` (a special token such as
    /// `<s>`), when the tokenizer has one.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::HuggingFace(hf) => hf.token_to_id(token),
            Inner::R50k(_) | Inner::Tiktoken(_) => self
                .builtin_specials()
                .iter()
                .find(|t| t.1 == token)
                .map(|t| t.0),
        }
    }

    /// The text of token `id` as the tokenizer names it (`<|endoftext|>`).
    pub fn token_text(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::HuggingFace(hf) => hf.id_to_token(id),
            Inner::R50k(_) | Inner::Tiktoken(_) => self
                .builtin_specials()
                .iter()
                .find(|t| t.0 == id)
                .map(|t| t.1.to_string()),
        }
    }

    /// The bytes of token `id` of a built-in BPE (`None` for a Hugging
    /// Face tokenizer, or an id it does not have).
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        match &self.inner {
            Inner::R50k(r50k) => r50k.bpe().decode_bytes(&[id]).ok(),
            Inner::Tiktoken(bpe) => bpe.decode_bytes(&[id]).ok(),
            Inner::HuggingFace(_) => None,
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        match &self.inner {
            Inner::R50k(r50k) => {
                String::from_utf8_lossy(&r50k.bpe().decode_bytes(ids).unwrap_or_default())
                    .into_owned()
            }
            Inner::Tiktoken(bpe) => {
                String::from_utf8_lossy(&bpe.decode_bytes(ids).unwrap_or_default()).into_owned()
            }
            Inner::HuggingFace(hf) => hf.decode(ids, false).unwrap_or_default(),
        }
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
    }

    #[test]
    fn specs_name_what_they_load() {
        assert_eq!(
            "o200k".parse::<TokenizerSpec>().unwrap(),
            TokenizerSpec::Tiktoken(TokenizerKind::O200k)
        );
        assert_eq!(
            "models/tokenizer.json".parse::<TokenizerSpec>().unwrap(),
            TokenizerSpec::HuggingFace("models/tokenizer.json".into())
        );
        assert!(
            "gpt5"
                .parse::<TokenizerSpec>()
                .unwrap_err()
                .contains("gpt5")
        );
        let err = TokenizerSpec::HuggingFace("/no/such/tokenizer.json".into())
            .load()
            .unwrap_err();
        assert!(
            err.to_string().starts_with("/no/such/tokenizer.json"),
            "{err}"
        );
    }
}
