//! The release binary is fully static: no ELF program interpreter, no dynamic section. The
//! shipped build (without the `dev` feature) has no `dev` subcommand, no crash points and no
//! local provider.

use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};

use crate::harness::Case;

fn release_binary() -> PathBuf {
    std::env::var_os("SANDBOXD_STATIC_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("target/x86_64-unknown-linux-musl/dist/sandboxd")
        })
}

/// The binary `make build` ships (`SANDBOXD_SHIPPED_BINARY`, set by `make integration`).
fn shipped_binary() -> Option<PathBuf> {
    std::env::var_os("SANDBOXD_SHIPPED_BINARY").map(PathBuf::from)
}

pub fn cases() -> Vec<Case> {
    let bin = release_binary();
    let skip = (!bin.exists()).then(|| format!("{} not built (run `make build`)", bin.display()));
    let shipped_skip = match shipped_binary() {
        None => {
            Some("SANDBOXD_SHIPPED_BINARY not set (run through `make integration`)".to_string())
        }
        Some(p) if !p.exists() => Some(format!("{} not built (run `make build`)", p.display())),
        Some(_) => skip.clone(),
    };
    vec![
        Case::plain(
            "static_binary::the_shipped_binary_has_no_dev_subcommand_crash_points_or_local_provider",
            move |_| {
                let shipped = shipped_binary().unwrap_or_default();
                let dev = release_binary();
                async move { check_shipped(&shipped, &dev) }
            },
        )
        .skip_if(shipped_skip),
        Case::plain(
            "static_binary::release_binary_has_no_program_interpreter",
            move |_| {
                let bin = release_binary();
                async move { check_static(&bin) }
            },
        )
        .skip_if(skip),
    ]
}

/// The shipped binary against the test build of the same sources (`dev`): what the feature
/// adds is present in one and absent from the other, so each check can fail.
fn check_shipped(shipped: &std::path::Path, dev: &std::path::Path) -> Result<()> {
    check_static(shipped)?;
    let run = |bin: &std::path::Path, args: &[&str], env: &[(&str, &str)]| {
        std::process::Command::new(bin)
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .with_context(|| format!("running {}", bin.display()))
    };
    // No `dev` subcommand: clap refuses it as unknown.
    let out = run(shipped, &["dev", "--help"], &[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("unrecognized subcommand 'dev'"),
        "the shipped binary accepted `dev --help`: {out:?}"
    );
    let out = run(dev, &["dev", "--help"], &[])?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("arm-server"),
        "the dev build has no `dev arm-server`: {out:?}"
    );
    // No crash points: the variable that would pause a CAA is not in the shipped binary.
    let needle = b"SANDBOXD_CAA_PAUSE_AT";
    let holds = |p: &std::path::Path| -> Result<bool> {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        Ok(bytes.windows(needle.len()).any(|w| w == needle))
    };
    ensure!(
        !holds(shipped)?,
        "the shipped binary knows SANDBOXD_CAA_PAUSE_AT"
    );
    ensure!(holds(dev)?, "the dev build lacks SANDBOXD_CAA_PAUSE_AT");
    // No local provider: a CAA told CLOUD_PROVIDER=local refuses to start, and says why.
    let out = run(
        shipped,
        &["caa", "--node-name", "n1"],
        &[
            ("CLOUD_PROVIDER", "local"),
            (sandboxd::caa::crashpoint::ENV, "start-vm:recorded"),
        ],
    )?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("CLOUD_PROVIDER=local")
            && err.contains("does not include it")
            && err.contains("CLOUD_PROVIDER=azure"),
        "the shipped CAA did not refuse the local provider with a sentence: {out:?}"
    );
    Ok(())
}

/// The program header of a dynamically linked executable naming its loader. (A static-PIE
/// binary still has PT_DYNAMIC for self-relocation, but no interpreter and no libraries.)
const PT_INTERP: u32 = 3;

fn check_static(path: &std::path::Path) -> Result<()> {
    let elf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        elf.len() > 64 && &elf[..4] == b"\x7fELF",
        "{} is not an ELF file",
        path.display()
    );
    ensure!(
        elf[4] == 2 && elf[5] == 1,
        "expected a 64-bit little-endian ELF"
    );
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    let machine = u16_at(18);
    ensure!(
        machine == 62,
        "expected x86-64 (62), e_machine is {machine}"
    );
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    ensure!(phnum > 0, "no program headers");
    for i in 0..phnum {
        let p_type = u32_at(phoff + i * phentsize);
        if p_type == PT_INTERP {
            bail!(
                "{} has a program interpreter: it is dynamically linked",
                path.display()
            );
        }
    }
    // And it runs on its own.
    let out = std::process::Command::new(path).arg("version").output()?;
    ensure!(out.status.success(), "`sandboxd version` failed: {out:?}");
    ensure!(String::from_utf8_lossy(&out.stdout).starts_with("sandboxd "));
    Ok(())
}
