//! Kubernetes resource quantities (`250m`, `1.5`, `4Gi`, `5G`, `1e3`) as exact integers.
//!
//! A quantity is held in nano-units (10⁻⁹ of the base unit), the finest scale the API server
//! keeps; finer fractions round up, as the API server rounds them. `i128` holds every value
//! the API server accepts (up to `Ei` × 10⁹) without loss.

/// Why a quantity string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid quantity {value:?}: {reason}")]
pub(crate) struct QuantityError {
    /// The text given.
    pub(crate) value: String,
    /// What is wrong with it.
    pub(crate) reason: &'static str,
}

/// Nano-units per base unit.
pub(crate) const NANO: i128 = 1_000_000_000;

/// Parses a Kubernetes quantity into nano-units, rounding finer fractions up.
pub(crate) fn parse_nanos(text: &str) -> Result<i128, QuantityError> {
    let err = |reason| QuantityError {
        value: text.to_string(),
        reason,
    };
    let s = text.trim();
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        Some(_) => (false, s),
        None => return Err(err("empty")),
    };
    let number_len = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_len);
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(err("no digits"));
    }
    if frac_part.contains('.') {
        return Err(err("more than one decimal point"));
    }
    // Leading zeros carry no value; anything longer than this cannot be a valid quantity.
    let significant = int_part.trim_start_matches('0');
    if significant.len() + frac_part.len() > 36 {
        return Err(err("too many digits"));
    }
    let mut mantissa: i128 = 0;
    for c in significant.chars().chain(frac_part.chars()) {
        mantissa = mantissa * 10 + i128::from(c as u8 - b'0');
    }
    let (exp10, exp2) = suffix_exponents(suffix).ok_or_else(|| err("unknown suffix"))?;
    // value = mantissa × 10^(exp10 − frac digits) × 2^exp2, in nano-units (+9).
    let scale = exp10 - frac_part.len() as i32 + 9;
    let mut value = mantissa;
    if exp2 > 0 {
        value = value
            .checked_mul(1i128 << exp2)
            .ok_or_else(|| err("too large"))?;
    }
    if scale >= 0 {
        let factor = 10i128
            .checked_pow(scale as u32)
            .ok_or_else(|| err("too large"))?;
        value = value.checked_mul(factor).ok_or_else(|| err("too large"))?;
    } else {
        let divisor = 10i128.checked_pow(scale.unsigned_abs());
        value = match divisor {
            Some(d) => div_ceil(value, d),
            // Smaller than 10⁻³⁸ nano: a non-zero value rounds up to one nano-unit.
            None => i128::from(value > 0),
        };
    }
    Ok(if negative { -value } else { value })
}

fn suffix_exponents(suffix: &str) -> Option<(i32, u32)> {
    Some(match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        _ => {
            let exp = suffix
                .strip_prefix('e')
                .or_else(|| suffix.strip_prefix('E'))?;
            let exp: i32 = exp.parse().ok()?;
            if !(-60..=60).contains(&exp) {
                return None;
            }
            (exp, 0)
        }
    })
}

/// `a / b` rounded towards positive infinity, for `b > 0`.
pub(crate) fn div_ceil(a: i128, b: i128) -> i128 {
    let q = a / b;
    if a % b > 0 { q + 1 } else { q }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_suffix_family_parses_exactly() {
        let cases: &[(&str, i128)] = &[
            ("1", NANO),
            ("250m", 250_000_000),
            ("1.5", 1_500_000_000),
            (".5", 500_000_000),
            ("100n", 100),
            ("3u", 3_000),
            ("2k", 2_000 * NANO),
            ("5M", 5_000_000 * NANO),
            ("5G", 5_000_000_000 * NANO),
            ("1Ki", 1024 * NANO),
            ("4Gi", 4 * (1 << 30) * NANO),
            ("0.5Gi", (1 << 29) * NANO),
            ("1.5Mi", 1_572_864 * NANO),
            ("1e3", 1_000 * NANO),
            ("129e6", 129_000_000 * NANO),
            ("2E-3", 2_000_000),
            ("1Ei", (1i128 << 60) * NANO),
            ("0", 0),
            ("+7", 7 * NANO),
            ("-1", -NANO),
        ];
        for (text, want) in cases {
            assert_eq!(parse_nanos(text), Ok(*want), "{text}");
        }
    }

    #[test]
    fn fractions_finer_than_a_nano_round_up() {
        assert_eq!(parse_nanos("0.0000000001"), Ok(1));
        assert_eq!(parse_nanos("1.0000000001"), Ok(NANO + 1));
        assert_eq!(parse_nanos("1e-50"), Ok(1));
    }

    #[test]
    fn garbage_is_refused_with_the_reason() {
        for (text, reason) in [
            ("", "empty"),
            ("Gi", "no digits"),
            ("1.2.3", "more than one decimal point"),
            ("12 cores", "unknown suffix"),
            ("1Xi", "unknown suffix"),
            ("1e999", "unknown suffix"),
            ("99999999999999999999999999999999999999", "too many digits"),
            ("999999999999999999999999999Ei", "too large"),
        ] {
            let err = parse_nanos(text).unwrap_err();
            assert_eq!(err.reason, reason, "{text}");
            assert!(err.to_string().contains(&format!("{text:?}")), "{err}");
        }
    }
}
