//! Hugging Face tokenizer.json files: a byte-level BPE written here (the
//! format GPT-2-style tokenizers ship in) loads, encodes as its merges say,
//! and decomposes a corpus that decodes back to the source; the built-in
//! BPEs written as tokenizer.json files encode text as they do.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;
use strata_dataplane::corpus::{Quiet, decompose_corpus};
use strata_dataplane::decompose::{Buckets, SplitLong};
use strata_dataplane::manifest::{Layout, TokenizerInfo};
use strata_dataplane::reader::read_shard;
use strata_dataplane::store::Location;
use strata_dataplane::tokenize::TokenizerSpec;
use strata_dataplane::writer::{DatasetWriter, WriterOptions};

/// Byte tokens 0..=255 (id = byte), merges "t h" → 256 and "th e" → 257,
/// and `<|endoftext|>` = 258.
fn write_tokenizer(path: &Path) {
    let map = strata_dataplane::hf_tokenizer::byte_chars();
    let mut vocab: BTreeMap<String, u32> =
        (0..256).map(|b| (map[b].to_string(), b as u32)).collect();
    vocab.insert("th".into(), 256);
    vocab.insert("the".into(), 257);
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 258, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": ["t h", "th e"]}
    });
    std::fs::write(path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
}

#[test]
fn a_tokenizer_json_encodes_by_its_merges() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    write_tokenizer(&path);
    let spec: TokenizerSpec = path.to_str().unwrap().parse().unwrap();
    let tok = spec.load().unwrap();
    assert_eq!(tok.eot_id(), 258);
    assert_eq!(tok.vocab_size(), 259);
    assert!(tok.name().starts_with("hf:") && tok.name().ends_with("tokenizer.json"));
    // "the" merges to one token; " cat" is a space byte and three letters.
    assert_eq!(tok.encode("the cat"), vec![257, 32, 99, 97, 116]);
    assert_eq!(tok.encode_document("the"), vec![257, 258]);
    let text = "Call me Ishmael. Ünïcödé — the whale!";
    assert_eq!(tok.decode(&tok.encode(text)), text);
}

#[test]
fn a_tokenizer_json_without_an_end_of_text_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    write_tokenizer(&path);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("<|endoftext|>", "<|pad|>");
    std::fs::write(&path, text).unwrap();
    let err = TokenizerSpec::HuggingFace(path.clone())
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("no end-of-text token"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decompose_with_a_tokenizer_json_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    write_tokenizer(&path);
    let tok = TokenizerSpec::HuggingFace(path).load().unwrap();
    let input = dir.path().join("corpus");
    std::fs::create_dir(&input).unwrap();
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(30);
    std::fs::write(input.join("a.txt"), &text).unwrap();

    let out = Location::parse(dir.path().join("ds").to_str().unwrap(), true).unwrap();
    let opts = WriterOptions {
        tokenizer: TokenizerInfo::of(&tok),
        layout: Layout::Decomposed {
            split_long: SplitLong::Largest,
        },
        buckets: Buckets::new(4, 8).unwrap(),
        seed: 1,
        shard_bytes: 1 << 20,
        overwrite: false,
    };
    let w = DatasetWriter::create(out.clone(), opts).await.unwrap();
    let summary = decompose_corpus(&[input], tok.clone(), w, &Quiet)
        .await
        .unwrap();
    let m = summary.manifest;
    assert_eq!(m.tokenizer.eot_id, 258);
    assert!(m.tokenizer.name.starts_with("hf:"));
    let ids = tok.encode_document(&text);
    assert_eq!(m.n_tokens_in, ids.len() as u64);
    for b in &m.buckets {
        for s in &b.shards {
            let shard = read_shard(&out, s, b.seq_len as usize + 1).await.unwrap();
            for r in 0..shard.rows() {
                let o = shard.offsets[r] as usize;
                assert_eq!(shard.row(r), &ids[o..o + shard.row_len]);
            }
        }
    }
}

/// The corpora (the same files `npm pack` gives when ../shared is absent).
fn corpora() -> std::path::PathBuf {
    std::env::var_os("STRATA_CORPORA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/corpora"))
}

/// Each built-in BPE as a Hugging Face tokenizer.json (what an export
/// writes beside the model) encodes real text, code-like text and
/// awkward whitespace and Unicode to exactly the ids strata's encoder
/// gives, and names its special tokens. (Special-token text inside a
/// document is the one difference, as in `transformers`' own GPT-2
/// tokenizer: Hugging Face reads it as the special token, strata's
/// dataset encoder as text.)
#[test]
fn built_in_tokenizers_as_tokenizer_json_encode_as_they_do() {
    use strata_dataplane::tokenize::TokenizerKind;
    let moby = std::fs::read_to_string(corpora().join("moby-dick/moby-dick.txt")).unwrap();
    let mut texts: Vec<String> = moby
        .split("\n\n")
        .filter(|p| !p.trim().is_empty())
        .take(400)
        .map(str::to_string)
        .collect();
    texts.extend(
        [
            "fn main() {\n    let x = 12345678;\r\n\tprintln!(\"{x}\");   \n}\n\n\n",
            "  leading and trailing   ",
            "I'm, you're, THEY'LL, it's: 'quoted' and 1,000,000.50 or 2024-12-04",
            "naïve café — 白鯨 🐋 Ελληνικά русский עברית العربية",
            "\u{a0}nbsp\u{2003}em\u{3000}ideographic",
        ]
        .map(str::to_string),
    );
    let dir = tempfile::tempdir().unwrap();
    for kind in TokenizerKind::ALL {
        let path = dir.path().join(format!("{}.json", kind.name()));
        std::fs::write(&path, kind.hf_tokenizer_json().to_string()).unwrap();
        let hf = TokenizerSpec::HuggingFace(path).load().unwrap();
        let ours = kind.load();
        assert_eq!(hf.eot_id(), ours.eot_id(), "{kind}");
        assert_eq!(hf.vocab_size(), ours.vocab_size(), "{kind}");
        for t in &texts {
            assert_eq!(hf.encode(t), ours.encode(t), "{kind}: {t:?}");
        }
    }
}
