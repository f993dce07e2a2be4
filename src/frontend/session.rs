//! One client session: the message loop, transactions, session settings, and running
//! simple-protocol statements on the shard(s) the router picks.
//!
//! Transaction pooling: shard connections are held only while a transaction (explicit,
//! or the implicit one of a multi-statement query or an unfinished extended-protocol
//! batch) needs them; otherwise each statement checks out and returns its connection.
//! The transaction status the client sees is computed from what the shards said.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::cancel::{Active, ServerKey};
use super::client::{ClientConn, ClientError};
use super::extended::{Deferred, PreparedStatement};
use super::settings::Settings;
use super::startup::{self, Handshake};
use super::Shared;
use crate::backend::{BackendError, Checkout};
use crate::merge::{relay_multi, relay_single, Combine, RelayError, Step, StepKind};
use crate::protocol::codec::FrameError;
use crate::protocol::messages;
use crate::protocol::{sqlstate, PgError};
use crate::router::{MergePlan, Route, RouteError, SavepointOp, StatementKind, StatementPlan};
use crate::topology::ShardId;

/// Server-side prepared statements a pooled connection may accumulate before they are
/// dropped (and re-created on demand).
pub(super) const MAX_PREPARED_PER_CONN: usize = 2000;

/// Run a client connection from handshake to goodbye.
pub async fn serve(mut client: ClientConn, shared: Arc<Shared>, peer: SocketAddr) {
    // Until the client has authenticated, no message may be larger than a startup packet.
    client.set_max_message(crate::protocol::codec::MAX_STARTUP_LEN as u64);
    let greeted = match Box::pin(startup::handshake(&mut client, &shared)).await {
        Ok(Handshake::Session(g)) => g,
        Ok(Handshake::Done) => return,
        Err(e) => {
            tracing::debug!(peer = %peer, error = %e, "handshake ended");
            return;
        }
    };
    client.set_max_message(shared.max_message);
    Box::pin(shared.learn_server_params()).await;
    let (pid, secret, active) = shared.cancels.register();
    startup::greeting(&shared, &greeted, pid, secret, &mut client.wbuf);
    if client.flush().await.is_err() {
        shared.cancels.unregister(pid);
        return;
    }
    tracing::info!(user = %greeted.user, peer = %peer, pid, "session start");
    let mut session = Session {
        shared: shared.clone(),
        client,
        settings: Settings::from_startup(&greeted.params),
        statements: HashMap::default(),
        portals: Default::default(),
        txn: None,
        held: Default::default(),
        batch_open: false,
        skipping: false,
        active,
        pending: Default::default(),
        steps: VecDeque::new(),
        point_memo: Default::default(),
        statement_uses: Vec::new(),
        schema_touched: false,
        dirty: false,
        statement_salt: rand::random(),
    };
    let end = session.run().await;
    session.mark_dirty_conns();
    drop(session);
    shared.cancels.unregister(pid);
    match end {
        Ok(()) => tracing::info!(user = %greeted.user, peer = %peer, pid, "session end"),
        Err(e) => {
            tracing::info!(user = %greeted.user, peer = %peer, pid, reason = %e, "session end")
        }
    }
}

/// Why a session ends.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A protocol violation or the like: sent to the client as FATAL, then disconnect.
    #[error("{0}")]
    Fatal(PgError),
}

/// An error for the client: one of ours, or a shard's ErrorResponse as it was sent.
#[derive(Debug, Clone)]
pub enum StmtError {
    Pg(PgError),
    Raw(Bytes),
}

impl StmtError {
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            StmtError::Pg(e) => e.encode(out),
            StmtError::Raw(b) => out.extend_from_slice(b),
        }
    }
}

impl From<PgError> for StmtError {
    fn from(e: PgError) -> Self {
        StmtError::Pg(e)
    }
}

impl From<BackendError> for StmtError {
    fn from(e: BackendError) -> Self {
        StmtError::Pg(e.to_pg())
    }
}

pub fn route_error(e: &RouteError) -> PgError {
    let mut pg = PgError::error(e.sqlstate(), e.message().to_owned()).with_position(e.position());
    if let Some(h) = e.hint() {
        pg = pg.with_hint(h.to_owned());
    }
    pg
}

/// Settings that only matter while a statement runs, never to how it is parsed or what
/// its result columns are: changing them in a block leaves kept statements shareable.
const RUN_TIME_ONLY: &[&str] = &[
    "transaction",
    "transaction_isolation",
    "transaction_read_only",
    "transaction_deferrable",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "default_transaction_deferrable",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "application_name",
    "synchronous_commit",
    "work_mem",
    "maintenance_work_mem",
];

/// Whether SET or RESET of `name` (`None`: RESET ALL) may change how statements parse.
fn may_change_parsing(name: Option<&str>) -> bool {
    name.is_none_or(|n| !RUN_TIME_ONLY.contains(&n))
}

/// An open transaction block.
pub struct Txn {
    /// The client's BEGIN (with its options), replayed on each shard the block reaches.
    pub begin_sql: String,
    /// SAVEPOINT / SET LOCAL statements so far, replayed on shards that join later.
    pub replay: Vec<String>,
    /// Set when a statement failed: everything but ROLLBACK is refused until the end.
    pub failed: bool,
    /// The shard this transaction wrote to (writes to a second shard are refused until
    /// two-phase commit exists).
    pub writer: Option<ShardId>,
    /// Session settings changed inside the block, kept only if it commits.
    pub pending: Option<Settings>,
    /// The block's savepoints, oldest first, each with `pending` as it was when it was
    /// defined: ROLLBACK TO one undoes the SETs made since, as in PostgreSQL.
    pub savepoints: Vec<(String, Option<Settings>)>,
    /// Opened by the router around a multi-statement query, not by the client.
    pub implicit: bool,
    /// A utility statement (DDL, …) ran in this block: the schema may differ once it
    /// ends.
    pub schema_changed: bool,
    /// A SET, SET LOCAL or RESET that may change how a statement is parsed ran in this
    /// block (`may_change_parsing`): the held connections' settings are not what their
    /// fingerprint says until it ends, and statements kept there are not shared.
    pub settings_changed: bool,
}

impl Txn {
    /// Follow a savepoint statement that succeeded: ROLLBACK TO ends the block's
    /// failed state, and the session settings the block will keep go back to what they
    /// were at the savepoint.
    fn savepoint_done(&mut self, op: SavepointOp, name: &str) {
        if op == SavepointOp::RollbackTo {
            self.failed = false;
        }
        let at = self.savepoints.iter().rposition(|(n, _)| n == name);
        match (op, at) {
            (SavepointOp::Define, _) => self
                .savepoints
                .push((name.to_owned(), self.pending.clone())),
            (SavepointOp::RollbackTo, Some(i)) => {
                // The savepoint stays; those defined after it are gone.
                self.savepoints.truncate(i + 1);
                self.pending = self.savepoints[i].1.clone();
            }
            (SavepointOp::Release, Some(i)) => self.savepoints.truncate(i),
            // Unknown to the router (refused by the shard, or defined before a
            // connection was held and not yet checked): nothing to follow.
            (_, None) => {}
        }
    }

    fn new(begin_sql: String, implicit: bool) -> Txn {
        Txn {
            begin_sql,
            replay: Vec::new(),
            failed: false,
            writer: None,
            pending: None,
            savepoints: Vec::new(),
            implicit,
            schema_changed: false,
            settings_changed: false,
        }
    }

    /// The router's own block around one request.
    pub fn implicit() -> Txn {
        Txn::new("BEGIN".into(), true)
    }
}

pub struct Session {
    pub shared: Arc<Shared>,
    pub client: ClientConn,
    /// What every checked-out connection must be set to for this client.
    pub settings: Settings,
    /// Protocol-level prepared statements by client name ("" is the unnamed one).
    pub statements: foldhash::HashMap<String, Arc<PreparedStatement>>,
    /// Bound portals by client name.
    pub portals: super::extended::Portals,
    pub txn: Option<Txn>,
    /// Shard connections this client holds right now.
    pub held: super::held::Held<Checkout>,
    /// An extended-protocol batch has been sent without its Sync yet: keep connections.
    pub batch_open: bool,
    /// After an error in the extended protocol: ignore messages until Sync.
    pub skipping: bool,
    /// Server connections running this client's statements, for cancel requests.
    pub active: Active,
    /// Extended-protocol messages waiting for Flush or Sync.
    pub pending: super::extended::Pending,
    /// Answers expected from shards for the statement being relayed (kept between
    /// statements for its allocation).
    pub steps: VecDeque<Step>,
    /// The last simple-protocol point query, so that the next of its shape is known at
    /// a glance (`Router::point_query_memo`).
    pub point_memo: crate::router::PointMemo,
    /// A utility statement was bound in the pending extended-protocol batch: the
    /// schema epoch moves on once the batch has run.
    pub schema_touched: bool,
    /// What statements did in the batch being relayed (reused, like `steps`).
    pub statement_uses: Vec<(super::extended::Use, usize, u64)>,
    /// A statement with untracked session effects ran on the held connections.
    pub dirty: bool,
    /// Names this session's own copies of its named statements, made while the
    /// settings of a connection it holds are unknown (`Batch::named_key`).
    pub statement_salt: u64,
}

impl Session {
    async fn run(&mut self) -> Result<(), SessionError> {
        loop {
            let frame = match self.client.read_raw().await {
                Ok(f) => f,
                Err(ClientError::Closed) => return Ok(()),
                Err(ClientError::Frame(e)) => {
                    let code = match e {
                        FrameError::TooLarge { .. } => sqlstate::PROGRAM_LIMIT_EXCEEDED,
                        FrameError::BadLength(_) => sqlstate::PROTOCOL_VIOLATION,
                    };
                    return self.fatal(PgError::fatal(code, e.to_string())).await;
                }
                Err(e) => return Err(e.into()),
            };
            let result = match frame[0] {
                // Not boxed: a box per request costs an allocation of its (kilobyte-sized)
                // future every time, while inline it costs each idle client about that
                // much memory once. The rare, larger parts of a request are boxed inside.
                b'Q' => self.simple_query(frame).await,
                tag @ (b'P' | b'B' | b'D' | b'E' | b'C') => match self.extended_message(frame) {
                    Ok(Deferred::Nothing) => Ok(()),
                    Ok(work) => self.extended(tag, work).await,
                    Err(e) => Err(e),
                },
                tag @ (b'H' | b'S') => self.extended(tag, Deferred::Nothing).await,
                b'X' => return Ok(()),
                // CopyData/CopyDone/CopyFail outside COPY are ignored, as PostgreSQL does.
                b'd' | b'c' | b'f' => Ok(()),
                b'F' => {
                    let e = PgError::error(
                        sqlstate::FEATURE_NOT_SUPPORTED,
                        "the fastpath function call protocol is not supported",
                    )
                    .with_hint("call the function with SELECT");
                    e.encode(&mut self.client.wbuf);
                    self.ready().await
                }
                other => {
                    let e = PgError::fatal(
                        sqlstate::PROTOCOL_VIOLATION,
                        format!("invalid frontend message type {other}"),
                    );
                    return self.fatal(e).await;
                }
            };
            match result {
                Ok(()) => {}
                Err(SessionError::Fatal(e)) => return self.fatal(e).await,
                Err(e) => return Err(e),
            }
        }
    }

    async fn fatal(&mut self, e: PgError) -> Result<(), SessionError> {
        tracing::warn!(error = %e, peer = %self.client.peer(), "closing client connection");
        e.encode(&mut self.client.wbuf);
        self.client.flush().await?;
        Err(SessionError::Fatal(e))
    }

    /// The transaction status the client sees.
    /// The error for any statement but ROLLBACK/COMMIT in a failed block.
    pub fn aborted_error() -> PgError {
        PgError::error(
            sqlstate::IN_FAILED_SQL_TRANSACTION,
            "current transaction is aborted, commands ignored until end of transaction block",
        )
    }

    /// Whether the client is in a failed transaction block.
    pub fn in_failed_block(&self) -> bool {
        self.txn.as_ref().is_some_and(|t| t.failed)
    }

    pub fn status(&self) -> u8 {
        match &self.txn {
            Some(t) if t.failed => b'E',
            Some(t) if !t.implicit => b'T',
            _ => b'I',
        }
    }

    /// Finish a request: release connections if nothing needs them, ReadyForQuery, flush.
    pub async fn ready(&mut self) -> Result<(), SessionError> {
        self.release();
        let status = self.status();
        if self.txn.is_none() && !self.batch_open {
            self.portals.clear();
        }
        messages::ready_for_query(&mut self.client.wbuf, status);
        self.client.flush().await?;
        Ok(())
    }

    /// Give back connections no transaction or open batch needs.
    pub fn release(&mut self) {
        if self.txn.is_none()
            && !self.batch_open
            && !self.held.is_empty()
            && !self.shared.session_pooling
        {
            self.mark_dirty_conns();
            self.held.clear();
            if let Ok(mut a) = self.active.lock() {
                a.clear();
            }
        }
    }

    /// Connections that ran statements with untracked session effects get a full reset
    /// before anyone uses them again.
    pub fn mark_dirty_conns(&mut self) {
        if std::mem::take(&mut self.dirty) {
            for c in self.held.values_mut() {
                c.settings = u64::MAX;
            }
        }
    }

    /// Report an error for the current statement; inside a transaction block it fails.
    pub fn fail(&mut self, e: impl Into<StmtError>) {
        let e = e.into();
        match &e {
            StmtError::Pg(pg) => {
                tracing::info!(code = pg.code, error = %pg.message, peer = %self.client.peer(), "statement refused")
            }
            StmtError::Raw(raw) => {
                let (code, msg) =
                    crate::protocol::error::summarize_error(raw.get(5..).unwrap_or_default());
                tracing::info!(code = %code, error = %msg, peer = %self.client.peer(), "statement failed");
            }
        }
        e.encode(&mut self.client.wbuf);
        if let Some(t) = self.txn.as_mut() {
            t.failed = true;
        }
    }

    /// Make sure this client holds a ready connection to `shard`: checked out, session
    /// settings applied, inside the client's transaction block if one is open.
    pub async fn conn_for(&mut self, shard: ShardId) -> Result<(), StmtError> {
        if self.held.contains_key(&shard) {
            return Ok(());
        }
        let mut c = self.shared.pools.checkout(shard).await?;
        let wanted = self.settings.fingerprint();
        if c.prepared.len() >= MAX_PREPARED_PER_CONN || c.settings != wanted || self.txn.is_some() {
            // Boxed: rare work with futures of its own, kept out of every request's.
            Box::pin(self.prepare_conn(&mut c, wanted)).await?;
        }
        if let Ok(mut a) = self.active.lock() {
            a.push(ServerKey {
                addr: c.addr,
                pid: c.pid,
                secret: c.secret,
            });
        }
        self.held.insert(shard, c);
        Ok(())
    }

    /// Bring a checked-out connection to this session's state: bounded statements,
    /// this client's settings, and inside its transaction block if one is open.
    async fn prepare_conn(&self, c: &mut Checkout, wanted: u64) -> Result<(), StmtError> {
        if c.prepared.len() >= MAX_PREPARED_PER_CONN {
            // Statements are kept on the connections that ran them (clients share most;
            // a session whose settings were unknown has its own): keep their number
            // bounded.
            if let Some(err) = c.run_quiet("DEALLOCATE ALL").await? {
                return Err(server_error(&err, &c.shard_name));
            }
            c.prepared.clear();
            c.stale.clear();
        }
        if c.settings != wanted {
            // Unknown until the SETs succeed.
            c.settings = u64::MAX;
            if let Some(err) = c.run_quiet(&self.settings.apply_sql()).await? {
                return Err(server_error(&err, &c.shard_name));
            }
            c.settings = wanted;
        }
        if let Some(txn) = &self.txn {
            let mut sqls = vec![txn.begin_sql.as_str()];
            sqls.extend(txn.replay.iter().map(String::as_str));
            for sql in sqls {
                if let Some(err) = c.run_quiet(sql).await? {
                    return Err(server_error(&err, &c.shard_name));
                }
            }
        }
        Ok(())
    }

    /// Forget a connection that failed mid-statement (it goes back to the pool, which
    /// drops it as broken). A transaction that used it cannot continue.
    pub fn drop_conn(&mut self, shard: ShardId) {
        self.held.remove(&shard);
        if let Some(t) = self.txn.as_mut() {
            t.failed = true;
        }
    }

    /// Refuse a write that would make a transaction span shards.
    pub fn check_write(&mut self, stmt: &StatementPlan, shards: &[ShardId]) -> Result<(), PgError> {
        if !stmt.is_write() {
            return Ok(());
        }
        let Some(txn) = self.txn.as_mut() else {
            return Ok(());
        };
        if txn.implicit {
            // The router's own block around one request: committed on every shard only
            // if every statement succeeded.
            return Ok(());
        }
        let refuse = || {
            PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, "a transaction that writes to more than one shard is not supported")
                .with_hint("keep each transaction's writes on one shard key, or run them as separate transactions (two-phase commit is not built yet)")
        };
        if shards.len() > 1 {
            return Err(refuse());
        }
        match txn.writer {
            Some(w) if w != shards[0] => Err(refuse()),
            _ => {
                txn.writer = Some(shards[0]);
                Ok(())
            }
        }
    }

    /// After statements inside a block: the block failed if any shard says so.
    pub fn sync_txn_status(&mut self) {
        if let Some(t) = self.txn.as_mut() {
            if self.held.values().any(|c| c.status == b'E') {
                t.failed = true;
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Simple query protocol

    async fn simple_query(&mut self, frame: BytesMut) -> Result<(), SessionError> {
        let router = self.shared.router.load_full();
        // A point SELECT seen before runs without a plan being built: what `execute`
        // would do with its one statement (`run_routed` → `run_point`). It is looked up
        // before the text is checked: only a well-formed text can match (see
        // `Router::point_query`), and a text that does not goes the long way.
        if self.point_queries_open() {
            if let Some((0, text)) = frame[5..].split_last() {
                if let Some(p) = router.point_query_memo(text, &mut self.point_memo) {
                    self.skipping = false;
                    self.run_point(p.shard, &p.bound, p.value, text).await?;
                    return self.ready().await;
                }
            }
        }
        let sql = match messages::parse_query(&frame[5..]) {
            Ok(s) => s,
            Err(e) if e.is_encoding() => {
                self.fail(invalid_utf8());
                return self.ready().await;
            }
            Err(e) => {
                return Err(SessionError::Fatal(PgError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    e.to_string(),
                )))
            }
        };
        self.skipping = false;
        let plan = match router.plan(sql) {
            Ok(p) => p,
            Err(e) => {
                self.fail(route_error(&e));
                return self.ready().await;
            }
        };
        if plan.statements.is_empty() {
            messages::empty_message(&mut self.client.wbuf, b'I');
            return self.ready().await;
        }
        // Several statements in one string run in one implicit transaction, unless they
        // manage transactions themselves.
        let implicit = plan.statements.len() > 1
            && self.txn.is_none()
            && !plan.statements.iter().any(|s| {
                matches!(
                    s.kind,
                    StatementKind::Begin
                        | StatementKind::Commit
                        | StatementKind::Rollback
                        | StatementKind::Savepoint { .. }
                )
            });
        if implicit {
            self.txn = Some(Txn::implicit());
        }
        let single = plan.statements.len() == 1;
        for stmt in &plan.statements {
            let text = if single { sql } else { stmt.text(sql) };
            if !self.execute(stmt, text).await? {
                break;
            }
        }
        if implicit {
            let ok = self.txn.as_ref().is_some_and(|t| !t.failed);
            Box::pin(self.end_txn(ok, false)).await?;
        }
        self.ready().await
    }

    /// Run one statement of the simple protocol; `Ok(false)` if it failed.
    pub async fn execute(
        &mut self,
        stmt: &StatementPlan,
        text: &str,
    ) -> Result<bool, SessionError> {
        if self.in_failed_block() && !ends_failed_block(stmt) {
            Self::aborted_error().encode(&mut self.client.wbuf);
            return Ok(false);
        }
        match &stmt.kind {
            StatementKind::Begin => {
                if self.txn.as_ref().is_some_and(|t| !t.implicit) {
                    PgError::warning(
                        sqlstate::ACTIVE_SQL_TRANSACTION,
                        "there is already a transaction in progress",
                    )
                    .encode(&mut self.client.wbuf);
                } else {
                    self.txn = Some(Txn::new(text.to_owned(), false));
                }
                messages::command_complete(&mut self.client.wbuf, "BEGIN");
                Ok(true)
            }
            StatementKind::Commit | StatementKind::Rollback => {
                let commit = stmt.kind == StatementKind::Commit;
                let word = if commit { "COMMIT" } else { "ROLLBACK" };
                let chain = is_and_chain(text);
                if chain && self.txn.as_ref().is_none_or(|t| t.implicit) {
                    self.fail(PgError::error(
                        sqlstate::NO_ACTIVE_SQL_TRANSACTION,
                        format!("{word} AND CHAIN can only be used in transaction blocks"),
                    ));
                    return Ok(false);
                }
                if self.txn.as_ref().is_none_or(|t| t.implicit) {
                    PgError::warning(
                        sqlstate::NO_ACTIVE_SQL_TRANSACTION,
                        "there is no transaction in progress",
                    )
                    .encode(&mut self.client.wbuf);
                    messages::command_complete(&mut self.client.wbuf, word);
                    return Ok(true);
                }
                let failed = self.txn.as_ref().is_some_and(|t| t.failed);
                let begin_sql = self.txn.as_ref().map(|t| t.begin_sql.clone());
                let ok = Box::pin(self.end_txn(commit && !failed, true)).await?;
                if ok && chain {
                    // AND CHAIN: a new block with the same characteristics.
                    self.txn = begin_sql.map(|b| Txn::new(b, false));
                }
                if ok {
                    // COMMIT of a failed block reports ROLLBACK, as PostgreSQL does.
                    messages::command_complete(
                        &mut self.client.wbuf,
                        if commit && !failed {
                            "COMMIT"
                        } else {
                            "ROLLBACK"
                        },
                    );
                }
                Ok(ok)
            }
            // Boxed, here and below: rarer statements with larger futures, kept out of
            // the future of every statement.
            StatementKind::Savepoint { op, name } => {
                Box::pin(self.savepoint(stmt, text, *op, name)).await
            }
            StatementKind::Set { name, local } => {
                Box::pin(self.set(stmt, text, Some(name.clone()), *local)).await
            }
            StatementKind::Reset { name } => {
                Box::pin(self.set(stmt, text, name.clone(), false)).await
            }
            StatementKind::Discard if is_deallocate_all(text) => {
                // Server connections keep their statements (they are this router's);
                // the client's are forgotten.
                self.statements.clear();
                messages::command_complete(&mut self.client.wbuf, "DEALLOCATE ALL");
                Ok(true)
            }
            StatementKind::Discard if is_discard_all(text) => {
                if self.txn.as_ref().is_some_and(|t| !t.implicit) {
                    self.fail(PgError::error(
                        sqlstate::ACTIVE_SQL_TRANSACTION,
                        "DISCARD ALL cannot run inside a transaction block",
                    ));
                    return Ok(false);
                }
                self.settings.reset(None);
                self.statements.clear();
                self.portals.clear();
                messages::command_complete(&mut self.client.wbuf, "DISCARD ALL");
                Ok(true)
            }
            _ => {
                self.dirty |= stmt.session_effects;
                let ok = self.run_routed(stmt, text).await?;
                if may_change_schema(stmt, || text) {
                    self.schema_may_change();
                }
                Ok(ok)
            }
        }
    }

    /// A utility statement ran: statements kept on server connections are not used
    /// again (now, and once the open transaction block ends).
    pub(super) fn schema_may_change(&mut self) {
        if let Some(t) = self.txn.as_mut() {
            t.schema_changed = true;
        }
        self.shared.schema_changed();
    }

    /// End the open transaction block on every shard it reached. Returns whether it
    /// ended without error (errors are already sent).
    pub(super) async fn end_txn(
        &mut self,
        commit: bool,
        explicit: bool,
    ) -> Result<bool, SessionError> {
        let Some(txn) = self.txn.take() else {
            return Ok(true);
        };
        let word = if commit { "COMMIT" } else { "ROLLBACK" };
        let schema_changed = txn.schema_changed;
        // Read-only shards first, the one that wrote last: if a commit must fail, it
        // fails before the writes are committed.
        let mut order: Vec<ShardId> = self
            .held
            .keys()
            .copied()
            .filter(|s| Some(*s) != txn.writer)
            .collect();
        order.extend(txn.writer.filter(|w| self.held.contains_key(w)));
        let mut ok = true;
        for shard in order {
            let Some(conn) = self.held.get_mut(&shard) else {
                continue;
            };
            match conn.run_quiet(word).await {
                Ok(None) => {}
                Ok(Some(err)) => {
                    if ok {
                        self.client
                            .wbuf
                            .extend_from_slice(&messages::raw(err.tag, &err.body));
                    }
                    ok = false;
                }
                Err(e) => {
                    if ok {
                        e.to_pg().encode(&mut self.client.wbuf);
                    }
                    ok = false;
                    self.held.remove(&shard);
                }
            }
        }
        let changed = txn.pending.is_some();
        if commit && ok {
            if let Some(s) = txn.pending {
                self.settings = s;
            }
        }
        // Connections whose settings changed inside a rolled-back block are back to the
        // session's settings only after a rollback, which PostgreSQL guarantees; after a
        // commit they carry the new ones.
        // Settings changed inside the block (a RESET among them, perhaps): set the
        // connections up afresh next time rather than guess their state.
        let fp = if changed {
            u64::MAX
        } else {
            self.settings.fingerprint()
        };
        for c in self.held.values_mut() {
            if c.settings != u64::MAX {
                c.settings = fp;
            }
        }
        if schema_changed {
            // The block's DDL is visible to everyone only now.
            self.shared.schema_changed();
        }
        let _ = explicit;
        self.release();
        Ok(ok)
    }

    async fn savepoint(
        &mut self,
        stmt: &StatementPlan,
        text: &str,
        op: SavepointOp,
        name: &str,
    ) -> Result<bool, SessionError> {
        if self.txn.as_ref().is_none_or(|t| t.implicit) || self.held.is_empty() {
            if let Some(t) = self.txn.as_mut().filter(|t| !t.implicit) {
                // No shard reached yet: remember it for the shards that join.
                t.replay.push(text.to_owned());
                t.savepoint_done(op, name);
                messages::command_complete(&mut self.client.wbuf, savepoint_tag(text));
                return Ok(true);
            }
            // Outside a block the shard answers with PostgreSQL's own error.
            return self.run_routed(stmt, text).await;
        }
        let shards: Vec<ShardId> = self.held.keys().copied().collect();
        let ok = self.run_on(&shards, text, Combine::Replicated).await?;
        if let Some(t) = self.txn.as_mut() {
            t.replay.push(text.to_owned());
            if ok {
                t.savepoint_done(op, name);
            }
        }
        self.sync_txn_status();
        Ok(ok)
    }

    /// SET / RESET: run on a shard (which checks the value and reports ParameterStatus),
    /// then remember it for every connection this client uses.
    async fn set(
        &mut self,
        stmt: &StatementPlan,
        text: &str,
        name: Option<String>,
        local: bool,
    ) -> Result<bool, SessionError> {
        if name.as_deref() == Some("client_encoding")
            && !is_reset_stmt(stmt)
            && !super::startup::encoding_ok(set_value(text))
        {
            self.fail(
                PgError::error(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    "client encodings other than UTF8 are not supported by shardwire",
                )
                .with_hint("shard keys are read and hashed as UTF-8; keep client_encoding UTF8"),
            );
            return Ok(false);
        }
        let is_reset = matches!(stmt.kind, StatementKind::Reset { .. });
        // Every connection the client holds (in a block, or all the time with session
        // pooling) must carry the setting; with none held, the default shard checks it
        // and connections taken later are set up on checkout.
        let shards: Vec<ShardId> = if !self.held.is_empty() {
            self.held.keys().copied().collect()
        } else {
            vec![self.shared.router.load().topology().default_shard]
        };
        let ok = self.run_on(&shards, text, Combine::Replicated).await?;
        if !ok {
            return Ok(false);
        }
        let parsing = may_change_parsing(name.as_deref());
        if local {
            if let Some(t) = self.txn.as_mut() {
                t.replay.push(text.to_owned());
                t.settings_changed |= parsing;
            }
            return Ok(true);
        }
        let in_block = self.txn.as_ref().is_some_and(|t| !t.implicit);
        let target = match self.txn.as_mut() {
            Some(t) => {
                t.replay.push(text.to_owned());
                t.settings_changed |= parsing;
                t.pending.get_or_insert_with(|| self.settings.clone())
            }
            None => &mut self.settings,
        };
        // A RESET on the server goes to the server's default, which differs from the
        // client's startup value: such a connection must be set up again before reuse.
        let reapply = is_reset && target.reset_differs(name.as_deref());
        if is_reset {
            target.reset(name.as_deref());
        } else if let Some(n) = name {
            target.set(&n, text.to_owned());
        }
        if !in_block && self.txn.is_none() {
            // The connection that ran it now carries exactly the session's settings.
            let fp = if reapply {
                u64::MAX
            } else {
                self.settings.fingerprint()
            };
            for s in &shards {
                if let Some(c) = self.held.get_mut(s) {
                    c.settings = fp;
                }
            }
        }
        Ok(true)
    }

    /// Whether a point SELECT may run as a kept statement now (`run_point`): outside
    /// transaction blocks and open extended batches, on a session without untracked
    /// effects.
    fn point_queries_open(&self) -> bool {
        self.shared.prepare_point_queries && self.txn.is_none() && !self.batch_open && !self.dirty
    }

    /// Route a statement and run it.
    async fn run_routed(&mut self, stmt: &StatementPlan, text: &str) -> Result<bool, SessionError> {
        let router = self.shared.router.load_full();
        // A point SELECT outside a block: the shard parses it once per connection.
        if self.point_queries_open() {
            if let Some((shard, bound, value)) = stmt.point_literal(router.topology()) {
                return self
                    .run_point(shard, bound, value.as_bytes(), text.as_bytes())
                    .await;
            }
        }
        let routed = match stmt.route_quiet(router.topology(), &[]) {
            Ok(r) => r,
            Err(e) => {
                self.fail(route_error(&e));
                return Ok(false);
            }
        };
        tracing::debug!(route = ?routed.route, "routed");
        match routed.route {
            Route::Shard(s) => {
                if let Err(e) = self.check_write(stmt, &[s]) {
                    self.fail(e);
                    return Ok(false);
                }
                self.run_on(&[s], text, Combine::Sum).await
            }
            Route::Multi { shards, merge } => {
                if let Err(e) = self.check_write(stmt, &shards) {
                    self.fail(e);
                    return Ok(false);
                }
                let combine = match merge {
                    MergePlan::Replicated => Combine::Replicated,
                    _ => Combine::Sum,
                };
                if stmt.is_write() && self.txn.is_none() && !needs_no_block(text) {
                    // A write on several shards outside a block: run it in a block on
                    // each and commit only if every shard succeeded.
                    self.txn = Some(Txn::implicit());
                    let ok = self.run_on(&shards, text, combine).await?;
                    let committed = Box::pin(self.end_txn(ok, false)).await?;
                    return Ok(ok && committed);
                }
                self.run_on(&shards, text, combine).await
            }
        }
    }

    /// Send `sql` as a simple query to `shards` and relay the combined answer.
    pub async fn run_on(
        &mut self,
        shards: &[ShardId],
        sql: &str,
        combine: Combine,
    ) -> Result<bool, SessionError> {
        for &s in shards {
            if let Err(e) = self.conn_for(s).await {
                self.fail(e);
                return Ok(false);
            }
        }
        // The session's queue, reused: no allocation per statement.
        let mut steps = std::mem::take(&mut self.steps);
        steps.clear();
        steps.push_back(Step::Server {
            kind: StepKind::Query,
            forward: true,
        });
        let result = if let [s] = shards {
            let Some(conn) = self.held.get_mut(s) else {
                return Ok(false);
            };
            messages::query(&mut conn.wbuf, sql);
            match conn.flush().await {
                Ok(()) => relay_single(conn, &mut self.client, &mut steps).await,
                Err(e) => Err(RelayError::Backend(e)),
            }
        } else {
            let mut conns = write_to(&mut self.held, shards, |b| messages::query(b, sql));
            match flush_all(&mut conns).await {
                Ok(()) => {
                    Box::pin(relay_multi(
                        &mut conns,
                        &mut self.client,
                        &mut steps,
                        combine,
                    ))
                    .await
                }
                Err(e) => Err(RelayError::Backend(e)),
            }
        };
        self.steps = steps;
        self.finish_relay(shards, result)
    }

    /// Turn a relay's result into "did the statement succeed", handling broken shards.
    pub fn finish_relay(
        &mut self,
        shards: &[ShardId],
        result: Result<crate::merge::Outcome, RelayError>,
    ) -> Result<bool, SessionError> {
        match result {
            Ok(out) => {
                if out.error {
                    if let Some(t) = self.txn.as_mut() {
                        t.failed = true;
                    }
                }
                self.sync_txn_status();
                Ok(!out.error)
            }
            Err(RelayError::Client(e)) => Err(SessionError::Client(e)),
            Err(RelayError::Backend(e)) => {
                tracing::warn!(error = %e, "shard connection failed mid-statement");
                let broken: Vec<ShardId> = shards
                    .iter()
                    .copied()
                    .filter(|s| self.held.get(s).is_some_and(|c| c.broken))
                    .collect();
                for s in broken {
                    self.drop_conn(s);
                }
                // Other shards of a fan-out may still be mid-answer: they cannot be reused.
                for s in shards {
                    if let Some(c) = self.held.get_mut(s) {
                        c.broken = true;
                    }
                }
                for s in shards {
                    self.drop_conn(*s);
                }
                self.fail(e.to_pg());
                if self.txn.as_ref().is_some_and(|t| t.implicit) {
                    // Nothing left to finish the implicit block on.
                }
                Ok(false)
            }
            Err(RelayError::Refused(e)) => {
                for s in shards {
                    if let Some(c) = self.held.get_mut(s) {
                        c.broken = true;
                    }
                    self.drop_conn(*s);
                }
                self.fail(e);
                Ok(false)
            }
        }
    }
}

/// The held connections to `shards`, each with `write` applied to its output buffer.
pub(super) fn write_to<'a>(
    held: &'a mut super::held::Held<Checkout>,
    shards: &[ShardId],
    write: impl Fn(&mut BytesMut),
) -> Vec<&'a mut crate::backend::ServerConn> {
    let mut conns = Vec::with_capacity(shards.len());
    for (id, c) in held.iter_mut() {
        if shards.contains(id) {
            write(&mut c.wbuf);
            conns.push(&mut **c);
        }
    }
    conns
}

/// Send every connection's buffered output, stopping at the first that fails.
pub(super) async fn flush_all(
    conns: &mut [&mut crate::backend::ServerConn],
) -> Result<(), BackendError> {
    for c in conns.iter_mut() {
        c.flush().await?;
    }
    Ok(())
}

/// A shard's ErrorResponse (from a statement the router ran itself) for the client.
fn server_error(err: &crate::protocol::Frame, shard: &str) -> StmtError {
    let raw = messages::raw(err.tag, &err.body);
    match crate::merge::client_error(&raw, shard) {
        Some(e) => StmtError::Pg(e),
        None => StmtError::Raw(raw),
    }
}

/// The error for a statement that is not valid UTF-8 (PostgreSQL's 22021).
pub fn invalid_utf8() -> PgError {
    PgError::error(
        sqlstate::CHARACTER_NOT_IN_REPERTOIRE,
        "invalid byte sequence for encoding \"UTF8\"",
    )
    .with_hint("shardwire reads statements as UTF-8; set client_encoding to UTF8")
}

/// Statements allowed in a failed transaction block.
pub(super) fn ends_failed_block(stmt: &StatementPlan) -> bool {
    match stmt.kind {
        StatementKind::Commit | StatementKind::Rollback => true,
        StatementKind::Savepoint { op, .. } => op == SavepointOp::RollbackTo,
        _ => false,
    }
}

/// Statements PostgreSQL refuses to run inside a transaction block (VACUUM, CREATE
/// INDEX CONCURRENTLY, …): a fan-out of one runs on each shard on its own.
fn needs_no_block(text: &str) -> bool {
    let t = text.trim_start().to_ascii_lowercase();
    let first = t.split_whitespace().next().unwrap_or("");
    matches!(first, "vacuum" | "cluster" | "reindex")
        || (t.contains(" concurrently") && !t.starts_with("refresh"))
}

fn is_reset_stmt(stmt: &StatementPlan) -> bool {
    matches!(stmt.kind, StatementKind::Reset { .. })
}

/// The value part of `SET x TO v` / `SET x = v` / `SET NAMES v` (quotes kept).
fn set_value(text: &str) -> &str {
    let lower = text.to_ascii_lowercase();
    for sep in [" to ", "=", " names "] {
        if let Some(i) = lower.find(sep) {
            return text[i + sep.len()..].trim();
        }
    }
    ""
}

/// `COMMIT AND CHAIN` / `ROLLBACK AND CHAIN` (not `AND NO CHAIN`).
fn is_and_chain(text: &str) -> bool {
    let words: Vec<String> = text
        .split_whitespace()
        .map(|w| w.trim_end_matches(';').to_ascii_lowercase())
        .collect();
    words.ends_with(&["and".to_string(), "chain".to_string()])
}

fn is_deallocate_all(text: &str) -> bool {
    text.trim_start()
        .get(..10)
        .is_some_and(|w| w.eq_ignore_ascii_case("deallocate"))
}

fn is_discard_all(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    let mut words = t.split_whitespace();
    words.next() == Some("discard") && words.next().map(|w| w.trim_end_matches(';')) == Some("all")
}

fn savepoint_tag(text: &str) -> &'static str {
    let t = text.trim_start().to_ascii_lowercase();
    if t.starts_with("release") {
        "RELEASE"
    } else if t.starts_with("rollback") {
        "ROLLBACK"
    } else {
        "SAVEPOINT"
    }
}

/// Whether a statement can change what other statements' names resolve to or what types
/// they have: utility statements (DDL, DO, CALL, …) except the common ones that cannot
/// (COPY, VACUUM, ANALYZE, LISTEN/NOTIFY, cursors, SQL-level PREPARE/EXECUTE, LOCK, …),
/// so that bulk loads and maintenance do not retire every kept statement. `text` gives
/// the statement's own text (asked for only for a utility statement).
pub(super) fn may_change_schema<'t>(stmt: &StatementPlan, text: impl FnOnce() -> &'t str) -> bool {
    const NEUTRAL: [&str; 16] = [
        "COPY",
        "VACUUM",
        "ANALYZE",
        "ANALYSE",
        "LISTEN",
        "NOTIFY",
        "UNLISTEN",
        "CHECKPOINT",
        "LOCK",
        "DECLARE",
        "FETCH",
        "MOVE",
        "CLOSE",
        "PREPARE",
        "EXECUTE",
        "DEALLOCATE",
    ];
    if stmt.kind != StatementKind::Other {
        return false;
    }
    let word = text()
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or_default();
    !NEUTRAL.iter().any(|n| n.eq_ignore_ascii_case(word))
}
