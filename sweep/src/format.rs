//! Numbers for people: counts with a suffix, scientific notation.

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
