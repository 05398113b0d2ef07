//! The configuration steps: `azure secret`, `ssh-key`, `limit`, `caa restart`, and their
//! bad inputs.

use std::os::unix::fs::PermissionsExt;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use sandboxd::api::peerpodconfig::{PeerPodConfig, PeerPodConfigSpec};
use serde_json::json;

use super::support::{Run, ctl, ctl_with, raw};
use crate::harness::{Case, Env};

const SUBSCRIPTION: &str = "0f0e0d0c-1111-2222-3333-444455556666";
const TENANT: &str = "aaaaaaaa-1111-2222-3333-444455556666";
const CLIENT: &str = "bbbbbbbb-1111-2222-3333-444455556666";

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster(
            "ctl::azure_secret_is_written_from_flags_env_and_stdin_and_never_printed",
            secret_written,
        ),
        Case::cluster(
            "ctl::azure_secret_prompts_on_a_terminal_without_echoing_the_secret",
            secret_prompt,
        )
        .skip_if(
            (!std::path::Path::new("/usr/bin/script").exists())
                .then(|| "util-linux `script` (a pseudo-terminal) is not installed".to_string()),
        ),
        Case::cluster(
            "ctl::azure_secret_missing_a_key_fails_naming_the_key",
            secret_missing_key,
        ),
        Case::cluster(
            "ctl::ssh_key_stores_the_public_key_and_writes_no_file_without_out",
            ssh_key,
        ),
        Case::cluster("ctl::limit_get_and_set_change_the_peerpodconfig", limit),
        Case::cluster(
            "ctl::caa_restart_sets_reboot_on_the_daemonset_template",
            caa_restart,
        ),
        Case::plain(
            "ctl::missing_kubeconfig_fails_naming_the_file",
            missing_kubeconfig,
        ),
    ]
}

fn value(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

async fn secret_written(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    let secrets: Api<Secret> = Api::namespaced(admin, &env.ns);
    // Flags and environment, the client secret from stdin (not a terminal here).
    let from_stdin = "s3cr3t-from-stdin-7f2a";
    let out = ctl_with(
        &env,
        &env.ns,
        &[
            "azure",
            "secret",
            "--client-id",
            CLIENT,
            "--tenant-id",
            TENANT,
        ],
        Run {
            envs: &[("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION)],
            stdin: Some(&format!("{from_stdin}\n")),
            ..Default::default()
        },
    )
    .await?
    .ok()?;
    ensure!(
        !out.all().contains(from_stdin),
        "secret printed:\n{}",
        out.all()
    );
    ensure!(out.stdout.contains("AZURE_CLIENT_SECRET"), "{}", out.all());
    let s = secrets.get("peer-pods-secret").await?;
    ensure!(value(&s, "AZURE_CLIENT_SECRET").as_deref() == Some(from_stdin));
    ensure!(value(&s, "AZURE_CLIENT_ID").as_deref() == Some(CLIENT));
    ensure!(value(&s, "AZURE_TENANT_ID").as_deref() == Some(TENANT));
    ensure!(value(&s, "AZURE_SUBSCRIPTION_ID").as_deref() == Some(SUBSCRIPTION));

    // Everything from the environment replaces it.
    let from_env = "s3cr3t-from-env-91bc";
    let out = ctl_with(
        &env,
        &env.ns,
        &["azure", "secret"],
        Run {
            envs: &[
                ("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION),
                ("AZURE_TENANT_ID", TENANT),
                ("AZURE_CLIENT_ID", CLIENT),
                ("AZURE_CLIENT_SECRET", from_env),
            ],
            ..Default::default()
        },
    )
    .await?
    .ok()?;
    ensure!(
        !out.all().contains(from_env),
        "secret printed:\n{}",
        out.all()
    );
    let s = secrets.get("peer-pods-secret").await?;
    ensure!(value(&s, "AZURE_CLIENT_SECRET").as_deref() == Some(from_env));
    Ok(())
}

/// Runs `azure secret` on a pseudo-terminal (util-linux `script`), types the secret once the
/// prompt is shown, and checks the terminal never showed it.
async fn secret_prompt(env: Env) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let secret = "typed-at-the-prompt-5e1f";
    let command = format!(
        "{} ctl --kubeconfig {} -n {} azure secret --client-id {CLIENT} --tenant-id {TENANT}",
        env!("CARGO_BIN_EXE_sandboxd"),
        env.cp().kubeconfig_path.display(),
        env.ns
    );
    let mut child = tokio::process::Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .env("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION)
        .env_remove("AZURE_CLIENT_SECRET")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while !String::from_utf8_lossy(&seen).contains("(not echoed): ") {
            let n = stdout.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "no prompt: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        Ok(())
    })
    .await
    .context("waiting for the prompt")??;
    stdin.write_all(format!("{secret}\n").as_bytes()).await?;
    stdin.flush().await?;
    stdout.read_to_end(&mut seen).await?;
    drop(stdin);
    let status = child.wait().await?;
    let shown = String::from_utf8_lossy(&seen);
    ensure!(status.success(), "failed:\n{shown}");
    ensure!(
        !shown.contains(secret),
        "the terminal showed the secret:\n{shown}"
    );
    let secrets: Api<Secret> = Api::namespaced(env.admin().await?, &env.ns);
    let s = secrets.get("peer-pods-secret").await?;
    ensure!(value(&s, "AZURE_CLIENT_SECRET").as_deref() == Some(secret));
    Ok(())
}

async fn secret_missing_key(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    let secrets: Api<Secret> = Api::namespaced(admin, &env.ns);
    let secret = "never-shown-3c9d";
    // No tenant id.
    ctl_with(
        &env,
        &env.ns,
        &["azure", "secret", "--client-id", CLIENT],
        Run {
            envs: &[
                ("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION),
                ("AZURE_CLIENT_SECRET", secret),
            ],
            ..Default::default()
        },
    )
    .await?
    .fails_with(&["AZURE_TENANT_ID", "--tenant-id"])?;
    // No client secret: empty stdin.
    ctl_with(
        &env,
        &env.ns,
        &[
            "azure",
            "secret",
            "--client-id",
            CLIENT,
            "--tenant-id",
            TENANT,
        ],
        Run {
            envs: &[("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION)],
            stdin: Some(""),
            ..Default::default()
        },
    )
    .await?
    .fails_with(&["AZURE_CLIENT_SECRET"])?;
    // A subscription id that is not a GUID: named, and the secret still not shown.
    let out = ctl_with(
        &env,
        &env.ns,
        &[
            "azure",
            "secret",
            "--client-id",
            CLIENT,
            "--tenant-id",
            TENANT,
        ],
        Run {
            envs: &[
                ("AZURE_SUBSCRIPTION_ID", "not-a-guid"),
                ("AZURE_CLIENT_SECRET", secret),
            ],
            ..Default::default()
        },
    )
    .await?
    .fails_with(&["AZURE_SUBSCRIPTION_ID"])?;
    ensure!(!out.all().contains(secret), "{}", out.all());
    ensure!(secrets.get_opt("peer-pods-secret").await?.is_none());
    // A namespace that does not exist: no operator installed there.
    ctl_with(
        &env,
        &format!("{}-none", env.ns),
        &[
            "azure",
            "secret",
            "--client-id",
            CLIENT,
            "--tenant-id",
            TENANT,
        ],
        Run {
            envs: &[
                ("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION),
                ("AZURE_CLIENT_SECRET", secret),
            ],
            ..Default::default()
        },
    )
    .await?
    .fails_with(&["does not exist", "sandboxd ctl install"])?;
    Ok(())
}

async fn ssh_key(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    let secrets: Api<Secret> = Api::namespaced(admin, &env.ns);
    let dir = tempfile::tempdir()?;
    let out = ctl_with(
        &env,
        &env.ns,
        &["ssh-key"],
        Run {
            cwd: Some(dir.path()),
            ..Default::default()
        },
    )
    .await?
    .ok()?;
    ensure!(
        std::fs::read_dir(dir.path())?.next().is_none(),
        "ssh-key wrote files without --out"
    );
    let s = secrets.get("ssh-key-secret").await?;
    let public = value(&s, "id_rsa.pub").context("id_rsa.pub")?;
    ensure!(public.starts_with("ssh-ed25519 AAAA"), "{public}");
    ensure!(out.stdout.contains(public.trim()), "{}", out.all());
    ensure!(
        value(&s, "id_rsa").is_none(),
        "the private key must not be stored"
    );

    // With --out: the private key, 0600, and it is the pair of the stored public key.
    let path = dir.path().join("id_peerpods");
    let path_str = path.display().to_string();
    ctl(&env, &env.ns, &["ssh-key", "--out", &path_str])
        .await?
        .ok()?;
    let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "mode {mode:o}");
    let s = secrets.get("ssh-key-secret").await?;
    let stored = value(&s, "id_rsa.pub").context("id_rsa.pub")?;
    ensure!(stored != public, "a new key was not generated");
    if let Ok(derived) = tokio::process::Command::new("ssh-keygen")
        .args(["-y", "-f", &path_str])
        .output()
        .await
    {
        ensure!(
            derived.status.success(),
            "ssh-keygen cannot read the private key: {}",
            String::from_utf8_lossy(&derived.stderr)
        );
        let derived = String::from_utf8(derived.stdout)?;
        let two = |s: &str| s.split(' ').take(2).collect::<Vec<_>>().join(" ");
        ensure!(two(&derived) == two(&stored), "{derived} vs {stored}");
    }
    // --out never overwrites.
    ctl(&env, &env.ns, &["ssh-key", "--out", &path_str])
        .await?
        .fails_with(&["id_peerpods"])?;
    Ok(())
}

async fn limit(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    let ppcs: Api<PeerPodConfig> = Api::namespaced(admin, &env.ns);
    // No PeerPodConfig yet: says how one comes to be.
    ctl(&env, &env.ns, &["limit", "get"])
        .await?
        .fails_with(&["peerpodconfig-openshift", "kataconfig create --peer-pods"])?;
    let spec: PeerPodConfigSpec = serde_json::from_value(json!({}))?;
    ppcs.create(
        &PostParams::default(),
        &PeerPodConfig::new("peerpodconfig-openshift", spec),
    )
    .await?;
    let out = ctl(&env, &env.ns, &["limit", "get"]).await?.ok()?;
    ensure!(out.stdout.trim() == "10", "{}", out.all());
    ctl(&env, &env.ns, &["limit", "set", "3"]).await?.ok()?;
    ensure!(ppcs.get("peerpodconfig-openshift").await?.spec.limit == "3");
    let out = ctl(&env, &env.ns, &["limit", "get"]).await?.ok()?;
    ensure!(out.stdout.trim() == "3", "{}", out.all());
    ctl(&env, &env.ns, &["limit", "set", "-2"])
        .await?
        .fails_with(&["-2"])?;
    ctl(&env, &env.ns, &["limit", "set", "many"])
        .await?
        .fails_with(&["many"])?;
    ensure!(ppcs.get("peerpodconfig-openshift").await?.spec.limit == "3");
    Ok(())
}

async fn caa_restart(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    ctl(&env, &env.ns, &["caa", "restart"])
        .await?
        .fails_with(&[
            "peerpodconfig-ctrl-caa-daemon",
            "kataconfig create --peer-pods",
        ])?;
    let dss: Api<DaemonSet> = Api::namespaced(admin, &env.ns);
    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "peerpodconfig-ctrl-caa-daemon"},
        "spec": {
            "selector": {"matchLabels": {"app": "caa"}},
            "template": {
                "metadata": {"labels": {"app": "caa"}},
                "spec": {"containers": [{
                    "name": "cc-runtime-install-pod",
                    "image": "sandboxd:latest",
                    "env": [{"name": "KEEP", "value": "me"}],
                }]},
            },
        },
    }))?;
    dss.create(&PostParams::default(), &ds).await?;
    let reboot = |ds: &DaemonSet| {
        ds.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
            .env
            .clone()
            .unwrap_or_default()
    };
    ctl(&env, &env.ns, &["caa", "restart"]).await?.ok()?;
    let first = dss.get("peerpodconfig-ctrl-caa-daemon").await?;
    let env1 = reboot(&first);
    ensure!(env1.iter().any(|e| e.name == "KEEP"), "{env1:?}");
    let v1 = env1
        .iter()
        .find(|e| e.name == "REBOOT")
        .and_then(|e| e.value.clone())
        .context("REBOOT not set")?;
    ensure!(first.metadata.generation == Some(2), "template unchanged");
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    ctl(&env, &env.ns, &["caa", "restart"]).await?.ok()?;
    let second = dss.get("peerpodconfig-ctrl-caa-daemon").await?;
    let v2 = reboot(&second)
        .iter()
        .find(|e| e.name == "REBOOT")
        .and_then(|e| e.value.clone())
        .context("REBOOT not set")?;
    ensure!(v1 != v2, "a second restart did not change the template");
    ensure!(second.metadata.generation == Some(3));
    Ok(())
}

async fn missing_kubeconfig(_env: Env) -> Result<()> {
    raw(
        &["ctl", "--kubeconfig", "/nonexistent/kubeconfig", "status"],
        Run::default(),
    )
    .await?
    .fails_with(&["/nonexistent/kubeconfig"])?;
    Ok(())
}
