//! Process-wide settings of the C allocator (glibc's malloc, which Rust's global allocator calls).
//!
//! It owns one decision, measured on the download path (`bench/run --path download-verify`, 1 GiB,
//! see Performance in the README): glibc gives each thread that allocates an arena of its own
//! (up to eight per core), and memory freed in an arena stays resident until that arena's top is
//! free. bicsi's long paths hand buffers from the runtime's threads to blocking workers and back,
//! so with the default the anonymous memory of `bicsi serve` peaked at 15.4 MiB during a
//! download; with a single arena at 10.4 MiB (and with two, 14.5 MiB). Small allocations still
//! come from each thread's cache without taking the arena's lock.

#![allow(unsafe_code)]

/// Limits the allocator to one arena. Call it first thing in `main`, before any thread starts.
/// On a C library without `mallopt` (musl) this does not build, which is the point: the
/// setting would then be meaningless.
pub fn one_arena() {
    // SAFETY: mallopt takes two integers and changes the allocator's parameters; it is called
    // before any other thread exists, as glibc asks of parameter changes.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    if ok != 1 {
        // glibc returns 1 on success; a refusal leaves the defaults, which only cost memory.
        eprintln!("warning: mallopt(M_ARENA_MAX, 1) was refused; the allocator keeps its defaults");
    }
}
