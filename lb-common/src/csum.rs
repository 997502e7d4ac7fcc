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
    fn byte_order_independent() {
        // The same update done on byte-swapped words gives the byte-swapped checksum.
        let (c, from, to) = (0xb861u16, 0xc0a8_00c7u32, 0x0a14_000bu32);
        // (A little-endian load of network-order bytes reverses all four bytes.)
        let swapped = replace4(c.swap_bytes(), from.swap_bytes(), to.swap_bytes());
        assert_eq!(swapped.swap_bytes(), replace4(c, from, to));
    }
}
