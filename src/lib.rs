//! shardwire: a sharding router for PostgreSQL.
//!
//! Clients speak the PostgreSQL protocol to the `frontend`; the `router` decides which
//! shard(s) each statement goes to using the `topology`; the `backend` pools connections
//! to the shards; `merge` combines answers from several shards.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod auth;
pub mod backend;
pub mod config;
pub mod frontend;
pub mod merge;
pub mod protocol;
pub mod router;
pub mod server;
pub mod topology;
