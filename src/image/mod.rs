//! `sandboxd image`: build the pod VM image, publish it to Azure, delete what was published,
//! and the in-cluster image Job that does build + publish in one process.

pub mod build;
pub mod publish;

use clap::Subcommand;

/// The image tools.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the pod VM disk image (raw, qcow2, fixed VHD).
    Build(build::Args),
    /// Lay out the build inputs (kernel, the modules the image takes, systemd-boot) as the
    /// OCI image carries them for the image Job.
    StageInputs(build::inputs::StageArgs),
    /// Upload a VHD to Azure and create an image from it.
    Publish(publish::Args),
    /// Delete an image (and its blob) that `sandboxd image publish` created.
    Delete(publish::DeleteArgs),
    /// In-cluster Job: build (or take a prebuilt VHD), publish, record `AZURE_IMAGE_ID`.
    Job(publish::JobArgs),
}

/// Run one image tool.
pub async fn run(cmd: ImageCommand) -> anyhow::Result<()> {
    match cmd {
        ImageCommand::Build(args) => build::run(args).await,
        ImageCommand::StageInputs(args) => build::inputs::run(args).await,
        ImageCommand::Publish(args) => publish::run(args).await,
        ImageCommand::Delete(args) => publish::run_delete(args).await,
        ImageCommand::Job(args) => publish::run_job(args).await,
    }
}
