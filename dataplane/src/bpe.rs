//! A faster encoder for GPT-2's BPE (`r50k_base`), giving exactly the ids
//! of `tiktoken`'s `encode_ordinary`.
//!
//! tiktoken splits text with the backtracking regex
//! `'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s`
//! and then merges each piece's bytes by rank. The regex engine is most of
//! the cost. Here the same split is a hand-written scanner over the same
//! Unicode classes (taken from `regex-syntax`, the tables the regex uses),
//! and a piece that is one token is a single hash lookup. The split is
//! checked against the regex on real text and on generated strings.

use std::sync::OnceLock;

use regex_syntax::hir::{Class, HirKind};
use rustc_hash::FxHashMap;
use tiktoken_rs::CoreBPE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CharClass {
    Letter,
    Number,
    Space,
    Other,
}

/// Sorted code point ranges of one Unicode class, as the regex sees it.
struct Ranges(Vec<(u32, u32)>);

impl Ranges {
    fn of(pattern: &str) -> Ranges {
        let hir = regex_syntax::Parser::new()
            .parse(pattern)
            .expect("a valid class pattern");
        let HirKind::Class(Class::Unicode(class)) = hir.kind() else {
            unreachable!("{pattern} is a Unicode class")
        };
        Ranges(
            class
                .ranges()
                .iter()
                .map(|r| (r.start() as u32, r.end() as u32))
                .collect(),
        )
    }

    fn contains(&self, c: char) -> bool {
        let c = c as u32;
        self.0
            .binary_search_by(|&(lo, hi)| {
                if hi < c {
                    std::cmp::Ordering::Less
                } else if lo > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
    }
}

struct Classes {
    letter: Ranges,
    number: Ranges,
    space: Ranges,
    ascii: [CharClass; 128],
}

impl Classes {
    fn new() -> Classes {
        let mut classes = Classes {
            letter: Ranges::of(r"\p{L}"),
            number: Ranges::of(r"\p{N}"),
            space: Ranges::of(r"\s"),
            ascii: [CharClass::Other; 128],
        };
        for b in 0..128u8 {
            classes.ascii[b as usize] = classes.slow(b as char);
        }
        classes
    }

    fn slow(&self, c: char) -> CharClass {
        if self.letter.contains(c) {
            CharClass::Letter
        } else if self.number.contains(c) {
            CharClass::Number
        } else if self.space.contains(c) {
            CharClass::Space
        } else {
            CharClass::Other
        }
    }

    /// The class of the character starting at byte `i`, and its length.
    #[inline]
    fn at(&self, s: &str, i: usize) -> (CharClass, usize) {
        let b = s.as_bytes()[i];
        if b < 128 {
            return (self.ascii[b as usize], 1);
        }
        let c = s[i..].chars().next().expect("i is a char boundary");
        (self.slow(c), c.len_utf8())
    }
}

/// The end of the run of `class` characters starting at byte `i`.
#[inline]
fn run_end(classes: &Classes, s: &str, mut i: usize, class: CharClass) -> usize {
    while i < s.len() {
        let (c, len) = classes.at(s, i);
        if c != class {
            break;
        }
        i += len;
    }
    i
}

/// The end of the piece starting at byte `i` (`i < s.len()`).
fn piece_end(classes: &Classes, s: &str, i: usize) -> usize {
    let bytes = s.as_bytes();
    // '(?:[sdmt]|ll|ve|re)
    if bytes[i] == b'\'' {
        match (bytes.get(i + 1), bytes.get(i + 2)) {
            (Some(b's' | b'd' | b'm' | b't'), _) => return i + 2,
            (Some(b'l'), Some(b'l')) | (Some(b'v' | b'r'), Some(b'e')) => return i + 3,
            _ => {}
        }
    }
    let (class, len) = classes.at(s, i);
    // ` ?\p{L}++`, ` ?\p{N}++`, ` ?[^\s\p{L}\p{N}]++`: a space joins the
    // run after it.
    if bytes[i] == b' ' && i + 1 < s.len() {
        let (next, _) = classes.at(s, i + 1);
        if next != CharClass::Space {
            return run_end(classes, s, i + 1, next);
        }
    }
    if class != CharClass::Space {
        return run_end(classes, s, i + len, class);
    }
    // Whitespace: `\s++$` to the end of the text; before anything else,
    // `\s+(?!\S)` leaves the run's last character to the next piece, and a
    // run of one is `\s` alone.
    let end = run_end(classes, s, i, CharClass::Space);
    if end == s.len() {
        return end;
    }
    let last = s[..end]
        .char_indices()
        .next_back()
        .map(|(p, _)| p)
        .expect("the run is not empty");
    if last > i { last } else { end }
}

/// Byte ranges of tiktoken's r50k pieces of `s`, in order.
pub(crate) fn pieces(s: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    let classes = classes();
    let mut i = 0;
    std::iter::from_fn(move || {
        (i < s.len()).then(|| {
            let start = i;
            i = piece_end(classes, s, i);
            (start, i)
        })
    })
}

fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(Classes::new)
}

/// GPT-2's merge table, rebuilt from tiktoken's decoder.
pub(crate) struct R50k {
    ranks: FxHashMap<Vec<u8>, u32>,
    /// Pieces longer than this go to tiktoken's own merge (it switches to a
    /// heap for long pieces; the simple merge here is quadratic).
    bpe: &'static CoreBPE,
}

const LONG_PIECE: usize = 100;

impl R50k {
    pub(crate) fn get() -> &'static R50k {
        static R50K: OnceLock<R50k> = OnceLock::new();
        R50K.get_or_init(|| {
            let bpe = tiktoken_rs::r50k_base_singleton();
            let ranks = (0..50256u32)
                .map(|rank| {
                    let bytes = bpe
                        .decode_bytes(&[rank])
                        .expect("r50k ranks 0..50256 are all tokens");
                    (bytes, rank)
                })
                .collect();
            R50k { ranks, bpe }
        })
    }

    /// tiktoken's own r50k (for decoding).
    pub(crate) fn bpe(&self) -> &'static CoreBPE {
        self.bpe
    }

    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) {
        for (start, end) in pieces(text) {
            let piece = &text.as_bytes()[start..end];
            if let Some(&rank) = self.ranks.get(piece) {
                out.push(rank);
            } else if piece.len() > LONG_PIECE {
                // A piece alone splits into itself, so tiktoken encodes it
                // exactly as it would in place.
                out.extend(self.bpe.encode_ordinary(&text[start..end]));
            } else {
                self.merge(piece, out);
            }
        }
    }

    fn rank(&self, bytes: &[u8]) -> u32 {
        self.ranks.get(bytes).copied().unwrap_or(u32::MAX)
    }

    /// tiktoken's byte-pair merge: repeatedly join the adjacent pair with
    /// the lowest rank (the leftmost among equals).
    fn merge(&self, piece: &[u8], out: &mut Vec<u32>) {
        // (start of part, rank of the part joined with the next one)
        let mut parts: Vec<(usize, u32)> = (0..piece.len() - 1)
            .map(|i| (i, self.rank(&piece[i..i + 2])))
            .collect();
        parts.push((piece.len() - 1, u32::MAX));
        parts.push((piece.len(), u32::MAX));
        let pair_rank = |parts: &[(usize, u32)], i: usize| {
            if i + 3 < parts.len() {
                self.rank(&piece[parts[i].0..parts[i + 3].0])
            } else {
                u32::MAX
            }
        };
        loop {
            let mut min = (u32::MAX, 0);
            for (i, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < min.0 {
                    min = (rank, i);
                }
            }
            if min.0 == u32::MAX {
                break;
            }
            let i = min.1;
            if i > 0 {
                parts[i - 1].1 = pair_rank(&parts, i - 1);
            }
            parts[i].1 = pair_rank(&parts, i);
            parts.remove(i + 1);
        }
        out.extend(parts.windows(2).map(|w| self.ranks[&piece[w[0].0..w[1].0]]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference_pieces(s: &str) -> Vec<&str> {
        let re = fancy_regex::Regex::new(
            r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s",
        )
        .unwrap();
        re.find_iter(s).map(|m| m.unwrap().as_str()).collect()
    }

    fn fast_pieces(s: &str) -> Vec<&str> {
        pieces(s).map(|(a, b)| &s[a..b]).collect()
    }

    fn check(s: &str) {
        assert_eq!(fast_pieces(s), reference_pieces(s), "split of {s:?}");
        let mut ids = Vec::new();
        R50k::get().encode(s, &mut ids);
        assert_eq!(
            ids,
            tiktoken_rs::r50k_base_singleton().encode_ordinary(s),
            "ids of {s:?}"
        );
    }

    #[test]
    fn splits_and_encodes_like_tiktoken_on_tricky_text() {
        for s in [
            "",
            "Hello world",
            "  leading and trailing  ",
            "tabs\t\tand\n\nnewlines\n",
            "a  \tb",
            "don't we'll they've you're I'm she'd it's 'tis ''s",
            "x.'s",
            "1863, 4:30pm, 3.14159, ½ Ⅻ ٣",
            "Ünïcödé 文字 — naïve café, ﬁ ligature, नमस्ते",
            "emoji 🎉🎉 and \u{200b}zero width\u{a0}nbsp",
            "   x",
            "\u{3000}\u{3000}y \u{3000}",
            &"!".repeat(300),
            &"abc".repeat(200),
        ] {
            check(s);
        }
    }

    #[test]
    fn matches_tiktoken_on_the_corpora() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/corpora/sotu");
        let dir = std::env::var_os("STRATA_CORPORA")
            .map(|c| std::path::PathBuf::from(c).join("sotu"))
            .unwrap_or(dir);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for path in files.iter().step_by(10) {
            let text = std::fs::read_to_string(path).unwrap();
            let mut ids = Vec::new();
            R50k::get().encode(&text, &mut ids);
            assert!(
                ids == tiktoken_rs::r50k_base_singleton().encode_ordinary(&text),
                "{}",
                path.display()
            );
        }
    }

    proptest! {
        #[test]
        fn matches_tiktoken_on_generated_text(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just(" ".to_string()), Just("  ".to_string()), Just("\n".to_string()),
                    Just("\t".to_string()), Just("'".to_string()), Just("'s".to_string()),
                    Just("ll".to_string()), Just("\u{a0}".to_string()), Just("é".to_string()),
                    Just("\u{301}".to_string()), Just("Ⅻ".to_string()), Just("字".to_string()),
                    "[a-zA-Z]{1,6}", "[0-9]{1,4}", "[.,;:!?()\\-]{1,3}", any::<char>().prop_map(String::from),
                ],
                0..40,
            )
        ) {
            check(&parts.concat());
        }
    }
}
