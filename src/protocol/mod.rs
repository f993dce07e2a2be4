//! protocol (stub)
