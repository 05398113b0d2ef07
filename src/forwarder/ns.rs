//! Entering namespaces at process start, before any thread exists (mount namespaces can only
//! be unshared by a single-threaded process). Used by local pod VMs (`forwarder
//! --unshare-net --private-run DIR`).

use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};

/// Enters a new network namespace when `unshare_net`, then a new mount namespace whose
/// `/run` is `private_run`.
pub fn enter(unshare_net: bool, private_run: Option<&Path>) -> Result<(), String> {
    if unshare_net {
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("new network namespace: {e}"))?;
    }
    if let Some(dir) = private_run {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("new mount namespace: {e}"))?;
        // Nothing mounted from here on propagates back to the node.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(|e| format!("making mounts private: {e}"))?;
        mount(
            Some(dir),
            "/run",
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| format!("mounting {} on /run: {e}", dir.display()))?;
        for d in ["/run/netns", "/run/kata-containers"] {
            std::fs::create_dir_all(d).map_err(|e| format!("creating {d}: {e}"))?;
        }
    }
    Ok(())
}
