//! The folders a run may read its data from. A cluster rank reads only inside the roots its
//! worker allows: each data file (image, caption, prompt file, cached latent) is opened and the
//! open descriptor's real path is checked, so neither a symbolic link inside an allowed folder
//! nor one swapped in after an earlier check leads out. Local runs are not confined (kohya
//! follows links).

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where data may be read from: anywhere, or only inside some folders.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedRoots {
    /// Canonical roots; `None` = not confined.
    roots: Option<Vec<PathBuf>>,
}

impl AllowedRoots {
    /// Not confined: any path may be read (local runs).
    pub fn any() -> Self {
        Self { roots: None }
    }

    /// Only files inside `roots` may be read. Roots are compared after canonicalisation; a root
    /// that does not exist allows nothing.
    pub fn only<I, P>(roots: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: AsRef<Path>,
    {
        Self {
            roots: Some(
                roots
                    .into_iter()
                    .filter_map(|r| r.as_ref().canonicalize().ok())
                    .collect(),
            ),
        }
    }

    pub fn is_confined(&self) -> bool {
        self.roots.is_some()
    }

    fn refuse(&self, path: &Path, real: &Path) -> Error {
        let roots: Vec<String> = self
            .roots
            .iter()
            .flatten()
            .map(|r| r.display().to_string())
            .collect();
        Error::Config(format!(
            "`{}` leads to `{}`, outside the folders this worker lets a job read ({}): a \
             dataset may not link to files outside it; copy the file into the dataset instead \
             of linking it",
            path.display(),
            real.display(),
            if roots.is_empty() {
                "none".to_string()
            } else {
                roots.join(", ")
            }
        ))
    }

    fn inside(&self, real: &Path) -> bool {
        match &self.roots {
            None => true,
            Some(roots) => roots.iter().any(|r| real.starts_with(r)),
        }
    }

    /// Refuses `path` when it resolves (links followed) to a place outside the roots. For
    /// listing and metadata checks; reads go through [`AllowedRoots::open`], which checks the
    /// file actually opened.
    pub fn check(&self, path: &Path) -> Result<()> {
        if self.roots.is_none() {
            return Ok(());
        }
        let real = path.canonicalize().map_err(|e| Error::io(path, e))?;
        if self.inside(&real) {
            Ok(())
        } else {
            Err(self.refuse(path, &real))
        }
    }

    /// Opens `path` for reading. When confined, the file must be a regular file inside a
    /// root, judged by where the open descriptor really points, so nothing can be swapped in
    /// between a check and the open.
    pub fn open(&self, path: &Path) -> Result<File> {
        if self.roots.is_none() {
            return File::open(path).map_err(|e| Error::io(path, e));
        }
        let file = open_nonblocking(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::Config(format!(
                "`{}` is not a regular file; a dataset holds only files and folders",
                path.display()
            )));
        }
        let real = opened_path(&file, path)?;
        if self.inside(&real) {
            Ok(file)
        } else {
            Err(self.refuse(path, &real))
        }
    }

    /// The whole file, read through [`AllowedRoots::open`].
    pub fn read(&self, path: &Path) -> Result<Vec<u8>> {
        use std::io::Read;
        let mut file = self.open(path)?;
        let mut out = Vec::new();
        file.read_to_end(&mut out).map_err(|e| Error::io(path, e))?;
        Ok(out)
    }
}

/// Opens without blocking on a FIFO swapped in for a file (the type is checked next).
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
    }
    #[cfg(not(unix))]
    {
        File::open(path)
    }
}

/// Where an open file really is: the kernel's name for the descriptor on Linux; elsewhere the
/// canonical path, accepted only when it is the same file (device and inode) as the one open.
fn opened_path(file: &File, path: &Path) -> Result<PathBuf> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let link = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        if let Ok(real) = std::fs::read_link(&link) {
            return Ok(real);
        }
    }
    let real = path.canonicalize().map_err(|e| Error::io(path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let open = file.metadata().map_err(|e| Error::io(path, e))?;
        let named = std::fs::metadata(&real).map_err(|e| Error::io(&real, e))?;
        if (open.dev(), open.ino()) != (named.dev(), named.ino()) {
            return Err(Error::Config(format!(
                "`{}` changed while it was being opened; a dataset must not change during a run",
                path.display()
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = file;
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_reads_anything_and_only_reads_inside() {
        let dir = std::env::temp_dir().join(format!("loractl-confine-{}", std::process::id()));
        let inside = dir.join("in");
        let outside = dir.join("out");
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(inside.join("a.txt"), "fine").unwrap();
        std::fs::write(outside.join("secret.txt"), "secret").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(outside.join("secret.txt"), inside.join("link.txt")).unwrap();

        let roots = AllowedRoots::only([&inside]);
        assert_eq!(roots.read(&inside.join("a.txt")).unwrap(), b"fine");
        assert!(roots.read(&outside.join("secret.txt")).is_err());
        #[cfg(unix)]
        {
            let err = roots
                .read(&inside.join("link.txt"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("link.txt") && err.contains("secret.txt"),
                "{err}"
            );
            assert!(roots.check(&inside.join("link.txt")).is_err());
            assert_eq!(
                AllowedRoots::any().read(&inside.join("link.txt")).unwrap(),
                b"secret"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
