//! `crds/` must be exactly what `keyward crds` generates from the Rust types.

use std::path::Path;

#[test]
fn checked_in_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut expected_files = Vec::new();
    for crd in keyward::crds::all() {
        let name = keyward::crds::file_name(&crd);
        let path = dir.join(&name);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; run `cargo run -- crds --out-dir crds`",
                path.display()
            )
        });
        assert_eq!(
            on_disk,
            keyward::crds::to_yaml(&crd),
            "crds/{name} is stale: run `cargo run -- crds --out-dir crds` and commit"
        );
        expected_files.push(name);
    }
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    expected_files.sort();
    assert_eq!(
        present, expected_files,
        "crds/ holds files no type generates"
    );
}

#[test]
fn keyward_crds_prints_the_checked_in_files() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keyward"))
        .arg("crds")
        .output()
        .expect("running keyward crds");
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let files: String = keyward::crds::all()
        .iter()
        .map(|crd| {
            let text = std::fs::read_to_string(dir.join(keyward::crds::file_name(crd))).unwrap();
            format!("---\n{text}")
        })
        .collect();
    assert_eq!(printed, files);
}

/// `kubectl explain` wraps descriptions itself: a line break inside a paragraph
/// (from a wrapped doc comment) shows as ragged text. Paragraph breaks may stay.
#[test]
fn no_field_description_has_a_hard_line_break() {
    fn walk(path: &str, value: &serde_json::Value, found: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    let at = format!("{path}.{key}");
                    match (key.as_str(), v) {
                        ("description", serde_json::Value::String(text))
                            if text.split("\n\n").any(|p| p.contains('\n')) =>
                        {
                            found.push(format!("{at}: {text:?}"));
                        }
                        _ => walk(&at, v, found),
                    }
                }
            }
            serde_json::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    walk(&format!("{path}[{i}]"), v, found);
                }
            }
            _ => {}
        }
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut found = Vec::new();
    let mut descriptions = 0;
    for crd in keyward::crds::all() {
        let name = keyward::crds::file_name(&crd);
        let text = std::fs::read_to_string(dir.join(&name)).unwrap();
        descriptions += text.matches("description:").count();
        let value: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
        walk(&name, &value, &mut found);
    }
    assert!(
        descriptions > 100,
        "only {descriptions} descriptions: is the walk reading the CRDs?"
    );
    assert!(
        found.is_empty(),
        "descriptions with a line break inside a paragraph (join wrapped lines in src/crds.rs):\n{}",
        found.join("\n")
    );
}
