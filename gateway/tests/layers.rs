//! The layers of `gateway/src` run one way: a module may use its own layer and those below,
//! never one above. This reads the source, so a new upward `use crate::…` fails here.
//!
//! Top to bottom (see `docs/architecture.md`):
//!
//! 1. `server`: the accept loop and the shutdown order (and `test_util`, which re-exports);
//! 2. `edge`, `ops`, `node`: what a client or an operator meets, and the state they share;
//! 3. `protocol`: the wire protocols' adapters;
//! 4. `core`, `auth`: sessions, the hub, token verification;
//! 5. `broker`, `cluster`: what nodes share through Redis (or memory);
//! 6. `conn`: one connection's mechanics (frames, socket loops, outbound queue, events);
//! 7. `config`, `error`, `metrics`, `time`: the foundation.

use std::path::Path;

const LAYERS: &[&[&str]] = &[
    &["server", "test_util"],
    &["edge", "ops", "node"],
    &["protocol"],
    &["core", "auth"],
    &["broker", "cluster"],
    &["conn"],
    &["config", "error", "metrics", "time"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// `crate::x` references in code (not comments, not `#[cfg(test)]` modules).
fn references(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in source.lines() {
        let code = line.trim_start();
        if code.starts_with("#[cfg(test)]") {
            break;
        }
        if code.starts_with("//") {
            continue;
        }
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let tail = &rest[i + "crate::".len()..];
            let name: String = tail
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
            rest = tail;
        }
        // `use super::x` inside a folder stays within the folder's layer.
    }
    out
}

fn visit(dir: &Path, top: Option<&str>, found: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_owned();
        if path.is_dir() {
            visit(&path, Some(top.unwrap_or(&name)), found);
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let module = top.unwrap_or(&name).to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(mine) = layer(&module) else {
            found.push(format!(
                "{}: module `{module}` has no layer",
                path.display()
            ));
            continue;
        };
        let source = std::fs::read_to_string(&path).expect("read file");
        for used in references(&source) {
            match layer(&used) {
                Some(theirs) if theirs < mine => found.push(format!(
                    "{}: `{module}` (layer {}) uses `crate::{used}` (layer {})",
                    path.display(),
                    mine + 1,
                    theirs + 1
                )),
                Some(_) => {}
                None => found.push(format!("{}: `crate::{used}` has no layer", path.display())),
            }
        }
    }
}

#[test]
fn no_module_uses_a_layer_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    visit(&src, None, &mut found);
    assert!(found.is_empty(), "upward imports:\n{}", found.join("\n"));
}

#[test]
fn the_check_sees_an_upward_import() {
    let refs = references(
        "use crate::core::hub::Hub;\n// crate::edge in a comment\n#[cfg(test)]\nuse crate::server;",
    );
    assert_eq!(refs, vec!["core".to_owned()]);
    assert!(
        layer("core") < layer("broker"),
        "core sits above the broker"
    );
}

#[test]
fn the_redis_transport_knows_nothing_of_what_travels_on_it() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cluster/redis.rs");
    let source = std::fs::read_to_string(path).expect("read cluster/redis.rs");
    let refs = references(&source);
    for above in ["broker", "core", "protocol", "edge"] {
        assert!(
            !refs.iter().any(|r| r == above),
            "cluster/redis.rs uses crate::{above}"
        );
    }
}
