//! merge (stub)
