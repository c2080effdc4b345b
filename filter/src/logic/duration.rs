//! Durations in configuration: "500ms", "30s", "1.5s", "5m", "1h".

/// Parses a duration string into milliseconds. Accepts an unsigned number, with an optional
/// decimal fraction (as Envoy does: "1.5s", "0.25s"), followed by one of the units `ms`, `s`,
/// `m`, `h`. The value must come to a whole number of milliseconds ("1.0005s" is rejected).
pub fn parse_millis(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("'{text}' has no unit (use ms, s, m or h, e.g. \"30s\")"))?;
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!("'{text}' does not start with a number (e.g. \"30s\")"));
    }
    let factor: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        other => return Err(format!("'{text}' has unknown unit '{other}' (use ms, s, m or h)")),
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) => (whole, fraction),
        None => (number, ""),
    };
    if whole.is_empty() || (number.contains('.') && fraction.is_empty()) || fraction.contains('.') {
        return Err(format!("'{text}' is not a number followed by a unit (e.g. \"30s\" or \"1.5s\")"));
    }
    let too_large = || format!("'{text}' is too large");
    let whole: u64 = whole.parse().map_err(|_| too_large())?;
    let mut millis = whole.checked_mul(factor).ok_or_else(too_large)?;
    // The fraction, exactly: digits beyond the ninth must be zeros (no unit is finer than that).
    let significant = fraction.trim_end_matches('0');
    if significant.len() > 9 {
        return Err(format!("'{text}' is finer than a millisecond"));
    }
    if !significant.is_empty() {
        let digits = u32::try_from(significant.len()).map_err(|_| too_large())?;
        let scale = 10u64.checked_pow(digits).ok_or_else(too_large)?;
        let numerator: u64 =
            significant.parse::<u64>().map_err(|_| too_large())?.checked_mul(factor).ok_or_else(too_large)?;
        if !numerator.is_multiple_of(scale) {
            return Err(format!("'{text}' is finer than a millisecond"));
        }
        millis = millis.checked_add(numerator / scale).ok_or_else(too_large)?;
    }
    Ok(millis)
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
        for bad in [
            "",
            "30",
            "s",
            "-1s",
            "10d",
            "30 s",
            "99999999999999999999s",
            ".5s",
            "1.s",
            "1..5s",
            "1.5.0s",
            "1,5s",
            "1.5",
            "0.5ms",
            "1.0005s",
            "0.0000000001h",
            "1e3ms",
            "1.5 s",
        ] {
            assert!(parse_millis(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_millis("18446744073709551615h").is_err());
    }

    #[test]
    fn parses_decimals_like_envoy() {
        assert_eq!(parse_millis("1.5s"), Ok(1_500));
        assert_eq!(parse_millis("0.25s"), Ok(250));
        assert_eq!(parse_millis("0.001s"), Ok(1));
        assert_eq!(parse_millis("2.500s"), Ok(2_500));
        assert_eq!(parse_millis("1.5m"), Ok(90_000));
        assert_eq!(parse_millis("0.5h"), Ok(1_800_000));
        assert_eq!(parse_millis("10.0ms"), Ok(10));
        assert_eq!(parse_millis("1.000000000000s"), Ok(1_000), "trailing zeros are exact");
        assert_eq!(parse_millis("0.000001h"), Err("'0.000001h' is finer than a millisecond".into()));
        assert_eq!(parse_millis("18446744073709551.615s"), Ok(u64::MAX));
        assert_eq!(parse_millis("18446744073709551.616s"), Err("'18446744073709551.616s' is too large".into()));
        assert_eq!(
            parse_millis("18446744073709551.615ms"),
            Err("'18446744073709551.615ms' is finer than a millisecond".into())
        );
    }

    #[test]
    fn any_text_is_an_answer_not_a_panic() {
        for text in
            ["", ".", "..", ".s", "0.", "9".repeat(40).as_str(), "1.99999999999999999999h", "\u{e9}s", "1.5\u{e9}"]
        {
            let _ = parse_millis(text);
        }
    }

    #[test]
    fn formats_round_trip() {
        for ms in [1, 500, 1_000, 30_000, 90_000, 300_000, 3_600_000] {
            assert_eq!(parse_millis(&format_millis(ms)), Ok(ms));
        }
    }
}
