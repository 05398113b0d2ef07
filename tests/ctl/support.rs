//! Running `sandboxd ctl` as a user would: the built binary, the test kubeconfig, a namespace.

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;

use crate::harness::Env;

/// What one run printed and how it ended.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    /// Both streams, for assertions about what was (not) printed.
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    /// Fails unless the run succeeded.
    pub fn ok(self) -> Result<Self> {
        anyhow::ensure!(
            self.code == 0,
            "ctl failed ({}):\n{}",
            self.code,
            self.all()
        );
        Ok(self)
    }

    /// Fails unless the run failed with a message containing every `needle`.
    pub fn fails_with(self, needles: &[&str]) -> Result<Self> {
        anyhow::ensure!(
            self.code != 0,
            "ctl succeeded but should not:\n{}",
            self.all()
        );
        for n in needles {
            anyhow::ensure!(
                self.stderr.contains(n),
                "stderr lacks {n:?}:\n{}",
                self.all()
            );
        }
        Ok(self)
    }
}

/// Options of one run.
#[derive(Default)]
pub struct Run<'a> {
    pub envs: &'a [(&'a str, &'a str)],
    pub stdin: Option<&'a str>,
    pub cwd: Option<&'a Path>,
}

/// `sandboxd ctl --kubeconfig <test cluster> -n <ns> <args>`.
pub async fn ctl(env: &Env, ns: &str, args: &[&str]) -> Result<Out> {
    ctl_with(env, ns, args, Run::default()).await
}

/// [`ctl`] with environment, stdin and working directory.
pub async fn ctl_with(env: &Env, ns: &str, args: &[&str], run: Run<'_>) -> Result<Out> {
    let kubeconfig = env.cp().kubeconfig_path.display().to_string();
    let mut full = vec!["ctl", "--kubeconfig", &kubeconfig, "-n", ns];
    full.extend_from_slice(args);
    raw(&full, run).await
}

/// The binary with exactly `args`.
pub async fn raw(args: &[&str], run: Run<'_>) -> Result<Out> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandboxd"));
    cmd.args(args)
        .env_remove("KUBECONFIG")
        .env_remove("AZURE_CLIENT_ID")
        .env_remove("AZURE_CLIENT_SECRET")
        .env_remove("AZURE_TENANT_ID")
        .env_remove("AZURE_SUBSCRIPTION_ID")
        .envs(run.envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = run.cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().context("starting sandboxd")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    if let Some(text) = run.stdin {
        stdin.write_all(text.as_bytes()).await?;
    }
    drop(stdin);
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        child.wait_with_output(),
    )
    .await
    .context("sandboxd ctl did not finish in 120s")??;
    Ok(Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
