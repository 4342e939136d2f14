//! Number and table formatting for human-readable output.

/// A count with a decimal suffix: `8192`, `12.3K`, `7.23M`, `1.05B`, `2.46T`.
pub fn count(x: f64) -> String {
    let a = x.abs();
    let (v, suffix) = if a >= 1e15 {
        return format!("{x:.3e}");
    } else if a >= 1e12 {
        (x / 1e12, "T")
    } else if a >= 1e9 {
        (x / 1e9, "B")
    } else if a >= 1e6 {
        (x / 1e6, "M")
    } else if a >= 1e4 {
        (x / 1e3, "K")
    } else {
        return format!("{}", x.round());
    };
    let digits = if v.abs() >= 99.995 {
        1
    } else if v.abs() >= 10.0 {
        2
    } else {
        3
    };
    format!("{v:.digits$}{suffix}")
}

/// A learning rate or FLOP count in scientific notation.
pub fn sci(x: f64) -> String {
    format!("{x:.3e}")
}

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
