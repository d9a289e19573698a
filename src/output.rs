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

// ---------------------------------------------------------------------------------------------
// Inputs: what a command reads, which no output may be, contain, or lie inside.
// ---------------------------------------------------------------------------------------------

/// An input as it was found: its canonical path, whether it is a directory, and the (device,
/// inode) identities of it and, for a directory, of every file directly inside it (so that a hard
/// link to a model file is recognised under any name).
#[derive(Debug, Clone)]
struct Input {
    canonical: PathBuf,
    is_dir: bool,
    ids: Vec<(u64, u64)>,
}

static INPUTS: std::sync::Mutex<Vec<Input>> = std::sync::Mutex::new(Vec::new());

#[cfg(unix)]
fn file_id(m: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

/// Records `path` as an input of the running command: every output made afterwards (and every
/// output checked with [`check_target`]) is refused when it is this path (by name or by inode),
/// contains it, or lies inside it. A path that does not exist yet is ignored here; reading it
/// reports it.
pub fn register_input(path: impl AsRef<Path>) {
    let path = path.as_ref();
    let Ok(canonical) = path.canonicalize() else {
        return;
    };
    let Ok(meta) = std::fs::metadata(&canonical) else {
        return;
    };
    let mut ids: Vec<(u64, u64)> = file_id(&meta).into_iter().collect();
    if meta.is_dir() {
        if let Ok(entries) = std::fs::read_dir(&canonical) {
            for e in entries.flatten() {
                if let Some(id) = e.metadata().ok().as_ref().and_then(file_id) {
                    ids.push(id);
                }
            }
        }
    }
    INPUTS.lock().unwrap_or_else(|e| e.into_inner()).push(Input { canonical, is_dir: meta.is_dir(), ids });
}

/// Where `target` would be: its folder's canonical path joined with its name (the target itself
/// need not exist).
fn resolve(target: &Path) -> Result<(PathBuf, String)> {
    let name = target
        .file_name()
        .filter(|n| *n != "." && *n != "..")
        .ok_or_else(|| Error::file(target, "output path has no file name"))?
        .to_string_lossy()
        .into_owned();
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let meta = std::fs::metadata(&parent).map_err(|_| Error::file(&parent, "output directory does not exist"))?;
    if !meta.is_dir() {
        return Err(Error::file(&parent, "output directory is not a directory"));
    }
    let parent = parent.canonicalize().at(&parent)?;
    Ok((parent.join(&name), name))
}

/// Whether a directory is one this tool wrote: an MLX directory (its index carries our record) or
/// a `synth` checkpoint (its weights' header metadata carries our mark).
pub fn is_our_directory(dir: &Path) -> bool {
    let index = dir.join("model.safetensors.index.json");
    if let Ok(text) = std::fs::read_to_string(&index) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if v.get("metadata").and_then(|m| m.get(crate::verify::MLX_INDEX_KEY)).is_some() {
                return true;
            }
        }
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        (n == "model.safetensors" || (n.starts_with("model-00001-of-") && n.ends_with(".safetensors")))
            && e.file_type().is_ok_and(|t| t.is_file())
            && crate::stfile::SafetensorsFile::open(e.path())
                .is_ok_and(|f| f.header().metadata.contains_key(SYNTH_MARK))
    })
}

/// The safetensors metadata key `synth` writes, by which `--force` recognises its directories.
pub const SYNTH_MARK: &str = "ouro_quant.synth";

/// The words by which the files this tool writes without a header of their own (SVG and PNG
/// plots) name their writer.
pub const FILE_MARK: &str = "written by ouro-quant";

/// Whether a regular file is one this tool wrote, by what it carries: a GGUF file with our
/// `ouro_quant.version` key; a safetensors file whose metadata names us (logits, stored
/// references, synth weights); a validate report (its schema), Markdown summary or card; a plot
/// (its [`FILE_MARK`]). `--force` replaces no other file.
pub fn is_our_file(path: &Path) -> bool {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut head = Vec::new();
    if f.by_ref().take(1 << 16).read_to_end(&mut head).is_err() {
        return false;
    }
    if head.starts_with(b"GGUF") {
        return crate::gguf::file::GgufFile::open(path).is_ok_and(|g| g.header.get("ouro_quant.version").is_some());
    }
    if let Ok(st) = crate::stfile::SafetensorsFile::open(path) {
        let m = &st.header().metadata;
        return m.get("produced_by").is_some_and(|v| v.starts_with("ouro-quant"))
            || m.get("format").is_some_and(|v| v.starts_with("ouro-quant"))
            || m.contains_key(SYNTH_MARK);
    }
    // The card inside a directory this tool wrote is part of that output.
    if path.file_name().is_some_and(|n| n == "README.md") && path.parent().is_some_and(is_our_directory) {
        return true;
    }
    let text = String::from_utf8_lossy(&head);
    let find = |needle: &str| text.contains(needle);
    find("\"schema\": \"ouro-quant-")
        || text.starts_with("**Validation** by ouro-quant")
        || (text.starts_with("---\n") && text.split("\n---").next().is_some_and(|front| front.contains("\nquantized_by: ouro-quant\n")))
        || find(FILE_MARK)
}

/// What an existing target is, as far as replacing it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Existing {
    None,
    File,
    OurDir,
}

/// Checks an output location before any work: its folder exists, it is no input of this command
/// (nor contains one, nor lies inside one), and what is there now may be replaced: nothing, or with
/// `force` a regular file (for a file output) or a directory this tool wrote (for a directory
/// output). Never a foreign directory, a symbolic link, a device, a FIFO or a socket.
pub fn check_target(target: &Path, force: bool, is_dir: bool) -> Result<()> {
    check(target, force, is_dir, false).map(|_| ())
}

/// [`check_target`] for a file written with [`PendingOutput::managed_file`].
pub fn check_managed(target: &Path) -> Result<()> {
    check(target, true, false, true).map(|_| ())
}

/// `managed`: a file the tool keeps up to date in a place of its own (a batch's state and
/// summaries, a model card beside a converted file), replaced whatever it holds.
fn check(target: &Path, force: bool, is_dir: bool, managed: bool) -> Result<Existing> {
    let (resolved, _) = resolve(target)?;
    let meta = std::fs::symlink_metadata(&resolved).ok();
    let id = meta.as_ref().and_then(file_id);
    for input in INPUTS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        if resolved == input.canonical || id.is_some_and(|i| input.ids.first() == Some(&i)) {
            return Err(Error::file(target, format!("is an input of this command ({}): refusing to overwrite it", input.canonical.display())));
        }
        if id.is_some_and(|i| input.ids.contains(&i)) {
            return Err(Error::file(
                target,
                format!("is a file (or a hard link to a file) of {}, an input of this command: refusing to overwrite it", input.canonical.display()),
            ));
        }
        if input.is_dir && resolved.starts_with(&input.canonical) {
            return Err(Error::file(
                target,
                format!("lies inside {}, an input of this command: write the output elsewhere", input.canonical.display()),
            ));
        }
        if input.canonical.starts_with(&resolved) {
            return Err(Error::file(target, format!("contains {}, an input of this command", input.canonical.display())));
        }
    }
    let Some(meta) = meta else {
        return Ok(Existing::None);
    };
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Err(Error::file(target, "is a symbolic link: outputs are never written through or over links (remove it, or choose another path)"));
    }
    let what = if ft.is_file() {
        if force && !is_dir && !managed && !is_our_file(&resolved) {
            return Err(Error::file(
                target,
                "is a file that ouro-quant did not write: --force replaces only this tool's own outputs (remove it yourself, or choose another path)",
            ));
        }
        Existing::File
    } else if ft.is_dir() {
        if is_our_directory(&resolved) {
            Existing::OurDir
        } else if std::fs::read_dir(&resolved).is_ok_and(|mut d| d.next().is_none()) && !force {
            return Err(Error::file(target, "already exists (an empty directory; pass --force to replace it)"));
        } else if std::fs::read_dir(&resolved).is_ok_and(|mut d| d.next().is_none()) {
            Existing::OurDir
        } else {
            return Err(Error::file(
                target,
                "is a directory that ouro-quant did not write: it is never replaced, with or without --force (remove it yourself, or choose another path)",
            ));
        }
    } else {
        return Err(Error::file(target, "is not a regular file or directory (a device, FIFO or socket): refusing to replace it"));
    };
    if !force {
        return Err(Error::file(target, "already exists (pass --force to replace it)"));
    }
    match (what, is_dir) {
        (Existing::File, true) => Err(Error::file(target, "is a file; the output is a directory: refusing to replace it")),
        (Existing::OurDir, false) => Err(Error::file(target, "is a directory; the output is a file: refusing to replace it")),
        _ => Ok(what),
    }
}

// ---------------------------------------------------------------------------------------------
// Temporaries: named per process and per output, removed on error, on a signal, and by later runs.
// ---------------------------------------------------------------------------------------------

static NEXT_TEMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Temporaries of this process not yet committed or dropped: what a signal removes.
static PENDING: std::sync::Mutex<Vec<(PathBuf, bool)>> = std::sync::Mutex::new(Vec::new());

fn pending_list() -> std::sync::MutexGuard<'static, Vec<(PathBuf, bool)>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

fn remove_path(p: &Path, is_dir: bool) {
    let _ = if is_dir { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
}

/// Removes every pending temporary of this process (what an interrupted command leaves).
pub fn remove_pending() {
    for (p, is_dir) in pending_list().drain(..) {
        remove_path(&p, is_dir);
    }
}

/// On SIGINT, SIGTERM and SIGHUP: remove every pending temporary and exit with 128 + the signal
/// (130, 143, 129), as a shell reports a process the signal ended. Call once, early in `main`.
pub fn install_signal_cleanup() {
    #[cfg(unix)]
    {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else {
            return;
        };
        std::thread::spawn(move || {
            if let Some(sig) = signals.forever().next() {
                remove_pending();
                // A writer may have created a file in a temporary directory meanwhile.
                remove_pending();
                eprintln!("\ninterrupted: temporary outputs removed");
                std::process::exit(128 + sig);
            }
        });
    }
}

/// A file or directory being written under a temporary name beside its target.
#[derive(Debug)]
pub struct PendingOutput {
    target: PathBuf,
    temp: PathBuf,
    is_dir: bool,
    /// Whether a replaceable target existed when checked (so commit may replace it).
    replace: bool,
    managed: bool,
    done: bool,
}

impl PendingOutput {
    /// Prepares to write a file at `target` (see [`check_target`] for what is refused).
    pub fn file(target: impl AsRef<Path>, force: bool) -> Result<Self> {
        Self::new(target.as_ref(), force, false, false)
    }

    /// Prepares to write a directory at `target` (created empty under the temporary name).
    pub fn dir(target: impl AsRef<Path>, force: bool) -> Result<Self> {
        Self::new(target.as_ref(), force, true, false)
    }

    /// Prepares to write a file the tool keeps up to date in a place of its own (a batch's state
    /// and summaries, a card beside a converted file): an existing regular file there is
    /// replaced whatever it holds; inputs, links, devices and directories are still refused.
    pub fn managed_file(target: impl AsRef<Path>) -> Result<Self> {
        Self::new(target.as_ref(), true, false, true)
    }

    fn new(target: &Path, force: bool, is_dir: bool, managed: bool) -> Result<Self> {
        let existing = check(target, force, is_dir, managed)?;
        let (resolved, name) = resolve(target)?;
        let parent = resolved.parent().expect("resolved paths have a parent").to_path_buf();
        remove_stale(&parent);
        let seq = NEXT_TEMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let temp = parent.join(format!("{TEMP_MARK}{}-{seq}-{name}", std::process::id()));
        pending_list().push((temp.clone(), is_dir));
        let made = if is_dir {
            std::fs::create_dir(&temp)
        } else {
            std::fs::OpenOptions::new().write(true).create_new(true).open(&temp).map(|_| ())
        };
        if let Err(e) = made {
            pending_list().retain(|(p, _)| p != &temp);
            return Err(Error::io(&temp, e));
        }
        Ok(PendingOutput {
            target: target.to_path_buf(),
            temp,
            is_dir,
            replace: existing != Existing::None,
            managed,
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

    /// Moves the finished output into place. Without a replaceable target at the start, the move
    /// fails if anything appeared there meanwhile (one atomic step on Linux); with one (`--force`),
    /// the target is checked again and only replaced if it is still a file or our directory.
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.replace {
            let force_check = check(&self.target, true, self.is_dir, self.managed)?;
            if force_check == Existing::None {
                rename_noreplace(&self.temp, &self.target)?;
            } else if self.is_dir {
                // Move the old directory aside, put the new one in place, then remove the old.
                let (resolved, name) = resolve(&self.target)?;
                let seq = NEXT_TEMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let aside = resolved.with_file_name(format!("{TEMP_MARK}{}-{seq}-old-{name}", std::process::id()));
                std::fs::rename(&resolved, &aside).at(&self.target)?;
                pending_list().push((aside.clone(), true));
                if let Err(e) = rename_noreplace(&self.temp, &self.target) {
                    let _ = std::fs::rename(&aside, &resolved);
                    pending_list().retain(|(p, _)| p != &aside);
                    return Err(e);
                }
                pending_list().retain(|(p, _)| p != &aside);
                let _ = std::fs::remove_dir_all(&aside);
            } else {
                std::fs::rename(&self.temp, &self.target).at(&self.target)?;
            }
        } else {
            rename_noreplace(&self.temp, &self.target)?;
        }
        pending_list().retain(|(p, _)| p != &self.temp);
        if let Some(parent) = self.target.parent() {
            // Make the rename durable where the platform allows syncing a directory.
            if let Ok(d) = std::fs::File::open(if parent.as_os_str().is_empty() { Path::new(".") } else { parent }) {
                let _ = d.sync_all();
            }
        }
        self.done = true;
        Ok(self.target.clone())
    }
}

/// Renames `from` to `to` unless `to` exists, as one step where the platform has one
/// (`renameat2(RENAME_NOREPLACE)` on Linux; a hard link then unlink for files elsewhere).
fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    let appeared = || Error::file(to, "appeared while this command ran (another process wrote it?): not replaced, the new output was discarded");
    #[cfg(target_os = "linux")]
    {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let f = CString::new(from.as_os_str().as_bytes()).map_err(|_| Error::file(from, "path has a NUL byte"))?;
        let t = CString::new(to.as_os_str().as_bytes()).map_err(|_| Error::file(to, "path has a NUL byte"))?;
        // SAFETY: two valid NUL-terminated paths; the call only reads them.
        let r = unsafe {
            libc::syscall(libc::SYS_renameat2, libc::AT_FDCWD, f.as_ptr(), libc::AT_FDCWD, t.as_ptr(), libc::RENAME_NOREPLACE)
        };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EEXIST) => return Err(appeared()),
            // The filesystem or kernel lacks the flag: fall back below.
            Some(libc::EINVAL) | Some(libc::ENOSYS) => {}
            _ => return Err(Error::io(to, e)),
        }
    }
    if from.is_dir() {
        if std::fs::symlink_metadata(to).is_ok() {
            return Err(appeared());
        }
        return std::fs::rename(from, to).at(to);
    }
    match std::fs::hard_link(from, to) {
        Ok(()) => std::fs::remove_file(from).at(from),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(appeared()),
        Err(e) => Err(Error::io(to, e)),
    }
}

impl Drop for PendingOutput {
    fn drop(&mut self) {
        if !self.done {
            remove_path(&self.temp, self.is_dir);
            pending_list().retain(|(p, _)| p != &self.temp);
        }
    }
}

/// Removes temporaries in `parent` left by processes that no longer run (a SIGKILLed convert),
/// whatever output they were for.
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let fname = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = fname.strip_prefix(TEMP_MARK) else {
            continue;
        };
        let Some(Ok(pid)) = rest.split_once('-').map(|(p, _)| p.parse::<u32>()) else {
            continue;
        };
        if pid != std::process::id() && !process_alive(pid) {
            let p = e.path();
            // Never follow a link someone named like our temporaries.
            match e.file_type() {
                Ok(t) if t.is_dir() => remove_path(&p, true),
                Ok(t) if t.is_file() || t.is_symlink() => remove_path(&p, false),
                _ => {}
            }
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
