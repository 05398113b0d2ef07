//! Host edits on a temporary root: idempotent, unrelated config kept byte for byte, fully
//! reversible.

use std::collections::BTreeMap;
use std::path::Path;

use super::systemd::Recorded;
use super::*;

fn snapshot(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let key = p.strip_prefix(base).unwrap().display().to_string();
            if let Ok(target) = std::fs::read_link(&p) {
                // Links point at host paths, which need not exist under the test root.
                out.insert(format!("{key}@"), target.display().to_string().into_bytes());
            } else if p.is_dir() {
                out.insert(format!("{key}/"), Vec::new());
                walk(base, &p, out);
            } else {
                out.insert(key, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn host_with_shim() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("opt/kata/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("containerd-shim-kata-v2"), "shim").unwrap();
    dir
}

fn put(root: &Path, abs: &str, content: &str) {
    let p = files::host_path(root, abs);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn restarts(r: &Recorded) -> Vec<String> {
    r.restarted.lock().unwrap().clone()
}

const CONTAINERD_1X: &str = r#"version = 2
root = "/var/lib/containerd"

# operators keep comments like this one
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
"#;

const CONTAINERD_2X: &str = r#"version = 3
imports = ["/etc/containerd/extra.toml"]

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = 'io.containerd.runc.v2'
"#;

#[tokio::test]
async fn containerd_v2_install_is_idempotent_and_uninstall_restores_every_byte() {
    let host = host_with_shim();
    let root = host.path();
    put(root, containerd::MAIN_CONFIG, CONTAINERD_1X);
    put(root, "/etc/containerd/certs.d/unrelated.toml", "x = 1\n");
    let before = snapshot(root);
    let rt = Runtime::Containerd("containerd://1.7.22".into());
    let sm = Recorded::default();
    let cfg = InstallConfig::new("info");

    assert!(install(root, &rt, &cfg, &sm).await.unwrap());
    let main = std::fs::read_to_string(files::host_path(root, containerd::MAIN_CONFIG)).unwrap();
    assert!(main.starts_with(CONTAINERD_1X.lines().next().unwrap()));
    assert!(main.contains("# operators keep comments like this one"));
    assert!(containerd::imports_dropin(&main).unwrap());
    let dropin = std::fs::read_to_string(files::host_path(root, containerd::DROPIN)).unwrap();
    assert!(dropin.contains("io.containerd.grpc.v1.cri"), "{dropin}");
    assert!(dropin.contains("runtime_path = \"/opt/kata/bin/containerd-shim-kata-v2\""));
    let kata = std::fs::read_to_string(files::host_path(root, kata_config::KATA_CONFIG)).unwrap();
    assert!(kata.contains("/run/peerpod/hypervisor.sock"));
    assert_eq!(restarts(&sm), ["containerd.service"]);

    let after_first = snapshot(root);
    assert!(
        !install(root, &rt, &cfg, &sm).await.unwrap(),
        "second install changed files"
    );
    assert_eq!(snapshot(root), after_first);
    assert_eq!(restarts(&sm).len(), 1, "no restart without a change");

    assert!(uninstall(root, &rt, &sm).await.unwrap());
    assert_eq!(snapshot(root), before, "uninstall left the host different");
    assert_eq!(restarts(&sm).len(), 2);
    assert!(
        !uninstall(root, &rt, &sm).await.unwrap(),
        "second uninstall changed something"
    );
}

#[tokio::test]
async fn containerd_v3_keeps_existing_imports_and_reverts_exactly() {
    let host = host_with_shim();
    let root = host.path();
    put(root, containerd::MAIN_CONFIG, CONTAINERD_2X);
    let before = snapshot(root);
    let rt = Runtime::Containerd("containerd://2.0.0".into());
    let sm = Recorded::default();
    install(root, &rt, &InstallConfig::new("debug"), &sm)
        .await
        .unwrap();
    let main = std::fs::read_to_string(files::host_path(root, containerd::MAIN_CONFIG)).unwrap();
    assert!(main.contains("/etc/containerd/extra.toml") && main.contains(containerd::DROPIN));
    let dropin = std::fs::read_to_string(files::host_path(root, containerd::DROPIN)).unwrap();
    assert!(dropin.contains("io.containerd.cri.v1.runtime"), "{dropin}");
    let kata = std::fs::read_to_string(files::host_path(root, kata_config::KATA_CONFIG)).unwrap();
    assert!(kata.contains("enable_debug = true"));
    uninstall(root, &rt, &sm).await.unwrap();
    assert_eq!(snapshot(root), before);
}

#[tokio::test]
async fn log_level_change_rewrites_only_the_kata_config() {
    let host = host_with_shim();
    let root = host.path();
    put(root, containerd::MAIN_CONFIG, CONTAINERD_2X);
    let rt = Runtime::Containerd("containerd://2.0.0".into());
    let sm = Recorded::default();
    install(root, &rt, &InstallConfig::new("info"), &sm)
        .await
        .unwrap();
    let main1 = std::fs::read(files::host_path(root, containerd::MAIN_CONFIG)).unwrap();
    assert!(
        install(root, &rt, &InstallConfig::new("debug"), &sm)
            .await
            .unwrap()
    );
    let main2 = std::fs::read(files::host_path(root, containerd::MAIN_CONFIG)).unwrap();
    assert_eq!(main1, main2);
    let before_uninstall_main = String::from_utf8(main2).unwrap();
    assert!(before_uninstall_main.contains(containerd::DROPIN));
    uninstall(root, &rt, &sm).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(files::host_path(root, containerd::MAIN_CONFIG)).unwrap(),
        CONTAINERD_2X
    );
}

#[tokio::test]
async fn containerd_without_config_gets_one_and_loses_it_again() {
    let host = host_with_shim();
    let root = host.path();
    let before = snapshot(root);
    let rt = Runtime::Containerd("containerd://2.1.1".into());
    let sm = Recorded::default();
    install(root, &rt, &InstallConfig::new("info"), &sm)
        .await
        .unwrap();
    let main = std::fs::read_to_string(files::host_path(root, containerd::MAIN_CONFIG)).unwrap();
    assert!(main.contains("version = 3"));
    uninstall(root, &rt, &sm).await.unwrap();
    assert_eq!(snapshot(root), before);
}

#[tokio::test]
async fn edits_made_after_install_survive_uninstall() {
    let host = host_with_shim();
    let root = host.path();
    put(root, containerd::MAIN_CONFIG, CONTAINERD_1X);
    let rt = Runtime::Containerd("containerd://1.7.0".into());
    let sm = Recorded::default();
    install(root, &rt, &InstallConfig::new("info"), &sm)
        .await
        .unwrap();
    let path = files::host_path(root, containerd::MAIN_CONFIG);
    let mut main = std::fs::read_to_string(&path).unwrap();
    main.push_str("\n[metrics]\n  address = \"127.0.0.1:1338\"\n");
    std::fs::write(&path, &main).unwrap();
    uninstall(root, &rt, &sm).await.unwrap();
    let after = std::fs::read_to_string(&path).unwrap();
    assert!(after.contains("127.0.0.1:1338"), "{after}");
    assert!(!after.contains(containerd::DROPIN), "{after}");
    assert!(after.contains("# operators keep comments like this one"));
}

#[tokio::test]
async fn crio_dropin_is_added_and_removed() {
    let host = host_with_shim();
    let root = host.path();
    put(
        root,
        "/etc/crio/crio.conf",
        "[crio]\nlog_level = \"info\"\n",
    );
    put(
        root,
        "/etc/crio/crio.conf.d/00-default.conf",
        "[crio.runtime]\n",
    );
    let before = snapshot(root);
    let sm = Recorded::default();
    assert!(
        install(root, &Runtime::Crio, &InstallConfig::new("info"), &sm)
            .await
            .unwrap()
    );
    let dropin = std::fs::read_to_string(files::host_path(root, crio::DROPIN)).unwrap();
    assert!(dropin.contains("[crio.runtime.runtimes.kata-remote]"));
    assert!(
        !install(root, &Runtime::Crio, &InstallConfig::new("info"), &sm)
            .await
            .unwrap()
    );
    assert_eq!(restarts(&sm), ["crio.service"]);
    uninstall(root, &Runtime::Crio, &sm).await.unwrap();
    assert_eq!(snapshot(root), before);
}

#[tokio::test]
async fn missing_shim_is_the_failure_reason_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    put(dir.path(), containerd::MAIN_CONFIG, CONTAINERD_1X);
    let before = snapshot(dir.path());
    let sm = Recorded::default();
    let rt = Runtime::Containerd("containerd://1.7.0".into());
    let kata_only = InstallConfig::new("info").with_shim(ShimChoice::Kata);
    let err = install(dir.path(), &rt, &kata_only, &sm).await.unwrap_err();
    assert_eq!(err.metric_label(), "shim_missing");
    assert!(err.to_string().contains("kata-deploy"), "{err}");
    assert_eq!(snapshot(dir.path()), before);
    assert!(restarts(&sm).is_empty());
}

#[tokio::test]
async fn foreign_file_at_our_path_is_never_overwritten() {
    let host = host_with_shim();
    let root = host.path();
    put(
        root,
        crio::DROPIN,
        "[crio.runtime.runtimes.kata-remote]\n# someone else's\n",
    );
    let sm = Recorded::default();
    let err = install(root, &Runtime::Crio, &InstallConfig::new("info"), &sm)
        .await
        .unwrap_err();
    assert_eq!(err.metric_label(), "not_ours");
    uninstall(root, &Runtime::Crio, &sm).await.unwrap();
    assert!(files::host_path(root, crio::DROPIN).exists());
}

#[test]
fn runtime_is_read_from_node_info() {
    assert_eq!(
        Runtime::from_node_info("containerd://2.0.0").unwrap(),
        Runtime::Containerd("containerd://2.0.0".into())
    );
    assert_eq!(
        Runtime::from_node_info("cri-o://1.31.0").unwrap(),
        Runtime::Crio
    );
    assert_eq!(
        Runtime::from_node_info("docker://27")
            .unwrap_err()
            .metric_label(),
        "unsupported_runtime"
    );
}

fn link_target(root: &Path) -> Option<String> {
    std::fs::read_link(files::host_path(root, containerd::SHIM_LINK))
        .ok()
        .map(|t| t.display().to_string())
}

#[tokio::test]
async fn containerd_1_6_finds_the_shim_by_its_runtime_type_name_and_uninstall_removes_it() {
    let host = host_with_shim();
    let root = host.path();
    put(root, containerd::MAIN_CONFIG, CONTAINERD_1X);
    let before = snapshot(root);
    let rt = Runtime::Containerd("containerd://1.6.20".into());
    let sm = Recorded::default();
    install(root, &rt, &InstallConfig::new("info"), &sm)
        .await
        .unwrap();
    // containerd 1.6 ignores runtime_path: it runs containerd-shim-<name>-<v> from its PATH,
    // the name coming from runtime_type.
    let dropin: toml_edit::DocumentMut =
        std::fs::read_to_string(files::host_path(root, containerd::DROPIN))
            .unwrap()
            .parse()
            .unwrap();
    let rt_type = dropin["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
        ["kata-remote"]["runtime_type"]
        .as_str()
        .unwrap()
        .to_string();
    let name = containerd::shim_binary_of(&rt_type).unwrap();
    assert_eq!(
        files::host_path(root, "/usr/local/bin").join(&name),
        files::host_path(root, containerd::SHIM_LINK)
    );
    assert_eq!(
        link_target(root).as_deref(),
        Some("/opt/kata/bin/containerd-shim-kata-v2")
    );
    // The guest pull of containerd nodes is kata's.
    let kata: toml_edit::DocumentMut =
        std::fs::read_to_string(files::host_path(root, kata_config::KATA_CONFIG))
            .unwrap()
            .parse()
            .unwrap();
    assert_eq!(
        kata["runtime"]["experimental_force_guest_pull"].as_bool(),
        Some(true)
    );
    let after = snapshot(root);
    assert!(
        !install(root, &rt, &InstallConfig::new("info"), &sm)
            .await
            .unwrap()
    );
    assert_eq!(snapshot(root), after);
    uninstall(root, &rt, &sm).await.unwrap();
    assert_eq!(
        snapshot(root),
        before,
        "the link or /usr/local/bin was left"
    );
}

#[tokio::test]
async fn containerd_1_7_and_later_get_no_name_form_link_so_a_read_only_usr_is_fine() {
    for version in ["containerd://1.7.22", "containerd://2.4.2"] {
        let host = host_with_shim();
        let root = host.path();
        put(root, containerd::MAIN_CONFIG, CONTAINERD_1X);
        let rt = Runtime::Containerd(version.into());
        let sm = Recorded::default();
        install(root, &rt, &InstallConfig::new("info"), &sm)
            .await
            .unwrap();
        assert_eq!(link_target(root), None, "{version}");
        assert!(
            !files::host_path(root, "/usr/local/bin").exists(),
            "{version}: /usr/local/bin was created"
        );
        uninstall(root, &rt, &sm).await.unwrap();
    }
}

#[tokio::test]
async fn a_foreign_file_with_the_shims_name_fails_containerd_1_6_and_is_left_on_later_ones() {
    for (version, fails) in [("containerd://1.6.20", true), ("containerd://2.0.0", false)] {
        let host = host_with_shim();
        let root = host.path();
        put(root, containerd::SHIM_LINK, "#!/bin/sh\n# an admin's own\n");
        let rt = Runtime::Containerd(version.into());
        let sm = Recorded::default();
        let r = install(root, &rt, &InstallConfig::new("info"), &sm).await;
        if fails {
            assert_eq!(r.unwrap_err().metric_label(), "not_ours", "{version}");
        } else {
            r.unwrap();
        }
        uninstall(root, &rt, &sm).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(files::host_path(root, containerd::SHIM_LINK)).unwrap(),
            "#!/bin/sh\n# an admin's own\n",
            "{version}"
        );
    }
}

#[tokio::test]
async fn a_shim_link_an_older_kata_deploy_made_is_used_and_kept() {
    let host = host_with_shim();
    let root = host.path();
    let link = files::host_path(root, containerd::SHIM_LINK);
    std::fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink("/opt/kata/bin/containerd-shim-kata-v2", &link).unwrap();
    let rt = Runtime::Containerd("containerd://1.6.20".into());
    let sm = Recorded::default();
    install(root, &rt, &InstallConfig::new("info"), &sm)
        .await
        .unwrap();
    uninstall(root, &rt, &sm).await.unwrap();
    assert_eq!(
        link_target(root).as_deref(),
        Some("/opt/kata/bin/containerd-shim-kata-v2"),
        "a link sandboxd did not make was removed"
    );
}

#[tokio::test]
async fn crio_nodes_pull_images_in_the_guest_through_crio() {
    let host = host_with_shim();
    let root = host.path();
    let sm = Recorded::default();
    install(root, &Runtime::Crio, &InstallConfig::new("info"), &sm)
        .await
        .unwrap();
    let dropin: toml_edit::DocumentMut =
        std::fs::read_to_string(files::host_path(root, crio::DROPIN))
            .unwrap()
            .parse()
            .unwrap();
    assert_eq!(
        dropin["crio"]["runtime"]["runtimes"]["kata-remote"]["runtime_pull_image"].as_bool(),
        Some(true)
    );
    let kata: toml_edit::DocumentMut =
        std::fs::read_to_string(files::host_path(root, kata_config::KATA_CONFIG))
            .unwrap()
            .parse()
            .unwrap();
    assert_eq!(
        kata["runtime"]["experimental_force_guest_pull"].as_bool(),
        Some(false)
    );
    assert_eq!(kata["runtime"]["disable_new_netns"].as_bool(), Some(true));
    assert!(link_target(root).is_none(), "CRI-O needs no shim link");
}

/// A stand-in for the sandboxd binary the installer copies.
fn fake_sandboxd(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("sandboxd-binary");
    std::fs::write(&p, b"\x7fELF sandboxd").unwrap();
    p
}

#[tokio::test]
async fn without_kata_the_node_gets_sandboxds_shim_and_loses_it_on_uninstall() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    std::fs::create_dir_all(&root).unwrap();
    put(&root, containerd::MAIN_CONFIG, CONTAINERD_2X);
    let before = snapshot(&root);
    let rt = Runtime::Containerd("containerd://2.4.2".into());
    let sm = Recorded::default();
    let mut cfg = InstallConfig::new("info");
    cfg.shim_source = Some(fake_sandboxd(dir.path()));
    assert!(install(&root, &rt, &cfg, &sm).await.unwrap());
    let shim = files::host_path(&root, kata_config::SANDBOXD_SHIM);
    assert_eq!(std::fs::read(&shim).unwrap(), b"\x7fELF sandboxd");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&shim).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }
    let dropin = std::fs::read_to_string(files::host_path(&root, containerd::DROPIN)).unwrap();
    assert!(
        dropin.contains(&format!(
            "runtime_path = \"{}\"",
            kata_config::SANDBOXD_SHIM
        )),
        "{dropin}"
    );
    // Idempotent: the same binary is not copied again, nothing restarts.
    assert!(!install(&root, &rt, &cfg, &sm).await.unwrap());
    assert_eq!(restarts(&sm).len(), 1);
    // A new sandboxd (an operator upgrade) replaces the copy, and a new kata configuration
    // is written, without restarting containerd: the next shim it starts reads them, and a
    // restart would end the node's open exec sessions.
    std::fs::write(cfg.shim_source.as_ref().unwrap(), b"\x7fELF sandboxd 2").unwrap();
    assert!(install(&root, &rt, &cfg, &sm).await.unwrap());
    assert_eq!(std::fs::read(&shim).unwrap(), b"\x7fELF sandboxd 2");
    let kata = || std::fs::read(files::host_path(&root, kata_config::KATA_CONFIG)).unwrap();
    let before_debug = kata();
    let mut debug = InstallConfig::new("debug");
    debug.shim_source = cfg.shim_source.clone();
    assert!(install(&root, &rt, &debug, &sm).await.unwrap());
    assert_ne!(
        kata(),
        before_debug,
        "the log level is in the kata configuration"
    );
    assert_eq!(restarts(&sm).len(), 1, "an upgrade restarted containerd");
    uninstall(&root, &rt, &sm).await.unwrap();
    assert_eq!(snapshot(&root), before, "uninstall left the host different");
}

#[tokio::test]
async fn the_shim_choice_picks_kata_or_sandboxd_and_switching_removes_sandboxds_copy() {
    let host = host_with_shim();
    let root = host.path();
    let src = fake_sandboxd(root);
    put(root, containerd::MAIN_CONFIG, CONTAINERD_2X);
    let rt = Runtime::Containerd("containerd://2.4.2".into());
    let sm = Recorded::default();
    let dropin = || std::fs::read_to_string(files::host_path(root, containerd::DROPIN)).unwrap();
    // auto with kata's shim on the node: kata's.
    install(root, &rt, &InstallConfig::new("info"), &sm)
        .await
        .unwrap();
    assert!(dropin().contains("/opt/kata/bin/containerd-shim-kata-v2"));
    assert!(!files::host_path(root, kata_config::SANDBOXD_SHIM).exists());
    // sandboxd chosen: sandboxd's, even where kata's exists.
    let mut sbx = InstallConfig::new("info").with_shim(ShimChoice::Sandboxd);
    sbx.shim_source = Some(src.clone());
    assert_ne!(sbx.hash(), InstallConfig::new("info").hash());
    assert!(install(root, &rt, &sbx, &sm).await.unwrap());
    assert!(dropin().contains(kata_config::SANDBOXD_SHIM));
    assert!(files::host_path(root, kata_config::SANDBOXD_SHIM).exists());
    // Back to kata: the copy goes.
    let kata = InstallConfig::new("info").with_shim(ShimChoice::Kata);
    assert!(install(root, &rt, &kata, &sm).await.unwrap());
    assert!(dropin().contains("/opt/kata/bin/containerd-shim-kata-v2"));
    assert!(!files::host_path(root, kata_config::SANDBOXD_SHIM).exists());
    // CRI-O: sandboxd's shim serves containerd only.
    let err = install(root, &Runtime::Crio, &sbx, &sm).await.unwrap_err();
    assert_eq!(err.metric_label(), "unsupported_runtime");
    uninstall(root, &rt, &sm).await.unwrap();
}

#[test]
fn the_shim_choice_reads_the_kataconfig_spelling() {
    for c in [ShimChoice::Auto, ShimChoice::Kata, ShimChoice::Sandboxd] {
        assert_eq!(ShimChoice::from_spec(c.as_str()), c);
    }
    assert_eq!(ShimChoice::from_spec(""), ShimChoice::Auto);
}
