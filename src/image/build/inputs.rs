//! The build inputs as the OCI image carries them, so the in-cluster image Job needs nothing
//! else: `sandboxd image stage-inputs` copies the kernel, the modules the initramfs takes
//! (the requested ones and what they depend on, nothing more) and systemd-boot into a fixed
//! layout, and `sandboxd image job` looks there when it is not told otherwise.
//!
//! Layout below [`DEFAULT_DIR`] (or any root):
//!
//! ```text
//! vmlinuz                      the kernel
//! systemd-bootx64.efi          systemd-boot
//! modules/<version>/…          the chosen .ko files at their paths in the tree,
//!                              plus modules.builtin
//! ```

use std::path::{Path, PathBuf};

use super::{Error, modules};

/// Where the OCI image carries the build inputs.
pub const DEFAULT_DIR: &str = "/usr/share/sandboxd/podvm";
/// The kernel's name in the layout.
pub const KERNEL: &str = "vmlinuz";
/// systemd-boot's name in the layout.
pub const SYSTEMD_BOOT: &str = "systemd-bootx64.efi";
/// The directory holding `<version>/`, the pruned module tree.
pub const MODULES: &str = "modules";

/// The three build inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inputs {
    /// The kernel.
    pub kernel: PathBuf,
    /// The kernel's module tree (`…/<version>`).
    pub modules_dir: PathBuf,
    /// systemd-boot's EFI binary.
    pub systemd_boot: PathBuf,
}

/// What [`stage`] wrote.
#[derive(Clone, Debug)]
pub(crate) struct Staged {
    /// The inputs at their new places.
    pub(crate) inputs: Inputs,
    /// The modules copied, in load order.
    pub(crate) modules: Vec<String>,
    /// Bytes written.
    pub(crate) bytes: u64,
}

fn copy(from: &Path, to: &Path) -> Result<u64, Error> {
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d).map_err(|source| Error::Output {
            path: d.into(),
            source,
        })?;
    }
    std::fs::copy(from, to).map_err(|source| Error::Input {
        path: from.into(),
        source,
    })
}

/// Copies the inputs into the layout under `out`: the kernel, systemd-boot, and of the module
/// tree only `wanted` with their dependencies (what `sandboxd image build` puts in the
/// initramfs) and `modules.builtin`.
pub(crate) fn stage(
    kernel: &Path,
    modules_dir: &Path,
    systemd_boot: &Path,
    wanted: &[String],
    out: &Path,
) -> Result<Staged, Error> {
    let version = modules_dir
        .file_name()
        .ok_or_else(|| Error::Modules(format!("{} names no version", modules_dir.display())))?;
    let resolved = modules::resolve(modules_dir, wanted).map_err(Error::Modules)?;
    let target = out.join(MODULES).join(version);
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(|source| Error::Output {
            path: target.clone(),
            source,
        })?;
    }
    let mut bytes = 0;
    for m in &resolved {
        let rel = m.path.strip_prefix(modules_dir).map_err(|_| {
            Error::Modules(format!(
                "{} is outside {}",
                m.path.display(),
                modules_dir.display()
            ))
        })?;
        bytes += copy(&m.path, &target.join(rel))?;
    }
    let builtin = modules_dir.join("modules.builtin");
    if builtin.exists() {
        bytes += copy(&builtin, &target.join("modules.builtin"))?;
    } else {
        std::fs::create_dir_all(&target).map_err(|source| Error::Output {
            path: target.clone(),
            source,
        })?;
    }
    bytes += copy(kernel, &out.join(KERNEL))?;
    bytes += copy(systemd_boot, &out.join(SYSTEMD_BOOT))?;
    Ok(Staged {
        inputs: Inputs {
            kernel: out.join(KERNEL),
            modules_dir: target,
            systemd_boot: out.join(SYSTEMD_BOOT),
        },
        modules: resolved.into_iter().map(|m| m.name).collect(),
        bytes,
    })
}

/// The inputs laid out under `root`, if all three are there. The module tree is the one
/// directory below `modules/` (the last by name if there are several).
pub fn find(root: &Path) -> Option<Inputs> {
    let kernel = root.join(KERNEL);
    let systemd_boot = root.join(SYSTEMD_BOOT);
    if !kernel.is_file() || !systemd_boot.is_file() {
        return None;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root.join(MODULES))
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    versions.sort();
    Some(Inputs {
        kernel,
        modules_dir: versions.pop()?,
        systemd_boot,
    })
}

/// The inputs to build from: each one given wins; the rest come from the layout under
/// `root`. `None` when something is still missing.
pub(crate) fn choose(
    kernel: Option<&Path>,
    modules_dir: Option<&Path>,
    systemd_boot: Option<&Path>,
    root: &Path,
) -> Option<Inputs> {
    let laid_out = || find(root);
    let layout = if kernel.is_some() && modules_dir.is_some() && systemd_boot.is_some() {
        None
    } else {
        laid_out()
    };
    let pick = |given: Option<&Path>, from: fn(&Inputs) -> &PathBuf| -> Option<PathBuf> {
        given
            .map(Path::to_path_buf)
            .or_else(|| layout.as_ref().map(|l| from(l).clone()))
    };
    Some(Inputs {
        kernel: pick(kernel, |l| &l.kernel)?,
        modules_dir: pick(modules_dir, |l| &l.modules_dir)?,
        systemd_boot: pick(systemd_boot, |l| &l.systemd_boot)?,
    })
}

/// Flags of `sandboxd image stage-inputs`.
#[derive(Debug, Clone, clap::Args)]
pub struct StageArgs {
    /// The kernel (see `sandboxd image build --kernel`).
    #[arg(long)]
    pub(crate) kernel: PathBuf,
    /// The kernel's module tree (`lib/modules/<version>`).
    #[arg(long)]
    pub(crate) modules_dir: PathBuf,
    /// systemd-boot's EFI binary.
    #[arg(long)]
    pub(crate) systemd_boot: PathBuf,
    /// Modules the image loads (their dependencies are added); the build's default.
    #[arg(long, value_delimiter = ',', default_values_t = modules::DEFAULT.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    pub(crate) modules: Vec<String>,
    /// Directory to lay the inputs out in (the image carries them at
    /// `/usr/share/sandboxd/podvm`).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

/// Lay out the inputs; prints a summary on stderr and the three paths on stdout
/// (`KERNEL=`, `MODULES_DIR=`, `SYSTEMD_BOOT=`).
pub(crate) async fn run(args: StageArgs) -> anyhow::Result<()> {
    let staged = tokio::task::spawn_blocking(move || {
        stage(
            &args.kernel,
            &args.modules_dir,
            &args.systemd_boot,
            &args.modules,
            &args.out,
        )
    })
    .await??;
    eprintln!(
        "[image] staged kernel, systemd-boot and {} modules ({:.1} MiB): {}",
        staged.modules.len(),
        staged.bytes as f64 / 1048576.0,
        staged.modules.join(" ")
    );
    println!("KERNEL={}", staged.inputs.kernel.display());
    println!("MODULES_DIR={}", staged.inputs.modules_dir.display());
    println!("SYSTEMD_BOOT={}", staged.inputs.systemd_boot.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let m = dir.join("lib/modules/6.1.0-test");
        std::fs::create_dir_all(m.join("kernel/net")).unwrap();
        std::fs::create_dir_all(m.join("kernel/fs")).unwrap();
        let ko = modules::tests::fake_ko;
        std::fs::write(m.join("kernel/net/vxlan.ko"), ko("depends=udp_tunnel")).unwrap();
        std::fs::write(m.join("kernel/net/udp_tunnel.ko"), ko("depends=")).unwrap();
        std::fs::write(m.join("kernel/fs/btrfs.ko"), ko("depends=")).unwrap();
        std::fs::write(m.join("modules.builtin"), "kernel/fs/vfat.ko\n").unwrap();
        std::fs::write(m.join("modules.order"), "x\n").unwrap();
        std::fs::write(dir.join("vmlinuz-6.1.0-test"), b"MZkernel").unwrap();
        std::fs::write(dir.join("systemd-bootx64.efi"), b"MZboot").unwrap();
        (
            dir.join("vmlinuz-6.1.0-test"),
            m,
            dir.join("systemd-bootx64.efi"),
        )
    }

    fn files(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    walk(root, &e.path(), out);
                } else {
                    out.push(e.path().strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
        walk(root, root, &mut out);
        out.sort();
        out
    }

    #[test]
    fn staging_keeps_only_the_wanted_modules_and_their_dependencies() {
        let dir = tempfile::tempdir().unwrap();
        let (k, m, b) = tree(dir.path());
        let out = dir.path().join("podvm");
        let staged = stage(&k, &m, &b, &["vxlan".into(), "vfat".into()], &out).unwrap();
        assert_eq!(staged.modules, ["udp_tunnel", "vxlan"]);
        assert_eq!(
            files(&out),
            [
                "modules/6.1.0-test/kernel/net/udp_tunnel.ko",
                "modules/6.1.0-test/kernel/net/vxlan.ko",
                "modules/6.1.0-test/modules.builtin",
                "systemd-bootx64.efi",
                "vmlinuz",
            ]
        );
        // The staged tree resolves the same modules again (built-ins still known).
        let again =
            modules::resolve(&staged.inputs.modules_dir, &["vxlan".into(), "vfat".into()]).unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(find(&out), Some(staged.inputs));
    }

    #[test]
    fn given_inputs_win_over_the_layout_and_a_partial_layout_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let (k, m, b) = tree(dir.path());
        let root = dir.path().join("podvm");
        let staged = stage(&k, &m, &b, &["vxlan".into()], &root).unwrap().inputs;
        let mine = Path::new("/elsewhere/vmlinuz");
        let got = choose(Some(mine), None, None, &root).unwrap();
        assert_eq!(got.kernel, mine);
        assert_eq!(got.modules_dir, staged.modules_dir);
        assert_eq!(got.systemd_boot, staged.systemd_boot);
        assert_eq!(choose(None, None, None, &root), Some(staged));
        // Nothing laid out and nothing given: nothing to build from.
        assert_eq!(choose(None, None, None, &dir.path().join("none")), None);
        std::fs::remove_file(root.join(SYSTEMD_BOOT)).unwrap();
        assert_eq!(choose(None, None, None, &root), None);
        assert!(choose(Some(mine), Some(mine), Some(mine), &root).is_some());
    }
}
