//! Durations in configuration: "500ms", "30s", "5m", "1h".

/// Parses a duration string into milliseconds. Accepts an unsigned integer followed by one of
/// the units `ms`, `s`, `m`, `h`.
pub fn parse_millis(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("'{text}' has no unit (use ms, s, m or h, e.g. \"30s\")"))?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!("'{text}' does not start with a number (e.g. \"30s\")"));
    }
    let value: u64 = digits.parse().map_err(|_| format!("'{text}' is too large"))?;
    let factor: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        other => return Err(format!("'{text}' has unknown unit '{other}' (use ms, s, m or h)")),
    };
    value.checked_mul(factor).ok_or_else(|| format!("'{text}' is too large"))
}

/// Formats milliseconds the way the configuration writes them, choosing the largest exact unit.
pub fn format_millis(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    for (unit, factor) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms.is_multiple_of(factor) {
            return format!("{}{unit}", ms / factor);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_millis("500ms"), Ok(500));
        assert_eq!(parse_millis("30s"), Ok(30_000));
        assert_eq!(parse_millis("5m"), Ok(300_000));
        assert_eq!(parse_millis("2h"), Ok(7_200_000));
        assert_eq!(parse_millis(" 0s "), Ok(0));
    }

    #[test]
    fn rejects_bad_durations() {
        for bad in ["", "30", "s", "-1s", "1.5s", "10d", "30 s", "99999999999999999999s"] {
            assert!(parse_millis(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_millis("18446744073709551615h").is_err());
    }

    #[test]
    fn formats_round_trip() {
        for ms in [1, 500, 1_000, 30_000, 90_000, 300_000, 3_600_000] {
            assert_eq!(parse_millis(&format_millis(ms)), Ok(ms));
        }
    }
}
