//! The crate's error type: every failure names the file, and where it applies the tensor or key.

use std::path::{Path, PathBuf};

/// Errors raised while reading or writing checkpoints and outputs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error on a named file.
    /// (The OS error is part of the message, not a `source`, so that error chains do not print
    /// it twice.)
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A file whose contents are malformed (not a tensor in particular).
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// One tensor of a file is malformed, missing or has the wrong shape or dtype.
    #[error("{}: tensor `{}`: {msg}", path.display(), printable(tensor))]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    /// A configuration key is missing, has the wrong type, or holds a value this tool cannot honour.
    #[error("{}: key `{}`: {msg}", path.display(), printable(key))]
    Config {
        path: PathBuf,
        key: String,
        msg: String,
    },
    /// A bad option or combination of options given by the user.
    #[error("{0}")]
    Usage(String),
}

/// `s` with control characters (a terminal's escape sequences, newlines, NULs) written as
/// `\u{..}` escapes, so that a name read from a file is printed as what it is.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(s.chars().map(|c| if c.is_control() { c.escape_unicode().to_string() } else { c.to_string() }).collect())
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            err: source,
        }
    }
    pub fn file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn tensor(path: impl AsRef<Path>, tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            path: path.as_ref().to_path_buf(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
    pub fn config(path: impl AsRef<Path>, key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.as_ref().to_path_buf(),
            key: key.into(),
            msg: msg.into(),
        }
    }
}

/// Attach a path to `std::io::Result`s.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
