//! Owned host files: written only with sandboxd's marker, removed only when they carry it,
//! replaced atomically.

use std::path::{Path, PathBuf};

use super::Error;

/// The first line of every file sandboxd owns on a host.
pub(crate) const MARKER: &str =
    "# Managed by sandboxd node-install; removed on uninstall. Do not edit.\n";

/// `root` joined with a host-absolute path.
pub fn host_path(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

/// Reads a file; a missing file is `None`.
pub(crate) fn read_opt(path: &Path) -> Result<Option<String>, Error> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Creates the missing directories above `path`; answers them, outermost first (what an
/// uninstall removes again).
fn create_parents(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let Some(parent) = path.parent() else {
        return Ok(Vec::new());
    };
    let mut missing = Vec::new();
    let mut p = parent;
    while !p.exists() {
        missing.push(p.to_path_buf());
        match p.parent() {
            Some(pp) => p = pp,
            None => break,
        }
    }
    std::fs::create_dir_all(parent)?;
    missing.reverse();
    Ok(missing)
}

/// Writes `content` atomically (temporary file + rename), creating parent directories.
/// Returns the directories it had to create, outermost first.
pub(crate) fn write_atomic(path: &Path, content: &str) -> Result<Vec<PathBuf>, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let created = create_parents(path).map_err(io)?;
    let tmp = path.with_extension("sandboxd-tmp");
    std::fs::write(&tmp, content).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(created)
}

/// Writes an owned file (with [`MARKER`] prepended to `body`). Refuses to replace a file
/// that is not ours. Returns (changed, directories created).
pub(crate) fn write_owned(path: &Path, body: &str) -> Result<(bool, Vec<PathBuf>), Error> {
    let want = format!("{MARKER}{body}");
    match read_opt(path)? {
        Some(have) if have == want => Ok((false, Vec::new())),
        Some(have) if !have.starts_with(MARKER) => Err(Error::NotOurs(path.to_path_buf())),
        _ => Ok((true, write_atomic(path, &want)?)),
    }
}

/// Removes an owned file. A missing file is fine; a file without [`MARKER`] is left alone.
/// Returns whether it removed something.
pub(crate) fn remove_owned(path: &Path) -> Result<bool, Error> {
    match read_opt(path)? {
        Some(have) if have.starts_with(MARKER) => {
            std::fs::remove_file(path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Copies the executable `src` to `path` (mode 0755, atomically: a running copy keeps its
/// old file) unless `path` already holds the same bytes. Returns (changed, directories
/// created).
pub(crate) fn copy_executable(src: &Path, path: &Path) -> Result<(bool, Vec<PathBuf>), Error> {
    use std::os::unix::fs::PermissionsExt;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    let want = std::fs::read(src).map_err(io(src))?;
    if std::fs::read(path).is_ok_and(|have| have == want) {
        return Ok((false, Vec::new()));
    }
    let mut created = Vec::new();
    if let Some(parent) = path.parent() {
        let mut p = parent;
        while !p.exists() {
            created.push(p.to_path_buf());
            match p.parent() {
                Some(pp) => p = pp,
                None => break,
            }
        }
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        created.reverse();
    }
    let tmp = path.with_extension("sandboxd-tmp");
    std::fs::write(&tmp, &want).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok((true, created))
}

/// Removes directories (innermost first) if they are empty.
pub(crate) fn remove_empty_dirs(dirs: &[PathBuf]) {
    for d in dirs.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

/// What [`link`] found or did at a symlink path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Link {
    /// It already pointed at the target.
    Present,
    /// It was created (or repointed from `replaceable`), with the directories it needed.
    Created(Vec<PathBuf>),
    /// Something else is there (a file, or a link elsewhere); left alone.
    Foreign,
}

/// Makes `path` a symlink to `target` (a host path, written as is). A link pointing at one
/// of `replaceable` (an earlier install's target) is repointed; anything else is left alone.
pub(crate) fn link(path: &Path, target: &str, replaceable: &[&str]) -> Result<Link, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_link(path) {
        Ok(t) if t == Path::new(target) => return Ok(Link::Present),
        Ok(t) if replaceable.iter().any(|r| t == Path::new(r)) => {
            std::fs::remove_file(path).map_err(io)?;
        }
        Ok(_) => return Ok(Link::Foreign),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Not a symlink (a file or a directory).
        Err(_) => return Ok(Link::Foreign),
    }
    let created = create_parents(path).map_err(io)?;
    std::os::unix::fs::symlink(target, path).map_err(io)?;
    Ok(Link::Created(created))
}

/// Removes the symlink at `path` if it still points at `target`. Returns whether it did.
pub(crate) fn unlink(path: &Path, target: &str) -> Result<bool, Error> {
    match std::fs::read_link(path) {
        Ok(t) if t == Path::new(target) => {
            std::fs::remove_file(path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(true)
        }
        _ => Ok(false),
    }
}
