//! `sandboxd operator`.

/// Flags of `sandboxd operator`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {}

/// Runs `sandboxd operator` until shutdown.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("sandboxd operator is not implemented yet")
}
