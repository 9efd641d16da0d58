//! Sizes in Kubernetes quantity form (`256Mi`, `10Gi`, `1G`, `1500`), parsed and printed for the
//! CLI and the StorageClass parameters. Only whole bytes: fractions and milli-units are refused.

/// Parses a byte quantity: a whole number with an optional binary (Ki, Mi, Gi, Ti, Pi, Ei) or
/// decimal (k, K, M, G, T, P, E) suffix.
pub fn parse(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(format!(
            "size {text:?} is not a quantity: use a whole number of bytes with an optional suffix, such as 256Mi or 10Gi"
        ));
    }
    let n: u64 = number
        .parse()
        .map_err(|_| format!("size {text:?} is too large"))?;
    let mult: u64 = match suffix {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        other => {
            return Err(format!(
                "size {text:?} has an unknown suffix {other:?}: use Ki, Mi, Gi, Ti (binary) or k, M, G, T (decimal)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// Prints a byte count in the largest binary unit that divides it exactly (`1Gi`, `1536Mi`).
pub fn format(bytes: u64) -> String {
    const UNITS: [(&str, u64); 6] = [
        ("Ei", 1 << 60),
        ("Pi", 1 << 50),
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (name, size) in UNITS {
        if bytes >= size && bytes % size == 0 {
            return format!("{}{name}", bytes / size);
        }
    }
    bytes.to_string()
}

/// Human-oriented size with one decimal (`1.5 GiB`), for tables and progress.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quantities() {
        let table: &[(&str, Result<u64, ()>)] = &[
            ("256Mi", Ok(256 << 20)),
            ("10Gi", Ok(10 << 30)),
            ("1G", Ok(1_000_000_000)),
            ("1500", Ok(1500)),
            ("2k", Ok(2000)),
            (" 1Ki ", Ok(1024)),
            ("", Err(())),
            ("Mi", Err(())),
            ("1.5Gi", Err(())),
            ("10Xi", Err(())),
            ("-1", Err(())),
            ("99999999999Ei", Err(())),
        ];
        for (text, want) in table {
            assert_eq!(parse(text).map_err(|_| ()), *want, "{text:?}");
        }
    }

    #[test]
    fn formats_quantities() {
        assert_eq!(format(1 << 30), "1Gi");
        assert_eq!(format(1536 << 20), "1536Mi");
        assert_eq!(format(1000), "1000");
        assert_eq!(human(1536 << 20), "1.5 GiB");
        assert_eq!(human(12), "12 B");
    }
}
