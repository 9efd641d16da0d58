//! The floors of `src/` (issue 16): every top-level module of the library stands on one floor and
//! imports only from its own floor or the floors below; no loop among modules of one floor. This
//! test reads the source, so it keeps `src/lib.rs`'s layer list true.
//!
//! What counts as an import: a `crate::NAME` path (`use crate::NAME…`, `use crate::{NAME, …}`, a
//! path in an expression, type or attribute string such as serde's `default = "crate::…"`, and
//! `$crate::` in macros) in code that is compiled into the library. What does not: comments,
//! doc comments included (a doc link `[crate::x]` names a module for the reader and does not
//! make this one depend on it; an upward one is allowed where the contract says who the caller
//! is), items under `#[cfg(test)]` and files declared by a `#[cfg(test)] mod NAME;` (tests may
//! reach anywhere), and `main.rs` (the binary, above every floor).
//!
//! Imports that still run up, and the imports that close a loop within a floor, are listed in
//! `KNOWN_BACK_EDGES`, each to be moved down; the list may only shrink: an edge listed but no
//! longer there (or now running down a floor) fails the test too, so the list stays the truth.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Bottom first. A module may import from its own floor (without a loop) and the floors below.
const FLOORS: &[(&str, &[&str])] = &[
    (
        "model, records, the error and pure rules",
        &[
            "authority",
            "certs",
            "clock",
            "counters",
            "error",
            "fsutil",
            "guard",
            "health",
            "imagefmt",
            "logs",
            "messages",
            "model",
            "nbd_tls",
            "nbd_wire",
            "proto",
            "quantity",
            "tls",
        ],
    ),
    ("OS seams", &["os"]),
    (
        "per-disk and per-replica domain",
        &[
            "backup",
            "disks",
            "download",
            "files",
            "mirror",
            "replica_file",
            "replica_server",
            "snapshot",
            "sync",
            "volume_engine",
        ],
    ),
    (
        "node and controller domain",
        &[
            "agent",
            "backing",
            "cluster",
            "controller",
            "events",
            "metrics",
            "node",
            "params",
            "reconcile",
            "settings",
            "storageclass",
            "store",
        ],
    ),
    ("wire", &["auth", "client", "csi", "http", "remote", "ui"]),
    ("processes", &["server"]),
    ("CLI", &["cli", "fuzzing"]),
];

/// Imports that run up today (importer, imported), each a seam in the wrong place still to be
/// moved down (issue 16, Deliver 1). Only ever remove lines from this list.
///
/// Cut so far: `files` reads the records and settings through its own traits (`ImageRecords`,
/// `FileSettings`, implemented by `backing` and `settings`), gets the typed source in the
/// request and counts through `counters` (floor 0); the BackingImage record, its files' states
/// and the disk layout live in `model`, so `store`, `agent` and `metrics` no longer import
/// `backing`, which closed the loops within floor 3; the CLI's HTTP API client and output live
/// under `cli` (`cli::api`, `cli::output`), so nothing imports up into it.
const KNOWN_BACK_EDGES: &[(&str, &str)] = &[];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The source with comments blanked (`code`), and also string and char contents blanked
/// (`skeleton`, for matching braces); both keep every byte's position and every newline.
fn lex(text: &str) -> (Vec<u8>, Vec<u8>) {
    let b = text.as_bytes();
    let mut code = b.to_vec();
    let mut skel = b.to_vec();
    let blank = |v: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut v[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p);
            blank(&mut code, i, end);
            blank(&mut skel, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            let (mut depth, mut j) = (0, i);
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut code, i, j);
            blank(&mut skel, i, j);
            i = j;
        } else if (rest.starts_with(b"r#") || rest.starts_with(b"r\"") || rest.starts_with(b"br"))
            && (i == 0 || !ident(b[i - 1]))
        {
            let start = i + if rest[0] == b'b' { 2 } else { 1 };
            let hashes = b[start..].iter().take_while(|&&c| c == b'#').count();
            if b.get(start + hashes) != Some(&b'"') {
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let body = start + hashes + 1;
            let end = b[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| body + p);
            blank(&mut skel, body, end);
            i = end + close.len();
        } else if rest[0] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut skel, i + 1, j.min(b.len()));
            i = j + 1;
        } else if rest[0] == b'\'' {
            // A char literal ('x', '\n', '\u{..}'), else a lifetime ('a).
            let end = if rest.get(1) == Some(&b'\\') {
                rest[2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map(|p| i + 2 + p)
            } else {
                let len = std::str::from_utf8(&rest[1..rest.len().min(5)])
                    .ok()
                    .or_else(|| std::str::from_utf8(&rest[1..rest.len().min(2)]).ok())
                    .and_then(|s| s.chars().next())
                    .map_or(1, char::len_utf8);
                (rest.get(1 + len) == Some(&b'\'')).then_some(i + 1 + len)
            };
            match end {
                Some(end) => {
                    blank(&mut skel, i + 1, end);
                    i = end + 1;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    (code, skel)
}

/// Blanks every item under `#[cfg(test)]` in `code` (found in `skel`); returns the names of the
/// modules declared `#[cfg(test)] mod NAME;` (files of test code).
fn drop_tests(code: &mut [u8], skel: &[u8]) -> Vec<String> {
    const ATTR: &[u8] = b"#[cfg(test)]";
    let mut test_mods = Vec::new();
    let mut i = 0;
    while let Some(p) = skel[i..].windows(ATTR.len()).position(|w| w == ATTR) {
        let start = i + p;
        let after = start + ATTR.len();
        let semi = skel[after..]
            .iter()
            .position(|&c| c == b';')
            .map(|p| after + p);
        let brace = skel[after..]
            .iter()
            .position(|&c| c == b'{')
            .map(|p| after + p);
        let end = match (semi, brace) {
            (Some(s), b) if b.is_none_or(|b| s < b) => {
                let item = String::from_utf8_lossy(&skel[after..s]);
                let words: Vec<&str> = item.split_whitespace().collect();
                if let [.., "mod", name] = words.as_slice() {
                    test_mods.push(name.to_string());
                }
                s + 1
            }
            (_, Some(b)) => {
                let mut depth = 0usize;
                let mut j = b;
                loop {
                    match skel[j] {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                j + 1
            }
            _ => skel.len(),
        };
        for c in &mut code[start..end] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
        i = end;
    }
    test_mods
}

/// The first path segments after every `crate::` in `code` (all of them in a `crate::{…}` group).
fn crate_refs(code: &str) -> BTreeSet<String> {
    let b = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some(p) = code[from..].find("crate") {
        let at = from + p;
        from = at + 5;
        if (at > 0 && ident(b[at - 1])) || b.get(at + 5).is_some_and(|&c| ident(c)) {
            continue;
        }
        let rest = code[at + 5..].trim_start();
        let Some(rest) = rest.strip_prefix("::") else {
            continue;
        };
        let rest = rest.trim_start();
        let first = |s: &str| -> String {
            s.chars()
                .take_while(|&c| c == '_' || c.is_alphanumeric())
                .collect()
        };
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            for (k, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if c.is_whitespace() => {}
                    _ if item_start => {
                        out.insert(first(&group[k..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(first(rest));
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules of the library (`src/NAME.rs` or `src/NAME/`).
fn top_modules() -> BTreeSet<String> {
    fs::read_dir(src())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_stem()?.to_str()?.to_string();
            (p.is_dir() || p.extension().is_some_and(|e| e == "rs")).then_some(name)
        })
        .filter(|n| n != "lib" && n != "main")
        .collect()
}

/// Every import between two top-level modules: (importer, imported) → the files that make it.
fn imports() -> BTreeMap<(String, String), BTreeSet<String>> {
    let root = src();
    let modules = top_modules();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files.sort();
    // Directories of test code: `a/b.rs` declaring `#[cfg(test)] mod c;` makes `a/b/c.rs` and
    // everything under `a/b/c/` test code.
    let mut test_code: Vec<PathBuf> = Vec::new();
    let mut sources = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&root).unwrap().to_path_buf();
        let text = fs::read_to_string(file).unwrap();
        let (mut code, skel) = lex(&text);
        for name in drop_tests(&mut code, &skel) {
            let dir = if rel == Path::new("lib.rs") {
                PathBuf::new()
            } else {
                rel.with_extension("")
            };
            test_code.push(dir.join(&name));
        }
        sources.push((rel, String::from_utf8(code).unwrap()));
    }
    let mut edges: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for (rel, code) in sources {
        if rel == Path::new("lib.rs") || rel == Path::new("main.rs") {
            continue;
        }
        if test_code
            .iter()
            .any(|t| rel.with_extension("") == *t || rel.starts_with(t))
        {
            continue;
        }
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs").to_string();
        for target in crate_refs(&code) {
            if target != top && modules.contains(&target) {
                let files = edges.entry((top.clone(), target)).or_default();
                files.insert(rel.display().to_string());
            }
        }
    }
    edges
}

fn floor_of() -> BTreeMap<&'static str, usize> {
    let mut floor = BTreeMap::new();
    for (n, (_, modules)) in FLOORS.iter().enumerate() {
        for m in *modules {
            assert!(floor.insert(*m, n).is_none(), "{m} is on two floors");
        }
    }
    floor
}

#[test]
fn every_module_has_a_floor() {
    let floor = floor_of();
    let modules = top_modules();
    let missing: Vec<_> = modules
        .iter()
        .filter(|m| !floor.contains_key(m.as_str()))
        .collect();
    let gone: Vec<_> = floor.keys().filter(|m| !modules.contains(**m)).collect();
    assert!(
        missing.is_empty() && gone.is_empty(),
        "modules without a floor: {missing:?}; floors naming modules that do not exist: {gone:?}; \
         put each module of src/ on one floor of FLOORS in tests/floors.rs (and in lib.rs's doc)"
    );
}

#[test]
fn no_import_runs_up() {
    let floor = floor_of();
    let edges = imports();
    let known: BTreeSet<(&str, &str)> = KNOWN_BACK_EDGES.iter().copied().collect();
    let mut up = Vec::new();
    for ((from, to), files) in &edges {
        let (Some(&a), Some(&b)) = (floor.get(from.as_str()), floor.get(to.as_str())) else {
            continue;
        };
        if b > a && !known.contains(&(from.as_str(), to.as_str())) {
            up.push(format!(
                "{from} (floor {a}, {}) -> {to} (floor {b}, {}) in {}",
                FLOORS[a].0,
                FLOORS[b].0,
                files.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    let stale: Vec<_> = known
        .iter()
        .filter(|(from, to)| {
            let key = (from.to_string(), to.to_string());
            !edges.contains_key(&key) || floor.get(to) < floor.get(from)
        })
        .collect();
    assert!(
        up.is_empty() && stale.is_empty(),
        "imports that run up a floor (move the type or function down to the importer's floor, \
         or pass the value in):\n  {}\nKNOWN_BACK_EDGES that are gone or now run down (remove them \
         from the list): {stale:?}",
        up.join("\n  ")
    );
}

#[test]
fn no_loop_within_a_floor() {
    let floor = floor_of();
    let known: BTreeSet<(&str, &str)> = KNOWN_BACK_EDGES.iter().copied().collect();
    let mut next: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (from, to) in imports().into_keys() {
        if !known.contains(&(from.as_str(), to.as_str()))
            && floor.get(from.as_str()) == floor.get(to.as_str())
        {
            next.entry(from).or_default().push(to);
        }
    }
    // Depth-first search; a module met again on the current path closes a loop.
    fn visit(
        m: &str,
        next: &BTreeMap<String, Vec<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(p) = path.iter().position(|x| x == m) {
            let mut cycle = path[p..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for n in next.get(m).into_iter().flatten() {
            if let Some(c) = visit(n, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in next.keys() {
        if let Some(cycle) = visit(m, &next, &mut Vec::new(), &mut done) {
            panic!(
                "a loop of imports within one floor: {}; move what one of them needs down",
                cycle.join(" -> ")
            );
        }
    }
}

#[test]
fn lib_doc_lists_the_floors() {
    // lib.rs's doc names each floor as "//! N. …" with its modules in backticks; it must say
    // what FLOORS says.
    let text = fs::read_to_string(src().join("lib.rs")).unwrap();
    let modules = top_modules();
    let mut doc: Vec<BTreeSet<String>> = Vec::new();
    for line in text.lines().map_while(|l| l.strip_prefix("//!")) {
        let line = line.trim();
        let numbered = line
            .split_once(". ")
            .is_some_and(|(n, _)| n.parse::<usize>() == Ok(doc.len()));
        if numbered {
            doc.push(BTreeSet::new());
        } else if line.is_empty() && !doc.is_empty() {
            break; // the list ends at the first empty line after it
        } else if doc.is_empty() {
            continue;
        }
        let names = line.split('`').skip(1).step_by(2);
        if let Some(floor) = doc.last_mut() {
            floor.extend(names.filter(|n| modules.contains(*n)).map(String::from));
        }
    }
    let want: Vec<BTreeSet<String>> = FLOORS
        .iter()
        .map(|(_, m)| m.iter().map(|s| s.to_string()).collect())
        .collect();
    assert_eq!(
        doc, want,
        "src/lib.rs's floor list differs from FLOORS in tests/floors.rs"
    );
}

#[test]
fn the_reader_sees_what_it_should() {
    // The reader itself, on what src/ holds: a doc link is not an import, a test is not, a
    // grouped import is, and so is a path in an attribute's string.
    let text = "//! [crate::up]\nuse crate::{a::X, b};\n#[serde(default = \"crate::c::f\")]\n\
                struct S(crate::d::T, &'static str, char);\nconst Q: char = '{';\n\
                #[cfg(test)]\nmod tests { use crate::e; fn f() { let _ = \"}\"; } }\n\
                #[cfg(test)]\nmod more;\nfn g() -> u8 { crate::f::h() }\n";
    let (mut code, skel) = lex(text);
    let test_mods = drop_tests(&mut code, &skel);
    let refs = crate_refs(&String::from_utf8(code).unwrap());
    let want: BTreeSet<String> = ["a", "b", "c", "d", "f"].map(String::from).into();
    assert_eq!(refs, want);
    assert_eq!(test_mods, ["more"]);
}
