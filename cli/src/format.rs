//! Number and table formatting for human-readable output.

pub use strata_sweep::format::{count, sci};

/// Left-aligned columns separated by two spaces, each line indented.
pub fn table(indent: &str, rows: &[Vec<String>]) -> String {
    let n_cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n_cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::from(indent);
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        assert_eq!(count(8192.0), "8192");
        assert_eq!(count(65536.0), "65.54K");
        assert_eq!(count(7_234_000.0), "7.234M");
        assert_eq!(count(1.0e11), "100.0B");
        assert_eq!(count(2.5e12), "2.500T");
    }

    #[test]
    fn tables_align() {
        let t = table(
            "  ",
            &[
                vec!["a".into(), "bb".into(), "c".into()],
                vec!["aaa".into(), "b".into(), "c".into()],
            ],
        );
        assert_eq!(t, "  a    bb  c\n  aaa  b   c\n");
    }
}
