#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| bicsi::fuzzing::fuzz_disk_entry(data));
