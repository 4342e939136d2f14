//! Values a recipe may write in more than one way.
//!
//! Token counts are large, so `total_tokens = 2e12`, `total_tokens = "2T"` and
//! `total_tokens = 2000000000000` all mean the same thing. Some quantities may
//! instead name the scaling law that chooses them (`lr = "step-law"`).
//! Deserialisation only recognises the shape; range checks happen in
//! validation so that every problem is reported at once.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// A number, or the name of the law that picks it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Quantity {
    Number(f64),
    #[serde(serialize_with = "serialize_step_law")]
    StepLaw,
}

fn serialize_step_law<S: serde::Serializer>(s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(STEP_LAW)
}

/// The spelling of [`Quantity::StepLaw`] in a recipe.
pub const STEP_LAW: &str = "step-law";

impl Quantity {
    pub fn number(self) -> Option<f64> {
        match self {
            Quantity::Number(x) => Some(x),
            Quantity::StepLaw => None,
        }
    }
}

/// Parses `"1.5B"`, `"2T"`, `"64K"`, `"500M"`, `"1e9"` or `"4096"`.
///
/// Suffixes are decimal (K = 1e3, M = 1e6, B or G = 1e9, T = 1e12), as token
/// budgets are quoted in papers.
pub fn parse_with_suffix(text: &str) -> Option<f64> {
    let t = text.trim().replace('_', "");
    let (digits, scale) = match t.chars().last()? {
        'k' | 'K' => (&t[..t.len() - 1], 1e3),
        'm' | 'M' => (&t[..t.len() - 1], 1e6),
        'b' | 'B' | 'g' | 'G' => (&t[..t.len() - 1], 1e9),
        't' | 'T' => (&t[..t.len() - 1], 1e12),
        _ => (t.as_str(), 1.0),
    };
    let x: f64 = digits.trim().parse().ok()?;
    Some(x * scale)
}

impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Quantity;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(
                    f,
                    "a number (1e9, 4096, \"1.5B\", \"2T\") or \"{STEP_LAW}\""
                )
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Quantity, E> {
                Ok(Quantity::Number(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Quantity, E> {
                Ok(Quantity::Number(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Quantity, E> {
                Ok(Quantity::Number(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Quantity, E> {
                if v == STEP_LAW {
                    return Ok(Quantity::StepLaw);
                }
                parse_with_suffix(v)
                    .map(Quantity::Number)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

/// The data curriculum: which bucket each step draws from, with what odds.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum CurriculumSpec {
    Named(NamedCurriculum),
    /// Odds per bucket, from the dataset's smallest bucket upwards.
    Odds(Vec<f64>),
}

/// The paper's named curricula, defined for any number of buckets: over
/// D8..D13 they are Uniform 1 1 1 1 1 1, Grow-Linear 6 5 4 3 2 1 and Grow-P2
/// 32 16 8 4 2 1 (smallest bucket first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NamedCurriculum {
    Uniform,
    GrowLinear,
    GrowP2,
}

impl NamedCurriculum {
    pub const ALL: [(&'static str, NamedCurriculum); 3] = [
        ("uniform", NamedCurriculum::Uniform),
        ("grow-linear", NamedCurriculum::GrowLinear),
        ("grow-p2", NamedCurriculum::GrowP2),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, c)| *c == self).unwrap().0
    }

    /// Odds for `n_buckets` buckets, smallest bucket first.
    pub fn odds(self, n_buckets: usize) -> Vec<f64> {
        (0..n_buckets)
            .map(|i| {
                let from_top = (n_buckets - 1 - i) as i32;
                match self {
                    NamedCurriculum::Uniform => 1.0,
                    NamedCurriculum::GrowLinear => f64::from(from_top + 1),
                    NamedCurriculum::GrowP2 => 2f64.powi(from_top),
                }
            })
            .collect()
    }
}

impl<'de> Deserialize<'de> for CurriculumSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CurriculumSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(
                    f,
                    "\"uniform\", \"grow-linear\", \"grow-p2\" or a list of odds per bucket, smallest bucket first"
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CurriculumSpec, E> {
                NamedCurriculum::ALL
                    .iter()
                    .find(|(name, _)| *name == v)
                    .map(|(_, c)| CurriculumSpec::Named(*c))
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CurriculumSpec, A::Error> {
                let mut odds = Vec::new();
                while let Some(x) = seq.next_element::<OddsValue>()? {
                    odds.push(x.0);
                }
                Ok(CurriculumSpec::Odds(odds))
            }
        }
        d.deserialize_any(V)
    }
}

/// One entry of an odds list: TOML writes `1` and `1.0` differently.
struct OddsValue(f64);

impl<'de> Deserialize<'de> for OddsValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = OddsValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a number")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<OddsValue, E> {
                Ok(OddsValue(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<OddsValue, E> {
                Ok(OddsValue(v as f64))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<OddsValue, E> {
                Ok(OddsValue(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_are_decimal() {
        assert_eq!(parse_with_suffix("2T"), Some(2e12));
        assert_eq!(parse_with_suffix("1.5B"), Some(1.5e9));
        assert_eq!(parse_with_suffix("1.5G"), Some(1.5e9));
        assert_eq!(parse_with_suffix("64K"), Some(64e3));
        assert_eq!(parse_with_suffix("500M"), Some(5e8));
        assert_eq!(parse_with_suffix("1e9"), Some(1e9));
        assert_eq!(parse_with_suffix("1_000"), Some(1000.0));
        assert_eq!(parse_with_suffix("lots"), None);
        assert_eq!(parse_with_suffix(""), None);
    }

    #[test]
    fn named_curricula_match_the_paper_over_d8_to_d13() {
        assert_eq!(NamedCurriculum::Uniform.odds(6), vec![1.0; 6]);
        assert_eq!(
            NamedCurriculum::GrowLinear.odds(6),
            vec![6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
        );
        assert_eq!(
            NamedCurriculum::GrowP2.odds(6),
            vec![32.0, 16.0, 8.0, 4.0, 2.0, 1.0]
        );
    }
}
