//! Value parsers for flags whose range clap's types do not express. Each runs where clap parses
//! the flag, so an out-of-range value is a usage error (exit 2) naming the flag and the range,
//! before any model is loaded.

/// `--temperature`: a finite number >= 0 (0 = greedy).
pub fn temperature(s: &str) -> Result<f64, String> {
    let t: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if t.is_finite() && t >= 0.0 {
        Ok(t)
    } else {
        Err(format!(
            "{s} is out of range: give a number >= 0 (0 = greedy)"
        ))
    }
}

/// `--top-p`: in (0, 1] (1 keeps every token).
pub fn top_p(s: &str) -> Result<f64, String> {
    let p: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if p > 0.0 && p <= 1.0 {
        Ok(p)
    } else {
        Err(format!("{s} is out of range: give 0 < p <= 1"))
    }
}

/// A count that must be at least 1 (`--top-k`, `--layers`, `--runs`...).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if n >= 1 {
        Ok(n)
    } else {
        Err(format!("{s} is out of range: give at least 1"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(temperature("0"), Ok(0.0));
        assert_eq!(temperature("1.5"), Ok(1.5));
        for bad in ["-1", "-0.0001", "nan", "inf", "x", ""] {
            assert!(temperature(bad).is_err(), "{bad}");
        }
        assert_eq!(top_p("1"), Ok(1.0));
        assert_eq!(top_p("0.01"), Ok(0.01));
        for bad in ["0", "2", "1.0001", "-0.5", "nan", "p"] {
            assert!(top_p(bad).is_err(), "{bad}");
        }
        assert_eq!(at_least_one("1"), Ok(1));
        for bad in ["0", "-1", "1.5", ""] {
            assert!(at_least_one(bad).is_err(), "{bad}");
        }
    }
}
