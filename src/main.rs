//! The `sandboxd` binary: parse, set up crypto and logging, dispatch.

use std::process::ExitCode;

#[cfg(feature = "dev")]
use sandboxd::cli::DevCommand;
use sandboxd::cli::{Cli, Command};

fn main() -> ExitCode {
    // The pause process of a pod's sandbox container (PID 1 of its own pid namespace).
    if sandboxd::agent::pause::is_pause() {
        return sandboxd::agent::pause::main();
    }
    // PID 1 of a pod VM (or started as /init): the init duties, no command line.
    if sandboxd::forwarder::init::should_run() {
        return sandboxd::forwarder::init::main();
    }
    // containerd's shim for kata-remote (`containerd-shim-sandboxd-v2`): Go-style flags, its
    // own runtime and logging.
    if sandboxd::shim::started_as_shim() {
        return sandboxd::shim::main();
    }
    let cli = sandboxd::cli::parse();
    if let Command::Shim(args) = &cli.command {
        return sandboxd::shim::run_args(&args.args);
    }
    // Namespaces are entered while the process still has one thread.
    let (unshare_net, private_run) = match &cli.command {
        Command::Forwarder(a) => (a.unshare_net, a.private_run.as_deref()),
        _ => (false, None),
    };
    if let Err(e) = sandboxd::forwarder::ns::enter(unshare_net, private_run) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    // One TLS crypto provider for every client and server in the process.
    let _ = sandboxd::pki::tls_provider().install_default();
    if let Err(e) = sandboxd::telemetry::init_logging(&cli.log) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // The webhook answers each request in tens of microseconds: one thread serves it with no
    // hand-offs between threads (measured faster than the multi-threaded runtime on one core).
    // The agent clones container processes (libcontainer): with one thread, no other thread
    // can hold a lock (the allocator's included) that the child would inherit locked.
    // The forwarder relays one pod's few connections: one thread hands a message from the
    // socket it arrived on to the next with no wake-up of another CPU of the VM.
    let mut builder = match &cli.command {
        Command::Webhook(_) | Command::Agent(_) | Command::Forwarder(_) => {
            tokio::runtime::Builder::new_current_thread()
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Operator(args) => sandboxd::operator::run(args).await,
        Command::Webhook(args) => sandboxd::webhook::run(args).await,
        Command::Caa(args) => sandboxd::caa::run(args).await,
        Command::CaaRelay(args) => sandboxd::caa::noderelay::run(args).await,
        Command::Forwarder(args) => sandboxd::forwarder::run(args).await,
        Command::Agent(args) => {
            Ok(sandboxd::agent::run(args, sandboxd::shutdown::on_signals()?).await?)
        }
        Command::Shim(_) => unreachable!("the shim runs before the async runtime"),
        Command::Image(cmd) => sandboxd::image::run(cmd).await,
        Command::Ctl(args) => sandboxd::ctl::run(args).await,
        Command::MustGatherPod(args) => sandboxd::ctl::support_bundle::pod::run(args).await,
        #[cfg(feature = "dev")]
        Command::Dev(DevCommand::ArmServer(args)) => {
            Ok(sandboxd::armtest::run(args, sandboxd::shutdown::on_signals()?).await?)
        }
        #[cfg(feature = "dev")]
        Command::Dev(DevCommand::ControlPlane(args)) => Ok(sandboxd::devenv::control_plane::run(
            args,
            sandboxd::shutdown::on_signals()?,
        )
        .await?),
        #[cfg(feature = "dev")]
        Command::Dev(DevCommand::Kubelet(args)) => {
            sandboxd::devenv::kubelet::run(args, sandboxd::shutdown::on_signals()?).await
        }
        #[cfg(feature = "dev")]
        Command::Dev(DevCommand::Node(args)) => {
            sandboxd::devenv::node::run(args, sandboxd::shutdown::on_signals()?).await
        }
        #[cfg(feature = "dev")]
        Command::Dev(DevCommand::Agent(args)) => {
            Ok(sandboxd::devenv::agent::run(args, sandboxd::shutdown::on_signals()?).await?)
        }
        Command::Version => {
            println!(
                "sandboxd {} ({}-{})",
                sandboxd::VERSION,
                std::env::consts::ARCH,
                std::env::consts::OS
            );
            Ok(())
        }
    }
}
