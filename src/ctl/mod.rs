//! `sandboxd ctl`: the user's command line for every step of the setup guide.
//!
//! kubectl-style global flags (`--kubeconfig`, `--context`, `-n`, `-o`) and one
//! subcommand per step. Each subcommand lives in its own file; this module only parses
//! and dispatches.

pub(crate) mod azure_arm;
pub(crate) mod azure_configmap;
pub(crate) mod azure_nsg;
#[cfg(test)]
mod bundle;
pub(crate) mod caa;
pub(crate) mod doctor;
pub mod install;
pub(crate) mod kataconfig;
pub(crate) mod limit;
pub(crate) mod output;
pub(crate) mod secret;
pub(crate) mod ssh_key;
pub(crate) mod status;
pub mod support_bundle;
pub(crate) mod vm;

use crate::k8s::KubeArgs;

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Output {
    /// Human-readable columns.
    #[default]
    Table,
    /// YAML.
    Yaml,
    /// JSON.
    Json,
}

/// Flags of `sandboxd ctl`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How to reach the API server (`--kubeconfig`, `--context`).
    #[command(flatten)]
    pub(crate) kube: KubeArgs,
    /// The namespace of the operator and the peer-pods configuration.
    #[arg(short = 'n', long, global = true, default_value = crate::api::names::DEFAULT_NAMESPACE)]
    pub(crate) namespace: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,
    /// The command.
    #[command(subcommand)]
    pub(crate) command: CtlCommand,
}

/// Commands of `sandboxd ctl`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum CtlCommand {
    /// Install the CRDs, namespace, RBAC and operator Deployment (server-side apply).
    Install(install::InstallArgs),
    /// Remove what `install` added (refused while a KataConfig exists).
    Uninstall(install::UninstallArgs),
    /// Azure configuration: the credentials secret and the peer-pods ConfigMap.
    #[command(subcommand)]
    Azure(AzureCommand),
    /// Generate an SSH key pair in memory and store the public key in `ssh-key-secret`.
    SshKey(ssh_key::Args),
    /// Create the KataConfig.
    #[command(subcommand)]
    Kataconfig(kataconfig::Command),
    /// Get or set the peer-pod VM limit per node.
    #[command(subcommand)]
    Limit(limit::Command),
    /// Operate the cloud-api-adaptor DaemonSet.
    #[command(subcommand)]
    Caa(caa::Command),
    /// Show installation progress, readiness and VM usage; non-zero exit on failure.
    Status(status::Args),
    /// Check the whole chain and print each finding with its fix.
    Doctor(doctor::Args),
    /// Peer-pod VMs.
    #[command(subcommand)]
    Vm(vm::Command),
    /// Collect objects, logs, doctor findings and versions into one .tar.gz for a bug
    /// report, every credential redacted.
    SupportBundle(support_bundle::BundleArgs),
    /// The support bundle as files under /must-gather (the `oc adm must-gather --image`
    /// entry point; the binary runs it when invoked as `gather`).
    MustGather(support_bundle::MustGatherArgs),
}

/// `sandboxd ctl azure ...`.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum AzureCommand {
    /// Create `peer-pods-secret` from flags, `AZURE_*` environment or a prompt.
    Secret(secret::Args),
    /// Discover the Azure network and write `peer-pods-cm`.
    Configmap(azure_configmap::Args),
}

/// What every command gets: how to reach the cluster, the namespace and output format.
#[derive(Clone, Debug)]
pub(crate) struct Ctx {
    /// Kubeconfig and context.
    pub(crate) kube: KubeArgs,
    /// The operator / configuration namespace.
    pub(crate) namespace: String,
    /// Output format.
    pub(crate) output: Output,
}

impl Ctx {
    /// A client for the selected cluster.
    pub(crate) async fn client(&self) -> anyhow::Result<kube::Client> {
        Ok(self.kube.client().await?)
    }
}

/// Run one `ctl` command.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let ctx = Ctx {
        kube: args.kube,
        namespace: args.namespace,
        output: args.output,
    };
    match args.command {
        CtlCommand::Install(a) => install::install(&ctx, a).await,
        CtlCommand::Uninstall(a) => install::uninstall(&ctx, a).await,
        CtlCommand::Azure(AzureCommand::Secret(a)) => secret::run(&ctx, a).await,
        CtlCommand::Azure(AzureCommand::Configmap(a)) => azure_configmap::run(&ctx, a).await,
        CtlCommand::SshKey(a) => ssh_key::run(&ctx, a).await,
        CtlCommand::Kataconfig(c) => kataconfig::run(&ctx, c).await,
        CtlCommand::Limit(c) => limit::run(&ctx, c).await,
        CtlCommand::Caa(c) => caa::run(&ctx, c).await,
        CtlCommand::Status(a) => status::run(&ctx, a).await,
        CtlCommand::Doctor(a) => doctor::run(&ctx, a).await,
        CtlCommand::Vm(c) => vm::run(&ctx, c).await,
        CtlCommand::SupportBundle(a) => support_bundle::run(&ctx, a).await,
        CtlCommand::MustGather(a) => support_bundle::must_gather(&ctx, a).await,
    }
}
