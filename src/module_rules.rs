//! The module rule, checked on the sources: `api` (CRD types and `api::names`, the one
//! definition of every shared name), `cloud` (provider trait, azure, local and their netlink
//! plumbing) and `protocol` (ttrpc frames and messages) import nothing else of the crate;
//! `config` imports only `cloud`, whose settings types it builds, and `api` for the names of
//! what it reads. So none of them can be part of a cycle. The development modules (the ARM
//! test server, the dev environment, the local provider) exist only with the `dev` feature,
//! and the rest of the crate names them only behind that feature.

use std::path::{Path, PathBuf};

/// Each restricted top-level module and the other top-level modules it may name.
const RULES: &[(&str, &[&str])] = &[
    ("api", &[]),
    ("cloud", &[]),
    ("protocol", &[]),
    ("config", &["api", "cloud"]),
];

/// The `.rs` files of top-level module `name` (`src/<name>.rs` or `src/<name>/**`).
fn files_of(src: &Path, name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    let single = src.join(format!("{name}.rs"));
    if single.is_file() {
        out.push(single);
    }
    walk(&src.join(name), &mut out);
    out.sort();
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The leading identifier of `s` (after whitespace).
fn ident(s: &str) -> &str {
    let s = s.trim_start();
    &s[..s.find(|c: char| !is_ident(c)).unwrap_or(s.len())]
}

/// Every top-level module named through `crate::` in `text`, with its 1-based line: the
/// segment after `crate::`, or each item of a `crate::{a, b::c}` group. `$crate` is not
/// this crate's path and is skipped.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let line_of = |i: usize| text[..i].matches('\n').count() + 1;
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| is_ident(c) || c == '$') {
            continue;
        }
        let rest = text[i + "crate::".len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group up to its closing brace.
            let mut depth = 0usize;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth > 0 => depth -= 1,
                    ',' | '}' if depth == 0 => {
                        let item = ident(&group[start..j]);
                        if !item.is_empty() {
                            out.push((line_of(i), item.to_string()));
                        }
                        start = j + 1;
                        if c == '}' {
                            break;
                        }
                    }
                    _ => {}
                }
            }
        } else {
            out.push((line_of(i), ident(rest).to_string()));
        }
    }
    out
}

#[test]
fn api_cloud_and_protocol_import_nothing_else_of_the_crate_and_config_only_api_and_cloud() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let mut broken = Vec::new();
    for (module, allowed) in RULES {
        let files = files_of(&src, module);
        assert!(!files.is_empty(), "no sources of module `{module}` found");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (line, name) in crate_paths(&text) {
                if name != *module && !allowed.contains(&name.as_str()) {
                    let rel = file.strip_prefix(root).unwrap_or(&file);
                    broken.push(format!(
                        "{}:{line}: `crate::{name}` (module `{module}` may import {})",
                        rel.display(),
                        if allowed.is_empty() {
                            "nothing else of the crate".to_string()
                        } else {
                            format!("only {}", allowed.join(", "))
                        }
                    ));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "module rule broken:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_shared_names_import_nothing_not_even_from_api() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api/names.rs");
    let text = std::fs::read_to_string(&path).unwrap();
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let imports: Vec<&str> = code
        .lines()
        .map(str::trim_start)
        .filter(|l| !l.starts_with("//"))
        .filter(|l| l.starts_with("use ") || l.contains("crate::") || l.contains("super::"))
        .collect();
    assert!(imports.is_empty(), "src/api/names.rs imports {imports:?}");
}

/// The modules only the `dev` feature builds, as the rest of the crate names them.
const DEV_MODULES: &[&str] = &["armtest", "devenv", "cloud::local"];

#[test]
fn dev_modules_are_named_only_behind_the_dev_feature() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if name != "armtest" && name != "devenv" {
            files.extend(files_of(&src, &name));
        }
    }
    files.retain(|f| !f.starts_with(src.join("cloud/local")));
    files.sort();
    files.dedup();
    // A line is gated when `#[cfg(feature = "dev")]` stands just above it or just above the
    // top-level item it is part of.
    let gated = |lines: &[&str], i: usize| {
        let above = |at: usize| {
            lines[at.saturating_sub(3)..at]
                .iter()
                .any(|l| l.contains("cfg(feature = \"dev\")"))
        };
        let item = (0..=i).rev().find(|&j| {
            let l = lines[j];
            !l.is_empty() && !l.starts_with([' ', '}', '#', '/', ')'])
        });
        above(i) || item.is_some_and(above)
    };
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            let declares = DEV_MODULES.iter().any(|m| {
                let leaf = m.rsplit("::").next().unwrap_or(m);
                code.trim_start().starts_with("pub mod ") && code.contains(&format!("mod {leaf};"))
            });
            let names = DEV_MODULES.iter().any(|m| code.contains(&format!("{m}::")));
            if (declares || names) && !gated(&lines, i) {
                let rel = file.strip_prefix(root).unwrap_or(file);
                broken.push(format!("{}:{}: {}", rel.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "dev modules named outside #[cfg(feature = \"dev\")]:\n{}",
        broken.join("\n")
    );
}

#[test]
fn crate_paths_are_found_in_plain_grouped_and_multi_line_imports() {
    let text = "use crate::cloud::Error;\nuse crate::{\n    api::X,\n    forwarder::{net, relay},\n    VERSION,\n};\nlet v = crate::VERSION;\nmacro_rules! m { () => { $crate::x } }\nfoo_crate::bar();\n";
    assert_eq!(
        crate_paths(text),
        vec![
            (1, "cloud".to_string()),
            (2, "api".to_string()),
            (2, "forwarder".to_string()),
            (2, "VERSION".to_string()),
            (7, "VERSION".to_string()),
        ]
    );
}
