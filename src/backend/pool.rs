//! One bb8 pool per shard.
//!
//! bb8 on its own reports a failed connect (wrong password, shard down) as a checkout
//! timeout after the full wait. The manager here records each connect failure and wakes
//! waiting checkouts, so a client learns the real reason at once.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bb8::{ManageConnection, PooledConnection, QueueStrategy, RunError};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::{BackendError, ServerConn};
use crate::topology::{Shard, ShardId};

/// Pool settings (from the `pool` section of the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    pub size: u32,
    pub connect_timeout: Duration,
    pub checkout_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            size: 20,
            connect_timeout: Duration::from_millis(3000),
            checkout_timeout: Duration::from_millis(5000),
        }
    }
}

/// The last connect failure of a shard, shared by the manager and checkouts.
#[derive(Default)]
struct Failures {
    last: Mutex<Option<(Instant, BackendError)>>,
    notify: Notify,
}

impl Failures {
    fn record(&self, e: BackendError) {
        if let Ok(mut last) = self.last.lock() {
            *last = Some((Instant::now(), e));
        }
        self.notify.notify_waiters();
    }

    fn clear(&self) {
        if let Ok(mut last) = self.last.lock() {
            *last = None;
        }
    }

    /// A failure newer than `since`.
    fn since(&self, since: Instant) -> Option<BackendError> {
        let last = self.last.lock().ok()?;
        last.as_ref()
            .filter(|(at, _)| *at >= since)
            .map(|(_, e)| e.clone())
    }
}

/// bb8 manager for one shard.
pub struct ShardManager {
    shard_id: ShardId,
    shard: Shard,
    connect_timeout: Duration,
    failures: Arc<Failures>,
}

impl ManageConnection for ShardManager {
    /// Boxed: a checkout moves the connection through bb8, the checkout guard and the
    /// session's map; a pointer moves cheaply, the whole struct does not.
    type Connection = Box<ServerConn>;
    type Error = BackendError;

    async fn connect(&self) -> Result<Box<ServerConn>, BackendError> {
        match ServerConn::connect(self.shard_id, &self.shard, self.connect_timeout).await {
            Ok(c) => {
                self.failures.clear();
                Ok(Box::new(c))
            }
            Err(e) => {
                tracing::warn!(shard = %self.shard.name, error = %e, "connect failed");
                self.failures.record(e.clone());
                Err(e)
            }
        }
    }

    async fn is_valid(&self, _conn: &mut Box<ServerConn>) -> Result<(), BackendError> {
        // Checked-out connections are not pinged (a round trip per checkout); a dead one
        // is noticed on first use and dropped.
        Ok(())
    }

    fn has_broken(&self, conn: &mut Box<ServerConn>) -> bool {
        !conn.reusable()
    }
}

/// A connection checked out of a shard's pool; goes back (or is dropped if unusable)
/// when this is dropped, and the next client in line gets its turn.
pub struct Checkout {
    conn: PooledConnection<'static, ShardManager>,
    /// This client's turn in the shard's first-come, first-served queue.
    _turn: OwnedSemaphorePermit,
}

impl std::ops::Deref for Checkout {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        &self.conn
    }
}

impl std::ops::DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut ServerConn {
        &mut self.conn
    }
}

struct ShardPool {
    name: String,
    pool: bb8::Pool<ShardManager>,
    /// One permit per pooled connection, handed out strictly in arrival order (bb8 lets
    /// a newcomer take a connection that frees up ahead of clients already waiting).
    turns: Arc<Semaphore>,
    failures: Arc<Failures>,
    checkout_timeout: Duration,
}

impl ShardPool {
    fn got(
        &self,
        r: Result<PooledConnection<'static, ShardManager>, RunError<BackendError>>,
        started: Instant,
    ) -> Result<PooledConnection<'static, ShardManager>, BackendError> {
        match r {
            Ok(c) => Ok(c),
            Err(RunError::User(e)) => Err(e),
            Err(RunError::TimedOut) => {
                Err(self
                    .failures
                    .since(started)
                    .unwrap_or(BackendError::CheckoutTimeout {
                        shard: self.name.clone(),
                        waited_ms: self.checkout_timeout.as_millis() as u64,
                    }))
            }
        }
    }

    /// Wait (up to the checkout timeout) for this client's turn, then for a connection.
    async fn wait_for_turn(&self, started: Instant) -> Result<Checkout, BackendError> {
        let turn =
            match tokio::time::timeout(self.checkout_timeout, self.turns.clone().acquire_owned())
                .await
            {
                Ok(Ok(t)) => t,
                _ => {
                    return Err(self.failures.since(started).unwrap_or(
                        BackendError::CheckoutTimeout {
                            shard: self.name.clone(),
                            waited_ms: self.checkout_timeout.as_millis() as u64,
                        },
                    ))
                }
            };
        self.wait_for_connection(turn, started).await
    }

    /// With this client's turn: wait for a connection, or for a connect attempt to fail
    /// (then report why at once instead of after the full timeout).
    async fn wait_for_connection(
        &self,
        turn: OwnedSemaphorePermit,
        started: Instant,
    ) -> Result<Checkout, BackendError> {
        let get = self.pool.get_owned();
        tokio::pin!(get);
        let failed = self.failures.notify.notified();
        tokio::pin!(failed);
        failed.as_mut().enable();
        // A failure after `started` and before `enable` would not wake us: look.
        if self.failures.since(started).is_none() {
            tokio::select! {
                r = &mut get => return self.got(r, started).map(|conn| Checkout { conn, _turn: turn }),
                _ = &mut failed => {}
            }
        }
        // A connect attempt failed while we waited. If a connection is free after all,
        // take it; otherwise report why connecting failed.
        match tokio::time::timeout(Duration::from_millis(1), &mut get).await {
            Ok(Ok(conn)) => Ok(Checkout { conn, _turn: turn }),
            _ => Err(self
                .failures
                .since(started)
                .unwrap_or(BackendError::Connect {
                    shard: self.name.clone(),
                    reason: "connect failed".into(),
                })),
        }
    }
}

/// The pools of every shard, indexed by `ShardId`.
pub struct Pools {
    shards: Vec<ShardPool>,
}

impl Pools {
    pub fn new(shards: &[Shard], settings: PoolSettings) -> Pools {
        let shards = shards
            .iter()
            .enumerate()
            .map(|(id, shard)| {
                let failures = Arc::new(Failures::default());
                let manager = ShardManager {
                    shard_id: id,
                    shard: shard.clone(),
                    connect_timeout: settings.connect_timeout,
                    failures: failures.clone(),
                };
                let pool = bb8::Pool::builder()
                    .max_size(settings.size.max(1))
                    .min_idle(None)
                    .test_on_check_out(false)
                    // The connection returned last is handed out first (PgBouncer does the
                    // same): a hot backend's caches serve the next statement, and under
                    // light load the extra connections stay idle until idle_timeout.
                    .queue_strategy(QueueStrategy::Lifo)
                    .retry_connection(false)
                    .connection_timeout(settings.checkout_timeout)
                    .idle_timeout(Some(Duration::from_secs(300)))
                    .build_unchecked(manager);
                ShardPool {
                    name: shard.name.clone(),
                    pool,
                    turns: Arc::new(Semaphore::new(settings.size.max(1) as usize)),
                    failures,
                    checkout_timeout: settings.checkout_timeout,
                }
            })
            .collect();
        Pools { shards }
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Check out a connection to `shard`, failing fast with the real reason if
    /// connecting to it fails. Idle connections the server closed meanwhile (a restart)
    /// are dropped and replaced, up to the pool size.
    pub async fn checkout(&self, shard: ShardId) -> Result<Checkout, BackendError> {
        let mut c = self.checkout_once(shard).await?;
        if !c.is_stale() {
            return Ok(c);
        }
        let tries = self
            .shards
            .get(shard)
            .map(|s| s.pool.state().connections + 1)
            .unwrap_or(1);
        for _ in 0..tries {
            tracing::debug!(shard, "dropping a pooled connection the server closed");
            drop(c);
            c = self.checkout_once(shard).await?;
            if !c.is_stale() {
                return Ok(c);
            }
        }
        drop(c);
        self.checkout_once(shard).await
    }

    async fn checkout_once(&self, shard: ShardId) -> Result<Checkout, BackendError> {
        let sp = self
            .shards
            .get(shard)
            .ok_or_else(|| BackendError::Connect {
                shard: format!("#{shard}"),
                reason: "no such shard".into(),
            })?;
        let started = Instant::now();
        // Usually it is this client's turn and a connection is idle: the first poll of
        // bb8's checkout has it. Waiting is the rare case, kept out of this future (and
        // so out of every session's request future) in a boxed one.
        if let Ok(turn) = sp.turns.clone().try_acquire_owned() {
            let get = sp.pool.get_owned();
            tokio::pin!(get);
            if let Poll::Ready(r) =
                std::future::poll_fn(|cx| Poll::Ready(get.as_mut().poll(cx))).await
            {
                return sp
                    .got(r, started)
                    .map(|conn| Checkout { conn, _turn: turn });
            }
            return Box::pin(sp.wait_for_connection(turn, started)).await;
        }
        Box::pin(sp.wait_for_turn(started)).await
    }

    /// Pool state for one shard: (connections, idle).
    pub fn state(&self, shard: ShardId) -> Option<(u32, u32)> {
        self.shards.get(shard).map(|s| {
            let st = s.pool.state();
            (st.connections, st.idle_connections)
        })
    }
}
