//! `sandboxd caa`.

/// Flags of `sandboxd caa`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {}

/// Runs `sandboxd caa` until shutdown.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("sandboxd caa is not implemented yet")
}
