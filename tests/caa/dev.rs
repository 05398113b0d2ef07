//! `sandboxd dev arm-server`: the ARM test server as a process, as demos and `ctl` use it.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use sandboxd::cloud::{Provider, VmSpec};

use super::SUB;
use crate::harness::process::{Process, free_port};
use crate::harness::{self, Env};

pub async fn arm_server_subcommand(_env: Env) -> Result<()> {
    let bin = Path::new(env!("CARGO_BIN_EXE_sandboxd"));
    // Hidden from the help, still there.
    let help = std::process::Command::new(bin).arg("--help").output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        !help.lines().any(|l| l.trim_start().starts_with("dev ")),
        "{help}"
    );
    let port = free_port();
    let args: Vec<String> = [
        "dev",
        "arm-server",
        "--addr",
        &format!("127.0.0.1:{port}"),
        "--lro-ms",
        "100",
        "--seed-subscription",
        SUB,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Process::start(&format!("arm-server-{port}"), bin, &args, &[])?;
    let log = server.log_path().to_path_buf();
    let seeded = harness::eventually(
        "the seeded peer-pods-cm keys",
        Duration::from_secs(20),
        || {
            let log = log.clone();
            async move {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                Ok(text
                    .lines()
                    .find_map(|l| l.strip_prefix("AZURE_SUBNET_ID="))
                    .map(str::to_string)
                    .filter(|_| text.contains("ARM test server listening")))
            }
        },
    )
    .await
    .map_err(|e| anyhow!("{e:#}\n{}", server.log_tail(20)))?;
    let base = format!("http://127.0.0.1:{port}/");
    let text = std::fs::read_to_string(&log)?;
    let image = text
        .lines()
        .find_map(|l| l.strip_prefix("AZURE_IMAGE_ID="))
        .context("AZURE_IMAGE_ID printed")?
        .to_string();
    assert!(text.contains(&format!("DEV_ARM_ENDPOINT={base}")));
    let provider = super::provider_at(&base, seeded)?;
    let vm = provider
        .create(&VmSpec {
            name: "podvm-demo-01234567".into(),
            size: "Standard_D2as_v5".into(),
            image_id: image,
            user_data: None,
            ssh_public_key: Some("ssh-ed25519 AAAA demo".into()),
            tags: Default::default(),
        })
        .await?;
    assert!(vm.private_ip.is_some(), "{vm:?}");
    let listed: serde_json::Value = http_get_json(port, "/armtest/vms").await?;
    assert_eq!(listed[0]["name"], "podvm-demo-01234567", "{listed}");
    provider.delete("podvm-demo-01234567").await?;
    assert!(provider.get("podvm-demo-01234567").await?.is_none());
    Ok(())
}

/// A plain HTTP/1.1 GET on loopback (the inspection endpoints speak JSON).
async fn http_get_json(port: u16, path: &str) -> Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").context("HTTP response")?;
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        // One chunk is enough for these small answers.
        let (_, rest) = body.split_once("\r\n").context("chunk")?;
        let end = rest.rfind("\r\n0\r\n").unwrap_or(rest.len());
        return Ok(serde_json::from_str(rest[..end].trim_end())?);
    }
    Ok(serde_json::from_str(body)?)
}
