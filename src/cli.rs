//! The command line: global flags and one subcommand per component.
//!
//! Argument structs are plain data so tests can build them without parsing.

use clap::{Parser, Subcommand};

use crate::telemetry::LogArgs;

/// sandboxd: Kubernetes pods in their own cloud VMs, from one binary.
#[derive(Debug, Parser)]
#[command(name = "sandboxd", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Logging flags, shared by every subcommand.
    #[command(flatten)]
    pub log: LogArgs,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The components and tools of sandboxd.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator: KataConfig, PeerPodConfig and PeerPod controllers.
    Operator(crate::operator::Args),
    /// Run the mutating admission webhook for peer pods.
    Webhook(crate::webhook::Args),
    /// Run the cloud-api-adaptor on a node.
    Caa(crate::caa::Args),
    /// Run the node agent relay beside CAA: the pods' agent sockets and the hypervisor
    /// socket, kept open across CAA restarts and rollouts.
    CaaRelay(crate::caa::noderelay::Args),
    /// Run the agent-protocol forwarder inside a pod VM.
    Forwarder(crate::forwarder::Args),
    /// Run the kata agent API inside a pod VM: sandboxes, containers, images, stdio.
    Agent(crate::agent::Args),
    /// containerd's runtime v2 shim for `kata-remote` (installed on nodes as
    /// `containerd-shim-sandboxd-v2`; containerd's own flags follow).
    Shim(crate::shim::Args),
    /// Build, publish and delete the pod VM image.
    #[command(subcommand)]
    Image(crate::image::ImageCommand),
    /// The user's command line: install, configure, check and inspect peer pods.
    Ctl(crate::ctl::Args),
    /// Print the version and build target.
    Version,
    /// Developer tools, not part of a deployment (hidden from help; builds with the `dev`
    /// feature only).
    #[cfg(feature = "dev")]
    #[command(subcommand, hide = true)]
    Dev(DevCommand),
    /// What the binary runs as `/bin/bash` and `/usr/bin/tar` in an `oc adm must-gather`
    /// pod (hidden from help).
    #[command(hide = true)]
    MustGatherPod(crate::ctl::support_bundle::pod::Args),
}

/// Developer tools: test peers that demos and `ctl` dry runs start as processes.
#[cfg(feature = "dev")]
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Serve the ARM test server (the Azure Resource Manager subset sandboxd uses).
    ArmServer(crate::armtest::Args),
    /// Run a local control plane from the cached test binaries (for `make demo`).
    ControlPlane(crate::devenv::control_plane::Args),
    /// A kubelet stand-in that drives the CAA hypervisor API for bound peer pods (fake
    /// nodes in numbers).
    Kubelet(crate::devenv::kubelet::Args),
    /// A real node (kubelet, containerd, kube-proxy) joined to a `dev control-plane`, in its
    /// own network and mount namespaces (root).
    Node(crate::devenv::node::Args),
    /// A kata-agent stand-in on a unix socket: answers health checks, runs no containers.
    Agent(crate::devenv::agent::Args),
}

// `sandboxd webhook` on its own: the same flags, help and version as `Command::Webhook`
// under `Cli` (the about line is that variant's).
#[derive(Debug, Parser)]
#[command(
    name = "sandboxd-webhook",
    bin_name = "sandboxd webhook",
    version,
    about = "Run the mutating admission webhook for peer pods",
    long_about = None
)]
struct WebhookCli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    args: crate::webhook::Args,
}

/// Parses the process's command line (exits with clap's message on a bad one).
///
/// `sandboxd webhook` parses only its own flags: building every component's command tree is
/// most of what the webhook would otherwise touch of the binary before its first request,
/// and its memory is a goal of its own. Other commands (and global flags given before the
/// subcommand) take the full tree.
pub fn parse() -> Cli {
    parse_from(std::env::args_os())
}

/// [`parse`] over the given arguments (the first is the program name).
pub(crate) fn parse_from<I, T>(args: I) -> Cli
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    if let Some(host) = plugin_host(args.first()) {
        // `kubectl sandboxd ...`: ctl's flags, help and errors under the name the user typed.
        use clap::{CommandFactory, FromArgMatches};
        let cmd = PluginCli::command().bin_name(format!("{host} sandboxd"));
        let p =
            PluginCli::from_arg_matches(&cmd.get_matches_from(args)).unwrap_or_else(|e| e.exit());
        return Cli {
            log: p.log,
            command: Command::Ctl(p.ctl),
        };
    }
    if let Some(prefix) = invoked_as(args.first()) {
        args.splice(0..1, prefix.iter().map(std::ffi::OsString::from));
    }
    if args.get(1).is_some_and(|a| a == "webhook") {
        let w = WebhookCli::parse_from(&args[1..]);
        return Cli {
            log: w.log,
            command: Command::Webhook(w.args),
        };
    }
    Cli::parse_from(args)
}

/// Program names under which the binary acts as one of its commands (multi-call binary;
/// kubectl's and oc's plugin names are [`plugin_host`]'s): the pod of `oc adm must-gather`
/// runs `/usr/bin/gather` through `/bin/bash -c`, and copies the result out with `tar` (see
/// [`crate::ctl::support_bundle::pod`]).
const INVOKED_AS: [(&str, &[&str]); 3] = [
    ("gather", &["sandboxd", "ctl", "must-gather"]),
    ("bash", &["sandboxd", "must-gather-pod", "shell", "--"]),
    ("tar", &["sandboxd", "must-gather-pod", "tar", "--"]),
];

/// `sandboxd ctl` as a kubectl or oc plugin (the same flags and commands).
#[derive(Debug, Parser)]
#[command(
    name = "kubectl-sandboxd",
    version,
    about = "The user's command line: install, configure, check and inspect peer pods",
    long_about = None
)]
struct PluginCli {
    #[command(flatten)]
    log: LogArgs,
    #[command(flatten)]
    ctl: crate::ctl::Args,
}

/// `kubectl` or `oc` when the binary runs as their plugin.
fn plugin_host(argv0: Option<&std::ffi::OsString>) -> Option<&'static str> {
    let name = std::path::Path::new(argv0?).file_name()?.to_str()?;
    match name {
        "kubectl-sandboxd" => Some("kubectl"),
        "oc-sandboxd" => Some("oc"),
        _ => None,
    }
}

/// The arguments that replace the program name when it is one of [`INVOKED_AS`].
fn invoked_as(argv0: Option<&std::ffi::OsString>) -> Option<&'static [&'static str]> {
    let name = std::path::Path::new(argv0?).file_name()?.to_str()?;
    INVOKED_AS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, prefix)| *prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The short path and the full tree must agree: the same flags, defaults and help.
    fn both(argv: &[&str]) -> (String, String) {
        let short = format!("{:?}", parse_from(argv.iter().copied()));
        let full = format!("{:?}", Cli::parse_from(argv.iter().copied()));
        (short, full)
    }

    #[test]
    fn webhook_flags_parse_the_same_on_the_short_path_as_in_the_full_command_tree() {
        for argv in [
            &["sandboxd", "webhook"][..],
            &[
                "sandboxd",
                "webhook",
                "--cert-dir",
                "/certs",
                "--port",
                "8443",
                "--bind-address",
                "127.0.0.1",
                "--log-level",
                "warn",
                "--log-format",
                "json",
                "--allowed-namespaces",
                "a,b-*",
                "--never-mutate-namespaces",
                "kube-system",
                "--max-body-bytes",
                "1000",
            ],
        ] {
            let (short, full) = both(argv);
            assert_eq!(short, full, "{argv:?}");
        }
    }

    #[test]
    fn webhook_help_and_version_read_the_same_on_the_short_path_as_in_the_full_tree() {
        for flag in ["--help", "--version"] {
            let short = parse_err(["webhook", flag]);
            let full = Cli::try_parse_from(["sandboxd", "webhook", flag])
                .expect_err("help and version exit early")
                .to_string();
            assert_eq!(sorted_entries(&short), sorted_entries(&full), "{flag}");
        }
    }

    fn parse_err<const N: usize>(argv: [&str; N]) -> String {
        WebhookCli::try_parse_from(argv)
            .expect_err("help and version exit early")
            .to_string()
    }

    /// Help text with its option entries sorted (the full tree lists the global flags
    /// among the subcommand's own).
    fn sorted_entries(help: &str) -> Vec<String> {
        let mut entries: Vec<String> = Vec::new();
        for line in help.lines() {
            if line.starts_with("  -") || line.starts_with("      --") || entries.is_empty() {
                entries.push(String::new());
            }
            let last = entries.last_mut().expect("an entry");
            last.push_str(line.trim_end());
            last.push('\n');
        }
        entries.sort();
        entries
    }

    #[test]
    fn webhook_short_path_rejects_what_the_full_tree_rejects_and_names_the_flag() {
        let short = WebhookCli::try_parse_from(["sandboxd webhook", "--port", "nine"])
            .expect_err("a bad port");
        let full =
            Cli::try_parse_from(["sandboxd", "webhook", "--port", "nine"]).expect_err("a bad port");
        assert_eq!(short.kind(), full.kind());
        assert!(short.to_string().contains("--port"), "{short}");
    }

    #[test]
    fn the_command_tree_passes_clap_s_own_checks() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn invoked_as_a_kubectl_or_oc_plugin_the_binary_is_ctl_and_as_gather_it_is_must_gather() {
        use clap::CommandFactory;
        for argv0 in ["kubectl-sandboxd", "/usr/local/bin/oc-sandboxd"] {
            let cli = parse_from([argv0, "-n", "ns", "limit", "get"]);
            let Command::Ctl(ctl) = cli.command else {
                panic!("{argv0} runs ctl")
            };
            assert_eq!(ctl.namespace, "ns");
            assert!(matches!(ctl.command, crate::ctl::CtlCommand::Limit(_)));
        }
        let help = PluginCli::command()
            .bin_name("kubectl sandboxd")
            .try_get_matches_from(["kubectl-sandboxd", "--help"])
            .expect_err("help exits")
            .to_string();
        assert!(
            help.contains("Usage: kubectl sandboxd [OPTIONS] <COMMAND>"),
            "{help}"
        );
        PluginCli::command().debug_assert();
        let cli = parse_from(["/usr/bin/gather"]);
        let Command::Ctl(ctl) = cli.command else {
            panic!("gather runs ctl must-gather")
        };
        assert!(matches!(ctl.command, crate::ctl::CtlCommand::MustGather(_)));
        // The must-gather pod's shell and tar: their arguments pass through untouched.
        let cli = parse_from(["/bin/bash", "-c", "trap : TERM INT; sleep infinity & wait"]);
        let Command::MustGatherPod(pod) = cli.command else {
            panic!("bash runs the must-gather pod stand-in")
        };
        assert!(matches!(
            pod.command,
            crate::ctl::support_bundle::pod::Command::Shell { ref args } if args[0] == "-c"
        ));
        let cli = parse_from(["tar", "-C", "/must-gather/", "-c", "."]);
        let Command::MustGatherPod(pod) = cli.command else {
            panic!("tar runs the must-gather pod stand-in")
        };
        assert!(matches!(
            pod.command,
            crate::ctl::support_bundle::pod::Command::Tar { ref args } if args.len() == 4
        ));
        // Any other name is the plain binary.
        assert!(matches!(
            parse_from(["sandboxd-v2", "version"]).command,
            Command::Version
        ));
    }

    #[test]
    fn other_commands_and_global_flags_before_the_subcommand_take_the_full_tree() {
        let cli = parse_from(["sandboxd", "--log-level", "debug", "webhook"]);
        assert!(matches!(cli.command, Command::Webhook(_)));
        assert_eq!(cli.log.log_level.as_deref(), Some("debug"));
        assert!(matches!(
            parse_from(["sandboxd", "version"]).command,
            Command::Version
        ));
    }
}
