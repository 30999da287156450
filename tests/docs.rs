//! The documentation as a newcomer meets it: a short README that holds the test
//! command, every page under `docs/` reachable from it by links, no link to a file or
//! heading that does not exist, and no placeholder left in a page.

use std::{
    collections::{BTreeSet, VecDeque},
    path::{Path, PathBuf},
};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The text outside fenced code blocks.
fn prose(text: &str) -> String {
    let mut fenced = false;
    let mut out = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The targets of `[text](target)` links in the prose.
fn links(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut found = Vec::new();
    let mut rest = prose.as_str();
    while let Some(at) = rest.find("](") {
        rest = &rest[at + 2..];
        if let Some(end) = rest.find(')') {
            found.push(rest[..end].to_owned());
            rest = &rest[end..];
        }
    }
    found
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    prose(text)
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| slug(h.trim_start_matches('#')))
        .collect()
}

fn markdown_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(markdown_files(&path));
        } else if path.extension().is_some_and(|e| e == "md") {
            files.push(path);
        }
    }
    files
}

#[test]
fn the_readme_is_short_and_holds_the_test_command() {
    let readme = read(&root().join("README.md"));
    let lines = readme.lines().count();
    assert!(
        lines <= 200,
        "README.md has {lines} lines; move depth into docs/"
    );
    assert!(
        readme.lines().any(|l| l == "hack/test"),
        "README.md must show `hack/test` on a line of its own: .ci/run runs exactly that"
    );
}

#[test]
fn every_docs_page_is_reachable_from_the_readme_and_every_link_resolves() {
    let readme = root().join("README.md").canonicalize().unwrap();
    let mut seen = BTreeSet::from([readme.clone()]);
    let mut queue = VecDeque::from([readme]);
    let mut broken = Vec::new();
    while let Some(page) = queue.pop_front() {
        let text = read(&page);
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = link.split_once('#').unwrap_or((&link, ""));
            let target = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            let Ok(target) = target.canonicalize() else {
                broken.push(format!("{}: {link}: no such file", page.display()));
                continue;
            };
            if target.extension().is_some_and(|e| e == "md") {
                if !anchor.is_empty() && !anchors(&read(&target)).contains(anchor) {
                    broken.push(format!("{}: {link}: no such heading", page.display()));
                }
                if seen.insert(target.clone()) {
                    queue.push_back(target);
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    let unreachable: Vec<_> = markdown_files(&root().join("docs"))
        .into_iter()
        .map(|p| p.canonicalize().unwrap())
        .filter(|p| !seen.contains(p))
        .collect();
    assert!(
        unreachable.is_empty(),
        "pages no link from README.md leads to: {unreachable:?}"
    );
    assert!(seen.len() > 10, "only {} pages reached", seen.len());
}

#[test]
fn no_page_holds_a_placeholder() {
    let mut pages = markdown_files(&root().join("docs"));
    pages.push(root().join("README.md"));
    for page in pages {
        let text = read(&page);
        for word in ["TODO", "TBD", "FIXME", "XXX", "coming soon", "lorem"] {
            assert!(!text.contains(word), "{} contains {word:?}", page.display());
        }
    }
}

#[test]
fn anchors_follow_github() {
    assert_eq!(slug(" `keyward run` flags"), "keyward-run-flags");
    assert_eq!(
        slug(" NamespaceNotAllowed and the other …NotAllowed"),
        "namespacenotallowed-and-the-other-notallowed"
    );
    assert_eq!(
        slug(" Policy: who may mint what"),
        "policy-who-may-mint-what"
    );
}
