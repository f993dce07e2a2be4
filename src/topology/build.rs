//! Building a `Topology` from a validated `Config` (stub).
