//! `scripts/oci-image.sh --podvm-inputs`: the product image carries the pod VM build inputs as
//! a second layer at `/usr/share/sandboxd/podvm`, pruned to the modules the image loads, and
//! an image built from that layer's files is the image built from the full module tree.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use sandboxd::image::build::{self, Format, inputs, modules};
use serde_json::Value;

use crate::harness::Case;

fn skip_reason(inputs: Option<String>) -> Option<String> {
    inputs
        .or_else(|| {
            ["jq", "gzip", "tar", "sha256sum"]
                .into_iter()
                .find(|t| !super::which(t))
                .map(|t| format!("{t} not installed (scripts/bootstrap.sh)"))
        })
        .or_else(|| {
            super::static_binary().is_none().then(|| {
                "no static sandboxd for the image layer (target/x86_64-unknown-linux-musl/dist/sandboxd or SANDBOXD_STATIC_BINARY): run `make build`".into()
            })
        })
}

pub fn case(inputs: Option<String>) -> Case {
    Case::plain(
        "image::oci_image_with_podvm_inputs_carries_kernel_pruned_modules_and_systemd_boot_reproducibly",
        |_| oci_layer(),
    )
    .skip_if(skip_reason(inputs))
}

struct Layout {
    digest: String,
    stdout: String,
    dir: PathBuf,
}

fn run_script(i: &super::Inputs, out: &Path) -> Result<Layout> {
    let bin = super::static_binary().context("no static binary")?;
    let o = Command::new("bash")
        .arg(super::repo().join("scripts/oci-image.sh"))
        .arg("--podvm-inputs")
        .arg(&bin)
        .arg(out)
        .arg("test")
        .env("PODVM_KERNEL", &i.kernel)
        .env("PODVM_MODULES_DIR", &i.modules_dir)
        .env("PODVM_SYSTEMD_BOOT", &i.systemd_boot)
        // The sandboxd under test lays the inputs out (the static one may predate it).
        .env("PODVM_STAGER", env!("CARGO_BIN_EXE_sandboxd"))
        .output()?;
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    ensure!(
        o.status.success(),
        "scripts/oci-image.sh failed:\n{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let digest = stdout
        .lines()
        .find_map(|l| l.strip_prefix("manifest digest: "))
        .context("no manifest digest printed")?
        .to_string();
    Ok(Layout {
        digest,
        stdout,
        dir: out.into(),
    })
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn json(p: &Path) -> Result<Value> {
    Ok(serde_json::from_slice(&std::fs::read(p)?)?)
}

async fn oci_layer() -> Result<()> {
    let i = super::inputs().await?;
    let tmp = tempfile::tempdir()?;
    let (i1, p1, p2) = (i.clone(), tmp.path().join("a"), tmp.path().join("b"));
    let (first, second) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((run_script(&i1, &p1)?, run_script(&i1, &p2)?))
    })
    .await??;
    ensure!(
        first.digest == second.digest,
        "two runs from the same inputs give different images: {} vs {}",
        first.digest,
        second.digest
    );

    // index → manifest → second layer.
    let index = json(&first.dir.join("index.json"))?;
    let manifest = json(&blob(
        &first.dir,
        index["manifests"][0]["digest"].as_str().context("index")?,
    ))?;
    let layers = manifest["layers"].as_array().context("manifest layers")?;
    ensure!(layers.len() == 2, "expected two layers: {manifest}");
    // The first layer links what an `oc adm must-gather` pod runs to the binary.
    let base = blob(&first.dir, layers[0]["digest"].as_str().context("layer")?);
    let listing = Command::new("tar").arg("-tvzf").arg(&base).output()?;
    let listing = String::from_utf8_lossy(&listing.stdout);
    for link in [
        "bin/bash -> ../sandboxd",
        "usr/bin/gather -> ../../sandboxd",
        "tar -> sandboxd",
    ] {
        ensure!(
            listing.contains(link),
            "{link} missing from the first layer:\n{listing}"
        );
    }
    let config = json(&blob(
        &first.dir,
        manifest["config"]["digest"].as_str().context("config")?,
    ))?;
    ensure!(
        config["rootfs"]["diff_ids"].as_array().map(Vec::len) == Some(2),
        "config lists {} diff ids",
        config["rootfs"]["diff_ids"]
    );
    let layer = blob(&first.dir, layers[1]["digest"].as_str().context("layer")?);
    let layer_size = std::fs::metadata(&layer)?.len();
    let root = tmp.path().join("root");
    std::fs::create_dir_all(&root)?;
    let x = Command::new("tar")
        .arg("-xzf")
        .arg(&layer)
        .arg("-C")
        .arg(&root)
        .output()?;
    ensure!(x.status.success(), "{}", String::from_utf8_lossy(&x.stderr));

    // Exactly the kernel, systemd-boot, modules.builtin and the modules the build loads.
    let podvm = root.join(inputs::DEFAULT_DIR.trim_start_matches('/'));
    let found = inputs::find(&podvm).context("no inputs laid out at /usr/share/sandboxd/podvm")?;
    ensure!(std::fs::read(&found.kernel)? == std::fs::read(&i.kernel)?);
    ensure!(std::fs::read(&found.systemd_boot)? == std::fs::read(&i.systemd_boot)?);
    ensure!(found.modules_dir.file_name() == i.modules_dir.file_name());
    let wanted: Vec<String> = modules::DEFAULT.iter().map(|s| s.to_string()).collect();
    let needed: BTreeSet<String> = modules::resolve(&i.modules_dir, &wanted)
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .map(|m| m.name)
        .collect();
    let mut carried = BTreeSet::new();
    let mut others = Vec::new();
    let mut stack = vec![found.modules_dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else if let Some(m) = modules::name_of(&name) {
                carried.insert(m);
            } else {
                others.push(name);
            }
        }
    }
    ensure!(
        carried == needed,
        "the layer carries modules {:?} but the image loads {:?}",
        carried,
        needed
    );
    ensure!(others == ["modules.builtin"], "other files: {others:?}");
    let mut top: Vec<String> = std::fs::read_dir(&podvm)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    top.sort();
    ensure!(
        top == [inputs::MODULES, inputs::SYSTEMD_BOOT, inputs::KERNEL],
        "{top:?}"
    );

    // The pruned inputs build the same image as the full tree.
    let shared = super::shared().await?;
    let out = tmp.path().join("out");
    let mut a = super::args(
        &super::Inputs {
            kernel: found.kernel,
            modules_dir: found.modules_dir,
            systemd_boot: found.systemd_boot,
        },
        &out,
        &shared.sandboxd,
    );
    a.format = vec![Format::Raw];
    let built = tokio::task::spawn_blocking(move || build::build(&a)).await??;
    ensure!(
        std::fs::read(super::output(&built, Format::Raw)?)?
            == std::fs::read(super::output(&shared.built, Format::Raw)?)?,
        "the image from the layer's inputs differs from the one from the full module tree"
    );
    eprintln!(
        "oci image: pod VM inputs layer {:.1} MiB gzip ({} modules); {}",
        layer_size as f64 / 1048576.0,
        carried.len(),
        first.stdout.lines().collect::<Vec<_>>().join("; ")
    );
    Ok(())
}
