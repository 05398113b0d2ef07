//! What `oc adm must-gather --image <sandboxd image>` runs in its pod, answered by the
//! binary itself (the image is `FROM scratch`: no shell, no tar).
//!
//! The must-gather pod has two containers of the image sharing `/must-gather`:
//!
//! - `gather` runs `/bin/bash -c <script>`: the script (oc's) starts a disk-usage watcher in
//!   the background, runs the gather command (`/usr/bin/gather` unless the user passes
//!   another after `--`), then `sync`. Here `bash -c` runs `ctl must-gather` when the script
//!   names `gather` or `must-gather`, and `sync`s; anything else is refused as not a shell.
//! - `copy` runs `/bin/bash -c "trap : TERM INT; sleep infinity & wait"`: it waits for its
//!   termination signal.
//!
//! oc then copies `/must-gather` out through the `copy` container: `rsync --version` (not
//! in the image, so oc falls back to tar), `tar --version`, then `tar -C /must-gather/ -c .`
//! with the archive read from stdout. The image links `/bin/bash`, `/usr/bin/gather` and
//! `/usr/bin/tar` to `/sandboxd`; the binary knows by its name what it was run as.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::archive::{Sink, Tar};

/// Flags of the hidden `must-gather-pod` command (the binary run as `bash` or `tar`).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// As what the binary was run.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The programs of a must-gather pod the binary stands in for.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {
    /// `bash -c SCRIPT` as oc's must-gather pod runs it.
    Shell {
        /// The shell's arguments (`-c SCRIPT`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// `tar --version` and `tar -C DIR -c [PATH...]` (the archive to stdout).
    Tar {
        /// tar's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// What a `bash -c` script of the must-gather pod asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Script {
    /// The `copy` container: wait until terminated.
    Wait,
    /// The `gather` container: collect into `/must-gather`.
    Gather,
}

/// Reads a script of the must-gather pod; `None` for anything else.
pub(crate) fn classify(script: &str) -> Option<Script> {
    let words: Vec<&str> = script
        .split(|c: char| c.is_whitespace() || matches!(c, ';' | '&' | '|' | '(' | ')'))
        .filter(|w| !w.is_empty())
        .collect();
    let gather = words.iter().any(|w| {
        let base = w.rsplit('/').next().unwrap_or(w);
        base == "gather" || base == "must-gather"
    });
    if gather {
        return Some(Script::Gather);
    }
    let wait = words.windows(2).any(|w| w == ["sleep", "infinity"]);
    wait.then_some(Script::Wait)
}

/// Runs the stand-in; returns the process's exit code.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Shell { args } => shell(args).await,
        Command::Tar { args } => tar(&args),
    }
}

async fn shell(args: Vec<String>) -> anyhow::Result<()> {
    let script = match args.as_slice() {
        [c, script, ..] if c == "-c" => script.clone(),
        _ => anyhow::bail!(
            "sandboxd is not a shell: as /bin/bash it runs only `-c` scripts of an `oc adm must-gather` pod"
        ),
    };
    match classify(&script) {
        Some(Script::Wait) => {
            let stop = crate::shutdown::on_signals()?;
            stop.cancelled().await;
            Ok(())
        }
        Some(Script::Gather) => {
            let cli = crate::cli::parse_from(["sandboxd", "ctl", "must-gather"]);
            let crate::cli::Command::Ctl(ctl) = cli.command else {
                unreachable!("ctl parses as ctl")
            };
            let result = crate::ctl::run(ctl).await;
            nix::unistd::sync();
            result
        }
        None => anyhow::bail!(
            "sandboxd is not a shell: as /bin/bash it runs only the gather and copy commands of an `oc adm must-gather` pod, not {script:?}"
        ),
    }
}

/// `tar --version`, or `tar -C DIR -c [PATH...]` writing an uncompressed archive of the
/// named paths under DIR (all of DIR for `.`) to stdout.
fn tar(args: &[String]) -> anyhow::Result<()> {
    if args.iter().any(|a| a == "--version") {
        println!(
            "tar (sandboxd {}): creates archives for oc rsync",
            crate::VERSION
        );
        return Ok(());
    }
    let mut dir = None;
    let mut create = false;
    let mut paths = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-C" => dir = it.next().map(PathBuf::from),
            "-c" | "-cf-" | "-cf" => create = true,
            "-f" => {
                anyhow::ensure!(
                    it.next().is_some_and(|f| f == "-"),
                    "tar: only stdout (-f -) is supported"
                );
            }
            a if a.starts_with("--exclude") => {}
            a if a.starts_with('-') => anyhow::bail!("tar: unsupported option {a}"),
            p => paths.push(p.to_string()),
        }
    }
    anyhow::ensure!(create, "tar: only creating an archive (-c) is supported");
    let dir = dir.unwrap_or_else(|| PathBuf::from("."));
    if paths.is_empty() {
        paths.push(".".into());
    }
    let stdout = std::io::stdout();
    let mut out = Tar::plain(std::io::BufWriter::new(stdout.lock()), "", 0);
    for p in &paths {
        add_tree(&mut out, &dir, Path::new(p))?;
    }
    out.finish()?;
    Ok(())
}

/// Adds `rel` under `base` (a file, or a directory and everything below it).
fn add_tree<W: Write>(out: &mut Tar<W>, base: &Path, rel: &Path) -> anyhow::Result<()> {
    let full = base.join(rel);
    let meta = std::fs::symlink_metadata(&full)?;
    let name = rel
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect::<PathBuf>();
    let name = name.to_string_lossy().to_string();
    if meta.is_dir() {
        if !name.is_empty() {
            out.add_dir(&name)?;
        }
        let mut entries: Vec<_> = std::fs::read_dir(&full)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            add_tree(out, base, &rel.join(e.file_name()))?;
        }
    } else if meta.is_file() {
        out.add(&name, &std::fs::read(&full)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_must_gather_pod_scripts_are_told_apart_and_nothing_else_is_run() {
        assert_eq!(
            classify("trap : TERM INT; sleep infinity & wait"),
            Some(Script::Wait)
        );
        // oc's gather script: a watcher in the background, the command, then sync.
        let gather = "if command -v setsid >/dev/null 2>&1; then\n  HAVE_SESSION_TOOLS=true\nfi\n\
            while true; do sleep 5; done & if [ \"$HAVE_SESSION_TOOLS\" = \"true\" ]; then\n  \
            setsid -w bash <<-MUSTGATHER_EOF\n/usr/bin/gather\nMUSTGATHER_EOF\nelse\n  /usr/bin/gather\nfi; sync && echo 'Caches written to disk'";
        assert_eq!(classify(gather), Some(Script::Gather));
        assert_eq!(classify("sandboxd ctl must-gather"), Some(Script::Gather));
        assert_eq!(classify("rm -rf /"), None);
        assert_eq!(classify("sleep 5"), None);
    }

    #[test]
    fn tar_writes_the_tree_that_system_tar_extracts() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/c.yaml"), "x: 1\n").unwrap();
        std::fs::write(src.path().join("version"), "v\n").unwrap();
        let mut buf = Vec::new();
        let mut t = Tar::plain(&mut buf, "", 0);
        add_tree(&mut t, src.path(), Path::new(".")).unwrap();
        t.finish().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("tar")
            .args(["-x", "-C"])
            .arg(dst.path())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&buf).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(
            std::fs::read_to_string(dst.path().join("a/b/c.yaml")).unwrap(),
            "x: 1\n"
        );
        assert_eq!(
            std::fs::read_to_string(dst.path().join("version")).unwrap(),
            "v\n"
        );
    }
}
