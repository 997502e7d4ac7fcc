//! Gives the TC program the skb's `ip_summed` (lb-common's `summed`): finds, in the running
//! kernel's BTF, the kfunc `bpf_cast_to_kern_ctx` and where `struct sk_buff` keeps the
//! `ip_summed` bitfield, and writes them into the program's three placeholder instructions
//! before the object is loaded. A kernel without them gets instructions that name every skb
//! `CHECKSUM_COMPLETE`, so the program updates checksums through the kernel's helpers, as it
//! did before it could read the field (correct, ~40 ns per packet slower where calls are dear).

use std::fmt;

use lb_common::summed;

/// Where the running kernel keeps what the program reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkbLayout {
    /// The kfunc's id in the kernel's BTF.
    pub kfunc: u32,
    /// The byte of `struct sk_buff` holding `ip_summed`.
    pub byte: u16,
    /// The bitfield's first bit in that byte.
    pub bit: u8,
}

/// How the loaded program updates a rewritten packet's TCP/UDP checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChecksumMode {
    /// By hand, from the skb's `ip_summed` (the helpers only for `CHECKSUM_COMPLETE`).
    ByHand(SkbLayout),
    /// Through the kernel's helpers, for the reason given.
    Helpers(&'static str),
}

impl fmt::Display for ChecksumMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ByHand(l) => write!(
                f,
                "by hand from ip_summed (struct sk_buff byte {}, bit {}; kfunc id {})",
                l.byte, l.bit, l.kfunc
            ),
            Self::Helpers(why) => write!(f, "through the kernel's helpers ({why})"),
        }
    }
}

/// The running kernel's layout, from `/sys/kernel/btf/vmlinux`: read and parsed once per
/// process (the kernel does not change under it; a test process loads hundreds of dataplanes).
pub fn kernel_layout() -> Result<SkbLayout, &'static str> {
    static LAYOUT: std::sync::OnceLock<Result<SkbLayout, &'static str>> =
        std::sync::OnceLock::new();
    *LAYOUT.get_or_init(|| {
        let btf = std::fs::read("/sys/kernel/btf/vmlinux").map_err(|_| "no kernel BTF")?;
        layout(&btf)
    })
}

/// Writes `mode`'s instructions over the placeholders in `object` (an eBPF ELF object), at
/// every place the three stand together. Returns how many places; an object holding a
/// placeholder anywhere else is refused (it would not load).
pub fn patch(object: &mut [u8], mode: ChecksumMode) -> Result<usize, String> {
    let words = match mode {
        ChecksumMode::ByHand(l) => [
            summed::call(l.kfunc),
            summed::load(l.byte),
            summed::shift(l.bit),
        ],
        ChecksumMode::Helpers(_) => summed::fallback(),
    };
    let placeholders = [summed::CALL, summed::LOAD, summed::SHIFT].map(u64::to_le_bytes);
    let mut places = 0;
    let mut at = 0;
    while at + 24 <= object.len() {
        if object[at..at + 8] != placeholders[0] {
            at += 1;
            continue;
        }
        for (i, p) in placeholders.iter().enumerate() {
            if object[at + 8 * i..at + 8 * (i + 1)] != *p {
                return Err(format!(
                    "the object's ip_summed read at byte {at} is not the three placeholders"
                ));
            }
        }
        for (i, w) in words.iter().enumerate() {
            object[at + 8 * i..at + 8 * (i + 1)].copy_from_slice(&w.to_le_bytes());
        }
        places += 1;
        at += 24;
    }
    Ok(places)
}

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_FUNC: u32 = 12;

/// One BTF type: its kind, name, and for a struct or union its members (name, type, bit
/// offset, bitfield size); for a modifier or typedef the type it refers to.
struct Type {
    kind: u32,
    name: u32,
    refers: u32,
    members: Vec<(u32, u32, u32, u32)>,
}

/// The layout from raw BTF (the kernel's own byte order, as `/sys/kernel/btf/vmlinux` holds).
pub fn layout(btf: &[u8]) -> Result<SkbLayout, &'static str> {
    let (types, strings) = parse(btf).ok_or("kernel BTF unreadable")?;
    let name = |off: u32| -> &[u8] {
        let s = strings.get(off as usize..).unwrap_or_default();
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    };
    let find = |kind: u32, n: &str| {
        types
            .iter()
            .position(|t| t.kind == kind && name(t.name) == n.as_bytes())
    };
    let kfunc = find(KIND_FUNC, summed::KFUNC).ok_or("no bpf_cast_to_kern_ctx kfunc")?;
    let skb = find(KIND_STRUCT, "sk_buff").ok_or("no struct sk_buff in BTF")?;
    let (bits, size) =
        member(&types, &name, skb, "ip_summed", 0, 0).ok_or("no sk_buff.ip_summed in BTF")?;
    if size != 2 || bits % 8 + 2 > 8 {
        return Err("sk_buff.ip_summed is not a 2-bit field within one byte");
    }
    Ok(SkbLayout {
        // Type ids count from 1 (0 is void).
        kfunc: u32::try_from(kfunc + 1).map_err(|_| "kernel BTF too large")?,
        byte: u16::try_from(bits / 8).map_err(|_| "sk_buff.ip_summed out of reach")?,
        bit: (bits % 8) as u8,
    })
}

/// The bit offset and bitfield size of the member `want` of struct/union `idx` (an index into
/// `types`), looking into anonymous struct and union members too.
fn member<'a>(
    types: &[Type],
    name: &impl Fn(u32) -> &'a [u8],
    idx: usize,
    want: &str,
    base: u32,
    depth: u32,
) -> Option<(u32, u32)> {
    let t = types.get(idx)?;
    if depth > 8 || (t.kind != KIND_STRUCT && t.kind != KIND_UNION) {
        return None;
    }
    for &(n, ty, off, size) in &t.members {
        if name(n) == want.as_bytes() {
            return Some((base + off, size));
        }
        if n == 0 {
            let inner = resolve(types, ty)?;
            if let Some(found) = member(types, name, inner, want, base + off, depth + 1) {
                return Some(found);
            }
        }
    }
    None
}

/// The index in `types` of type id `id` with typedefs and modifiers skipped.
fn resolve(types: &[Type], mut id: u32) -> Option<usize> {
    for _ in 0..16 {
        let t = types.get(id.checked_sub(1)? as usize)?;
        match t.kind {
            // typedef, volatile, const, restrict, type tag
            8..=11 | 18 => id = t.refers,
            _ => return Some(id as usize - 1),
        }
    }
    None
}

/// The types (index i is type id i + 1) and the string section of raw BTF.
fn parse(btf: &[u8]) -> Option<(Vec<Type>, &[u8])> {
    let u16_at = |o: usize| Some(u16::from_ne_bytes(btf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_ne_bytes(btf.get(o..o + 4)?.try_into().ok()?));
    if u16_at(0)? != 0xeb9f {
        return None;
    }
    let hdr_len = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
    let strings = btf.get(hdr_len + str_off..hdr_len + str_off + str_len)?;
    let (mut at, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
    let mut types = Vec::new();
    while at < end {
        let (name, info, refers) = (u32_at(at)?, u32_at(at + 4)?, u32_at(at + 8)?);
        let (kind, vlen, kflag) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31);
        at += 12;
        let mut members = Vec::new();
        let extra = match kind {
            // int, var, decl tag
            1 | 14 | 17 => 4,
            // array
            3 => 12,
            KIND_STRUCT | KIND_UNION => {
                for m in 0..vlen {
                    let o = at + 12 * m;
                    let off = u32_at(o + 8)?;
                    let (bits, size) = if kflag != 0 {
                        (off & 0xff_ffff, off >> 24)
                    } else {
                        (off, 0)
                    };
                    members.push((u32_at(o)?, u32_at(o + 4)?, bits, size));
                }
                12 * vlen
            }
            // enum, func proto
            6 | 13 => 8 * vlen,
            // datasec, enum64
            15 | 19 => 12 * vlen,
            // ptr, fwd, typedef, volatile, const, restrict, func, float, type tag
            2 | 7..=12 | 16 | 18 => 0,
            _ => return None,
        };
        at += extra;
        types.push(Type {
            kind,
            name,
            refers,
            members,
        });
    }
    Some((types, strings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_btf_gives_the_kfunc_and_a_two_bit_ip_summed() {
        let l = kernel_layout().expect("this machine has kernel BTF");
        assert!(l.kfunc > 0);
        assert!(l.bit <= 6, "{l:?}");
        // sk_buff is a few hundred bytes; the field sits after its list heads and cb[].
        assert!((64..256).contains(&l.byte), "{l:?}");
    }

    #[test]
    fn the_three_placeholders_are_patched_wherever_they_stand_together() {
        let ph = [summed::CALL, summed::LOAD, summed::SHIFT];
        let mut obj = vec![0xaa_u8; 5];
        for _ in 0..2 {
            obj.extend(ph.iter().flat_map(|w| w.to_le_bytes()));
            obj.extend([0x55; 3]);
        }
        let l = SkbLayout {
            kfunc: 62973,
            byte: 128,
            bit: 5,
        };
        assert_eq!(patch(&mut obj, ChecksumMode::ByHand(l)), Ok(2));
        let want: Vec<u8> = [summed::call(62973), summed::load(128), summed::shift(5)]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(&obj[5..29], &want[..]);
        assert_eq!(&obj[32..56], &want[..]);
        assert_eq!(patch(&mut obj, ChecksumMode::ByHand(l)), Ok(0));

        let mut broken: Vec<u8> = summed::CALL.to_le_bytes().to_vec();
        broken.extend(summed::SHIFT.to_le_bytes());
        broken.extend(summed::LOAD.to_le_bytes());
        assert!(patch(&mut broken, ChecksumMode::Helpers("test")).is_err());
    }

    #[test]
    fn the_built_object_reads_ip_summed_in_both_tc_programs() {
        // IPv4's `process` and IPv6's (a program of its own): a read optimized away or moved
        // into a path the compiler duplicated would change the count.
        let mut obj = crate::EBPF_OBJECT.to_vec();
        assert_eq!(patch(&mut obj, ChecksumMode::Helpers("test")), Ok(2));
    }

    #[test]
    fn btf_without_the_kfunc_or_the_field_is_named_not_guessed() {
        assert_eq!(layout(b"not btf"), Err("kernel BTF unreadable"));
        // A header and no types at all.
        let mut empty = Vec::new();
        for w in [0x0001_eb9f_u32, 24, 0, 0, 0, 1] {
            empty.extend(w.to_ne_bytes());
        }
        empty.push(0);
        assert_eq!(layout(&empty), Err("no bpf_cast_to_kern_ctx kfunc"));
    }
}
