//! The one error type of the bicsi domain, and the one table that maps it to gRPC codes and HTTP
//! statuses. Nothing else in the crate decides a status code: adapters convert with `From`.
//!
//! Messages name the object and, where there is one, the fix: they are read by people running
//! `kubectl describe pvc`, not by programs. `OsError`, the error of the OS seams (`os`), lives here
//! too, below them, so this floor imports nothing of the crate.

/// What went wrong, classified the way CSI (and HTTP) callers need to react to it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed or names something unsupported; retrying it unchanged cannot help.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// An object of that name exists and is incompatible with the request.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state that allows the call (attached elsewhere, not staged, in use).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation on the same object is in flight; the caller retries later.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    OutOfRange(String),
    /// Work is in progress or a dependency is down; the same call later may succeed.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    #[error("store: {0}")]
    Store(String),
    #[error(transparent)]
    Os(#[from] OsError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub type OsResult<T> = Result<T, OsError>;

/// What went wrong below the domain. Each message names the object and, where one is known, the
/// fix. The variants exist so that the domain can map them to CSI codes without parsing text:
/// `NotFound` → NotFound, `Busy` → FailedPrecondition, `Conflict` → AlreadyExists or
/// FailedPrecondition, `Unsupported` → InvalidArgument, `NoSpace` → ResourceExhausted,
/// `Timeout` and `Unavailable` → Unavailable, everything else → Internal.
#[derive(Debug, thiserror::Error)]
pub enum OsError {
    /// A program exited non-zero; `stderr` is what it said (plus a hint when one is known).
    #[error("{cmd} failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The file, device, program or process the call needs does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The object is in use (a mounted loop device, an export with a loop device on it).
    #[error("{0}")]
    Busy(String),
    /// The object exists but differs from what was asked (a replica with another size, an engine
    /// serving other replicas, a device that already holds data).
    #[error("{0}")]
    Conflict(String),
    /// The request cannot be served by this layer (a filesystem type, an image format, a path).
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    Timeout(String),
    /// A service this layer depends on does not answer (the engine host of `--engine-endpoint`).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Other(String),
}

impl OsError {
    /// An I/O error with context; ENOSPC becomes `NoSpace` and ENOENT `NotFound` so callers can
    /// tell them apart without looking at errno.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> OsError {
        let context = context.into();
        match source.kind() {
            std::io::ErrorKind::StorageFull => {
                OsError::NoSpace(format!("{context}: {source}; free space on that disk"))
            }
            std::io::ErrorKind::NotFound => OsError::NotFound(format!("{context}: {source}")),
            _ => OsError::Io { context, source },
        }
    }
}

impl Error {
    /// The gRPC code for this error: the whole table lives here.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Aborted(_) => Code::Aborted,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Internal(_) | Error::Store(_) => Code::Internal,
            Error::Os(OsError::NoSpace(_)) => Code::ResourceExhausted,
            Error::Os(OsError::Busy(_) | OsError::Conflict(_)) => Code::FailedPrecondition,
            Error::Os(OsError::Timeout(_) | OsError::Unavailable(_)) => Code::Unavailable,
            Error::Os(_) => Code::Internal,
        }
    }

    /// The HTTP status for the same error, derived from the gRPC code so the two never disagree.
    pub fn http_status(&self) -> u16 {
        use tonic::Code;
        match self.code() {
            Code::InvalidArgument | Code::OutOfRange => 400,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => 409,
            Code::ResourceExhausted => 507,
            Code::Unavailable => 503,
            _ => 500,
        }
    }

    /// Builds an error of the class a gRPC status carries (used by clients of our own APIs).
    pub fn from_code(code: tonic::Code, message: String) -> Error {
        use tonic::Code;
        match code {
            Code::InvalidArgument => Error::InvalidArgument(message),
            Code::NotFound => Error::NotFound(message),
            Code::AlreadyExists => Error::AlreadyExists(message),
            Code::FailedPrecondition => Error::FailedPrecondition(message),
            Code::Aborted => Error::Aborted(message),
            Code::ResourceExhausted => Error::ResourceExhausted(message),
            Code::OutOfRange => Error::OutOfRange(message),
            Code::Unavailable => Error::Unavailable(message),
            _ => Error::Internal(message),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        tonic::Status::new(e.code(), e.to_string())
    }
}

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Error {
        Error::Store(e.to_string())
    }
}

macro_rules! store_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Error {
                Error::Store(e.to_string())
            }
        }
    )*};
}
store_error_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Error {
        Error::Internal(format!("encoding: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_http_statuses_agree() {
        let table = [
            (
                Error::InvalidArgument("x".into()),
                tonic::Code::InvalidArgument,
                400,
            ),
            (Error::NotFound("x".into()), tonic::Code::NotFound, 404),
            (
                Error::AlreadyExists("x".into()),
                tonic::Code::AlreadyExists,
                409,
            ),
            (
                Error::FailedPrecondition("x".into()),
                tonic::Code::FailedPrecondition,
                409,
            ),
            (Error::Aborted("x".into()), tonic::Code::Aborted, 409),
            (
                Error::ResourceExhausted("x".into()),
                tonic::Code::ResourceExhausted,
                507,
            ),
            (Error::OutOfRange("x".into()), tonic::Code::OutOfRange, 400),
            (
                Error::Unavailable("x".into()),
                tonic::Code::Unavailable,
                503,
            ),
            (Error::Internal("x".into()), tonic::Code::Internal, 500),
        ];
        for (e, code, http) in table {
            assert_eq!(e.code(), code, "{e:?}");
            assert_eq!(e.http_status(), http, "{e:?}");
            let back = Error::from_code(code, "x".into());
            assert_eq!(back.code(), code);
        }
    }
}
