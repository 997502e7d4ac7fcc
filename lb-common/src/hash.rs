//! The seeded flow hash. The kernel uses it to index a service's Maglev row; userspace uses the
//! same function to predict where a flow lands (tests, `berth` tooling).

use crate::FlowKey;

#[inline(always)]
pub(crate) const fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// MurmurHash3's finalizer: every input bit flips each output bit with probability about 1/2.
#[inline(always)]
pub const fn finalize(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hashes the full 5-tuple (as it sits in the packet, network byte order) with `seed`
/// (MurmurHash3-style mixing: cheap in BPF, no loops, good avalanche).
#[inline(always)]
pub const fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    let ports = ((key.sport as u32) << 16) | key.dport as u32;
    let mut h = seed ^ (key.proto as u32).wrapping_mul(0x9e37_79b9);
    h = mix(h, key.saddr);
    h = mix(h, key.daddr);
    h = mix(h, ports);
    finalize(h ^ 13)
}

/// Hashes a socket cookie with `seed`: the socket hooks' Maglev index, so every datagram of one
/// socket goes to the same backend while the backend set stays the same.
#[inline(always)]
pub const fn cookie_hash(cookie: u64, seed: u32) -> u32 {
    let mut h = seed ^ 0x5bd1_e995;
    h = mix(h, cookie as u32);
    h = mix(h, (cookie >> 32) as u32);
    finalize(h ^ 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_and_every_field_change_the_hash() {
        let k = FlowKey::new(1, 2, 3, 4, 6);
        let h = flow_hash(&k, 7);
        assert_ne!(h, flow_hash(&k, 8));
        assert_ne!(h, flow_hash(&FlowKey::new(9, 2, 3, 4, 6), 7));
        assert_ne!(h, flow_hash(&FlowKey::new(1, 9, 3, 4, 6), 7));
        assert_ne!(h, flow_hash(&FlowKey::new(1, 2, 9, 4, 6), 7));
        assert_ne!(h, flow_hash(&FlowKey::new(1, 2, 3, 9, 6), 7));
        assert_ne!(h, flow_hash(&FlowKey::new(1, 2, 3, 4, 17), 7));
    }

    #[test]
    fn spreads_source_ports_evenly() {
        // 60k flows differing only in source port over 7 buckets: each within 5% of the mean.
        let mut buckets = [0u32; 7];
        for sport in 1024..61_024u16 {
            let k = FlowKey::new(0x0a00_0001, 0x0a00_0002, sport.to_be(), 8080u16.to_be(), 6);
            buckets[(flow_hash(&k, 0xdead_beef) % 7) as usize] += 1;
        }
        let mean = 60_000.0 / 7.0;
        for b in buckets {
            assert!((f64::from(b) - mean).abs() / mean < 0.05, "{buckets:?}");
        }
    }
}
