//! auth (stub)
