//! Hugging Face tokenizer.json files: a byte-level BPE written here (the
//! format GPT-2-style tokenizers ship in) loads, encodes as its merges say,
//! and decomposes a corpus that decodes back to the source.

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

/// GPT-2's reversible byte → printable-character map.
fn bytes_to_unicode() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(chars) {
        map[*b as usize] = char::from_u32(c).unwrap();
    }
    map
}

/// Byte tokens 0..=255 (id = byte), merges "t h" → 256 and "th e" → 257,
/// and `<|endoftext|>` = 258.
fn write_tokenizer(path: &Path) {
    let map = bytes_to_unicode();
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
