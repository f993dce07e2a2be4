//! The client side: accepting connections, the startup handshake, and one session task
//! per client that reads its messages and drives routing, backends and merges.

pub mod cancel;
pub mod client;
mod extended;
mod held;
mod session;
pub mod settings;
pub mod startup;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::ScramVerifier;
use crate::backend::Pools;
use crate::router::Router;
use cancel::CancelRegistry;
use client::ClientConn;

/// A user allowed to connect to the router.
pub struct UserAuth {
    pub verifier: ScramVerifier,
    /// May use the admin console (not built yet).
    pub admin: bool,
}

/// What every session shares. Passed in, never global, so a test can run a whole
/// router on port 0.
pub struct Shared {
    /// The router (and with it the topology); swapped whole on reload.
    pub router: ArcSwap<Router>,
    pub pools: Arc<Pools>,
    pub users: HashMap<String, UserAuth>,
    /// The database name clients ask for.
    pub database: String,
    /// Largest message accepted from a client.
    pub max_message: u64,
    pub cancels: CancelRegistry,
    /// Session pooling: connections stay with a client until it disconnects.
    pub session_pooling: bool,
    /// Keep clients' unnamed queries on server connections under shared names
    /// (`pool.reuse_unnamed_statements`).
    pub reuse_unnamed_statements: bool,
    /// Run simple-protocol point SELECTs as kept statements with the key literal as
    /// their parameter (`pool.prepare_point_queries`).
    pub prepare_point_queries: bool,
    /// Unnamed statement texts run before (kept on server connections from their second
    /// use on).
    pub seen_texts: extended::SeenTexts,
    /// Bumped after every utility statement (DDL and the like) that ran through the
    /// router: statements kept on server connections are named with it, so none made
    /// before a schema change is used after it.
    schema_epoch: std::sync::atomic::AtomicU64,
    /// ParameterStatus values of the default shard, learned from its first connection.
    server_params: Mutex<Option<Vec<(String, String)>>>,
    /// When learning `server_params` last failed (the default shard unreachable).
    server_params_failed: Mutex<Option<Instant>>,
}

/// After the default shard failed to answer, clients are greeted with PostgreSQL's
/// defaults for this long before a new client tries it again: while it is down, a
/// client that uses other shards does not wait on it at every start.
const SERVER_PARAMS_RETRY: Duration = Duration::from_secs(5);

impl Shared {
    pub fn new(
        router: Router,
        pools: Arc<Pools>,
        users: HashMap<String, UserAuth>,
        database: String,
        max_message: u64,
    ) -> Shared {
        Shared {
            router: ArcSwap::from_pointee(router),
            pools,
            users,
            database,
            max_message,
            cancels: CancelRegistry::default(),
            session_pooling: false,
            reuse_unnamed_statements: true,
            prepare_point_queries: true,
            seen_texts: Default::default(),
            schema_epoch: Default::default(),
            server_params: Mutex::new(None),
            server_params_failed: Mutex::new(None),
        }
    }

    pub fn schema_epoch(&self) -> u64 {
        self.schema_epoch.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A utility statement ran (or its transaction block ended): the schema may differ.
    pub fn schema_changed(&self) {
        self.schema_epoch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The default shard's ParameterStatus values, or PostgreSQL 15's defaults if no
    /// shard answered yet.
    pub fn server_params(&self) -> Vec<(String, String)> {
        if let Ok(p) = self.server_params.lock() {
            if let Some(p) = p.as_ref() {
                return p.clone();
            }
        }
        [
            ("server_version", "15.0"),
            ("server_encoding", "UTF8"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("IntervalStyle", "postgres"),
            ("TimeZone", "UTC"),
            ("integer_datetimes", "on"),
            ("standard_conforming_strings", "on"),
            ("application_name", ""),
            ("default_transaction_read_only", "off"),
            ("in_hot_standby", "off"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
    }

    /// Learn the default shard's ParameterStatus values (once; not again for
    /// `SERVER_PARAMS_RETRY` after a failed attempt).
    pub async fn learn_server_params(&self) {
        if self
            .server_params
            .lock()
            .map(|p| p.is_some())
            .unwrap_or(true)
        {
            return;
        }
        let failed_lately = self
            .server_params_failed
            .lock()
            .map(|f| f.is_some_and(|at| at.elapsed() < SERVER_PARAMS_RETRY))
            .unwrap_or(false);
        if failed_lately {
            return;
        }
        let shard = self.router.load().topology().default_shard;
        let fut = self.pools.checkout(shard);
        match tokio::time::timeout(Duration::from_secs(2), fut).await {
            Ok(Ok(conn)) => {
                let mut params = conn.params.clone();
                params.retain(|(k, _)| k != "session_authorization" && k != "is_superuser");
                if let Ok(mut p) = self.server_params.lock() {
                    *p = Some(params);
                }
            }
            _ => {
                if let Ok(mut f) = self.server_params_failed.lock() {
                    *f = Some(Instant::now());
                }
            }
        }
    }
}

/// Accept clients until `shutdown` turns true, then stop accepting and give running
/// sessions `grace` to finish.
pub async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let sessions = tokio_util_tracker::Tracker::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "set_nodelay failed");
                }
                let shared = shared.clone();
                let guard = sessions.enter();
                tokio::spawn(async move {
                    let _guard = guard;
                    let client = ClientConn::new(stream, shared.max_message);
                    session::serve(client, shared, peer).await;
                });
            }
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    drop(listener);
    tracing::info!(
        sessions = sessions.count(),
        "stopped accepting; waiting for sessions to finish"
    );
    let _ = tokio::time::timeout(grace, sessions.wait_idle()).await;
}

/// Counts running sessions so shutdown can wait for them.
mod tokio_util_tracker {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::sync::Notify;

    #[derive(Default, Clone)]
    pub struct Tracker {
        inner: Arc<(AtomicUsize, Notify)>,
    }

    pub struct Guard {
        inner: Arc<(AtomicUsize, Notify)>,
    }

    impl Tracker {
        pub fn enter(&self) -> Guard {
            self.inner.0.fetch_add(1, Ordering::SeqCst);
            Guard {
                inner: self.inner.clone(),
            }
        }

        pub fn count(&self) -> usize {
            self.inner.0.load(Ordering::SeqCst)
        }

        pub async fn wait_idle(&self) {
            loop {
                let notified = self.inner.1.notified();
                if self.count() == 0 {
                    return;
                }
                notified.await;
            }
        }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            if self.inner.0.fetch_sub(1, Ordering::SeqCst) == 1 {
                self.inner.1.notify_waiters();
            }
        }
    }
}

#[cfg(test)]
mod size_tests {
    fn future_size<A, B, C, Fut>(_f: fn(A, B, C) -> Fut) -> usize {
        std::mem::size_of::<Fut>()
    }

    /// Every idle client holds one session future (request futures are inline in it, see
    /// `Session::run`): keep it small enough that 10,000 idle clients stay far below
    /// 100 MB. Rare, large parts of a request belong in boxed futures.
    #[test]
    fn session_future_stays_small() {
        let n = future_size(super::session::serve);
        println!("session future: {n} bytes");
        assert!(
            n <= 4096,
            "the session future grew to {n} bytes; box the new large await"
        );
        println!(
            "Session: {} bytes",
            std::mem::size_of::<super::session::Session>()
        );
        println!(
            "ClientConn: {} bytes",
            std::mem::size_of::<super::client::ClientConn>()
        );
    }
}
