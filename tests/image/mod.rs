//! `sandboxd image build`: reproducible output, valid VHD/qcow2 (own parsers and qemu-img),
//! and a boot under qemu + OVMF whose forwarder answers mTLS through a port forward.
//!
//! Inputs (kernel, modules, systemd-boot) come from Debian packages through
//! `scripts/podvm-inputs.sh` (cached). The image's `/init` is the static release binary
//! (`target/x86_64-unknown-linux-musl/dist/sandboxd`, or `SANDBOXD_STATIC_BINARY`).

pub mod agent_vm;
mod bench_podvm;
pub mod boot;
mod oci;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use sandboxd::image::build::{self, Args, Format, gpt, qcow2, vhd};
use tokio::sync::OnceCell;

use crate::harness::Case;

/// Largest image the issue allows.
const MAX_IMAGE: u64 = 128 << 20;

/// The kernel, modules and systemd-boot from Debian packages.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub kernel: PathBuf,
    pub modules_dir: PathBuf,
    pub systemd_boot: PathBuf,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The static sandboxd for the image, if one is built.
pub fn static_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SANDBOXD_STATIC_BINARY").map(PathBuf::from)
        && p.exists()
    {
        return Some(p);
    }
    let p = repo().join("target/x86_64-unknown-linux-musl/dist/sandboxd");
    p.exists().then_some(p)
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Why the build inputs cannot be fetched here, if they cannot.
pub fn inputs_skip() -> Option<String> {
    (!which("apt-get") || !which("dpkg-deb"))
        .then(|| "apt-get and dpkg-deb are needed to fetch the kernel and systemd-boot".into())
}

/// Runs `scripts/podvm-inputs.sh` once per test run.
pub async fn inputs() -> Result<Inputs> {
    static INPUTS: OnceCell<Inputs> = OnceCell::const_new();
    INPUTS
        .get_or_try_init(|| async {
            tokio::task::spawn_blocking(|| {
                let out = Command::new("bash")
                    .arg(repo().join("scripts/podvm-inputs.sh"))
                    .output()
                    .context("running scripts/podvm-inputs.sh")?;
                ensure!(
                    out.status.success(),
                    "scripts/podvm-inputs.sh failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let text = String::from_utf8(out.stdout)?;
                let get = |k: &str| -> Result<PathBuf> {
                    text.lines()
                        .find_map(|l| l.strip_prefix(&format!("{k}=")))
                        .map(PathBuf::from)
                        .with_context(|| format!("podvm-inputs.sh printed no {k}"))
                };
                Ok(Inputs {
                    kernel: get("KERNEL")?,
                    modules_dir: get("MODULES_DIR")?,
                    systemd_boot: get("SYSTEMD_BOOT")?,
                })
            })
            .await?
        })
        .await
        .cloned()
}

pub fn args(i: &Inputs, out: &Path, sandboxd: &Path) -> Args {
    let mut a = Args::new(&i.kernel, &i.modules_dir, &i.systemd_boot, out);
    a.sandboxd = Some(sandboxd.into());
    // Extra initramfs files for a dynamically linked sandboxd in local runs
    // (`SRC:DEST,SRC:DEST`).
    if let Ok(extra) = std::env::var("SANDBOXD_PODVM_ADD_FILES") {
        a.add_files = extra.split(',').map(String::from).collect();
    }
    a
}

/// One image per test run, shared by the checks and the boot test.
pub struct Shared {
    /// Holds the outputs until the run ends.
    pub _dir: tempfile::TempDir,
    pub built: build::Built,
    pub seconds: f64,
    pub sandboxd: PathBuf,
}

fn init_binary() -> PathBuf {
    // Any file will do for the format checks; the boot test needs the static binary.
    static_binary().unwrap_or_else(|| std::env::current_exe().expect("test binary path"))
}

pub async fn shared() -> Result<&'static Shared> {
    static SHARED: OnceCell<Shared> = OnceCell::const_new();
    SHARED
        .get_or_try_init(|| async {
            let i = inputs().await?;
            let dir = tempfile::tempdir()?;
            let sandboxd = init_binary();
            let a = args(&i, dir.path(), &sandboxd);
            let start = Instant::now();
            let built = tokio::task::spawn_blocking(move || build::build(&a)).await??;
            Ok(Shared {
                _dir: dir,
                built,
                seconds: start.elapsed().as_secs_f64(),
                sandboxd,
            })
        })
        .await
}

pub fn output(b: &build::Built, f: Format) -> Result<&Path> {
    b.outputs
        .iter()
        .find(|(g, _)| *g == f)
        .map(|(_, p)| p.as_path())
        .with_context(|| format!("no {f:?} output"))
}

async fn reproducible_within_budget() -> Result<()> {
    let first = shared().await?;
    let i = inputs().await?;
    let dir = tempfile::tempdir()?;
    let a = args(&i, dir.path(), &first.sandboxd);
    let start = Instant::now();
    let second = tokio::task::spawn_blocking(move || build::build(&a)).await??;
    let seconds = start.elapsed().as_secs_f64();
    eprintln!(
        "image build: {:.1} MiB disk, initramfs {:.1} MiB, {:.1}s and {:.1}s (debug build of the library)",
        first.built.disk_size as f64 / 1048576.0,
        first.built.initramfs_size as f64 / 1048576.0,
        first.seconds,
        seconds
    );
    for f in [Format::Raw, Format::Qcow2, Format::Vhd] {
        let a = std::fs::read(output(&first.built, f)?)?;
        let b = std::fs::read(output(&second, f)?)?;
        ensure!(
            a.len() == b.len(),
            "{f:?}: sizes differ ({} vs {})",
            a.len(),
            b.len()
        );
        if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
            bail!("{f:?}: two builds from the same inputs differ at byte {at}");
        }
    }
    let raw_len = std::fs::metadata(output(&first.built, Format::Raw)?)?.len();
    ensure!(
        raw_len <= MAX_IMAGE,
        "image is {raw_len} bytes, over 128 MiB"
    );
    ensure!(
        raw_len % (1 << 20) == 0,
        "image size {raw_len} is not whole MiB"
    );
    Ok(())
}

async fn formats_are_valid() -> Result<()> {
    let s = shared().await?;
    let raw = std::fs::read(output(&s.built, Format::Raw)?)?;
    let t = gpt::parse(&raw).map_err(anyhow::Error::msg)?;
    ensure!(
        t.partitions.len() == 1 && t.partitions[0].type_guid == gpt::ESP_TYPE,
        "expected one EFI system partition: {t:?}"
    );
    let esp = &raw
        [t.partitions[0].first_lba as usize * 512..(t.partitions[0].last_lba as usize + 1) * 512];
    let boot = build::fat::read_file(esp, "EFI/BOOT/BOOTX64.EFI").map_err(anyhow::Error::msg)?;
    ensure!(boot.starts_with(b"MZ"), "BOOTX64.EFI is not a PE image");
    let entry =
        build::fat::read_file(esp, "loader/entries/sandboxd.conf").map_err(anyhow::Error::msg)?;
    ensure!(String::from_utf8_lossy(&entry).contains("initrd /sandboxd/initrd.img"));

    let vhd_path = output(&s.built, Format::Vhd)?;
    let vhd_bytes = std::fs::read(vhd_path)?;
    let footer = vhd::parse_footer(&vhd_bytes).map_err(anyhow::Error::msg)?;
    ensure!(footer.size == raw.len() as u64 && footer.size % (1 << 20) == 0);
    ensure!(
        vhd_bytes[..raw.len()] == raw[..],
        "VHD data differs from the raw disk"
    );

    let qcow = output(&s.built, Format::Qcow2)?;
    ensure!(
        qcow2::to_raw(&std::fs::read(qcow)?).map_err(anyhow::Error::msg)? == raw,
        "qcow2 does not read back as the raw disk"
    );
    if which("qemu-img") {
        let info = Command::new("qemu-img")
            .args(["info", "-f", "vpc", "--output", "json"])
            .arg(vhd_path)
            .output()?;
        ensure!(
            info.status.success(),
            "qemu-img info: {}",
            String::from_utf8_lossy(&info.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&info.stdout)?;
        ensure!(
            v["format"] == "vpc",
            "qemu-img reads format {}",
            v["format"]
        );
        ensure!(
            v["virtual-size"].as_u64() == Some(raw.len() as u64),
            "qemu-img virtual size {} != {}",
            v["virtual-size"],
            raw.len()
        );
        let check = Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(qcow)
            .output()?;
        ensure!(
            check.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let cmp = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(output(&s.built, Format::Raw)?)
            .arg(qcow)
            .output()?;
        ensure!(
            cmp.status.success(),
            "qemu-img compare: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
    }
    Ok(())
}

pub fn cases() -> Vec<Case> {
    let skip = inputs_skip();
    let qemu_img =
        inputs_skip().or_else(|| (!which("qemu-img")).then(|| "qemu-img not installed".into()));
    vec![
        Case::plain(
            "image::two_builds_from_the_same_inputs_are_byte_identical_and_fit_128_mib",
            |_| reproducible_within_budget(),
        )
        .skip_if(skip.clone()),
        Case::plain(
            "image::vhd_footer_gpt_and_qcow2_are_valid_for_own_parsers_and_qemu_img",
            |_| formats_are_valid(),
        )
        .skip_if(qemu_img),
        oci::case(skip.clone()),
        boot::case(skip.clone()),
        agent_vm::case(skip.clone()),
        bench_podvm::case(skip),
    ]
}
