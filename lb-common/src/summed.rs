//! The TC program's read of the skb's `ip_summed`, and the three instructions userspace patches
//! into it at load time.
//!
//! A translated packet's TCP/UDP checksum needs one update when the checksum is complete and
//! another when the skb is `CHECKSUM_PARTIAL` (the field then holds only the pseudo-header's
//! sum, which a NIC or the stack completes later); `CHECKSUM_COMPLETE` also needs the skb's own
//! sum adjusted. `__sk_buff` does not say which, and the kernel's checksum helpers, which know,
//! cost a helper call each (two per rewritten packet, ~40 ns on a CPU whose returns go through
//! a mitigation thunk). So the program reads `ip_summed` itself: the kfunc
//! `bpf_cast_to_kern_ctx` (which the verifier turns into a register move) gives the
//! `struct sk_buff`, and a one-byte load at the bitfield's byte, shifted, gives the value. The
//! kfunc's BTF id and the bitfield's place are this kernel's, so the program carries the three
//! instructions as raw words with placeholders ([`CALL`], [`LOAD`], [`SHIFT`]) and userspace
//! writes in what the kernel's BTF says ([`call`], [`load`], [`shift`]), or, on a kernel
//! without them, instructions that yield [`COMPLETE`] ([`fallback`]): every packet then takes
//! the helpers, as before.

/// `skb->ip_summed`: no checksum information (the field holds a complete checksum).
pub const NONE: u8 = 0;
/// `skb->ip_summed`: the checksum was verified (the field holds a complete checksum).
pub const UNNECESSARY: u8 = 1;
/// `skb->ip_summed`: `skb->csum` holds the sum of the packet (the field is complete).
pub const COMPLETE: u8 = 2;
/// `skb->ip_summed`: the field holds the pseudo-header's sum, to be completed later.
pub const PARTIAL: u8 = 3;

/// The kfunc whose BTF id [`call`] needs.
pub const KFUNC: &str = "bpf_cast_to_kern_ctx";

/// One eBPF instruction as the little-endian word it is in the object file.
pub const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    (code as u64)
        | (((dst & 0xf) | (src << 4)) as u64) << 8
        | (off as u16 as u64) << 16
        | (imm as u32 as u64) << 32
}

const JMP_CALL: u8 = 0x85;
const PSEUDO_KFUNC_CALL: u8 = 2;
const LDX_MEM_B: u8 = 0x71;
const ALU64_RSH_K: u8 = 0x77;
const ALU64_MOV_K: u8 = 0xb7;

/// Placeholder: `call` of kfunc id 0x6b73756d ("ksum"), the skb pointer in r1, the kernel's
/// `struct sk_buff` back in r0.
pub const CALL: u64 = insn(JMP_CALL, 0, PSEUDO_KFUNC_CALL, 0, 0x6b73_756d);
/// Placeholder: `r0 = *(u8 *)(r0 + 0x7eef)`, the byte holding `ip_summed`.
pub const LOAD: u64 = insn(LDX_MEM_B, 0, 0, 0x7eef, 0);
/// Placeholder: `r0 >>= 0x6b73`, down to the bitfield's first bit (the program masks 2 bits).
pub const SHIFT: u64 = insn(ALU64_RSH_K, 0, 0, 0, 0x6b73);

/// [`CALL`] patched: the kfunc's id in the kernel's BTF (`off` 0: vmlinux's own).
pub const fn call(btf_id: u32) -> u64 {
    insn(JMP_CALL, 0, PSEUDO_KFUNC_CALL, 0, btf_id as i32)
}

/// [`LOAD`] patched: the byte of `struct sk_buff` holding `ip_summed`.
pub const fn load(byte: u16) -> u64 {
    insn(LDX_MEM_B, 0, 0, byte as i16, 0)
}

/// [`SHIFT`] patched: the bitfield's first bit within that byte.
pub const fn shift(bit: u8) -> u64 {
    insn(ALU64_RSH_K, 0, 0, 0, bit as i32)
}

/// What the three placeholders become where the kernel has no such kfunc or field: `r0 =
/// COMPLETE`, twice, then `r0 >>= 0` (the helpers' path for every packet).
pub const fn fallback() -> [u64; 3] {
    let mov = insn(ALU64_MOV_K, 0, 0, 0, COMPLETE as i32);
    [mov, mov, shift(0)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_placeholders_are_the_instructions_they_stand_for() {
        // As llvm-objdump prints them: 85 20 00 00 6d 75 73 6b = call, src 2, imm "ksum".
        assert_eq!(
            CALL.to_le_bytes(),
            [0x85, 0x20, 0, 0, 0x6d, 0x75, 0x73, 0x6b]
        );
        assert_eq!(LOAD.to_le_bytes(), [0x71, 0x00, 0xef, 0x7e, 0, 0, 0, 0]);
        assert_eq!(SHIFT.to_le_bytes(), [0x77, 0x00, 0, 0, 0x73, 0x6b, 0, 0]);
        assert_eq!(
            call(62973).to_le_bytes(),
            [0x85, 0x20, 0, 0, 0xfd, 0xf5, 0, 0]
        );
        assert_eq!(load(128).to_le_bytes(), [0x71, 0, 0x80, 0, 0, 0, 0, 0]);
        assert_eq!(shift(5).to_le_bytes(), [0x77, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(fallback()[0].to_le_bytes(), [0xb7, 0, 0, 0, 2, 0, 0, 0]);
    }
}
