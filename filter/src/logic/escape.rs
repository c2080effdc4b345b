//! Client values in log lines. Envoy's log is line-oriented text: a model name or request id with
//! a newline in it could forge a whole log line (`[critical] ...`). Every value that came from a
//! client goes through [`log_safe`] (or [`LogSafe`] in a `format!`) before it reaches a log.

use std::fmt;

/// The longest value written to a log, in characters; longer ones are cut and marked.
pub const LOG_VALUE_MAX_CHARS: usize = 128;

/// `value` for a log line: control characters (C0, DEL, C1, and the Unicode line and paragraph
/// separators and bidirectional overrides that can make a terminal show something else) are
/// escaped as `\n`, `\r`, `\t`, `\\` or `\u{..}`, and anything after [`LOG_VALUE_MAX_CHARS`]
/// characters is replaced by `...(N bytes)`.
pub fn log_safe(value: &str) -> String {
    LogSafe(value).to_string()
}

/// Formats a client value for a log line like [`log_safe`], without an intermediate `String`:
/// `format!("model {}", LogSafe(&model))`.
#[derive(Debug, Clone, Copy)]
pub struct LogSafe<'a>(pub &'a str);

impl fmt::Display for LogSafe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, c) in self.0.chars().enumerate() {
            if n >= LOG_VALUE_MAX_CHARS {
                return write!(f, "...({} bytes)", self.0.len());
            }
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                '\\' => f.write_str("\\\\")?,
                c if needs_escape(c) => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                c => fmt::Write::write_char(f, c)?,
            }
        }
        Ok(())
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        // Line and paragraph separators, and the bidirectional embeddings, overrides and
        // isolates ("Trojan source").
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_values_are_unchanged() {
        for v in ["qwen2.5-1.5b-instruct-rkllm", "a b", "modèle-é", "", "0f8fad5b-d9cb-469f-a165-70867728950e"] {
            assert_eq!(log_safe(v), v);
        }
    }

    #[test]
    fn control_characters_cannot_start_a_line() {
        let forged = "m\n[2026-12-01 00:00:00.000][1][critical][main] forged\r\n\tx\u{0}\u{1b}[31m\u{7f}\u{85}";
        let out = log_safe(forged);
        assert!(!out.chars().any(|c| c.is_control()), "{out:?}");
        assert_eq!(
            out,
            "m\\n[2026-12-01 00:00:00.000][1][critical][main] forged\\r\\n\\tx\\u{0}\\u{1b}[31m\\u{7f}\\u{85}"
        );
        assert_eq!(log_safe("a\u{2028}b\u{202e}c\u{2066}"), "a\\u{2028}b\\u{202e}c\\u{2066}");
    }

    #[test]
    fn backslashes_are_escaped_so_escapes_cannot_be_faked() {
        assert_eq!(log_safe("a\\nb"), "a\\\\nb");
        assert_ne!(log_safe("a\\nb"), log_safe("a\nb"));
    }

    #[test]
    fn long_values_are_bounded() {
        let long = "x".repeat(1_000_000);
        let out = log_safe(&long);
        assert_eq!(out, format!("{}...(1000000 bytes)", "x".repeat(LOG_VALUE_MAX_CHARS)));
        let exact = "y".repeat(LOG_VALUE_MAX_CHARS);
        assert_eq!(log_safe(&exact), exact);
        // Multi-byte characters are never cut in half.
        let wide = "é".repeat(LOG_VALUE_MAX_CHARS + 1);
        assert!(log_safe(&wide).starts_with(&"é".repeat(LOG_VALUE_MAX_CHARS)));
    }

    #[test]
    fn display_wrapper_matches() {
        assert_eq!(format!("model {}", LogSafe("a\nb")), "model a\\nb");
    }
}
