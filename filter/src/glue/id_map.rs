//! Maps keyed by numbers the filter or its host makes (stream context ids, metric-name hashes),
//! never by what a client sends: a multiply spreads them well enough, where std's SipHash,
//! built to resist chosen keys, cost more than the rest of a lookup on every callback.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A 64-bit odd constant (2^64 / the golden ratio): multiplying by it spreads sequential ids
/// over the high bits, which the map's control bytes use.
const SPREAD: u64 = 0x9e37_79b9_7f4a_7c15;

#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(SPREAD);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(SPREAD);
    }
}

/// A map keyed by ids (see the module).
pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
