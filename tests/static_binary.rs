//! The release binary is fully static: no ELF program interpreter, no dynamic section.

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

pub fn cases() -> Vec<Case> {
    let bin = release_binary();
    let skip = (!bin.exists()).then(|| format!("{} not built (run `make build`)", bin.display()));
    vec![
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
