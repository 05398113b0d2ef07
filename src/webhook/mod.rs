//! `sandboxd webhook`.

/// Flags of `sandboxd webhook`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {}

/// Runs `sandboxd webhook` until shutdown.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("sandboxd webhook is not implemented yet")
}
