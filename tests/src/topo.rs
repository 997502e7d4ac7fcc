//! End-to-end test topologies: network namespaces joined by veth pairs (and bridges), real TCP
//! and UDP servers inside them, and the real `berth` daemon running in the namespace that plays
//! the host. Everything is removed on drop, including after a panic; leftovers of a crashed run
//! (same name prefix) are removed before a topology is built.
//!
//! The pieces live in `netns`, `servers` and `daemon`; this module gathers them under the one
//! path the older test files import (`berth_tests::topo::...`).

pub use crate::{daemon::*, netns::*, servers::*, traffic::*};
