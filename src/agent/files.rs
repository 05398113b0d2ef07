//! `CopyFile`: files, directories and symlinks the shim puts into the VM (hosts, hostname,
//! resolv.conf, termination-log, ConfigMap/Secret/projected/downward-API files), in chunks of
//! up to 1 MiB, again on every change.
//!
//! kata's rules: the destination must lie under the container share directory; nothing is
//! written outside it. Here every path component below the share directory is opened
//! without following symlinks and `..` is refused, so neither a symlink planted by an earlier
//! call nor a crafted path can lead a write out. A file is written to `<name>.tmp` and renamed
//! over the destination once `file_size` bytes are there, so a reader never sees half a file.
//! Directories come with the directory bit in `file_mode` (0o40000) and no data; symlinks with
//! the link bit (0o120000) and their target as data; parent directories get `dir_mode`
//! (Go's FileMode: only its permission bits count).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Component, Path};

use nix::fcntl::{AtFlags, OFlag, openat};
use std::os::unix::ffi::OsStrExt;

use nix::sys::stat::{Mode, SFlag, fchmod, fstat, mkdirat};
use nix::unistd::{Gid, Uid, fchown, fchownat};

use super::{Error, sys};
use crate::protocol::agent::CopyFileRequest;

const PERMISSIONS: u32 = 0o7777;
const DIR_PERMISSIONS: u32 = 0o777;

/// Where `req.path` lands relative to `share`, checked: absolute, under `share`, no `..`,
/// not `share` itself.
pub(crate) fn relative<'a>(share: &Path, path: &'a str) -> Result<&'a Path, Error> {
    let p = Path::new(path);
    let rel = p.strip_prefix(share).map_err(|_| {
        Error::InvalidArgument(format!(
            "CopyFile path {path:?} is not under {}",
            share.display()
        ))
    })?;
    if rel.as_os_str().is_empty() {
        return Err(Error::InvalidArgument(format!(
            "CopyFile path {path:?} names the share directory itself"
        )));
    }
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Error::InvalidArgument(format!(
            "CopyFile path {path:?} holds `..` or `.` components"
        )));
    }
    Ok(rel)
}

fn open_dir(dir: &impl AsFd, name: &Path) -> Result<OwnedFd, Error> {
    openat(
        dir,
        name,
        OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
        Mode::empty(),
    )
    .map_err(|e| match e {
        nix::errno::Errno::ELOOP | nix::errno::Errno::ENOTDIR => Error::InvalidArgument(format!(
            "CopyFile: {} is a symlink or not a directory",
            name.display()
        )),
        e => sys(format!("opening {}", name.display()))(e),
    })
}

/// Opens (creating with `mode`) directory `name` in `dir`, never through a symlink.
fn mkdir_open(dir: &impl AsFd, name: &Path, mode: u32) -> Result<(OwnedFd, bool), Error> {
    let created = match mkdirat(dir, name, Mode::from_bits_truncate(mode)) {
        Ok(()) => true,
        Err(nix::errno::Errno::EEXIST) => false,
        Err(e) => return Err(sys(format!("creating {}", name.display()))(e)),
    };
    Ok((open_dir(dir, name)?, created))
}

fn chown(fd: &impl AsFd, uid: i32, gid: i32, what: &Path) -> Result<(), Error> {
    fchown(
        fd.as_fd(),
        Some(Uid::from_raw(uid as u32)),
        Some(Gid::from_raw(gid as u32)),
    )
    .map_err(sys(format!("chown {}", what.display())))
}

/// Removes `name` in `dir` whatever it is (a directory with its content).
fn remove_all(dir: &impl AsFd, name: &Path) -> Result<(), Error> {
    match nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(nix::errno::Errno::EISDIR) => {
            let sub = open_dir(dir, name)?;
            let mut d = nix::dir::Dir::from_fd(sub).map_err(sys("reading a directory"))?;
            let names: Vec<std::ffi::OsString> = d
                .iter()
                .flatten()
                .map(|e| std::ffi::OsStr::from_bytes(e.file_name().to_bytes()).to_os_string())
                .filter(|n| n != "." && n != "..")
                .collect();
            for n in names {
                remove_all(&d, Path::new(&n))?;
            }
            nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::RemoveDir)
                .map_err(sys(format!("removing {}", name.display())))
        }
        Err(e) => Err(sys(format!("removing {}", name.display()))(e)),
    }
}

/// Applies one `CopyFile` chunk under `share`.
pub(crate) fn copy(share: &Path, req: &CopyFileRequest) -> Result<(), Error> {
    let rel = relative(share, &req.path)?;
    std::fs::create_dir_all(share).map_err(super::io(format!("creating {}", share.display())))?;
    let mut dir = open_dir(&nix::fcntl::AT_FDCWD, share)?;
    let parts: Vec<&Path> = rel.iter().map(Path::new).collect();
    let (name, parents) = parts.split_last().expect("a non-empty relative path");
    let last = parents.len();
    for (i, p) in parents.iter().enumerate() {
        let (fd, created) = mkdir_open(&dir, p, req.dir_mode & DIR_PERMISSIONS)?;
        // As kata: the immediate parent is owned by the file's owner.
        if created || i + 1 == last {
            chown(&fd, req.uid, req.gid, p)?;
        }
        dir = fd;
    }
    let kind = SFlag::from_bits_truncate(req.file_mode & SFlag::S_IFMT.bits());
    if kind == SFlag::S_IFDIR {
        // An existing directory stays (its content with it); a file in its place goes.
        match nix::unistd::unlinkat(&dir, *name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) | Err(nix::errno::Errno::EISDIR) => {}
            Err(e) => return Err(sys(format!("replacing {}", req.path))(e)),
        }
        let (fd, _) = mkdir_open(&dir, name, req.file_mode & DIR_PERMISSIONS)?;
        fchmod(&fd, Mode::from_bits_truncate(req.file_mode & PERMISSIONS))
            .map_err(sys(format!("chmod {}", req.path)))?;
        return chown(&fd, req.uid, req.gid, name);
    }
    if kind == SFlag::S_IFLNK {
        remove_all(&dir, name)?;
        let target = std::ffi::OsStr::from_bytes(&req.data);
        nix::unistd::symlinkat(target, &dir, *name)
            .map_err(sys(format!("creating the symlink {}", req.path)))?;
        return fchownat(
            &dir,
            *name,
            Some(Uid::from_raw(req.uid as u32)),
            Some(Gid::from_raw(req.gid as u32)),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(sys(format!("chown {}", req.path)));
    }
    if req.offset < 0 || req.file_size < 0 {
        return Err(Error::InvalidArgument(format!(
            "CopyFile {}: negative offset or size",
            req.path
        )));
    }
    let tmp = {
        let mut t = name.as_os_str().to_os_string();
        t.push(".tmp");
        t
    };
    let tmp = Path::new(&tmp);
    let mut flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    if req.offset == 0 {
        flags |= OFlag::O_TRUNC;
    }
    let file = openat(&dir, tmp, flags, Mode::from_bits_truncate(0o600))
        .map_err(sys(format!("opening {}.tmp", req.path)))?;
    let mut written = 0;
    while written < req.data.len() {
        written += nix::sys::uio::pwrite(&file, &req.data[written..], req.offset + written as i64)
            .map_err(sys(format!("writing {}", req.path)))?;
    }
    let st = fstat(&file).map_err(sys(format!("stat {}", req.path)))?;
    if st.st_size != req.file_size {
        // More chunks to come.
        return Ok(());
    }
    fchmod(&file, Mode::from_bits_truncate(req.file_mode & PERMISSIONS))
        .map_err(sys(format!("chmod {}", req.path)))?;
    chown(&file, req.uid, req.gid, name)?;
    // A directory in the way goes; a file or symlink is replaced by the rename itself.
    if let Ok(st) = nix::sys::stat::fstatat(&dir, *name, AtFlags::AT_SYMLINK_NOFOLLOW)
        && SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR
    {
        remove_all(&dir, name)?;
    }
    nix::fcntl::renameat(&dir, tmp, &dir, *name).map_err(sys(format!("renaming {}", req.path)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    fn req(path: &str, mode: u32, data: &[u8], size: i64, offset: i64) -> CopyFileRequest {
        CopyFileRequest {
            path: path.into(),
            file_size: size,
            file_mode: mode,
            dir_mode: 0x8000_01e8, // Go's ModeDir | 0o750
            uid: nix::unistd::getuid().as_raw() as i32,
            gid: nix::unistd::getgid().as_raw() as i32,
            offset,
            data: data.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn a_file_lands_under_the_share_directory_with_its_mode() {
        let d = tempfile::tempdir().unwrap();
        let share = d.path().join("shared/containers");
        let p = format!("{}/c1-0123456789abcdef-hosts", share.display());
        copy(&share, &req(&p, 0o644, b"127.0.0.1 localhost\n", 20, 0)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"127.0.0.1 localhost\n");
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o644);
    }

    #[test]
    fn chunks_appear_only_once_the_whole_file_is_there() {
        let d = tempfile::tempdir().unwrap();
        let share = d.path().to_path_buf();
        let p = format!("{}/c1-x-cm/..2024/key", share.display());
        let whole: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        copy(&share, &req(&p, 0o600, &whole[..1024], 3000, 0)).unwrap();
        assert!(!Path::new(&p).exists(), "visible after the first chunk");
        copy(&share, &req(&p, 0o600, &whole[1024..2048], 3000, 1024)).unwrap();
        copy(&share, &req(&p, 0o600, &whole[2048..], 3000, 2048)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), whole);
        // The parent got the permission bits of Go's dir mode.
        let parent = std::fs::metadata(Path::new(&p).parent().unwrap()).unwrap();
        assert_eq!(parent.permissions().mode() & 0o777, 0o750);
        assert_eq!(parent.uid(), nix::unistd::getuid().as_raw());
        // Sent again (a ConfigMap update): replaced.
        copy(&share, &req(&p, 0o600, b"new", 3, 0)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn directories_and_symlinks_are_made_as_the_shim_sends_them() {
        let d = tempfile::tempdir().unwrap();
        let share = d.path().to_path_buf();
        let dir = format!("{}/c1-x-cm", share.display());
        copy(&share, &req(&dir, 0o40755, b"", 0, 0)).unwrap();
        assert!(Path::new(&dir).is_dir());
        let link = format!("{dir}/key");
        copy(&share, &req(&link, 0o120777, b"..data/key", 10, 0)).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("..data/key"));
        // The directory again keeps its content.
        copy(&share, &req(&dir, 0o40755, b"", 0, 0)).unwrap();
        assert!(std::fs::symlink_metadata(&link).is_ok());
    }

    #[test]
    fn paths_outside_the_share_directory_or_through_symlinks_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let share = d.path().join("share");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        for bad in [
            "/etc/passwd".to_string(),
            format!("{}/../outside/x", share.display()),
            format!("{}/a/../../outside/x", share.display()),
            format!("{}", share.display()),
            "relative/path".to_string(),
        ] {
            let e = copy(&share, &req(&bad, 0o644, b"x", 1, 0)).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{bad}: {e}");
        }
        // A symlink planted by an earlier call cannot lead a write out.
        let link = format!("{}/escape", share.display());
        copy(
            &share,
            &req(&link, 0o120777, outside.to_str().unwrap().as_bytes(), 1, 0),
        )
        .unwrap();
        let e = copy(&share, &req(&format!("{link}/pwned"), 0o644, b"x", 1, 0)).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert!(!outside.join("pwned").exists());
        // Nor can a file name that is a symlink be written through.
        let e = copy(&share, &req(&link, 0o644, b"x", 1, 0));
        assert!(e.is_ok(), "replacing the symlink itself is fine: {e:?}");
        assert!(!outside.join("escape").exists());
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
    }
}
