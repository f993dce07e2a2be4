//! Connections to the shards: one protocol connection (`conn`) and one pool per shard
//! (`pool`). Errors say which shard failed and how, and become client-facing errors
//! through `BackendError::to_pg`.

pub mod conn;
pub mod pool;

pub use conn::{ServerConn, MAX_BACKEND_MESSAGE};
pub use pool::{Checkout, Pools};

use crate::protocol::{sqlstate, PgError};

/// What went wrong talking to a shard.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// Could not open or authenticate a connection.
    #[error("could not connect to shard \"{shard}\": {reason}")]
    Connect { shard: String, reason: String },
    /// The shard refused the connection with an error of its own (bad password,
    /// unknown database, too many connections, shutting down).
    #[error("shard \"{shard}\" refused the connection: {message} ({code})")]
    Rejected {
        shard: String,
        code: String,
        message: String,
    },
    /// An established connection broke.
    #[error("connection to shard \"{shard}\" was lost: {reason}")]
    Lost { shard: String, reason: String },
    /// The shard sent something we cannot parse.
    #[error("protocol error from shard \"{shard}\": {reason}")]
    Protocol { shard: String, reason: String },
    /// No pooled connection became free in time.
    #[error("no connection to shard \"{shard}\" became free within {waited_ms} ms")]
    CheckoutTimeout { shard: String, waited_ms: u64 },
}

impl BackendError {
    /// Whether the server connection is gone (vs. a refusal we could retry).
    pub fn is_disconnect(&self) -> bool {
        matches!(
            self,
            BackendError::Lost { .. } | BackendError::Protocol { .. }
        )
    }

    /// The error a client sees.
    pub fn to_pg(&self) -> PgError {
        match self {
            BackendError::Connect { .. } | BackendError::Rejected { .. } => PgError::error(
                sqlstate::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                self.to_string(),
            )
            .with_hint(
                "check that the shard is running and that shard-config.yaml names it correctly",
            ),
            BackendError::Lost { .. } => {
                PgError::error(sqlstate::CONNECTION_FAILURE, self.to_string())
            }
            BackendError::Protocol { .. } => {
                PgError::error(sqlstate::PROTOCOL_VIOLATION, self.to_string())
            }
            BackendError::CheckoutTimeout { .. } => {
                PgError::error(sqlstate::TOO_MANY_CONNECTIONS, self.to_string()).with_hint(
                    "raise pool.size or pool.checkout_timeout_ms, or lower the client concurrency",
                )
            }
        }
    }
}
