//! Test support for berth: packet building and checking (`wire`), the BPF_PROG_TEST_RUN fixture
//! harness (`fixture`), and end-to-end namespace topologies with real servers and the real daemon
//! (`topo`).

pub mod fixture;
pub mod topo;
pub mod wire;
