//! The module layering of `engine/src` (README, "Layout"): every module uses only modules of a
//! lower layer (or itself), so the graph has no circles and no import runs back up. Read from
//! the source text: each `crate::MODULE` a file names outside its unit tests.

use std::path::Path;

/// Layer of each top-level module of the engine crate, bottom first.
const LAYERS: &[(&str, u32)] = &[
    ("units", 1),
    ("error", 2),
    ("fsio", 3),
    ("memory", 3),
    ("config", 3),
    ("quant", 4),
    ("spec", 5),
    ("model", 6),
    ("loader", 7),
    ("analysis", 8),
    ("runtime", 8),
    ("selftest", 8),
    ("bench", 9),
    ("serve", 9),
    ("cli", 10),
];

fn layer(module: &str) -> Option<u32> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

/// `crate::X` names in `text` before its unit tests, comments skipped.
fn imports(text: &str) -> Vec<String> {
    let body = text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text);
    let mut out = Vec::new();
    for line in body.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            // `moe_kernels::...` and `$crate` are not this crate's modules.
            let before = &code[..i];
            if !before.ends_with('$') && !before.ends_with("moe_kernels::") && !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("engine/src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut bad = Vec::new();
    let mut checked = 0;
    for f in &all {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if ["lib", "bin"].contains(&module.as_str()) {
            continue;
        }
        let own = layer(&module).unwrap_or_else(|| {
            panic!(
                "{}: module {module:?} has no layer in LAYERS",
                rel.display()
            )
        });
        for target in imports(&std::fs::read_to_string(f).unwrap()) {
            checked += 1;
            let Some(l) = layer(&target) else {
                continue; // crate::Error, crate::Result and other re-exports of lib.rs
            };
            if target != module && l >= own {
                bad.push(format!(
                    "{} (layer {own}) uses crate::{target} (layer {l})",
                    rel.display()
                ));
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} imports found: the scan is broken"
    );
    assert!(
        bad.is_empty(),
        "imports that run up or across:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_scan_sees_imports() {
    let text = "use crate::model::Model; // crate::cli\nfn f() { crate::fsio::print(\"\"); }\n#[cfg(test)]\nmod tests { use crate::cli; }";
    assert_eq!(imports(text), vec!["model", "fsio"]);
}
