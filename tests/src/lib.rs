//! Test support for berth: packet building and checking (`wire`), the BPF_PROG_TEST_RUN fixture
//! harness (`fixture`), end-to-end namespace topologies with real servers and the real daemon
//! (`topo`, also the benchmarks' commands and namespaces), the Docker Engine and its test lab
//! (`docker`), and the benchmarks' statistics (`stats`).

pub mod docker;
pub mod fixture;
pub mod stats;
pub mod topo;
pub mod wire;
