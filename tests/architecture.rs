//! The shape the lifecycle work promised, checked on the source itself:
//! - `src/lifecycle/` does no I/O, reads no clock and draws no random number;
//! - no function of the reconciler or the lifecycle is longer than about 80 lines;
//! - the graph of the crate's top-level modules has no cycle.
//!
//! Read as text on purpose: these are properties of the code as written, and a test
//! that parses `use crate::…` lines catches a new cycle the day it is introduced.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The code of a file without its `#[cfg(test)] mod tests { … }` (tests may use clocks).
fn without_tests(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    }
}

#[test]
fn the_lifecycle_does_no_io_reads_no_clock_and_draws_no_random_number() {
    let forbidden = [
        "Timestamp::now",
        "SystemTime",
        "Instant::now",
        "getrandom",
        "tokio::",
        "reqwest",
        "kube::Api",
        "std::fs",
        "async fn",
        ".await",
    ];
    for file in sources(&src().join("lifecycle")) {
        let text = fs::read_to_string(&file).unwrap();
        let code = without_tests(&text);
        for word in forbidden {
            assert!(
                !code.contains(word),
                "{} uses `{word}`: the lifecycle decides, the executor does I/O",
                file.display()
            );
        }
    }
}

#[test]
fn no_reconciler_or_lifecycle_function_is_longer_than_about_80_lines() {
    const LIMIT: usize = 85;
    let mut long = Vec::new();
    for dir in ["reconciler", "lifecycle"] {
        for file in sources(&src().join(dir)) {
            let text = fs::read_to_string(&file).unwrap();
            let lines: Vec<&str> = without_tests(&text).lines().collect();
            let mut i = 0;
            while i < lines.len() {
                let line = lines[i].trim_start();
                let is_fn = (line.starts_with("fn ")
                    || line.starts_with("pub fn ")
                    || line.starts_with("pub(crate) fn ")
                    || line.starts_with("async fn ")
                    || line.starts_with("pub async fn "))
                    && !line.ends_with(';');
                if !is_fn {
                    i += 1;
                    continue;
                }
                let indent = lines[i].len() - line.len();
                let start = i;
                // The function ends at the first `}` at its own indentation.
                let end = (i + 1..lines.len())
                    .find(|j| {
                        let l = lines[*j];
                        l.trim_start() == "}" && l.len() - l.trim_start().len() == indent
                    })
                    .unwrap_or(lines.len() - 1);
                if end - start + 1 > LIMIT {
                    long.push(format!(
                        "{}:{} ({} lines): {}",
                        file.display(),
                        start + 1,
                        end - start + 1,
                        line
                    ));
                }
                i = end + 1;
            }
        }
    }
    assert!(long.is_empty(), "functions too long:\n{}", long.join("\n"));
}

/// The top-level module a file belongs to (`src/reconciler/world.rs` → `reconciler`).
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src()).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    (!matches!(name, "lib" | "main" | "bin")).then(|| name.to_owned())
}

#[test]
fn the_module_graph_has_no_cycle() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let files = sources(&src());
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(f)).collect();
    for file in &files {
        let Some(from) = module_of(file) else {
            continue;
        };
        let text = fs::read_to_string(file).unwrap();
        // Comments (doc links included) are not dependencies.
        let code: String = without_tests(&text)
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let deps = graph.entry(from.clone()).or_default();
        // `crate::name` anywhere (use lines, paths in code), and `crate::{a, b::…}`.
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                let close = group.find("};").or_else(|| group.find('}')).unwrap_or(0);
                group[..close]
                    .split(',')
                    .map(|s| s.trim().split("::").next().unwrap_or(""))
                    .collect()
            } else {
                vec![
                    rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap_or(""),
                ]
            };
            for name in names {
                if modules.contains(name) && name != from {
                    deps.insert(name.to_owned());
                }
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            panic!("module cycle: {}\n(graph: {graph:?})", cycle.join(" -> "));
        }
    }
    assert!(
        graph
            .get("lifecycle")
            .is_some_and(|d| !d.contains("reconciler"))
    );
}
