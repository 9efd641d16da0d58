//! The checksum rule, in one place: an image's file is known by its SHA-512, written as 128
//! hexadecimal characters and compared in lower case. An image's expected checksum may be empty
//! while it is not known yet (no `checksum` in its spec, no ready file); then any file is
//! accepted and the first ready one fixes it. Every path that reads a SHA-512 from a user or
//! compares one it computed (spec, upload header, download, transfer, a prepared or ready file,
//! a node's report) calls these two functions.

/// A SHA-512 as a user writes it, trimmed and in lower case; `None` when it is not 128
/// hexadecimal characters.
pub fn normalize_sha512(text: &str) -> Option<String> {
    let t = text.trim().to_ascii_lowercase();
    (t.len() == 128 && t.bytes().all(|b| b.is_ascii_hexdigit())).then_some(t)
}

/// Whether a computed SHA-512 `got` is the `expected` one (in any case); an empty `expected`
/// (not known yet) accepts any.
pub fn matches(expected: &str, got: &str) -> bool {
    expected.is_empty() || expected.eq_ignore_ascii_case(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizing_a_sha512() {
        let lower = "ab".repeat(64);
        let table: &[(&str, Option<&str>)] = &[
            (&lower, Some(&lower)),
            (&"AB".repeat(64), Some(&lower)),
            (&format!("  {lower}\n"), Some(&lower)),
            ("", None),
            (&"ab".repeat(32), None),
            (&"ab".repeat(65), None),
            (&format!("{}zz", "ab".repeat(63)), None),
            (&format!("sha512:{}", "ab".repeat(60)), None),
        ];
        for (text, want) in table {
            assert_eq!(normalize_sha512(text).as_deref(), *want, "{text:?}");
        }
    }

    #[test]
    fn comparing_a_sha512() {
        let a = "ab".repeat(64);
        let b = "cd".repeat(64);
        let table: &[(&str, &str, bool)] = &[
            (&a, &a, true),
            (&a.to_ascii_uppercase(), &a, true),
            (&a, &a.to_ascii_uppercase(), true),
            (&a, &b, false),
            ("", &b, true),
            (&a, "", false),
        ];
        for (expected, got, want) in table {
            assert_eq!(matches(expected, got), *want, "{expected:?} vs {got:?}");
        }
    }
}
