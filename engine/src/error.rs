//! One typed error for the whole engine. Every variant carries what a user needs to fix the
//! problem: the file, the tensor name, the expected and found shape or dtype, the limit.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("{path}: unknown model_type {model_type:?}; supported: {}", supported.join(", "))]
    UnsupportedModelType {
        path: PathBuf,
        model_type: String,
        supported: Vec<&'static str>,
    },

    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },

    #[error("tensor {name:?} is missing (looked in {})", files.join(", "))]
    MissingTensor { name: String, files: Vec<String> },

    #[error("{file}: unexpected tensor {name:?}: the {family} architecture has no such weight")]
    UnexpectedTensor {
        name: String,
        file: String,
        family: String,
    },

    #[error("{file}: tensor {name:?} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        file: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{file}: tensor {name:?} has dtype {found}, expected one of {expected}")]
    TensorDtype {
        name: String,
        file: String,
        found: String,
        expected: &'static str,
    },

    #[error("{path}: {msg}")]
    Tokenizer { path: PathBuf, msg: String },

    /// Bad user input: empty prompt, token id out of range, prompt longer than the context...
    #[error("{0}")]
    Input(String),

    #[error("model {name:?} ({repo}) is not in the local Hugging Face cache: looked for {looked_in}.\n{hint}")]
    ModelNotFound {
        name: String,
        repo: String,
        looked_in: PathBuf,
        hint: String,
    },

    /// A download from the Hugging Face Hub (`what`: the repo, revision and file) that failed.
    #[error("Hugging Face Hub, {what}: {msg}")]
    Hub { what: String, msg: String },

    /// A device allocation that cannot succeed, caught before it is tried (or the driver's
    /// out-of-memory error, with the numbers that explain it).
    #[error(
        "{device} out of memory: {what} needs {} but only {} of {} is free{}",
        crate::units::human_bytes(*need),
        crate::units::human_bytes(*free),
        crate::units::human_bytes(*total),
        if hint.is_empty() { String::new() } else { format!("; {hint}") }
    )]
    OutOfMemory {
        device: String,
        what: String,
        need: u64,
        free: u64,
        total: u64,
        hint: String,
    },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
