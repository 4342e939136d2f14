//! Ranks named as ranges: a cause that names every rank of a 16,384-rank
//! job one by one is 100 KB, the same ranks as ranges a line.

/// `ranks` (any order, repeats allowed) as ranges: "0–15, 17, 19–16383".
/// Past `MAX_RANGES` ranges the rest is counted, not listed.
pub fn rank_ranges(ranks: impl IntoIterator<Item = u32>) -> String {
    let mut v: Vec<u32> = ranks.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for r in v.iter().copied() {
        match ranges.last_mut() {
            Some((_, end)) if *end + 1 == r => *end = r,
            _ => ranges.push((r, r)),
        }
    }
    let shown: Vec<String> = ranges
        .iter()
        .take(MAX_RANGES)
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}–{b}")
            }
        })
        .collect();
    let mut out = shown.join(", ");
    if ranges.len() > MAX_RANGES {
        let rest: u64 = ranges[MAX_RANGES..]
            .iter()
            .map(|&(a, b)| u64::from(b - a) + 1)
            .sum();
        out.push_str(&format!(" and {rest} more"));
    }
    out
}

/// "rank 3" or "ranks 0–7, 9": the ranks with the right noun.
pub fn ranks_named(ranks: impl IntoIterator<Item = u32>) -> String {
    let v: Vec<u32> = ranks.into_iter().collect();
    let mut distinct = v.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let noun = if distinct.len() == 1 { "rank" } else { "ranks" };
    format!("{noun} {}", rank_ranges(distinct))
}

const MAX_RANGES: usize = 12;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_read_as_ranges() {
        assert_eq!(rank_ranges([3]), "3");
        assert_eq!(rank_ranges([5, 0, 1, 2, 3, 7, 8]), "0–3, 5, 7–8");
        assert_eq!(
            rank_ranges((0..16384).filter(|&r| r != 9001)),
            "0–9000, 9002–16383"
        );
        assert_eq!(ranks_named([4]), "rank 4");
        assert_eq!(ranks_named([4, 4]), "rank 4");
        assert_eq!(ranks_named([4, 5]), "ranks 4–5");
        let many = rank_ranges((0..100).step_by(2));
        assert!(many.ends_with(" and 38 more"), "{many}");
        assert_eq!(many.matches(", ").count(), MAX_RANGES - 1);
    }
}
