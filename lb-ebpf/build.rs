//! Link arguments for bpf-linker (which generates the code: the crate is linked as bitcode).

fn main() {
    // Misaligned loads and stores as single instructions: packet headers sit at any 2-byte
    // offset, and without this every u32 field read from one is four byte loads, shifts and ors.
    println!("cargo::rustc-link-arg=--cpu-features=+allows-misaligned-mem-access");
}
