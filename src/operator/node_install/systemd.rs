//! Restarting the container runtime through systemd's D-Bus API (pure Rust, no shell).

use std::path::PathBuf;

use super::Error;

/// Restarts systemd units. Behind a trait so host edits can be tested without systemd.
pub trait ServiceManager: Send + Sync {
    /// Restarts `unit` (queued as a `replace` job).
    fn restart(&self, unit: &str) -> impl std::future::Future<Output = Result<(), Error>> + Send;
}

/// systemd on the host's system bus socket.
#[derive(Clone, Debug)]
pub(crate) struct SystemdDbus {
    /// The bus socket (the host's `/run/dbus/system_bus_socket`, mounted in).
    pub(crate) socket: PathBuf,
}

impl ServiceManager for SystemdDbus {
    async fn restart(&self, unit: &str) -> Result<(), Error> {
        let dbus = |reason: String| Error::Systemd {
            unit: unit.to_string(),
            reason,
        };
        let address = format!("unix:path={}", self.socket.display());
        let conn = zbus::connection::Builder::address(address.as_str())
            .map_err(|e| dbus(format!("bus address {address}: {e}")))?
            .build()
            .await
            .map_err(|e| dbus(format!("connecting to {address}: {e}")))?;
        let proxy = zbus::Proxy::new(
            &conn,
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
        )
        .await
        .map_err(|e| dbus(e.to_string()))?;
        let job: zbus::zvariant::OwnedObjectPath = proxy
            .call("RestartUnit", &(unit, "replace"))
            .await
            .map_err(|e| dbus(e.to_string()))?;
        tracing::info!(unit, job = %job.as_str(), "restart queued");
        Ok(())
    }
}

/// A service manager that records restarts (tests and dry runs).
#[derive(Debug, Default)]
pub struct Recorded {
    /// Units restarted, in order.
    pub restarted: std::sync::Mutex<Vec<String>>,
}

impl ServiceManager for Recorded {
    async fn restart(&self, unit: &str) -> Result<(), Error> {
        self.restarted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(unit.to_string());
        Ok(())
    }
}
