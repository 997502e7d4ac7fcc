//! Test support for berth: packet building and checking (`wire`), the BPF_PROG_TEST_RUN fixture
//! harness (`fixture`).

pub mod fixture;
pub mod wire;
