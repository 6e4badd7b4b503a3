//! The serve crate's one error type. Every variant maps to one OpenAI-style HTTP error, so a bad
//! request never panics: it becomes an `Err` and then a JSON body with the right status.
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ServeError {
    /// A malformed or out-of-range request (400). `param` names the offending field.
    #[error("{message}")]
    Invalid { message: String, param: Option<String> },
    /// The prompt plus the requested tokens do not fit the model's context (400).
    #[error("{message}")]
    ContextLength { message: String },
    /// The body is larger than the server accepts (413).
    #[error("request body exceeds {limit} bytes")]
    TooLarge { limit: usize },
    /// The client did not send its request in time (408).
    #[error("{0}")]
    Timeout(String),
    /// `model` names a model this server does not have (404).
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    /// No such route (404).
    #[error("no route {0}")]
    NotFound(String),
    /// The waiting queue is full (429).
    #[error("the server is busy: {0} requests are already waiting; retry later")]
    QueueFull(usize),
    /// The model is still loading, or the engine stopped (503); the message says which and why.
    #[error("{0}")]
    NotReady(String),
    /// Generation failed inside the engine (500).
    #[error("generation failed: {0}")]
    Engine(String),
    #[error(transparent)]
    Model(#[from] femtochat_model::ModelError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ServeError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> ServeError {
        ServeError::Invalid { message: message.into(), param: param.map(str::to_string) }
    }
}

pub type Result<T> = std::result::Result<T, ServeError>;
