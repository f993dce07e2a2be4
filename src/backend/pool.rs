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
//! shard down), and the slot passes to the next waiter, which tries for itself; a
//! waiter that runs out of time is told the last connect failure, if there was one
//! while it waited. Waits are ended by one timer per pool, not one per waiter: arming a
//! timer wakes tokio's driver (an eventfd write and an extra epoll_wait), a cost every
//! wait would pay on a busy pool.
//!
//! Connections are closed after 4–5 idle minutes, and after about 30 minutes of life
//! (as bb8 did), so a backend's caches and memory are renewed now and then.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

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
/// reaper (four to five minutes), any connection once it has lived `LIFE_TICKS` ticks.
const REAP_TICK: Duration = Duration::from_secs(60);
const IDLE_TICKS: u64 = 4;
const LIFE_TICKS: u64 = 30;

/// A pooled connection and the reaper tick it was opened in.
struct Pooled {
    conn: Box<ServerConn>,
    born: u64,
}

/// An idle connection and the tick it came back in.
struct Idle {
    pooled: Pooled,
    returned: u64,
}

/// What a queued checkout is handed.
enum Grant {
    /// A connection someone returned.
    Conn(Pooled),
    /// A slot to open a new connection in (one was dropped); already counted in `open`.
    Open,
    /// Nothing: the checkout timeout passed first (sent by `watch`).
    Expired,
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Grant>,
    /// When its checkout timeout ends. Waiters queue in arrival order and all wait as
    /// long, so the first in line is always the first to run out of time. (tokio's
    /// clock, which `watch` sleeps on.)
    deadline: tokio::time::Instant,
}

struct State {
    /// Idle connections, the one returned last at the end.
    idle: Vec<Idle>,
    /// Connections that exist or are being opened: idle, checked out, connecting.
    open: u32,
    /// Checkouts waiting, in arrival order.
    waiters: VecDeque<Waiter>,
    /// A `watch` task is ending waits that run out of time.
    watched: bool,
    next_waiter: u64,
    /// The reaper's tick count.
    tick: u64,
    /// The last failed connect attempt, for waiters that time out.
    last_failure: Option<(Instant, BackendError)>,
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
    pooled: Option<Pooled>,
    pool: Arc<ShardPool>,
}

impl std::ops::Deref for Checkout {
    type Target = ServerConn;
    fn deref(&self) -> &ServerConn {
        &self
            .pooled
            .as_ref()
            .expect("a checkout holds its connection until dropped")
            .conn
    }
}

impl std::ops::DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut ServerConn {
        &mut self
            .pooled
            .as_mut()
            .expect("a checkout holds its connection until dropped")
            .conn
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(p) = self.pooled.take() {
            self.pool.put_back(p);
        }
    }
}

impl Checkout {
    /// Replace this connection (the server closed it) by a new one in the same slot,
    /// so the client keeps its turn.
    async fn reopen(mut self) -> Result<Checkout, BackendError> {
        let pool = Arc::clone(&self.pool);
        // Closed without going back: the slot stays counted, now held by `Slot`.
        drop(self.pooled.take());
        drop(self);
        let timeout = pool.connect_limit();
        Slot::new(pool).open(timeout).await
    }
}

/// A slot counted in `open` that holds no connection yet. Dropped without having
/// opened one, it gives the slot back (to the next waiter, if any).
struct Slot {
    pool: Arc<ShardPool>,
    armed: bool,
}

impl Slot {
    fn new(pool: Arc<ShardPool>) -> Slot {
        Slot { pool, armed: true }
    }

    /// Open a connection in this slot, within `timeout`.
    async fn open(mut self, timeout: Duration) -> Result<Checkout, BackendError> {
        let pool = Arc::clone(&self.pool);
        match ServerConn::connect(pool.id, &pool.shard, timeout).await {
            Ok(c) => {
                self.armed = false;
                let born = pool.lock().tick;
                Ok(Checkout {
                    pooled: Some(Pooled {
                        conn: Box::new(c),
                        born,
                    }),
                    pool,
                })
            }
            Err(e) => {
                tracing::warn!(shard = %pool.shard.name, error = %e, "connect failed");
                pool.lock().last_failure = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.armed {
            self.pool.free_slots(&mut self.pool.lock(), 1);
        }
    }
}

impl ShardPool {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if something did, the state is still
        // consistent enough to go on with.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn checkout(self: &Arc<Self>, pooled: Pooled) -> Checkout {
        Checkout {
            pooled: Some(pooled),
            pool: Arc::clone(self),
        }
    }

    /// A connection comes back: to the first waiter, else to the idle stack. An
    /// unusable or old one is closed and its slot handed on.
    fn put_back(&self, pooled: Pooled) {
        let mut st = self.lock();
        if !pooled.conn.reusable() || st.tick.saturating_sub(pooled.born) >= LIFE_TICKS {
            self.free_slots(&mut st, 1);
            drop(st);
            drop(pooled);
            return;
        }
        let mut grant = Grant::Conn(pooled);
        while let Some(w) = st.waiters.pop_front() {
            match w.tx.send(grant) {
                Ok(()) => return,
                // That waiter gave up (its client left): the next one.
                Err(back) => grant = back,
            }
        }
        if let Grant::Conn(pooled) = grant {
            let returned = st.tick;
            st.idle.push(Idle { pooled, returned });
        }
    }

    /// `n` connections are gone: their slots go to waiters, if any.
    fn free_slots(&self, st: &mut State, n: u32) {
        st.open = st.open.saturating_sub(n);
        self.hand_on_slots(st);
    }

    /// A connect attempt's limit: never past the checkout timeout.
    fn connect_limit(&self) -> Duration {
        self.connect_timeout.min(self.checkout_timeout)
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

    /// Wait in line for a connection or a slot, until `watch` says the checkout timeout
    /// (ending at `deadline`) is over. Only the wait is a future of its own, and a small
    /// one (it is not boxed: no allocation for the usual wait, which ends with a
    /// connection handed over); opening a connection in a slot is boxed.
    async fn wait(
        self: &Arc<Self>,
        id: u64,
        rx: oneshot::Receiver<Grant>,
        deadline: tokio::time::Instant,
    ) -> Result<Checkout, BackendError> {
        let mut queued = Queued {
            pool: self,
            id,
            rx,
            done: false,
        };
        let grant = match (&mut queued.rx).await {
            Ok(g) => g,
            Err(_) => {
                return Err(BackendError::Connect {
                    shard: self.shard.name.clone(),
                    reason: "the pool was closed".into(),
                })
            }
        };
        queued.done = true;
        drop(queued);
        match grant {
            Grant::Conn(p) => Ok(self.checkout(p)),
            Grant::Open => {
                let slot = Slot::new(Arc::clone(self));
                // Connect within what is left of the checkout timeout (a slot handed
                // over at the last moment still gets a short try).
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let timeout = self
                    .connect_timeout
                    .min(left.max(Duration::from_millis(100)));
                Box::pin(slot.open(timeout)).await
            }
            Grant::Expired => {
                // Out of time: if connecting failed meanwhile, that is the reason.
                let started = deadline.into_std().checked_sub(self.checkout_timeout);
                let failed = self.lock().last_failure.clone();
                Err(match failed {
                    Some((at, e)) if started.is_none_or(|s| at >= s) => e,
                    _ => BackendError::CheckoutTimeout {
                        shard: self.shard.name.clone(),
                        waited_ms: self.checkout_timeout.as_millis() as u64,
                    },
                })
            }
        }
    }

    /// Close connections idle for `IDLE_TICKS` ticks or alive for `LIFE_TICKS`, then
    /// start a new tick.
    fn reap(&self) {
        let old = {
            let mut st = self.lock();
            st.tick += 1;
            let tick = st.tick;
            let expired = |i: &Idle| {
                tick.saturating_sub(i.returned) > IDLE_TICKS
                    || tick.saturating_sub(i.pooled.born) >= LIFE_TICKS
            };
            if !st.idle.iter().any(expired) {
                return;
            }
            let (old, keep): (Vec<Idle>, Vec<Idle>) =
                std::mem::take(&mut st.idle).into_iter().partition(expired);
            st.idle = keep;
            self.free_slots(&mut st, old.len() as u32);
            old
        };
        tracing::debug!(shard = %self.shard.name, closed = old.len(), "closing old or idle connections");
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
            Some(Grant::Conn(p)) => self.pool.put_back(p),
            Some(Grant::Open) => {
                self.pool.free_slots(&mut self.pool.lock(), 1);
            }
            Some(Grant::Expired) | None => {}
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
                        watched: false,
                        next_waiter: 0,
                        tick: 0,
                        last_failure: None,
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
    /// connecting to it fails. An idle connection the server closed meanwhile (a
    /// restart) is replaced by a new one in its slot.
    pub async fn checkout(&self, shard: ShardId) -> Result<Checkout, BackendError> {
        let mut c = self.checkout_once(shard).await?;
        // Bounded: a fresh connection is stale only if the server closes it at once.
        for _ in 0..3 {
            if !c.is_stale() {
                break;
            }
            tracing::debug!(shard, "replacing a pooled connection the server closed");
            c = Box::pin(c.reopen()).await?;
        }
        Ok(c)
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
                if let Some(i) = st.idle.pop() {
                    drop(st);
                    return Ok(sp.checkout(i.pooled));
                }
            }
            if st.waiters.is_empty() && st.open < sp.size {
                st.open += 1;
                None
            } else {
                let (tx, rx) = oneshot::channel();
                let id = st.next_waiter;
                st.next_waiter += 1;
                let deadline = deadline_after(sp.checkout_timeout);
                st.waiters.push_back(Waiter { id, tx, deadline });
                if !std::mem::replace(&mut st.watched, true) {
                    tokio::spawn(watch(Arc::downgrade(sp)));
                }
                Some((id, rx, deadline))
            }
        };
        match wait {
            // Boxed: a connect's future stays out of every session's request future.
            None => Box::pin(Slot::new(Arc::clone(sp)).open(sp.connect_limit())).await,
            Some((id, rx, deadline)) => sp.wait(id, rx, deadline).await,
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

/// `timeout` from now; a timeout too long for the clock (the config does not bound it)
/// waits about thirty years.
fn deadline_after(timeout: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400))
}

/// End the waits of `pool` that run out of time, for as long as anyone waits, then stop
/// (the next waiter starts another).
async fn watch(pool: Weak<ShardPool>) {
    loop {
        let next = {
            let Some(pool) = pool.upgrade() else {
                return;
            };
            let mut st = pool.lock();
            let now = tokio::time::Instant::now();
            while let Some(w) = st.waiters.pop_front() {
                if w.deadline > now {
                    st.waiters.push_front(w);
                    break;
                }
                // A waiter whose client left meanwhile is gone: nothing to tell.
                let _ = w.tx.send(Grant::Expired);
            }
            match st.waiters.front() {
                Some(w) => w.deadline,
                None => {
                    st.watched = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(next).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkout_timeout_too_long_for_the_clock_does_not_overflow() {
        let far = deadline_after(Duration::MAX);
        assert!(far > tokio::time::Instant::now() + Duration::from_secs(20 * 365 * 86_400));
    }
}
