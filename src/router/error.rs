//! `RouteError`: the router's own errors, ready to become one `ErrorResponse`.

use std::fmt;

use super::sqlstate;
use crate::topology::PlacementError;

/// An error the router raises instead of routing a statement. Carries everything an
/// `ErrorResponse` needs; the proxy turns it into one in exactly one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteError {
    /// Real PostgreSQL SQLSTATE code (see `router::sqlstate`).
    sqlstate: &'static str,
    /// Primary message: names the construct that could not be routed.
    message: String,
    /// What the user can do instead.
    hint: Option<String>,
    /// 1-based character position in the query string (syntax errors).
    position: Option<u32>,
}

impl RouteError {
    pub fn new(sqlstate: &'static str, message: impl Into<String>) -> RouteError {
        RouteError {
            sqlstate,
            message: message.into(),
            hint: None,
            position: None,
        }
    }

    /// A 0A000 refusal with a hint.
    pub fn unsupported(message: impl Into<String>, hint: impl Into<String>) -> RouteError {
        RouteError::new(sqlstate::FEATURE_NOT_SUPPORTED, message).with_hint(hint)
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> RouteError {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_position(mut self, position: u32) -> RouteError {
        self.position = Some(position);
        self
    }

    pub fn sqlstate(&self) -> &'static str {
        self.sqlstate
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    pub fn position(&self) -> Option<u32> {
        self.position
    }
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.sqlstate)?;
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RouteError {}

impl From<PlacementError> for RouteError {
    fn from(e: PlacementError) -> RouteError {
        match &e {
            PlacementError::Uncovered { distribution, .. } => {
                RouteError::new(sqlstate::CHECK_VIOLATION, e.to_string()).with_hint(format!(
                    "add a placement for this key to distribution \"{distribution}\" in the shard config"
                ))
            }
            PlacementError::WrongType { .. } => {
                RouteError::new(sqlstate::INVALID_TEXT_REPRESENTATION, e.to_string())
            }
        }
    }
}
