//! backend (stub)
