//! cargo-fuzz entry of the `definition` target (tests/fuzz/targets.rs).
#![no_main]

#[path = "../../tests/fuzz/mod.rs"]
mod fuzz;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some(target) = fuzz::targets::target("definition") {
        let _ = (target.run)(data);
    }
});
