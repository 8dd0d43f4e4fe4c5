//! House rules that the compiler does not check: within each crate, no files import each
//! other in a circle. (Crates cannot: cargo refuses a cycle between them.)
//!
//! A file is a module; it depends on another when it names it through `crate::a::b` or
//! `super::sibling`. A module naming one of its own ancestors is not counted (a child may use
//! what its parent defines: the parent is its namespace, and every crate root declares and
//! re-exports its modules), nor a module naming itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace's crates: the folders the workspace manifest lists.
fn crates(root: &Path) -> Vec<PathBuf> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap_or_default();
    let line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .unwrap_or_default();
    line.split('"')
        .skip(1)
        .step_by(2)
        .map(|m| root.join(m))
        .collect()
}

/// Every `.rs` file under `dir`, with its module path (`["delivery", "nexthop"]`; the crate
/// root is `[]`).
fn modules(src: &Path, dir: &Path, out: &mut BTreeMap<Vec<String>, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            modules(src, &path, out);
            continue;
        }
        if path.extension().is_none_or(|x| x != "rs") {
            continue;
        }
        let rel = path.strip_prefix(src).unwrap_or(&path).with_extension("");
        let mut module: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if matches!(
            module.last().map(String::as_str),
            Some("mod" | "lib" | "main")
        ) {
            module.pop();
        }
        if module.first().is_some_and(|m| m == "bin") {
            continue; // each binary is a crate of its own
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        out.insert(module, without_comments(&text));
    }
}

/// The text without `//` comments (doc links are not imports). A `//` inside a string cuts
/// the rest of its line too, which only ever hides a name.
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The identifiers after `prefix` in `text`: `crate::a::b::C` gives `[a, b, C]` each time.
fn paths_after<'t>(text: &'t str, prefix: &str) -> Vec<Vec<&'t str>> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // `mycrate::`, not `crate::`
        }
        let mut segs = Vec::new();
        let mut s = rest;
        loop {
            let end = s
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(s.len());
            if end == 0 {
                break;
            }
            segs.push(&s[..end]);
            match s[end..].strip_prefix("::") {
                Some(next) => s = next,
                None => break,
            }
        }
        out.push(segs);
    }
    out
}

/// The longest module in `known` that `path` starts with.
fn module_of(known: &BTreeSet<Vec<String>>, path: &[&str]) -> Option<Vec<String>> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].iter().map(|s| s.to_string()).collect::<Vec<_>>())
        .find(|m| known.contains(m))
}

/// The dependencies between the files of one crate.
fn graph(files: &BTreeMap<Vec<String>, String>) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let known: BTreeSet<Vec<String>> = files.keys().cloned().collect();
    let mut g = BTreeMap::new();
    for (module, text) in files {
        let mut deps = BTreeSet::new();
        let parent = &module[..module.len().saturating_sub(1)];
        let named = paths_after(text, "crate::")
            .into_iter()
            .map(|p| p.into_iter().map(str::to_string).collect::<Vec<_>>());
        let siblings = paths_after(text, "super::").into_iter().map(|p| {
            parent
                .iter()
                .cloned()
                .chain(p.into_iter().map(str::to_string))
                .collect::<Vec<_>>()
        });
        for path in named.chain(siblings) {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            let Some(dep) = module_of(&known, &path) else {
                continue;
            };
            let ancestor = module.starts_with(&dep);
            if !ancestor && dep != *module {
                deps.insert(dep);
            }
        }
        g.insert(module.clone(), deps);
    }
    g
}

/// A cycle through `start`, if any (depth-first).
fn cycle_from(
    g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
    start: &Vec<String>,
) -> Option<Vec<Vec<String>>> {
    let mut stack = vec![(start.clone(), vec![start.clone()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in g.get(&at).into_iter().flatten() {
            if next == start {
                return Some(path.clone());
            }
            if seen.insert(next.clone()) {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    None
}

fn cycles_in(files: &BTreeMap<Vec<String>, String>) -> Vec<String> {
    let g = graph(files);
    let mut found: BTreeSet<String> = BTreeSet::new();
    for m in g.keys() {
        if let Some(c) = cycle_from(&g, m) {
            let mut names: Vec<String> = c.iter().map(|m| m.join("::")).collect();
            // One spelling per cycle: start at its smallest module.
            let first = (0..names.len())
                .min_by_key(|&i| names[i].clone())
                .unwrap_or(0);
            names.rotate_left(first);
            found.insert(names.join(" -> "));
        }
    }
    found.into_iter().collect()
}

#[test]
fn no_files_of_a_crate_import_each_other_in_a_circle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut problems = Vec::new();
    let crates = crates(&root);
    assert!(crates.len() >= 10, "the workspace's crates: {crates:?}");
    for c in crates {
        let src = c.join("src");
        let mut files = BTreeMap::new();
        modules(&src, &src, &mut files);
        assert!(!files.is_empty(), "no sources in {}", src.display());
        for cycle in cycles_in(&files) {
            problems.push(format!(
                "{}: {cycle}",
                c.file_name().unwrap_or_default().to_string_lossy()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "import cycles:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_cycle_check_finds_a_cycle_and_ignores_ancestors() {
    let files = |list: &[(&str, &str)]| -> BTreeMap<Vec<String>, String> {
        list.iter()
            .map(|(m, text)| {
                let path = m
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                (path, text.to_string())
            })
            .collect()
    };
    let circle = files(&[
        ("", "mod a; mod b; use a::X;"),
        ("a", "use crate::b::Y;"),
        ("b", "fn f() { crate::a::X::new(); }"),
    ]);
    assert_eq!(cycles_in(&circle), ["a -> b"]);
    let three = files(&[
        ("a", "crate::b::f()"),
        ("b", "super::c::g()"),
        ("c", "crate::a::h()"),
    ]);
    assert_eq!(cycles_in(&three), ["a -> b -> c"]);
    let tree = files(&[
        ("", "mod d; use d::Delivery; pub struct Config;"),
        ("d", "mod hop; use hop::Hop; use crate::Config;"),
        (
            "d::hop",
            "use super::Delivery; use crate::d::Policy; use crate::e::Z;",
        ),
        ("e", "fn g() { mycrate::d::x(); } use super::*;"),
    ]);
    assert!(cycles_in(&tree).is_empty(), "{:?}", cycles_in(&tree));
}
