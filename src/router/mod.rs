//! router (temporary stub with the final API; replaced by the pg_query router)

use std::sync::Arc;

use crate::topology::{ShardId, Topology};

pub struct Router {
    topology: Arc<Topology>,
}

impl Router {
    pub fn new(topology: Arc<Topology>) -> Router {
        Router { topology }
    }
    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }
    pub fn plan(&self, sql: &str) -> Result<Arc<QueryPlan>, RouteError> {
        let statements = sql
            .split(';')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                let first = s
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_ascii_lowercase();
                let kind = match first.as_str() {
                    "begin" | "start" => StatementKind::Begin,
                    "commit" | "end" => StatementKind::Commit,
                    "rollback" | "abort" => StatementKind::Rollback,
                    "set" => StatementKind::Set {
                        name: s.split_whitespace().nth(1).unwrap_or("").to_lowercase(),
                        local: false,
                    },
                    "reset" => StatementKind::Reset { name: None },
                    "show" => StatementKind::Show,
                    "discard" => StatementKind::Discard,
                    _ => StatementKind::Query,
                };
                StatementPlan {
                    text: s.to_owned(),
                    kind,
                }
            })
            .collect();
        Ok(Arc::new(QueryPlan { statements }))
    }
}

pub struct QueryPlan {
    pub statements: Vec<StatementPlan>,
}

pub struct StatementPlan {
    pub text: String,
    pub kind: StatementKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatementKind {
    Query,
    Begin,
    Commit,
    Rollback,
    Savepoint,
    Set { name: String, local: bool },
    Reset { name: Option<String> },
    Discard,
    Show,
    Other,
}

impl StatementPlan {
    pub fn is_write(&self) -> bool {
        false
    }
    pub fn route(&self, topology: &Topology, _params: &[Param<'_>]) -> Result<Routed, RouteError> {
        Ok(Routed {
            route: Route::Shard(topology.default_shard),
            reason: "stub".into(),
        })
    }
}

pub struct Param<'a> {
    pub value: Option<&'a [u8]>,
    pub binary: bool,
    pub type_oid: u32,
}

pub struct Routed {
    pub route: Route,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Shard(ShardId),
    Multi {
        shards: Vec<ShardId>,
        merge: MergePlan,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergePlan {
    Concat,
    Replicated,
}

#[derive(Debug, Clone)]
pub struct RouteError {
    sqlstate: &'static str,
    message: String,
}

impl RouteError {
    pub fn sqlstate(&self) -> &'static str {
        self.sqlstate
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    pub fn hint(&self) -> Option<&str> {
        None
    }
    pub fn position(&self) -> Option<u32> {
        None
    }
}
