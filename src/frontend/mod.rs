//! frontend (stub)
