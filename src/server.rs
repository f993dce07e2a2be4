//! Wiring a router together: topology → router, pools, users → a listening frontend.
//!
//! Everything is passed in, so tests can start a whole router on port 0.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::ScramVerifier;
use crate::backend::pool::PoolSettings;
use crate::backend::Pools;
use crate::frontend::{self, Shared, UserAuth};
use crate::router::Router;
use crate::topology::Topology;

/// A user of the router: name, plaintext password or SCRAM verifier, admin flag.
#[derive(Debug, Clone)]
pub struct UserSpec {
    pub name: String,
    pub password: String,
    pub admin: bool,
}

/// Everything `start` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub topology: Topology,
    pub users: Vec<UserSpec>,
    /// The database name clients connect to.
    pub database: String,
    /// `host:port`; port 0 picks a free one.
    pub listen: String,
    pub pool: PoolSettings,
    pub max_message: u64,
    /// Session pooling: a client keeps its shard connections until it disconnects.
    pub session_pooling: bool,
    /// Keep clients' unnamed queries on server connections (pool.reuse_unnamed_statements).
    pub reuse_unnamed_statements: bool,
    /// Run simple-protocol point SELECTs as kept statements (pool.prepare_point_queries).
    pub prepare_point_queries: bool,
    /// How long shutdown waits for running sessions.
    pub grace: Duration,
}

/// A router that is accepting clients.
pub struct RunningRouter {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningRouter {
    /// Stop accepting, let sessions finish within the grace period, and return.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.task.await;
    }

    /// Wait until the accept loop ends (after `stop` from elsewhere, or forever).
    pub async fn wait(self) {
        let _ = self.task.await;
    }

    /// A handle that can stop the router from another task.
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }
}

impl ServeOptions {
    /// Options from a validated config.
    pub fn from_config(
        cfg: &crate::config::Config,
    ) -> Result<ServeOptions, Vec<crate::config::ConfigError>> {
        let topology = crate::topology::build::build(cfg)?;
        Ok(ServeOptions {
            topology,
            users: cfg
                .users
                .iter()
                .map(|u| UserSpec {
                    name: u.name.clone(),
                    password: u.password.clone(),
                    admin: u.admin,
                })
                .collect(),
            database: cfg.database.clone(),
            listen: cfg.listen.clone(),
            pool: PoolSettings {
                size: cfg.pool.size,
                connect_timeout: Duration::from_millis(cfg.pool.connect_timeout_ms),
                checkout_timeout: Duration::from_millis(cfg.pool.checkout_timeout_ms),
            },
            session_pooling: cfg.pool.mode == crate::config::PoolMode::Session,
            max_message: cfg.pool.max_message_bytes,
            reuse_unnamed_statements: cfg.pool.reuse_unnamed_statements,
            prepare_point_queries: cfg.pool.prepare_point_queries,
            grace: Duration::from_secs(10),
        })
    }
}

/// Bind the listener and start serving.
pub async fn start(opts: ServeOptions) -> std::io::Result<RunningRouter> {
    let listener = TcpListener::bind(&opts.listen).await?;
    let addr = listener.local_addr()?;
    let pools = Pools::new(&opts.topology.shards, opts.pool);
    let users: HashMap<String, UserAuth> = opts
        .users
        .iter()
        .map(|u| {
            (
                u.name.clone(),
                UserAuth {
                    verifier: ScramVerifier::from_config(&u.password),
                    admin: u.admin,
                },
            )
        })
        .collect();
    let router = Router::new(Arc::new(opts.topology));
    let mut shared = Shared::new(router, pools, users, opts.database, opts.max_message);
    shared.session_pooling = opts.session_pooling;
    shared.reuse_unnamed_statements = opts.reuse_unnamed_statements;
    shared.prepare_point_queries = opts.prepare_point_queries;
    let shared = Arc::new(shared);
    let (tx, rx) = watch::channel(false);
    let task = tokio::spawn(frontend::run(listener, shared.clone(), rx, opts.grace));
    tracing::info!(%addr, "shardwire listening");
    Ok(RunningRouter {
        addr,
        shared,
        shutdown: tx,
        task,
    })
}
