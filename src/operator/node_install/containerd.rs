//! containerd: a drop-in that adds the `kata-remote` runtime handler (config version 2 for
//! containerd 1.x, version 3 for 2.x), imported from the main config, and the shim under the
//! name its `runtime_type` resolves to, for containerd 1.6.

use toml_edit::{Array, DocumentMut, Item, Value};

use super::Error;
use super::kata_config::KATA_CONFIG;
use crate::api::names::RUNTIME_CLASS;

/// The main containerd configuration.
pub const MAIN_CONFIG: &str = "/etc/containerd/config.toml";
/// sandboxd's drop-in.
pub const DROPIN: &str = "/etc/containerd/conf.d/50-sandboxd-kata-remote.toml";
/// The systemd unit to restart.
pub const UNIT: &str = "containerd.service";
/// The handler's `runtime_type`. containerd 1.6 ignores `runtime_path` and runs the shim
/// this name resolves to on its PATH (`containerd-shim-kata-remote-v2`); 1.7 and 2.x run
/// `runtime_path`.
pub(crate) const RUNTIME_TYPE: &str = "io.containerd.kata-remote.v2";
/// The name form of the shim for containerd 1.6: a link to the kata shim, on the PATH of
/// every containerd service (kata-deploy made the same link before containerd had
/// `runtime_path`).
pub(crate) const SHIM_LINK: &str = "/usr/local/bin/containerd-shim-kata-remote-v2";

/// The shim binary containerd derives from a `runtime_type` (`io.containerd.<name>.<v>` →
/// `containerd-shim-<name>-<v>`), as containerd 1.6 resolves it.
#[cfg(test)]
pub(crate) fn shim_binary_of(runtime_type: &str) -> Option<String> {
    let parts: Vec<&str> = runtime_type.split('.').collect();
    match parts.as_slice() {
        [.., name, version] if parts.len() >= 3 => {
            Some(format!("containerd-shim-{name}-{version}"))
        }
        _ => None,
    }
}

/// Whether a kubelet-reported containerd (`containerd://1.6.20`) resolves shims by their
/// `runtime_type` name only (before 1.7).
pub(crate) fn needs_shim_link(runtime_version: &str) -> bool {
    let v = runtime_version
        .trim_start_matches("containerd://")
        .trim_start_matches('v');
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    matches!((it.next().flatten(), it.next().flatten()), (Some(1), Some(m)) if m < 7)
}

/// Which config schema a node's containerd reads: the main config's `version` if set,
/// else 3 for containerd 2.x and 2 for 1.x (from the kubelet's `containerd://X.Y.Z`).
pub(crate) fn config_version(main: Option<&str>, runtime_version: &str) -> Result<i64, Error> {
    if let Some(text) = main {
        let doc: DocumentMut = text.parse().map_err(|e| Error::Parse {
            path: MAIN_CONFIG.into(),
            reason: format!("{e}"),
        })?;
        if let Some(v) = doc.get("version").and_then(Item::as_integer) {
            return Ok(if v >= 3 { 3 } else { 2 });
        }
    }
    let major = runtime_version
        .trim_start_matches("containerd://")
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .unwrap_or(2);
    Ok(if major >= 2 { 3 } else { 2 })
}

/// The drop-in body for `version`.
pub(crate) fn dropin(version: i64, shim: &str) -> String {
    let plugin = if version >= 3 {
        "io.containerd.cri.v1.runtime"
    } else {
        "io.containerd.grpc.v1.cri"
    };
    format!(
        r#"version = {version}

[plugins."{plugin}".containerd.runtimes.{RUNTIME_CLASS}]
runtime_type = "{RUNTIME_TYPE}"
runtime_path = "{shim}"
privileged_without_host_devices = true
pod_annotations = ["io.katacontainers.*"]

[plugins."{plugin}".containerd.runtimes.{RUNTIME_CLASS}.options]
ConfigPath = "{KATA_CONFIG}"
"#
    )
}

fn parse(text: &str) -> Result<DocumentMut, Error> {
    text.parse().map_err(|e| Error::Parse {
        path: MAIN_CONFIG.into(),
        reason: format!("{e}"),
    })
}

fn entry_covers(entry: &str, path: &str) -> bool {
    if entry == path {
        return true;
    }
    let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
    match entry.rsplit_once('/') {
        Some((d, "*")) => d == dir,
        Some((d, "*.toml")) => d == dir && file.ends_with(".toml"),
        _ => false,
    }
}

/// Whether the main config already imports [`DROPIN`] (exactly or by a glob of its
/// directory).
pub(crate) fn imports_dropin(main: &str) -> Result<bool, Error> {
    let doc = parse(main)?;
    Ok(doc
        .get("imports")
        .and_then(Item::as_array)
        .is_some_and(|a| {
            a.iter()
                .any(|v| v.as_str().is_some_and(|s| entry_covers(s, DROPIN)))
        }))
}

/// The main config with [`DROPIN`] added to `imports`; every other byte is kept. A missing
/// main config becomes a minimal one of `version`.
pub(crate) fn add_import(main: Option<&str>, version: i64) -> Result<String, Error> {
    let Some(text) = main else {
        return Ok(format!("version = {version}\nimports = [\"{DROPIN}\"]\n"));
    };
    let mut doc = parse(text)?;
    match doc.get_mut("imports") {
        Some(item) => {
            let arr = item.as_array_mut().ok_or_else(|| Error::Parse {
                path: MAIN_CONFIG.into(),
                reason: "imports is not an array".into(),
            })?;
            arr.push(DROPIN);
        }
        None => {
            let mut arr = Array::new();
            arr.push(DROPIN);
            doc.insert("imports", Item::Value(Value::Array(arr)));
        }
    }
    Ok(doc.to_string())
}

/// The main config without sandboxd's import (used when someone edited it after install,
/// so the original bytes can not simply be restored). An `imports` left empty is removed.
pub(crate) fn remove_import(text: &str) -> Result<String, Error> {
    let mut doc = parse(text)?;
    let mut now_empty = false;
    if let Some(arr) = doc.get_mut("imports").and_then(Item::as_array_mut) {
        arr.retain(|v| v.as_str() != Some(DROPIN));
        now_empty = arr.is_empty();
    }
    if now_empty {
        doc.remove("imports");
    }
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_from_config_then_from_runtime() {
        assert_eq!(
            config_version(Some("version = 2\n"), "containerd://2.0.0").unwrap(),
            2
        );
        assert_eq!(
            config_version(Some("version = 3\n"), "containerd://1.7.0").unwrap(),
            3
        );
        assert_eq!(config_version(None, "containerd://1.7.22").unwrap(), 2);
        assert_eq!(
            config_version(Some("# empty\n"), "containerd://2.1.0").unwrap(),
            3
        );
    }

    #[test]
    fn dropins_are_valid_toml_with_the_right_plugin() {
        let v2 = dropin(2, "/opt/kata/bin/containerd-shim-kata-v2");
        let d2: DocumentMut = v2.parse().unwrap();
        let rt =
            &d2["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["kata-remote"];
        assert_eq!(
            rt["runtime_type"].as_str(),
            Some("io.containerd.kata-remote.v2")
        );
        assert_eq!(
            rt["runtime_path"].as_str(),
            Some("/opt/kata/bin/containerd-shim-kata-v2")
        );
        assert_eq!(
            rt["pod_annotations"][0].as_str(),
            Some("io.katacontainers.*")
        );
        assert_eq!(rt["options"]["ConfigPath"].as_str(), Some(KATA_CONFIG));
        let d3: DocumentMut = dropin(3, "/x").parse().unwrap();
        assert!(
            d3["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["kata-remote"]
                .is_table()
        );
    }

    #[test]
    fn globs_of_the_dropin_directory_count_as_imported() {
        assert!(imports_dropin("imports = [\"/etc/containerd/conf.d/*.toml\"]\n").unwrap());
        assert!(!imports_dropin("imports = [\"/etc/other/*.toml\"]\n").unwrap());
        assert!(!imports_dropin("version = 2\n").unwrap());
    }

    #[test]
    fn import_is_added_and_removed_keeping_everything_else() {
        let original =
            "version = 2\n# keep me\nimports = [\"/etc/a.toml\"]\n\n[plugins]\n  x = 1\n";
        let added = add_import(Some(original), 2).unwrap();
        assert!(imports_dropin(&added).unwrap());
        assert!(added.contains("# keep me") && added.contains("  x = 1"));
        let removed = remove_import(&added).unwrap();
        assert!(!imports_dropin(&removed).unwrap());
        assert!(removed.contains("/etc/a.toml"));
    }

    #[test]
    fn the_runtime_type_resolves_to_the_linked_shim_name_as_containerd_1_6_does() {
        assert_eq!(
            shim_binary_of(RUNTIME_TYPE).as_deref(),
            SHIM_LINK.rsplit('/').next()
        );
        assert_eq!(
            shim_binary_of("io.containerd.runc.v2").as_deref(),
            Some("containerd-shim-runc-v2")
        );
        assert!(needs_shim_link("containerd://1.6.20"));
        assert!(needs_shim_link("containerd://v1.6.0"));
        assert!(!needs_shim_link("containerd://1.7.22"));
        assert!(!needs_shim_link("containerd://2.0.0"));
        assert!(!needs_shim_link("containerd://2.4.2"));
    }
}
