//! A header map as the proxy-wasm ABI hands it over, read in place.
//!
//! `proxy_get_header_map_pairs` returns one buffer: the pair count (u32 LE), each pair's name
//! and value lengths (u32 LE each), then each name and value followed by a NUL. The SDK's own
//! reader copies every name and value into its own allocation (and traps on a name that is not
//! UTF-8 or on a short buffer); the filter reads every request's headers, so it takes the
//! positions instead and copies only what it keeps.

use std::ops::Range;

/// Where each pair's name and value lie in `bytes`, in order. A buffer that ends early or
/// claims more than it holds gives the pairs that fit, never a position outside it.
pub fn pairs(bytes: &[u8]) -> Vec<(Range<usize>, Range<usize>)> {
    let u32_at = |at: usize| {
        at.checked_add(4)
            .and_then(|end| bytes.get(at..end))
            .and_then(|s| <[u8; 4]>::try_from(s).ok())
            .map(|b| u32::from_le_bytes(b) as usize)
    };
    let Some(count) = u32_at(0) else { return Vec::new() };
    // The names and values start after the table of lengths; a table that does not fit is a lie.
    let Some(mut p) = count.checked_mul(8).and_then(|n| n.checked_add(4)).filter(|&p| p <= bytes.len()) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(count);
    for n in 0..count {
        let (Some(name_len), Some(value_len)) = (u32_at(4 + n * 8), u32_at(8 + n * 8)) else { break };
        let Some(name_end) = p.checked_add(name_len) else { break };
        let value_start = name_end.saturating_add(1);
        let Some(value_end) = value_start.checked_add(value_len) else { break };
        if value_end > bytes.len() {
            break;
        }
        out.push((p..name_end, value_start..value_end));
        p = value_end.saturating_add(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serialize(map: &[(&str, &str)]) -> Vec<u8> {
        let mut out = (map.len() as u32).to_le_bytes().to_vec();
        for (k, v) in map {
            out.extend((k.len() as u32).to_le_bytes());
            out.extend((v.len() as u32).to_le_bytes());
        }
        for (k, v) in map {
            out.extend(k.as_bytes());
            out.push(0);
            out.extend(v.as_bytes());
            out.push(0);
        }
        out
    }

    fn read(bytes: &[u8]) -> Vec<(&[u8], &[u8])> {
        pairs(bytes).into_iter().map(|(k, v)| (&bytes[k], &bytes[v])).collect()
    }

    #[test]
    fn reads_the_pairs_in_place() {
        let map = [(":method", "POST"), (":path", "/v1/chat/completions"), ("x-empty", ""), ("content-length", "42")];
        let bytes = serialize(&map);
        let got = read(&bytes);
        let want: Vec<(&[u8], &[u8])> = map.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())).collect();
        assert_eq!(got, want);
        assert!(read(&serialize(&[])).is_empty());
        assert!(read(&[]).is_empty());
    }

    #[test]
    fn a_short_or_lying_buffer_gives_what_fits() {
        let bytes = serialize(&[("a", "1"), ("bb", "22")]);
        let whole = read(&bytes);
        for cut in 0..bytes.len() {
            let got = read(&bytes[..cut]);
            assert!(whole.starts_with(&got), "{cut}: {got:?}");
        }
        let mut lying = bytes.clone();
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        let _ = read(&lying);
        let mut long_value = bytes;
        long_value[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(read(&long_value).is_empty());
    }
}
