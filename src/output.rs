//! Outputs that appear whole or not at all: everything is written to a temporary path beside the
//! target and renamed into place only after it has been verified. A dropped (failed) output removes
//! its temporary path, so an error leaves nothing behind.

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// A checksum of bytes written, compared with the bytes read back before an output is committed.
/// XXH3-128: it detects a torn or corrupted write as surely as SHA-256 for this purpose and runs at
/// memory speed (SHA-256 was an eighth of a conversion's time).
pub type Checksum = u128;

/// A streaming [`Checksum`].
#[derive(Default, Clone)]
pub struct Checksummer(xxhash_rust::xxh3::Xxh3);

impl Checksummer {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn finish(&self) -> Checksum {
        self.0.digest128()
    }
}

/// The [`Checksum`] of `bytes`.
pub fn checksum(bytes: &[u8]) -> Checksum {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

/// Prefix of every temporary name, so stale ones from a killed run can be recognised and removed.
pub const TEMP_MARK: &str = ".ouro-quant-tmp-";

/// A file or directory being written under a temporary name beside its target.
#[derive(Debug)]
pub struct PendingOutput {
    target: PathBuf,
    temp: PathBuf,
    is_dir: bool,
    done: bool,
}

impl PendingOutput {
    /// Prepares to write a file at `target`. Refuses an existing target unless `force`.
    pub fn file(target: impl AsRef<Path>, force: bool) -> Result<Self> {
        Self::new(target.as_ref(), force, false)
    }

    /// Prepares to write a directory at `target` (created empty under the temporary name).
    pub fn dir(target: impl AsRef<Path>, force: bool) -> Result<Self> {
        Self::new(target.as_ref(), force, true)
    }

    fn new(target: &Path, force: bool, is_dir: bool) -> Result<Self> {
        let name = target
            .file_name()
            .ok_or_else(|| Error::file(target, "output path has no file name"))?
            .to_string_lossy()
            .into_owned();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !parent.is_dir() {
            return Err(Error::file(&parent, "output directory does not exist"));
        }
        if target.exists() && !force {
            return Err(Error::file(
                target,
                "already exists (pass --force to replace it)",
            ));
        }
        remove_stale(&parent, &name);
        let temp = parent.join(format!("{TEMP_MARK}{}-{name}", std::process::id()));
        if is_dir {
            std::fs::create_dir(&temp).at(&temp)?;
        }
        Ok(PendingOutput {
            target: target.to_path_buf(),
            temp,
            is_dir,
            done: false,
        })
    }

    /// The temporary path to write to.
    pub fn path(&self) -> &Path {
        &self.temp
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the finished output into place (replacing an old target, which `new` allowed only
    /// with `force`).
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.target.exists() {
            let r = if self.target.is_dir() && !self.target.is_symlink() {
                std::fs::remove_dir_all(&self.target)
            } else {
                std::fs::remove_file(&self.target)
            };
            r.at(&self.target)?;
        }
        std::fs::rename(&self.temp, &self.target).at(&self.target)?;
        if let Some(parent) = self.target.parent() {
            // Make the rename durable where the platform allows syncing a directory.
            if let Ok(d) = std::fs::File::open(if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            }) {
                let _ = d.sync_all();
            }
        }
        self.done = true;
        Ok(self.target.clone())
    }
}

impl Drop for PendingOutput {
    fn drop(&mut self) {
        if !self.done {
            let _ = if self.is_dir {
                std::fs::remove_dir_all(&self.temp)
            } else {
                std::fs::remove_file(&self.temp)
            };
        }
    }
}

/// Removes temporaries for `name` left by processes that no longer run (a SIGKILLed convert).
fn remove_stale(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let suffix = format!("-{name}");
    for e in entries.flatten() {
        let fname = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = fname.strip_prefix(TEMP_MARK) else {
            continue;
        };
        let Some(pid) = rest.strip_suffix(&suffix) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        // Without /proc we cannot tell; keep the file (it is ignored by name in any case).
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_output_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("x.bin");
        {
            let p = PendingOutput::file(&target, false).unwrap();
            std::fs::write(p.path(), b"partial").unwrap();
        }
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        let p = PendingOutput::file(&target, false).unwrap();
        std::fs::write(p.path(), b"whole").unwrap();
        p.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        assert!(PendingOutput::file(&target, false).is_err());
    }

    #[test]
    fn stale_temp_of_dead_process_is_removed() {
        let d = tempfile::tempdir().unwrap();
        // pid 0x7fff_fff0 does not exist.
        let stale = d.path().join(format!("{TEMP_MARK}2147483632-out.gguf"));
        std::fs::write(&stale, b"junk").unwrap();
        let _p = PendingOutput::file(d.path().join("out.gguf"), false).unwrap();
        assert!(!stale.exists());
    }
}

/// Starts writing a growing file out to the disk as it is written (Linux `sync_file_range` without
/// waiting), every [`Writeback::STEP`] bytes: the disk works while the next tensors are quantized,
/// dirty pages do not pile up until the final fsync (which then finds little left to do), and the
/// kernel does not throttle the writer all at once. Elsewhere it does nothing.
#[derive(Debug, Default)]
pub struct Writeback {
    flushed: u64,
}

impl Writeback {
    pub const STEP: u64 = 32 << 20;

    /// `written`: bytes handed to `out` so far; what its buffer still holds is not in the file yet.
    pub fn advance(&mut self, out: &std::io::BufWriter<std::fs::File>, written: u64) {
        let (file, in_file) = (out.get_ref(), written - out.buffer().len() as u64);
        #[cfg(target_os = "linux")]
        if in_file >= self.flushed + Self::STEP {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain syscall on an open descriptor. Errors are ignored: this only hints,
            // and the final fsync reports any write error.
            unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    self.flushed as libc::off64_t,
                    (in_file - self.flushed) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.flushed = in_file;
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (file, in_file);
    }
}
