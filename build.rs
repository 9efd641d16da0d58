//! Compiles the protobuf APIs with protox (a pure-Rust protoc: nothing to install).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/csi.proto", "proto/bicsi.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    // The binaries' relative relocations packed (DT_RELR, glibc 2.36+, the image's bookworm):
    // the loader reads a few KiB at start instead of the 1.3 MB .rela.dyn table, which stayed
    // resident (see the README, Performance, on memory).
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && std::env::var("CARGO_CFG_TARGET_ENV").as_deref() == Ok("gnu")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .generate_default_stubs(true)
        .compile_fds(fds)?;
    Ok(())
}
