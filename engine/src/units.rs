//! Units and ranges, at the bottom of the crate (nothing here imports anything of ours):
//! byte sizes for people, and the value parsers of numeric flags whose range clap's types do not
//! express. Each parser runs where clap parses the flag, so an out-of-range value is a usage
//! error (exit 2) naming the flag and the range, before any model is loaded.

/// `1.23 GiB`, `456.0 MiB`, `789 B`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.2} {}", UNITS[u])
}

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

/// A factor that must be a finite number > 0 (`--repeat-penalty`).
pub fn positive_f32(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("{s} is out of range: give a number > 0"))
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

/// A memory size (`--gpu-memory`): `24GiB`, `24 GB` (decimal), `20000MiB`, or plain bytes; > 0.
pub fn byte_size(s: &str) -> Result<u64, String> {
    let b: bytesize::ByteSize = s
        .trim()
        .parse()
        .map_err(|e| format!("{s:?} is not a size ({e}); e.g. 24GiB or 24000MB"))?;
    if b.as_u64() == 0 {
        return Err(format!("{s} is out of range: give a size > 0"));
    }
    Ok(b.as_u64())
}

/// A finite number > 0 (`--bandwidth`, `--memory`, `--tflops`).
pub fn positive(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("{s} is out of range: give a finite number > 0"))
    }
}

/// The longest context `analyze` computes for (64 Mi tokens, 6x Llama-4 Scout's 10M): keeps
/// KV bytes and attention FLOPs inside 64 bits for every config that parses.
pub const MAX_CONTEXT: u64 = 1 << 26;
/// The largest batch `analyze` computes for.
pub const MAX_BATCH: u64 = 1 << 20;

/// `--context`: 1 to [`MAX_CONTEXT`].
pub fn context(s: &str) -> Result<u64, String> {
    bounded(s, MAX_CONTEXT)
}

/// `--batch` of analyze: 1 to [`MAX_BATCH`].
pub fn batch(s: &str) -> Result<u64, String> {
    bounded(s, MAX_BATCH)
}

fn bounded(s: &str, max: u64) -> Result<u64, String> {
    let n = at_least_one(s)? as u64;
    if n <= max {
        Ok(n)
    } else {
        Err(format!("{s} is out of range: give 1 to {max}"))
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
        assert_eq!(positive("1e3"), Ok(1000.0));
        for bad in ["0", "-1", "1e400", "inf", "nan"] {
            assert!(positive(bad).is_err(), "{bad}");
        }
        assert_eq!(context("67108864"), Ok(1 << 26));
        assert!(context("67108865").is_err() && context("0").is_err());
        assert!(batch("1048577").is_err());
    }
}
