//! One connection pool per shard.
//!
//! A checkout that finds an idle connection takes the shard's lock, pops the connection
//! returned last and is done: no timer, no clock read, no semaphore. (LIFO, as PgBouncer
//! does: a hot backend's caches serve the next statement, and under light load the
//! extra connections stay idle until the idle timeout closes them.)
//!
//! Waiting is the rare case. A waiter queues in arrival order and is handed, by whoever
//! returns or drops a connection, either that connection or the right to open a new
//! one, so a newcomer never takes a connection ahead of a client already waiting. The
//! client that opens a connection learns at once why connecting failed (wrong password,
//! shard down), and the slot passes to the next waiter, which tries for itself.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::oneshot;

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

/// Idle connections are closed after `IDLE_TICKS` to `IDLE_TICKS + 1` ticks of the
/// reaper: four to five minutes.
const REAP_TICK: Duration = Duration::from_secs(60);
const IDLE_TICKS: u64 = 4;

/// What a queued checkout is handed.
enum Grant {
    /// A connection someone returned.
    Conn(Box<ServerConn>),
    /// A slot to open a new connection in (one was dropped); already counted in `open`.
    Open,
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Grant>,
}

struct State {
    /// Idle connections, the one returned last at the end, each with the reaper tick
    /// it came back in.
    idle: Vec<(Box<ServerConn>, u64)>,
    /// Connections that exist or are being opened: idle, checked out, connecting.
    open: u32,
    /// Checkouts waiting, in arrival order.
    waiters: VecDeque<Waiter>,
    next_waiter: u64,
    /// The reaper's tick count.
    tick: u64,
}

struct ShardPool {
    id: ShardId,
    shard: Shard,
    size: u32,
    connect_timeout: Duration,
    checkout_timeout: Duration,
    state: Mutex<State>,
}

/// A connection checked out of a shard's pool; goes back (or is dropped if unusable)
/// when this is dropped, straight to the first client waiting if there is one.
pub struct Checkout {
    /// `Some` until dropped.
    conn: Option<Box<ServerConn>>,
    pool: Arc<ShardPool>,
}

impl std::ops::Deref for Checkout {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        self.conn
            .as_deref()
            .expect("a checkout holds its connection until dropped")
    }
}

impl std::ops::DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_deref_mut()
            .expect("a checkout holds its connection until dropped")
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put_back(conn);
        }
    }
}

impl ShardPool {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the state is still
        // consistent enough to go on with.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn checkout(self: &Arc<Self>, conn: Box<ServerConn>) -> Checkout {
        Checkout {
            conn: Some(conn),
            pool: Arc::clone(self),
        }
    }

    /// A connection comes back: to the first waiter, else to the idle stack. An
    /// unusable one is closed and its slot handed on.
    fn put_back(&self, conn: Box<ServerConn>) {
        if !conn.reusable() {
            drop(conn);
            let mut st = self.lock();
            st.open = st.open.saturating_sub(1);
            self.hand_on_slots(&mut st);
            return;
        }
        let mut st = self.lock();
        let mut grant = Grant::Conn(conn);
        while let Some(w) = st.waiters.pop_front() {
            match w.tx.send(grant) {
                Ok(()) => return,
                // That waiter gave up (its client left): the next one.
                Err(back) => grant = back,
            }
        }
        if let Grant::Conn(conn) = grant {
            let tick = st.tick;
            st.idle.push((conn, tick));
        }
    }

    /// While there is room under the pool size, let waiters open connections.
    fn hand_on_slots(&self, st: &mut State) {
        while st.open < self.size {
            let Some(w) = st.waiters.pop_front() else {
                break;
            };
            st.open += 1;
            if w.tx.send(Grant::Open).is_err() {
                st.open -= 1;
            }
        }
    }

    /// Open a connection in a slot already counted in `open`; the slot is given back
    /// (and handed on) if connecting fails or this future is dropped.
    async fn open_new(self: Arc<Self>) -> Result<Checkout, BackendError> {
        struct Slot<'p>(Option<&'p ShardPool>);
        impl Drop for Slot<'_> {
            fn drop(&mut self) {
                if let Some(p) = self.0 {
                    let mut st = p.lock();
                    st.open = st.open.saturating_sub(1);
                    p.hand_on_slots(&mut st);
                }
            }
        }
        let mut slot = Slot(Some(&self));
        let timeout = self.connect_timeout.min(self.checkout_timeout);
        match ServerConn::connect(self.id, &self.shard, timeout).await {
            Ok(c) => {
                slot.0 = None;
                drop(slot);
                Ok(self.checkout(Box::new(c)))
            }
            Err(e) => {
                tracing::warn!(shard = %self.shard.name, error = %e, "connect failed");
                Err(e)
            }
        }
    }

    /// Wait in line (up to the checkout timeout) for a connection or a slot.
    async fn wait(
        self: Arc<Self>,
        id: u64,
        rx: oneshot::Receiver<Grant>,
    ) -> Result<Checkout, BackendError> {
        let mut queued = Queued {
            pool: &self,
            id,
            rx,
            done: false,
        };
        let grant = match tokio::time::timeout(self.checkout_timeout, &mut queued.rx).await {
            Ok(Ok(g)) => Some(g),
            Ok(Err(_)) => {
                return Err(BackendError::Connect {
                    shard: self.shard.name.clone(),
                    reason: "the pool was closed".into(),
                })
            }
            // Out of time: leave the line, unless a grant came at the last moment.
            Err(_) => queued.leave(),
        };
        queued.done = true;
        drop(queued);
        match grant {
            Some(Grant::Conn(c)) => Ok(self.checkout(c)),
            Some(Grant::Open) => Arc::clone(&self).open_new().await,
            None => Err(BackendError::CheckoutTimeout {
                shard: self.shard.name.clone(),
                waited_ms: self.checkout_timeout.as_millis() as u64,
            }),
        }
    }

    /// Close connections idle for `IDLE_TICKS` ticks, then start a new tick.
    fn reap(&self) {
        let old = {
            let mut st = self.lock();
            st.tick += 1;
            let cutoff = st.tick.saturating_sub(IDLE_TICKS);
            // Oldest first: the stale ones are a prefix.
            let n = st.idle.iter().take_while(|(_, t)| *t < cutoff).count();
            let old: Vec<_> = st.idle.drain(..n).collect();
            st.open = st.open.saturating_sub(n as u32);
            self.hand_on_slots(&mut st);
            old
        };
        if !old.is_empty() {
            tracing::debug!(shard = %self.shard.name, closed = old.len(), "closing idle connections");
        }
    }
}

/// A checkout's place in line. Dropped while still in line (the client left), it
/// leaves the line, and passes on anything it was handed meanwhile.
struct Queued<'p> {
    pool: &'p ShardPool,
    id: u64,
    rx: oneshot::Receiver<Grant>,
    /// Out of line, with whatever it was handed taken.
    done: bool,
}

impl Queued<'_> {
    /// Leave the line; if a grant was sent before we could, it is returned.
    fn leave(&mut self) -> Option<Grant> {
        let mut st = self.pool.lock();
        if let Some(at) = st.waiters.iter().position(|w| w.id == self.id) {
            st.waiters.remove(at);
            return None;
        }
        drop(st);
        // Grants are sent under the lock, so not in line means already sent.
        self.rx.try_recv().ok()
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        match self.leave() {
            Some(Grant::Conn(c)) => self.pool.put_back(c),
            Some(Grant::Open) => {
                let mut st = self.pool.lock();
                st.open = st.open.saturating_sub(1);
                self.pool.hand_on_slots(&mut st);
            }
            None => {}
        }
    }
}

/// The pools of every shard, indexed by `ShardId`.
pub struct Pools {
    shards: Vec<Arc<ShardPool>>,
}

impl Pools {
    /// The pools; inside a tokio runtime, also a task that closes long-idle
    /// connections (it ends when the pools are dropped).
    pub fn new(shards: &[Shard], settings: PoolSettings) -> Arc<Pools> {
        let shards = shards
            .iter()
            .enumerate()
            .map(|(id, shard)| {
                Arc::new(ShardPool {
                    id,
                    shard: shard.clone(),
                    size: settings.size.max(1),
                    connect_timeout: settings.connect_timeout,
                    checkout_timeout: settings.checkout_timeout,
                    state: Mutex::new(State {
                        idle: Vec::new(),
                        open: 0,
                        waiters: VecDeque::new(),
                        next_waiter: 0,
                        tick: 0,
                    }),
                })
            })
            .collect();
        let pools = Arc::new(Pools { shards });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(reaper(Arc::downgrade(&pools)));
        }
        pools
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
            .map(|s| s.lock().open + 1)
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
        let wait = {
            let mut st = sp.lock();
            if st.waiters.is_empty() {
                if let Some((c, _)) = st.idle.pop() {
                    drop(st);
                    return Ok(sp.checkout(c));
                }
            }
            if st.waiters.is_empty() && st.open < sp.size {
                st.open += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                let id = st.next_waiter;
                st.next_waiter += 1;
                st.waiters.push_back(Waiter { id, tx });
                Some((id, rx))
            }
        };
        // The slow paths are boxed: their futures stay out of every session's request
        // future.
        match wait {
            None => Box::pin(Arc::clone(sp).open_new()).await,
            Some((id, rx)) => Box::pin(Arc::clone(sp).wait(id, rx)).await,
        }
    }

    /// Pool state for one shard: (connections, idle).
    pub fn state(&self, shard: ShardId) -> Option<(u32, u32)> {
        self.shards.get(shard).map(|s| {
            let st = s.lock();
            (st.open, st.idle.len() as u32)
        })
    }
}

async fn reaper(pools: Weak<Pools>) {
    let mut every = tokio::time::interval(REAP_TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let Some(pools) = pools.upgrade() else {
            return;
        };
        for sp in &pools.shards {
            sp.reap();
        }
    }
}
