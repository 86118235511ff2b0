//! Fuzzing of the decoders that take bytes from outside (see `README.md` beside this file).
//! Included by path from the driver (`examples/fuzz.rs`) and the replay test
//! (`tests/integration/fuzz_corpus.rs`).
// Support code shared by several test binaries: its `pub` items are for them.
#![allow(unreachable_pub)]
// Each includer uses a different part (the driver writes seeds, the test does not).
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

pub mod engine;
pub mod gen;
pub mod seeds;
pub mod targets;
