//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; not part of bicsi's API).
//!
//! Each takes raw bytes from the fuzzer and runs one parser of untrusted input, checking the
//! promises its callers rely on beyond "does not panic". Parsers whose internals are private
//! keep their entry point beside them (`sync::fuzz_wire`, `http::fuzz_range`, ...); this module
//! holds the ones that only need the public API, and names them all in one place.

use std::collections::BTreeMap;

pub use crate::download::fuzz_content_range;
pub use crate::download::oci::fuzz as fuzz_disk_entry;
pub use crate::http::fuzz_range;
pub use crate::imagefmt::fuzz as fuzz_image_header;
pub use crate::sync::fuzz_wire;
pub use crate::sync::manifest::fuzz as fuzz_manifest;

/// StorageClass parameters as CreateVolume gets them: the input's lines as `key=value` pairs.
/// Parsing twice gives the same answer (no hidden state), and a replica count that parses is
/// within what a volume can have.
pub fn fuzz_volume_parameters(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let map: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let first = crate::params::parse(&map);
    let second = crate::params::parse(&map);
    assert_eq!(first.is_ok(), second.is_ok());
    if let Ok(p) = first {
        if let Some(n) = p.number_of_replicas {
            assert!(n >= 1, "{n} replicas accepted");
        }
    }
}

/// A BackingImage as a user sends it (JSON, `bicsi apply`, `POST /v1/backingimages`): one that
/// `from_user` accepts has a valid name and a normalised checksum.
pub fn fuzz_backing_image_json(data: &[u8]) {
    let Ok(bi) = serde_json::from_slice::<crate::backing::object::BackingImage>(data) else {
        return;
    };
    if let Ok(bi) = crate::backing::object::from_user(bi) {
        crate::backing::object::validate_name(bi.name()).expect("an accepted name is valid");
        let c = &bi.spec.checksum;
        assert!(
            c.is_empty() || (c.len() == 128 && c.bytes().all(|b| b.is_ascii_hexdigit())),
            "checksum {c:?} accepted"
        );
    }
}

/// A StorageClass as a user sends it (JSON): validation never panics.
pub fn fuzz_storage_class_json(data: &[u8]) {
    if let Ok(sc) = serde_json::from_slice::<crate::storageclass::StorageClass>(data) {
        let _ = crate::storageclass::validate(&sc, "driver.longhorn.io");
    }
}

/// A manifest for `bicsi apply -f`: splitting it into documents never panics, and none of the
/// documents it gives is empty.
pub fn fuzz_manifest_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(docs) = crate::cli::apply::manifest_documents("fuzz.yaml", text) {
        assert!(docs.iter().all(|d| !d.is_null()));
    }
}

/// The download guard's network lists (settings): an accepted list, written back entry by
/// entry, parses to the same entries.
pub fn fuzz_networks(data: &[u8]) {
    use crate::download::guard::parse_networks;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(entries) = parse_networks("fuzz", text) {
        let written: Vec<String> = entries.iter().map(ToString::to_string).collect();
        let again = parse_networks("fuzz", &written.join(",")).expect("written back, it parses");
        assert_eq!(again, entries);
    }
}
