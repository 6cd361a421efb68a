//! Feeds arbitrary bytes to the patch reader and applier (see `delta::fuzz_apply`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mesh_actors_fuzz::delta::fuzz_apply(data);
});
