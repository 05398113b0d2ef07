//! `sandboxd image build`: the pod VM disk image, written in pure Rust without root, loop
//! devices or external tools.
//!
//! The disk is a GPT with one EFI system partition (FAT32) holding systemd-boot as
//! `EFI/BOOT/BOOTX64.EFI`, a loader entry, the kernel and an initramfs: a gzip-compressed
//! newc cpio with the static `sandboxd` as `/init`, kata-agent when given, the kernel modules
//! the VM needs (dependencies first, listed in `/etc/sandboxd/modules`) and CA certificates.
//! The same inputs give the same bytes: timestamps are fixed, entries ordered, and GUIDs,
//! volume ids and the VHD id derive from a digest of the inputs.

pub(crate) mod cpio;
pub mod fat;
pub mod gpt;
pub mod inputs;
pub mod modules;
pub mod qcow2;
pub mod vhd;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where `/init` finds the module load order in the initramfs: one line per module, its
/// name followed by the modules it depends on.
pub(crate) const MODULES_LIST: &str = "etc/sandboxd/modules";
/// Where the modules sit in the initramfs.
pub(crate) const MODULES_DIR: &str = "lib/modules";
/// kata-agent's path in the initramfs.
pub(crate) const KATA_AGENT: &str = "usr/bin/kata-agent";
/// kata-agent's command line in the initramfs (from `--kata-agent-arg`): one argument a line.
pub(crate) const KATA_AGENT_ARGS: &str = "etc/sandboxd/kata-agent.args";
/// The allow-all policy an upstream kata-agent (built with agent-policy) needs to start.
pub(crate) const KATA_POLICY: &str = "etc/kata-opa/default-policy.rego";
/// The pause bundle an upstream kata-agent runs the sandbox container from.
pub(crate) const PAUSE_BUNDLE: &str = "pause_bundle";
/// confidential-data-hub in the initramfs (`--confidential-data-hub`).
pub(crate) const CDH: &str = "usr/local/bin/confidential-data-hub";
/// Build facts recorded in the initramfs.
pub(crate) const BUILD_INFO: &str = "etc/sandboxd/build.json";
/// Kernel command line of the loader entry.
pub(crate) const DEFAULT_CMDLINE: &str = "console=tty0 console=ttyS0,115200n8 panic=-1";
/// Base name of the outputs (`podvm.raw`, `podvm.qcow2`, `podvm.vhd`).
pub(crate) const OUTPUT_NAME: &str = "podvm";

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Raw disk.
    Raw,
    /// qcow2 (local VMs).
    Qcow2,
    /// Fixed VHD, size a whole number of MiB (Azure).
    Vhd,
}

impl Format {
    /// File extension of the format.
    pub(crate) fn extension(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vhd => "vhd",
        }
    }
}

/// Flags of `sandboxd image build`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The kernel (`vmlinuz` with the EFI stub), e.g. from Debian's linux-image-cloud-amd64.
    #[arg(long)]
    pub(crate) kernel: PathBuf,
    /// The kernel's module tree (`lib/modules/<version>`).
    #[arg(long)]
    pub(crate) modules_dir: PathBuf,
    /// systemd-boot's EFI binary (`systemd-bootx64.efi` from systemd-boot-efi).
    #[arg(long)]
    pub(crate) systemd_boot: PathBuf,
    /// An upstream kata-agent (static) to run instead of `sandboxd agent`; the image then
    /// also carries an allow-all policy, the pause bundle and the overlay module it needs.
    #[arg(long)]
    pub kata_agent: Option<PathBuf>,
    /// confidential-data-hub (static) for an upstream kata-agent, which pulls images
    /// through it: started before the agent (needs `--kata-agent`).
    #[arg(long)]
    pub(crate) confidential_data_hub: Option<PathBuf>,
    /// An argument kata-agent starts with, instead of `--config <file written by init>`;
    /// repeatable, in order (needs `--kata-agent`).
    #[arg(
        long = "kata-agent-arg",
        value_name = "ARG",
        allow_hyphen_values = true
    )]
    pub kata_agent_args: Vec<String>,
    /// The static sandboxd to run as `/init` (default: this executable).
    #[arg(long)]
    pub sandboxd: Option<PathBuf>,
    /// Directory to write `podvm.<format>` into.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Formats to write.
    #[arg(long, value_delimiter = ',', default_value = "raw,qcow2,vhd")]
    pub format: Vec<Format>,
    /// Kernel modules to load at boot (their dependencies are added).
    #[arg(long, value_delimiter = ',', default_values_t = modules::DEFAULT.iter().map(|s| s.to_string()).collect::<Vec<_>>())]
    pub(crate) modules: Vec<String>,
    /// CA certificate bundle to include (skipped when the default is absent).
    #[arg(long, default_value = "/etc/ssl/certs/ca-certificates.crt")]
    pub ca_certs: PathBuf,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    pub(crate) cmdline: String,
    /// Extra file for the initramfs, `SOURCE:DEST` (DEST absolute in the VM); repeatable.
    #[arg(long = "add-file", value_name = "SOURCE:DEST")]
    pub add_files: Vec<String>,
}

impl Args {
    /// Flags for the given inputs with every default.
    pub fn new(kernel: &Path, modules_dir: &Path, systemd_boot: &Path, out: &Path) -> Self {
        Self {
            kernel: kernel.into(),
            modules_dir: modules_dir.into(),
            systemd_boot: systemd_boot.into(),
            kata_agent: None,
            confidential_data_hub: None,
            kata_agent_args: Vec::new(),
            sandboxd: None,
            out: out.into(),
            format: vec![Format::Raw, Format::Qcow2, Format::Vhd],
            modules: modules::DEFAULT.iter().map(|s| s.to_string()).collect(),
            ca_certs: "/etc/ssl/certs/ca-certificates.crt".into(),
            cmdline: DEFAULT_CMDLINE.into(),
            add_files: Vec::new(),
        }
    }
}

/// Errors of the image build.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An input file cannot be read.
    #[error("reading {path}: {source}")]
    Input {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The kernel modules cannot be resolved.
    #[error("kernel modules: {0}")]
    Modules(String),
    /// Writing a file system or the disk failed.
    #[error("{stage}: {detail}")]
    Assemble {
        /// The stage.
        stage: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// Writing an output failed.
    #[error("writing {path}: {source}")]
    Output {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What a build produced.
#[derive(Clone, Debug)]
pub struct Built {
    /// The written files with their format.
    pub outputs: Vec<(Format, PathBuf)>,
    /// Virtual size of the disk in bytes (a whole number of MiB).
    pub disk_size: u64,
    /// Size of the compressed initramfs.
    pub initramfs_size: u64,
    /// Whether kata-agent is in the image.
    pub(crate) kata_agent: bool,
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Input {
        path: path.into(),
        source,
    })
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / 1048576.0)
}

/// Prints one progress line per stage on stderr.
struct Progress {
    start: Instant,
    stage: Instant,
}

impl Progress {
    fn done(&mut self, stage: &str, detail: &str) {
        eprintln!(
            "[image] {stage:<10} {detail} ({:.2}s)",
            self.stage.elapsed().as_secs_f64()
        );
        self.stage = Instant::now();
    }
}

/// The content of [`KATA_AGENT_ARGS`] for `--kata-agent-arg`s: none without arguments;
/// refused without kata-agent, or for an argument that is empty or holds a line break.
pub(crate) fn kata_agent_args_file(
    args: &[String],
    has_agent: bool,
) -> Result<Option<Vec<u8>>, Error> {
    if args.is_empty() {
        return Ok(None);
    }
    let refuse = |detail: String| Error::Assemble {
        stage: "inputs",
        detail,
    };
    if !has_agent {
        return Err(refuse("--kata-agent-arg needs --kata-agent".into()));
    }
    let mut text = String::new();
    for a in args {
        if a.is_empty() || a.contains(['\n', '\r']) {
            return Err(refuse(format!(
                "--kata-agent-arg {a:?}: empty or a line break (one argument a line)"
            )));
        }
        text.push_str(a);
        text.push('\n');
    }
    Ok(Some(text.into_bytes()))
}

/// An allow-all policy for an upstream kata-agent: every request of the agent protocol
/// allowed (kata names its rules after the request messages), generated from
/// `proto/agent.proto`.
pub(crate) fn allow_all_policy() -> String {
    let fd = crate::protocol::agent::file_descriptor();
    let mut names: Vec<String> = fd
        .proto()
        .service
        .iter()
        .flat_map(|s| s.method.iter())
        .filter_map(|m| m.input_type.as_deref())
        .map(|t| t.rsplit('.').next().unwrap_or(t).to_string())
        .collect();
    names.sort();
    names.dedup();
    let mut text = String::from(
        "# Allow every agent request (written by sandboxd image build; sandboxd enforces no policy).\npackage agent_policy\n\n",
    );
    for n in names {
        text.push_str(&format!("default {n} := true\n"));
    }
    text.push_str("default AllowRequestsFailingPolicy := true\n");
    text
}

/// Files an upstream kata-agent needs: the allow-all policy and the pause bundle, whose
/// `/pause` is sandboxd itself (a link to `/init`: kata copies the file it points at).
fn upstream_agent_files() -> Vec<(String, u32, Vec<u8>)> {
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["/pause"], "cwd": "/", "env": ["PATH=/"], "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs", "readonly": true},
    });
    vec![
        (
            KATA_POLICY.to_string(),
            0o644,
            allow_all_policy().into_bytes(),
        ),
        (
            format!("{PAUSE_BUNDLE}/config.json"),
            0o644,
            serde_json::to_vec_pretty(&config).expect("static JSON"),
        ),
    ]
}

/// Digest of everything that goes into the image: the seed of its GUIDs and ids.
fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_le_bytes());
        ctx.update(p);
    }
    ctx.finish().as_ref().try_into().expect("32 bytes")
}

fn derive(seed: &[u8; 32], what: &str) -> [u8; 32] {
    digest(&[seed, what.as_bytes()])
}

/// The initramfs entries (uncompressed cpio members), in archive order.
pub(crate) fn initramfs_entries(
    sandboxd: Vec<u8>,
    kata_agent: Option<Vec<u8>>,
    modules: &[(String, Vec<String>, Vec<u8>)],
    ca_certs: Option<Vec<u8>>,
    build_info: &str,
    extra: &[(String, u32, Vec<u8>)],
) -> Vec<cpio::Entry> {
    use cpio::Entry;
    let mut e = Vec::new();
    for d in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "etc",
        "etc/sandboxd",
        "etc/ssl",
        "etc/ssl/certs",
        "lib",
        MODULES_DIR,
        "media",
        "media/cidata",
        "root",
        "usr",
        "usr/bin",
        "var",
    ] {
        e.push(Entry::dir(d));
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    e.push(Entry::char_dev("dev/console", 0o600, 5, 1));
    e.push(Entry::char_dev("dev/null", 0o666, 1, 3));
    e.push(Entry::file("init", 0o755, sandboxd));
    if let Some(agent) = kata_agent {
        e.push(Entry::file(KATA_AGENT, 0o755, agent));
        e.push(Entry::dir(PAUSE_BUNDLE));
        e.push(Entry::dir(&format!("{PAUSE_BUNDLE}/rootfs")));
        e.push(Entry::symlink(
            &format!("{PAUSE_BUNDLE}/rootfs/pause"),
            "/init",
        ));
    }
    let mut list = String::new();
    // One line per module in load order: its name, then the modules it depends on.
    for (name, depends, data) in modules {
        e.push(Entry::file(
            &format!("{MODULES_DIR}/{name}.ko"),
            0o644,
            data.clone(),
        ));
        list.push_str(name);
        for d in depends {
            list.push(' ');
            list.push_str(d);
        }
        list.push('\n');
    }
    e.push(Entry::file(MODULES_LIST, 0o644, list.into_bytes()));
    if let Some(ca) = ca_certs {
        e.push(Entry::file("etc/ssl/certs/ca-certificates.crt", 0o644, ca));
    }
    e.push(Entry::file(
        BUILD_INFO,
        0o644,
        build_info.as_bytes().to_vec(),
    ));
    e.push(Entry::file("etc/hostname", 0o644, b"podvm\n".to_vec()));
    for (dest, perm, data) in extra {
        let dest = dest.trim_start_matches('/');
        // The kernel creates a file only where its directory exists.
        let mut dir = String::new();
        for part in dest
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map(|(_, d)| d)
            .unwrap_or(&[])
        {
            if !dir.is_empty() {
                dir.push('/');
            }
            dir.push_str(part);
            if !e.iter().any(|x| x.path == dir) {
                e.push(Entry::dir(&dir));
            }
        }
        e.push(Entry::file(dest, *perm, data.clone()));
    }
    e
}

fn gzip(data: &[u8]) -> Vec<u8> {
    // Header without a name and with mtime 0: the same input gives the same bytes.
    let mut enc = flate2::GzBuilder::new().mtime(0).operating_system(3).write(
        Vec::with_capacity(data.len() / 2),
        flate2::Compression::fast(),
    );
    enc.write_all(data).expect("writing to memory");
    enc.finish().expect("writing to memory")
}

/// Builds the raw disk image in memory; returns it with the facts of the build.
pub(crate) fn assemble(args: &Args) -> Result<(Vec<u8>, Built), Error> {
    let mut p = Progress {
        start: Instant::now(),
        stage: Instant::now(),
    };
    let sandboxd_path = match &args.sandboxd {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|source| Error::Input {
            path: "the running executable".into(),
            source,
        })?,
    };
    let kernel = read(&args.kernel)?;
    let sdboot = read(&args.systemd_boot)?;
    let sandboxd = read(&sandboxd_path)?;
    let kata_agent = args.kata_agent.as_deref().map(read).transpose()?;
    let ca_certs = if args.ca_certs.exists() {
        Some(read(&args.ca_certs)?)
    } else {
        None
    };
    p.done(
        "inputs",
        &format!(
            "kernel {}, sandboxd {}, kata-agent {}",
            mib(kernel.len() as u64),
            mib(sandboxd.len() as u64),
            kata_agent
                .as_ref()
                .map(|a| mib(a.len() as u64))
                .unwrap_or_else(|| "absent".into())
        ),
    );

    let resolved = modules::resolve(&args.modules_dir, &args.modules).map_err(Error::Modules)?;
    let mut mods = Vec::with_capacity(resolved.len());
    for m in &resolved {
        mods.push((m.name.clone(), m.depends.clone(), read(&m.path)?));
    }
    let kernel_version = args
        .modules_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    p.done(
        "modules",
        &format!(
            "{} modules ({}) for {kernel_version}",
            mods.len(),
            mib(mods.iter().map(|m| m.2.len() as u64).sum())
        ),
    );

    let names: Vec<String> = mods.iter().map(|m| m.0.clone()).collect();
    let build_info = serde_json::json!({
        "kernel": kernel_version,
        "modules": names,
        "kataAgent": kata_agent.is_some(),
        "confidentialDataHub": args.confidential_data_hub.is_some(),
        "kataAgentArgs": args.kata_agent_args,
        "sandboxd": crate::VERSION,
    })
    .to_string();
    let has_agent = kata_agent.is_some();
    let mut extra = Vec::new();
    if let Some(text) = kata_agent_args_file(&args.kata_agent_args, has_agent)? {
        extra.push((KATA_AGENT_ARGS.to_string(), 0o644, text));
    }
    if has_agent {
        extra.extend(upstream_agent_files());
        if let Some(cdh) = &args.confidential_data_hub {
            extra.push((CDH.to_string(), 0o755, read(cdh)?));
        }
    } else if args.confidential_data_hub.is_some() {
        return Err(Error::Assemble {
            stage: "inputs",
            detail:
                "--confidential-data-hub needs --kata-agent (sandboxd agent pulls images itself)"
                    .into(),
        });
    }
    for spec in &args.add_files {
        let (src, dest) = spec.split_once(':').ok_or_else(|| Error::Assemble {
            stage: "inputs",
            detail: format!("--add-file {spec:?} is not SOURCE:DEST"),
        })?;
        use std::os::unix::fs::PermissionsExt;
        let perm = std::fs::metadata(src)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0o644);
        extra.push((dest.to_string(), perm, read(Path::new(src))?));
    }
    let entries = initramfs_entries(sandboxd, kata_agent, &mods, ca_certs, &build_info, &extra);
    let archive = cpio::write(&entries);
    let initrd = gzip(&archive);
    p.done(
        "initramfs",
        &format!(
            "{} entries, {} cpio, {} gzip",
            entries.len(),
            mib(archive.len() as u64),
            mib(initrd.len() as u64)
        ),
    );
    let seed = digest(&[&kernel, &sdboot, &initrd, args.cmdline.as_bytes()]);

    let loader_conf = "timeout 0\ndefault sandboxd.conf\neditor no\nconsole-mode keep\n";
    let entry = format!(
        "title sandboxd pod VM\nversion {kernel_version}\nlinux /sandboxd/vmlinuz\ninitrd /sandboxd/initrd.img\noptions {}\n",
        args.cmdline
    );
    let files = vec![
        ("EFI/BOOT/BOOTX64.EFI".to_string(), sdboot),
        (
            "loader/loader.conf".to_string(),
            loader_conf.as_bytes().to_vec(),
        ),
        (
            "loader/entries/sandboxd.conf".to_string(),
            entry.into_bytes(),
        ),
        ("sandboxd/vmlinuz".to_string(), kernel),
        ("sandboxd/initrd.img".to_string(), initrd),
    ];
    let content: u64 = files.iter().map(|f| f.1.len() as u64).sum();
    // Room for FAT tables and directories, rounded to whole MiB.
    let esp_size = (content + content / 16 + (2 << 20))
        .div_ceil(1 << 20)
        .max(fat::MIN_ESP >> 20)
        << 20;
    let vol = derive(&seed, "esp-volume-id");
    let esp = fat::esp(
        esp_size,
        u32::from_le_bytes(vol[..4].try_into().unwrap()),
        &files,
    )
    .map_err(|detail| Error::Assemble {
        stage: "esp",
        detail,
    })?;
    p.done(
        "esp",
        &format!("FAT32 {} holding {}", mib(esp_size), mib(content)),
    );

    // 1 MiB before the ESP (GPT, alignment) and 1 MiB after (backup GPT).
    let first_lba = (1 << 20) / gpt::SECTOR;
    let disk_size = esp_size + (2 << 20);
    let mut disk = vec![0u8; disk_size as usize];
    disk[(1 << 20)..(1 << 20) + esp.len()].copy_from_slice(&esp);
    let part = gpt::Partition {
        type_guid: gpt::ESP_TYPE,
        guid: gpt::guid_from_digest(&derive(&seed, "esp-guid")),
        first_lba,
        last_lba: first_lba + esp_size / gpt::SECTOR - 1,
        name: "EFI system partition".into(),
    };
    gpt::write_table(
        &mut disk,
        &gpt::guid_from_digest(&derive(&seed, "disk-guid")),
        &[part],
    );
    p.done("disk", &format!("GPT {}", mib(disk_size)));
    let built = Built {
        outputs: Vec::new(),
        disk_size,
        initramfs_size: files[4].1.len() as u64,
        kata_agent: has_agent,
    };
    let _ = p.start;
    Ok((disk, built))
}

fn write_atomic(path: &Path, parts: &[&[u8]]) -> Result<(), Error> {
    let err = |source| Error::Output {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension("partial");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    for p in parts {
        f.write_all(p).map_err(err)?;
    }
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// Builds the image and writes every requested format into `args.out`.
pub fn build(args: &Args) -> Result<Built, Error> {
    let start = Instant::now();
    let (disk, mut built) = assemble(args)?;
    std::fs::create_dir_all(&args.out).map_err(|source| Error::Output {
        path: args.out.clone(),
        source,
    })?;
    let seed = digest(&[&disk]);
    for f in &args.format {
        let t = Instant::now();
        let path = args.out.join(format!("{OUTPUT_NAME}.{}", f.extension()));
        match f {
            Format::Raw => write_atomic(&path, &[&disk])?,
            Format::Qcow2 => write_atomic(&path, &[&qcow2::from_raw(&disk)])?,
            Format::Vhd => {
                let id: [u8; 16] = derive(&seed, "vhd-id")[..16].try_into().unwrap();
                write_atomic(&path, &[&disk, &vhd::footer(disk.len() as u64, id, 0)])?
            }
        }
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "[image] {:<10} {} ({}) ({:.2}s)",
            f.extension(),
            path.display(),
            mib(size),
            t.elapsed().as_secs_f64()
        );
        built.outputs.push((*f, path));
    }
    eprintln!(
        "[image] done       disk {} in {:.2}s",
        mib(built.disk_size),
        start.elapsed().as_secs_f64()
    );
    Ok(built)
}

/// Build the image.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let built = tokio::task::spawn_blocking(move || build(&args)).await??;
    if !built.kata_agent {
        eprintln!("[image] note: no --kata-agent given; the image boots without kata-agent");
    }
    for (_, p) in &built.outputs {
        println!("{}", p.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kata_agent_args_are_written_one_a_line_in_order() {
        let args = strings(&[
            "dev",
            "agent",
            "--socket",
            "/run/kata-containers/agent.sock",
        ]);
        let text = kata_agent_args_file(&args, true).unwrap().unwrap();
        assert_eq!(
            String::from_utf8(text).unwrap(),
            "dev\nagent\n--socket\n/run/kata-containers/agent.sock\n"
        );
        // Init reads back exactly these arguments.
        let back = crate::forwarder::init::kata_agent_args(Some(
            &String::from_utf8(kata_agent_args_file(&args, true).unwrap().unwrap()).unwrap(),
        ));
        assert_eq!(back, args);
        assert_eq!(
            format!("/{KATA_AGENT_ARGS}"),
            crate::forwarder::init::KATA_AGENT_ARGS
        );
    }

    #[test]
    fn without_kata_agent_args_no_file_is_written() {
        assert!(kata_agent_args_file(&[], true).unwrap().is_none());
        assert!(kata_agent_args_file(&[], false).unwrap().is_none());
    }

    #[test]
    fn kata_agent_args_without_kata_agent_or_with_line_breaks_are_refused() {
        assert!(kata_agent_args_file(&strings(&["dev"]), false).is_err());
        assert!(kata_agent_args_file(&strings(&["a\nb"]), true).is_err());
        assert!(kata_agent_args_file(&strings(&[""]), true).is_err());
    }

    #[test]
    fn the_allow_all_policy_names_every_request_of_the_agent_protocol() {
        let p = allow_all_policy();
        for rule in [
            "default CreateContainerRequest := true",
            "default WriteStreamRequest := true",
            "default ReadStreamRequest := true",
            "default SetPolicyRequest := true",
            "default CopyFileRequest := true",
            "default MemAgentMemcgConfig := true",
            "default AllowRequestsFailingPolicy := true",
        ] {
            assert!(p.contains(rule), "{rule} missing:\n{p}");
        }
        assert!(p.contains("package agent_policy"));
        assert!(!p.contains("Empty := true"));
    }

    #[test]
    fn an_upstream_kata_agent_gets_a_policy_and_a_pause_bundle_running_sandboxd() {
        let files = upstream_agent_files();
        let e = initramfs_entries(
            b"init".to_vec(),
            Some(b"agent".to_vec()),
            &[],
            None,
            "{}",
            &files,
        );
        let find = |p: &str| {
            e.iter()
                .find(|x| x.path == p)
                .unwrap_or_else(|| panic!("{p} missing"))
        };
        assert_eq!(find(KATA_AGENT).data, b"agent");
        assert_eq!(find(KATA_POLICY).mode & 0o170000, cpio::mode::FILE);
        let pause = find("pause_bundle/rootfs/pause");
        assert_eq!(pause.mode & 0o170000, cpio::mode::SYMLINK);
        assert_eq!(pause.data, b"/init");
        let config: serde_json::Value =
            serde_json::from_slice(&find("pause_bundle/config.json").data).unwrap();
        assert_eq!(config["process"]["args"][0], "/pause");
        // The parents exist before their files (the kernel creates files only in existing dirs).
        let pos = |p: &str| e.iter().position(|x| x.path == p).unwrap();
        assert!(pos("etc/kata-opa") < pos(KATA_POLICY));
        // Without kata-agent, none of it.
        let e = initramfs_entries(b"init".to_vec(), None, &[], None, "{}", &[]);
        assert!(!e.iter().any(|x| x.path.starts_with("pause_bundle")));
    }

    #[test]
    fn kata_agent_arg_takes_values_that_start_with_dashes() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: Args,
        }
        let cli = Cli::try_parse_from([
            "build",
            "--kernel=k",
            "--modules-dir=m",
            "--systemd-boot=s",
            "--out=o",
            "--kata-agent=a",
            "--kata-agent-arg",
            "dev",
            "--kata-agent-arg",
            "--socket",
            "--kata-agent-arg",
            "/x.sock",
        ])
        .unwrap();
        assert_eq!(
            cli.args.kata_agent_args,
            strings(&["dev", "--socket", "/x.sock"])
        );
    }
}
