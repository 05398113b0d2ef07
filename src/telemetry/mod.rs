//! Logging, metrics and the health/metrics HTTP server shared by every daemon.

pub(crate) mod redact;
mod server;

pub use server::{Readiness, router};
pub(crate) use server::{ReadyFlag, bind, serve};

use std::sync::Arc;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Errors of logging setup and the health server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--log-level` or `RUST_LOG` is not a valid filter.
    #[error(
        "invalid log level {value:?}: {reason} (expected e.g. info, debug or sandboxd=debug,kube=info)"
    )]
    LogLevel {
        /// What was given.
        value: String,
        /// Why it did not parse.
        reason: String,
    },
    /// A global logger was already installed.
    #[error("logging was already initialised")]
    AlreadyInitialised,
    /// The server address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server stopped with an I/O error.
    #[error("serving health and metrics: {0}")]
    Serve(#[source] std::io::Error),
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Logging flags every subcommand shares.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SANDBOXD_LOG_FORMAT")]
    pub(crate) log_format: LogFormat,
    /// Log filter: a level (error, warn, info, debug, trace) or per-module directives such as
    /// `sandboxd=debug,kube=info`. Defaults to `RUST_LOG`, then `info`.
    #[arg(long, global = true, env = "SANDBOXD_LOG_LEVEL")]
    pub(crate) log_level: Option<String>,
}

/// Messages of other crates that say nothing a user can act on, each quiet unless the
/// filter names its crate (see [`LogArgs::filter`]): (crate, directive).
const QUIET: &[(&str, &str)] = &[
    // A warning for every connection whose client sends an IP address as SNI (curl, wrk and
    // other OpenSSL clients do for `https://<ip>/`).
    ("rustls", "rustls::msgs::handshake=error"),
    // `sandboxd agent`'s containers: "cgroup manager V2 will be used" on each container
    // created or removed, and a warning for each cgroup controller of the kernel that
    // libcgroups does not manage (rdma, misc), none of which a container asks for.
    ("libcgroups", "libcgroups=warn,libcgroups::v2::util=error"),
    // "seccomp not available" for every container: libcontainer is built without
    // libseccomp because the agent compiles and installs the container's seccomp profile
    // itself (agent::seccomp), and no_new_privileges is set either way.
    ("libcontainer", "libcontainer::process::init::process=error"),
];

/// A log filter: the documented forms (a level, per-module directives) are a [`Targets`]
/// filter, which costs little per event and little code at start; span and field directives
/// (`sandboxd[admission]=debug`) need an [`EnvFilter`].
#[derive(Debug)]
pub(crate) enum LogFilter {
    /// Levels and per-module directives.
    Targets(Box<Targets>),
    /// Anything else `RUST_LOG` accepts.
    Env(Box<EnvFilter>),
}

impl LogArgs {
    /// The filter in force: `--log-level`, else `RUST_LOG`, else `info`.
    pub(crate) fn filter(&self) -> Result<LogFilter, Error> {
        let value = self
            .log_level
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| "info".to_string());
        // Messages nobody can act on stay quiet unless the filter names their crate or
        // turns logging off.
        let mut effective = value.clone();
        if value.trim() != "off" {
            for (krate, directive) in QUIET {
                if !value.contains(krate) {
                    effective = format!("{effective},{directive}");
                }
            }
        }
        // `Targets` would read a span or field directive as a target name.
        if !value.contains(['[', '{'])
            && let Ok(targets) = effective.parse::<Targets>()
        {
            return Ok(LogFilter::Targets(Box::new(targets)));
        }
        EnvFilter::builder()
            .parse(&effective)
            .map(|f| LogFilter::Env(Box::new(f)))
            .map_err(|e| Error::LogLevel {
                value,
                reason: e.to_string(),
            })
    }
}

/// Where log lines go: a duplicate of stderr taken when the logger is installed, on a high
/// descriptor. A child cloned without `exec` (libcontainer preparing a container in
/// `sandboxd agent`) keeps logging to the agent's stderr this way, not into the container's
/// stderr that it has put on descriptor 2 by then.
static LOG_FILE: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

fn log_writer() -> Box<dyn std::io::Write> {
    match LOG_FILE.get() {
        Some(f) => Box::new(f),
        None => Box::new(std::io::stderr()),
    }
}

fn duplicate_stderr() -> Option<std::fs::File> {
    use nix::fcntl::{FcntlArg, fcntl};
    let fd = fcntl(std::io::stderr(), FcntlArg::F_DUPFD_CLOEXEC(512)).ok()?;
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC just returned this new descriptor; nothing else owns it.
    #[allow(unsafe_code)]
    Some(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// Installs the global logger. Logs go to stderr so stdout stays free for command output,
/// every line through [`redact::redact`] (no token, client secret, storage key or SAS at
/// any level).
pub fn init_logging(args: &LogArgs) -> Result<(), Error> {
    if let Some(f) = duplicate_stderr() {
        let _ = LOG_FILE.set(f);
    }
    let (targets, env) = match args.filter()? {
        LogFilter::Targets(t) => (Some(t), None),
        LogFilter::Env(e) => (None, Some(e)),
    };
    let registry = tracing_subscriber::registry().with(targets).with(env);
    let result = match args.log_format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(redact::RedactingMakeWriter(log_writer))
                    .with_ansi(colours())
                    .with_target(true),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(redact::RedactingMakeWriter(log_writer)),
            )
            .try_init(),
    };
    result.map_err(|_| Error::AlreadyInitialised)
}

/// Colours only for a person at a terminal: not in `kubectl logs`, files or pipes, and not
/// where `NO_COLOR` is set (the pod VM's init sets it: its serial console is a terminal
/// that boot diagnostics store as text).
fn colours() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// A metrics registry under the `sandboxd` prefix, with a `build_info` gauge.
///
/// Components register their metrics into [`Metrics::registry_mut`] at start-up, then share
/// the finished registry with the server through [`Metrics::finish`].
pub struct Metrics {
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry holding `sandboxd_build_info{version, component}`.
    pub(crate) fn new() -> Self {
        Self::for_component("sandboxd")
    }

    /// Like [`Metrics::new`], labelling build info with the running component.
    pub fn for_component(component: &str) -> Self {
        let mut registry = Registry::with_prefix("sandboxd");
        let info = Family::<Vec<(String, String)>, Gauge>::default();
        info.get_or_create(&vec![
            ("version".to_string(), crate::VERSION.to_string()),
            ("component".to_string(), component.to_string()),
        ])
        .set(1);
        registry.register("build_info", "Build information", info);
        Self { registry }
    }

    /// The registry, for registering a component's metrics.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The registry, frozen for serving.
    pub fn finish(self) -> Arc<Registry> {
        Arc::new(self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter_of(level: &str) -> Result<LogFilter, Error> {
        LogArgs {
            log_level: Some(level.into()),
            ..Default::default()
        }
        .filter()
    }

    fn targets_of(level: &str) -> Targets {
        match filter_of(level).unwrap() {
            LogFilter::Targets(t) => *t,
            LogFilter::Env(_) => panic!("{level} is a targets filter"),
        }
    }

    #[test]
    fn clients_sending_an_ip_address_as_sni_are_not_a_warning_unless_rustls_is_named() {
        let sni = |level: &str, at: tracing::Level| {
            targets_of(level).would_enable("rustls::msgs::handshake", &at)
        };
        assert!(!sni("info", tracing::Level::WARN));
        assert!(!sni("warn", tracing::Level::WARN));
        assert!(!sni("sandboxd=debug,kube=info", tracing::Level::WARN));
        assert!(sni("info,rustls=debug", tracing::Level::WARN));
        // Other rustls warnings still show; `off` stays off.
        assert!(targets_of("warn").would_enable("rustls::conn", &tracing::Level::WARN));
        assert!(!sni("off", tracing::Level::ERROR));
    }

    #[test]
    fn container_runtime_chatter_is_quiet_unless_its_crate_is_named() {
        let on = |level: &str, target: &str, at: tracing::Level| {
            targets_of(level).would_enable(target, &at)
        };
        use tracing::Level;
        // Per container: the cgroup manager chosen, controllers it does not manage, and
        // libcontainer's seccomp warning (the agent installs the profile itself).
        assert!(!on("info", "libcgroups::common", Level::INFO));
        assert!(!on("info", "libcgroups::v2::util", Level::WARN));
        assert!(!on(
            "info",
            "libcontainer::process::init::process",
            Level::WARN
        ));
        assert!(!on("debug", "libcgroups::common", Level::INFO));
        // Their real failures still show.
        assert!(on("info", "libcgroups::v2::manager", Level::WARN));
        assert!(on(
            "info",
            "libcontainer::process::init::process",
            Level::ERROR
        ));
        assert!(on("info", "libcontainer::container", Level::WARN));
        // Named, they speak; the other crates stay quiet.
        assert!(on(
            "info,libcgroups=info",
            "libcgroups::common",
            Level::INFO
        ));
        assert!(on(
            "info,libcontainer=debug",
            "libcontainer::process::init::process",
            Level::WARN
        ));
        assert!(!on(
            "info,libcontainer=debug",
            "libcgroups::v2::util",
            Level::WARN
        ));
    }

    #[test]
    fn explicit_log_level_wins_and_bad_filters_name_the_value() {
        let t = targets_of("debug");
        assert!(t.would_enable("anything", &tracing::Level::DEBUG));
        assert!(!t.would_enable("anything", &tracing::Level::TRACE));

        let t = targets_of("sandboxd=debug,kube=warn");
        assert!(t.would_enable("sandboxd::caa", &tracing::Level::DEBUG));
        assert!(!t.would_enable("kube::client", &tracing::Level::INFO));

        assert!(matches!(
            filter_of("sandboxd[admission]=debug").unwrap(),
            LogFilter::Env(_)
        ));

        let err = filter_of("sandboxd=[").unwrap_err().to_string();
        assert!(err.contains("sandboxd=["), "{err}");
    }
}
