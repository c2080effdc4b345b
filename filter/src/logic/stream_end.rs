//! What a streamed reply's bytes say: whether it ended the way a node ends a finished one,
//! judged from its last bytes (for hosts that do not tell the filter that a node cut a stream:
//! on nginx a node that closes mid-stream looks like a clean end), and whether a chunk carries
//! anything but comments (newer exo opens each stream with `: keep-alive`, before any token).

/// How many of a stream's last bytes are kept to judge its end: the last event is short (its
/// text is one token or none).
pub const TAIL_BYTES: usize = 1024;

/// Whether `tail`, the last bytes of a streamed reply, shows the node finished it: newer exo
/// ends with `data: [DONE]`; older exo's last event has a `finish_reason` that is a string
/// (`"stop"`, `"length"`), where every earlier event has `null`.
pub fn finished(tail: &[u8]) -> bool {
    if contains(tail, b"[DONE]") {
        return true;
    }
    let key = b"\"finish_reason\"";
    let Some(at) = rfind(tail, key) else { return false };
    let rest = tail.get(at + key.len()..).unwrap_or_default();
    let mut values = rest.iter().copied().skip_while(u8::is_ascii_whitespace);
    values.next() == Some(b':') && values.find(|b| !b.is_ascii_whitespace()) == Some(b'"')
}

/// The longest chunk read to tell comments from tokens; a longer one is taken to carry a token
/// (a keep-alive comment is a dozen bytes).
pub const COMMENT_CHUNK_BYTES: usize = 256;

/// Whether `chunk`, a piece of a server-sent-event stream, holds only comments (lines that
/// start with `:`) and blank lines: no event, so no token yet.
pub fn only_comments(chunk: &[u8]) -> bool {
    chunk.len() <= COMMENT_CHUNK_BYTES
        && chunk.split(|&b| b == b'\n').all(|line| line.trim_ascii().is_empty() || line.first() == Some(&b':'))
}

/// Keeps the last [`TAIL_BYTES`] of a stream: `tail` followed by `chunk`.
pub fn keep_tail(tail: &mut Vec<u8>, chunk: &[u8]) {
    tail.extend_from_slice(chunk);
    let excess = tail.len().saturating_sub(TAIL_BYTES);
    if excess > 0 {
        tail.drain(..excess);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_comments_are_not_tokens() {
        assert!(only_comments(b": keep-alive\n\n"));
        assert!(only_comments(b": keep-alive\r\n\r\n: keep-alive\n\n"));
        assert!(only_comments(b"\n"));
        assert!(!only_comments(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"));
        assert!(!only_comments(b": keep-alive\n\ndata: {}\n\n"), "a comment and an event");
        assert!(!only_comments(b"{\"error\":{\"message\":\"x\"}}"), "not an event stream");
        let long = [b": ".as_slice(), &[b'x'; COMMENT_CHUNK_BYTES]].concat();
        assert!(!only_comments(&long), "longer than a comment chunk: taken as carrying a token");
    }

    #[test]
    fn both_dialects_finished_streams_are_recognised_and_cut_ones_are_not() {
        // Older exo (Python's json.dumps puts a space after the colon), last event "stop".
        let old = b"data: {\"choices\": [{\"delta\": {\"content\": \"a\"}, \"finish_reason\": null}]}\n\n\
                    data: {\"choices\": [{\"delta\": {}, \"finish_reason\": \"stop\"}]}\n\n";
        assert!(finished(old));
        // Cut after a token: the last finish_reason is null.
        let cut = b"data: {\"choices\": [{\"delta\": {\"content\": \"a\"}, \"finish_reason\": null}]}\n\n";
        assert!(!finished(cut));
        // Newer exo: [DONE] after the last event.
        assert!(finished(b"data: {\"finish_reason\":\"length\"}\n\ndata: [DONE]\n\n"));
        assert!(finished(b"data: {\"choices\":[{\"finish_reason\":\"stop\"}]}\n\n"));
        // Keep-alive comments only, nothing at all, or cut inside the last event.
        assert!(!finished(b": keep-alive\n\n"));
        assert!(!finished(b""));
        assert!(!finished(b"data: {\"choices\":[{\"finish_reason\""));
    }

    #[test]
    fn the_tail_keeps_the_last_bytes() {
        let mut tail = Vec::new();
        keep_tail(&mut tail, &[b'x'; 3000]);
        keep_tail(&mut tail, b"data: [DONE]\n\n");
        assert_eq!(tail.len(), TAIL_BYTES);
        assert!(finished(&tail));
        keep_tail(&mut tail, &[b'y'; TAIL_BYTES]);
        assert!(!finished(&tail));
    }
}
