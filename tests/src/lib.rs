//! Test support for berth: packet building and checking (`wire`), the BPF_PROG_TEST_RUN fixture
//! harness (`fixture`), network namespaces and the commands run in them (`netns`, shared with the
//! benchmarks), servers and clients (`servers`), the berth daemon as the tests run it (`daemon`),
//! the Docker Engine and its test lab (`docker`), other Docker hosts in namespaces of their own
//! (`engines`), a real etcd (`etcd`) and balancers fed through it by `berth publish` (`fabric`),
//! the hostile suites' random source (`fuzz`) and the benchmarks' statistics (`stats`).
//! `topo` gathers `netns`, `servers` and `daemon` under the path the older tests import.

pub mod capture;
pub mod daemon;
pub mod docker;
pub mod engines;
pub mod etcd;
pub mod fabric;
pub mod fixture;
pub mod fixture6;
pub mod fuzz;
pub mod netns;
pub mod servers;
pub mod stats;
pub mod topo;
pub mod traffic;
pub mod wire;
pub mod wire6;
