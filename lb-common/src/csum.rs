//! Incremental Internet checksum update (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Values are taken exactly as they sit in the packet (read as native integers from network-order
//! bytes): one's-complement addition is byte-order independent, so no swapping is needed.

#[inline(always)]
const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum field after a 32-bit field covered by it changed from `from` to `to`.
/// Only for a complete checksum (the IPv4 header's), never for a `CHECKSUM_PARTIAL` L4 field.
#[inline(always)]
pub const fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let mut sum = (!check) as u32;
    sum += (!from >> 16) & 0xffff;
    sum += !from & 0xffff;
    sum += to >> 16;
    sum += to & 0xffff;
    !fold(sum)
}

/// The checksum field after a 16-bit field covered by it changed from `from` to `to`.
#[inline(always)]
pub const fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let mut sum = (!check) as u32;
    sum += (!from) as u32;
    sum += to as u32;
    !fold(sum)
}

/// The one's-complement difference a 32-bit field's change from `from` to `to` makes to a
/// checksum, folded to 16 bits: several changes' differences add up (with [`add`]) to one
/// update of a checksum, e.g. through `bpf_l4_csum_replace(field, 0, diff, size 4)`.
#[inline(always)]
pub const fn diff4(from: u32, to: u32) -> u16 {
    let mut sum = (!from >> 16) & 0xffff;
    sum += !from & 0xffff;
    sum += to >> 16;
    sum += to & 0xffff;
    fold(sum)
}

/// [`diff4`] for a 16-bit field.
#[inline(always)]
pub const fn diff2(from: u16, to: u16) -> u16 {
    fold((!from) as u32 + to as u32)
}

/// [`diff4`] for a 16-byte field (an IPv6 address, as four words).
#[inline(always)]
pub const fn diff16(from: &[u32; 4], to: &[u32; 4]) -> u16 {
    add(
        add(diff4(from[0], to[0]), diff4(from[1], to[1])),
        add(diff4(from[2], to[2]), diff4(from[3], to[3])),
    )
}

/// One's-complement sum of two differences.
#[inline(always)]
pub const fn add(a: u16, b: u16) -> u16 {
    fold(a as u32 + b as u32)
}

/// The checksum field after changes whose summed difference is `diff`.
#[inline(always)]
pub const fn apply(check: u16, diff: u16) -> u16 {
    !fold((!check) as u32 + diff as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(words: &[u16]) -> u16 {
        let mut s: u32 = words.iter().map(|&w| u32::from(w)).sum();
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }

    #[test]
    fn matches_recomputation() {
        // An IPv4 header as 16-bit words, checksum word (index 5) zero; address at words 8-9.
        let mut h: [u16; 10] = [
            0x4500, 0x0073, 0, 0x4000, 0x4011, 0, 0xc0a8, 0x0001, 0xc0a8, 0x00c7,
        ];
        let c = full(&h);
        assert_eq!(c, 0xb861);
        let mut x = 0x1234_5678u32;
        for _ in 0..10_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let from = (u32::from(h[8]) << 16) | u32::from(h[9]);
            let before = full(&h);
            h[8] = (x >> 16) as u16;
            h[9] = x as u16;
            let want = full(&h);
            assert_eq!(replace4(before, from, x), want, "from {from:#x} to {x:#x}");
        }
    }

    #[test]
    fn ttl_decrement_matches_recomputation() {
        let mut h: [u16; 10] = [
            0x4500, 0x0073, 0, 0x4000, 0x4011, 0, 0xc0a8, 0x0001, 0xc0a8, 0x00c7,
        ];
        for _ in 0..63 {
            let before = full(&h);
            let old = h[4];
            h[4] -= 0x0100; // TTL is the high byte of the word (network order)
            assert_eq!(
                replace2(before, old, h[4]),
                full(&h),
                "ttl {:#x}",
                h[4] >> 8
            );
        }
    }

    #[test]
    fn summed_differences_match_recomputation() {
        // Both addresses and both ports of a pseudo-header + UDP header change at once.
        let mut w: [u16; 8] = [
            0x0a0a, 0x0002, 0x0a63, 0x0001, 0x9c40, 0x0050, 0x0011, 0x0010,
        ];
        let mut x = 0x9e37_79b9u32;
        for _ in 0..10_000 {
            let before = full(&w);
            let old = w;
            let mut next = || {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                x
            };
            let (sa, da, sp, dp) = (next(), next(), next() as u16, next() as u16);
            w[0] = (sa >> 16) as u16;
            w[1] = sa as u16;
            w[2] = (da >> 16) as u16;
            w[3] = da as u16;
            w[4] = sp;
            w[5] = dp;
            let word = |i: usize, a: [u16; 8]| (u32::from(a[i]) << 16) | u32::from(a[i + 1]);
            let d = add(
                add(diff4(word(0, old), sa), diff4(word(2, old), da)),
                add(diff2(old[4], sp), diff2(old[5], dp)),
            );
            assert_eq!(apply(before, d), full(&w));
            // As the kernel's csum_replace4(check, 0, diff) computes it.
            assert_eq!(replace4(before, 0, u32::from(d)), full(&w));
        }
    }

    #[test]
    fn an_address_difference_matches_recomputation() {
        // An IPv6 pseudo-header's two addresses (16 words) and a checksum over them.
        let mut w = [0u16; 16];
        let mut x = 0x2545_f491u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for v in &mut w {
            *v = next() as u16;
        }
        for _ in 0..10_000 {
            let before = full(&w);
            let words = |a: &[u16; 16], at: usize| -> [u32; 4] {
                core::array::from_fn(|i| {
                    (u32::from(a[at + 2 * i]) << 16) | u32::from(a[at + 2 * i + 1])
                })
            };
            let old = words(&w, 0);
            for v in &mut w[..8] {
                *v = next() as u16;
            }
            assert_eq!(apply(before, diff16(&old, &words(&w, 0))), full(&w));
        }
    }

    #[test]
    fn byte_order_independent() {
        // The same update done on byte-swapped words gives the byte-swapped checksum.
        let (c, from, to) = (0xb861u16, 0xc0a8_00c7u32, 0x0a14_000bu32);
        // (A little-endian load of network-order bytes reverses all four bytes.)
        let swapped = replace4(c.swap_bytes(), from.swap_bytes(), to.swap_bytes());
        assert_eq!(swapped.swap_bytes(), replace4(c, from, to));
    }
}
