//! The library error type shared by every attn crate.

use std::path::PathBuf;

/// Everything that can go wrong while building, loading or running a model.
///
/// Each variant names what was wrong (the config field, the tensor, the file)
/// so the command-line program can report it in one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is invalid or inconsistent with another one.
    #[error("invalid config: `{field}` {reason}")]
    Config { field: String, reason: String },

    /// A weight the model needs is not in the weight source.
    #[error("missing tensor `{name}`")]
    MissingTensor { name: String },

    /// A weight exists but has the wrong shape.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape { name: String, expected: Vec<usize>, got: Vec<usize> },

    /// An input tensor given to a layer has the wrong shape or type.
    #[error("{op}: {reason}")]
    Input { op: &'static str, reason: String },

    /// A file could not be read.
    #[error("{}: {cause}", path.display())]
    Io { path: PathBuf, cause: std::io::Error },

    /// A file was read but its content is malformed, truncated or corrupt.
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },

    /// A valid request for something attn does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// An error from the tensor library.
    #[error("tensor op failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

impl Error {
    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config { field: field.into(), reason: reason.into() }
    }

    pub fn input(op: &'static str, reason: impl Into<String>) -> Self {
        Error::Input { op, reason: reason.into() }
    }

    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format { path: path.into(), reason: reason.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), cause: source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
