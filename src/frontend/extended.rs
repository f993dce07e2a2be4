//! The extended query protocol: Parse/Bind/Describe/Execute/Close/Flush/Sync.
//!
//! Messages are gathered into groups that go to the same shard(s); a group is sent when
//! the target changes, at Flush and at Sync. The router answers Parse and Close itself
//! (statements live in the session, not on a particular server connection) and creates
//! each statement on whichever pooled connection runs it, under a name derived from its
//! text and parameter types, so a connection parses it once however many clients use it.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::session::{ends_failed_block, route_error, Session, SessionError, StmtError};
use crate::merge::{relay_multi, relay_single, Combine, RelayError, Step, StepKind};
use crate::protocol::messages::{self, MalformedMessage};
use crate::protocol::{sqlstate, PgError};
use crate::router::{MergePlan, Param, QueryPlan, Route, StatementKind};
use crate::topology::ShardId;

/// A statement prepared by the client (protocol level).
pub struct PreparedStatement {
    pub sql: String,
    pub param_types: Vec<u32>,
    /// The router's analysis: zero statements (empty query) or one.
    pub plan: Arc<QueryPlan>,
    /// Identifies the statement on server connections (`sw_<hash>`): a hash of the
    /// client session, its statement name, the text and the parameter types, so that
    /// clients never share a server statement (whose plan may be stale for them).
    pub hash: u64,
    /// The client's unnamed statement: sent as the server's unnamed statement.
    pub unnamed: bool,
}

impl PreparedStatement {
    fn server_name(&self) -> String {
        if self.unnamed {
            String::new()
        } else {
            format!("sw_{:016x}", self.hash)
        }
    }

    /// Transaction control and settings are run by the session, not forwarded as is.
    fn is_local(&self) -> bool {
        match self.plan.statements.first() {
            Some(s) => !matches!(
                s.kind,
                StatementKind::Query | StatementKind::Show | StatementKind::Other
            ),
            None => false,
        }
    }
}

/// A bound portal: which statement, and where it runs.
pub struct Portal {
    pub statement: Arc<PreparedStatement>,
    pub target: Target,
}

impl Portal {
    fn target_is_local(&self) -> bool {
        self.target == Target::Local
    }
}

/// Where a group of messages goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Only answers the router gives itself.
    Local,
    Shard(ShardId),
    Multi(Vec<ShardId>, Combine),
}

/// One message to send (or answer) within a group.
enum Op {
    Bind {
        portal: String,
        statement: Arc<PreparedStatement>,
        rest: Bytes,
    },
    DescribeStatement(Arc<PreparedStatement>),
    DescribePortal(String),
    Execute(String, i32),
    ClosePortal(String),
    Synthetic(Bytes),
    /// An error the router raises at this point of the batch.
    Error(Bytes),
}

/// Messages bound for one target, in client order.
pub struct Group {
    target: Target,
    ops: Vec<Op>,
}

/// Groups waiting for Flush or Sync.
#[derive(Default)]
pub struct Pending {
    groups: Vec<Group>,
    /// Shards that were sent messages without a Sync yet.
    unsynced: BTreeSet<ShardId>,
    /// Something in this batch failed: its shards must not commit at Sync.
    failed: bool,
    /// Roughly how many bytes the pending groups hold (to send early when large).
    bytes: usize,
}

/// What an extended-protocol message left to do that must wait (on shards or the
/// client's socket).
pub enum Deferred {
    Nothing,
    /// The pending batch grew large: send it now.
    SendPending,
    /// Execute of a portal the router runs itself (transaction control, SET, …).
    ExecuteLocal(Arc<PreparedStatement>),
}

/// A portal name that never exists: executing it fails on purpose.
const POISON_PORTAL: &str = "shardwire_abort_batch";

/// Read and drop everything up to ReadyForQuery (the answer to a Sync sent after a
/// deliberate failure).
async fn discard_to_ready(
    c: &mut crate::backend::ServerConn,
) -> Result<(), crate::backend::BackendError> {
    loop {
        let f = c.read_raw().await?;
        if f[0] == b'Z' {
            return Ok(());
        }
    }
}

/// Queue the answer the client is owed for a message sent to a shard, counting it.
fn answer(steps: &mut VecDeque<Step>, kind: StepKind, server_steps: &mut usize) {
    steps.push_back(Step::Server {
        kind,
        forward: true,
    });
    *server_steps += 1;
}

/// Send pending groups early once they hold this much, so a huge pipeline is not held
/// in memory until its Sync.
const PENDING_LIMIT: usize = 1 << 20;

fn malformed(e: MalformedMessage) -> SessionError {
    SessionError::Fatal(PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()))
}

/// An answer without a body (ParseComplete `1`, BindComplete `2`, CloseComplete `3`,
/// NoData `n`), from static bytes: no allocation.
fn synthetic(tag: u8) -> Op {
    Op::Synthetic(match tag {
        b'1' => Bytes::from_static(b"1\0\0\0\x04"),
        b'2' => Bytes::from_static(b"2\0\0\0\x04"),
        b'3' => Bytes::from_static(b"3\0\0\0\x04"),
        b'n' => Bytes::from_static(b"n\0\0\0\x04"),
        _ => messages::raw(tag, &[]),
    })
}

impl Session {
    fn add_op(&mut self, target: Target, op: Op) {
        self.pending.bytes += match &op {
            Op::Bind { rest, .. } => rest.len() + 64,
            Op::Synthetic(b) | Op::Error(b) => b.len(),
            _ => 64,
        };
        let groups = &mut self.pending.groups;
        match groups.last_mut() {
            Some(g) if g.target == target || target == Target::Local => g.ops.push(op),
            Some(g) if g.target == Target::Local => {
                g.target = target;
                g.ops.push(op);
            }
            _ => groups.push(Group {
                target,
                ops: {
                    // Room for a whole P/B/D/E batch without growing.
                    let mut ops = Vec::with_capacity(8);
                    ops.push(op);
                    ops
                },
            }),
        }
    }

    /// An error answering a client message: reported in order, then everything up to
    /// Sync is ignored.
    fn ext_error(&mut self, e: impl Into<StmtError>) {
        let mut b = BytesMut::new();
        e.into().encode(&mut b);
        self.add_op(Target::Local, Op::Error(b.freeze()));
        self.skipping = true;
        if let Some(t) = self.txn.as_mut() {
            t.failed = true;
        }
    }

    /// Parse, Bind, Describe, Execute or Close: recorded in the pending batch without
    /// waiting on anything. Returns the work that must wait (the caller boxes it, so the
    /// common messages cost no allocation).
    pub(super) fn extended_message(&mut self, frame: BytesMut) -> Result<Deferred, SessionError> {
        let tag = frame[0];
        if self.skipping {
            return Ok(Deferred::Nothing);
        }
        let frame = frame.freeze();
        let body = frame.slice(5..);
        let deferred = match tag {
            b'P' => self.on_parse(&body).map(|()| Deferred::Nothing)?,
            b'B' => self.on_bind(&body).map(|()| Deferred::Nothing)?,
            b'D' => self.on_describe(&body).map(|()| Deferred::Nothing)?,
            b'E' => self.on_execute(&body)?,
            _ => self.on_close(&body).map(|()| Deferred::Nothing)?,
        };
        if matches!(deferred, Deferred::Nothing)
            && self.pending.bytes > PENDING_LIMIT
            && !self.skipping
        {
            // A long pipeline: send what we have so answers keep flowing.
            return Ok(Deferred::SendPending);
        }
        Ok(deferred)
    }

    /// The waiting part of an extended-protocol message (see `extended_message`), or a
    /// Flush or Sync.
    pub(super) async fn extended(&mut self, tag: u8, work: Deferred) -> Result<(), SessionError> {
        match tag {
            b'H' => {
                self.run_groups(false).await?;
                self.client.flush().await?;
                Ok(())
            }
            b'S' => {
                self.run_groups(true).await?;
                self.skipping = false;
                self.ready().await
            }
            _ => match work {
                Deferred::Nothing => Ok(()),
                Deferred::SendPending => self.run_groups(false).await,
                Deferred::ExecuteLocal(stmt) => {
                    // Everything before it must have happened before the transaction
                    // state changes.
                    self.run_groups(false).await?;
                    if self.skipping {
                        return Ok(());
                    }
                    let Some(sp) = stmt.plan.statements.first() else {
                        return Ok(());
                    };
                    if !self.execute(sp, &stmt.sql).await? {
                        self.skipping = true;
                    }
                    Ok(())
                }
            },
        }
    }

    fn on_parse(&mut self, body: &Bytes) -> Result<(), SessionError> {
        // The same unnamed statement again (drivers without named statements send Parse
        // before every execution): nothing new to analyse, and the message need not
        // even be decoded.
        if body.first() == Some(&0) {
            if let Some(old) = self.statements.get("") {
                if messages::is_parse_of(body, "", &old.sql, &old.param_types) {
                    self.add_op(Target::Local, synthetic(b'1'));
                    return Ok(());
                }
            }
        }
        let p = match messages::parse_parse(body) {
            Ok(p) => p,
            Err(e) if e.is_encoding() => {
                self.ext_error(super::session::invalid_utf8());
                return Ok(());
            }
            Err(e) => return Err(malformed(e)),
        };
        if !p.name.is_empty() && self.statements.contains_key(p.name) {
            self.ext_error(PgError::error(
                sqlstate::DUPLICATE_PREPARED_STATEMENT,
                format!("prepared statement \"{}\" already exists", p.name),
            ));
            return Ok(());
        }
        let plan = match self.shared.router.load().plan(p.sql) {
            Ok(plan) => plan,
            Err(e) => {
                self.ext_error(route_error(&e));
                return Ok(());
            }
        };
        if plan.statements.len() > 1 {
            self.ext_error(PgError::error(
                sqlstate::SYNTAX_ERROR,
                "cannot insert multiple commands into a prepared statement",
            ));
            return Ok(());
        }
        let mut h = DefaultHasher::new();
        self.id.hash(&mut h);
        p.name.hash(&mut h);
        p.sql.hash(&mut h);
        p.param_types.hash(&mut h);
        let stmt = PreparedStatement {
            unnamed: p.name.is_empty(),
            sql: p.sql.to_owned(),
            param_types: p.param_types,
            plan,
            hash: h.finish(),
        };
        self.statements.insert(p.name.to_owned(), Arc::new(stmt));
        self.add_op(Target::Local, synthetic(b'1'));
        Ok(())
    }

    fn on_bind(&mut self, body: &Bytes) -> Result<(), SessionError> {
        let b = messages::parse_bind(body).map_err(malformed)?;
        let Some(stmt) = self.statements.get(b.statement).cloned() else {
            self.ext_error(PgError::error(
                sqlstate::INVALID_SQL_STATEMENT_NAME,
                format!("prepared statement \"{}\" does not exist", b.statement),
            ));
            return Ok(());
        };
        let portal = b.portal.to_owned();
        if self.in_failed_block()
            && !stmt
                .plan
                .statements
                .first()
                .is_some_and(|s| ends_failed_block(s, &stmt.sql))
        {
            self.ext_error(Session::aborted_error());
            return Ok(());
        }
        if stmt.is_local() {
            self.portals.insert(
                portal,
                Portal {
                    statement: stmt,
                    target: Target::Local,
                },
            );
            self.add_op(Target::Local, synthetic(b'2'));
            return Ok(());
        }
        let router = self.shared.router.load_full();
        let topology = router.topology();
        let target = match stmt.plan.statements.first() {
            None => Target::Shard(self.describe_shard()),
            Some(sp) => {
                self.dirty |= sp.session_effects;
                let param = |(i, value)| Param {
                    value,
                    binary: b.is_binary(i),
                    type_oid: stmt.param_types.get(i).copied().unwrap_or(0),
                };
                // The parameters on the stack when they are few (they usually are).
                let mut inline = [Param::NULL; 8];
                let spilled: Vec<Param<'_>>;
                let params: &[Param<'_>] = if b.param_count <= inline.len() {
                    for (slot, p) in inline.iter_mut().zip(b.params().enumerate().map(param)) {
                        *slot = p;
                    }
                    &inline[..b.param_count]
                } else {
                    spilled = b.params().enumerate().map(param).collect();
                    &spilled
                };
                let routed = match sp.route_quiet(topology, params) {
                    Ok(r) => r,
                    Err(e) => {
                        self.ext_error(route_error(&e));
                        return Ok(());
                    }
                };
                tracing::debug!(route = ?routed.route, "routed");
                let shards = match &routed.route {
                    Route::Shard(s) => std::slice::from_ref(s),
                    Route::Multi { shards, .. } => shards.as_slice(),
                };
                if let Err(e) = self.check_write(sp, shards) {
                    self.ext_error(e);
                    return Ok(());
                }
                match routed.route {
                    Route::Shard(s) => Target::Shard(s),
                    Route::Multi { shards, merge } => {
                        let combine = if merge == MergePlan::Replicated {
                            Combine::Replicated
                        } else {
                            Combine::Sum
                        };
                        Target::Multi(shards, combine)
                    }
                }
            }
        };
        let rest = body.slice(b.rest_offset..);
        self.portals.insert(
            portal.clone(),
            Portal {
                statement: stmt.clone(),
                target: target.clone(),
            },
        );
        self.add_op(
            target,
            Op::Bind {
                portal,
                statement: stmt,
                rest,
            },
        );
        Ok(())
    }

    /// A shard to describe a statement on: the one this batch already talks to, one the
    /// transaction holds, or the default shard.
    fn describe_shard(&self) -> ShardId {
        if let Some(Group {
            target: Target::Shard(s),
            ..
        }) = self.pending.groups.last()
        {
            return *s;
        }
        if let Some(s) = self.held.keys().next() {
            return *s;
        }
        self.shared.router.load().topology().default_shard
    }

    fn on_describe(&mut self, body: &Bytes) -> Result<(), SessionError> {
        let t = messages::parse_target(body, "Describe").map_err(malformed)?;
        if t.kind == b'S' {
            let Some(stmt) = self.statements.get(t.name).cloned() else {
                self.ext_error(PgError::error(
                    sqlstate::INVALID_SQL_STATEMENT_NAME,
                    format!("prepared statement \"{}\" does not exist", t.name),
                ));
                return Ok(());
            };
            if stmt.is_local() {
                let mut b = BytesMut::new();
                b.extend_from_slice(&messages::raw(b't', &[0, 0]));
                b.extend_from_slice(&messages::raw(b'n', &[]));
                self.add_op(Target::Local, Op::Synthetic(b.freeze()));
                return Ok(());
            }
            let shard = self.describe_shard();
            self.add_op(Target::Shard(shard), Op::DescribeStatement(stmt));
            return Ok(());
        }
        let Some(portal) = self.portals.get(t.name) else {
            self.ext_error(PgError::error(
                sqlstate::INVALID_CURSOR_NAME,
                format!("portal \"{}\" does not exist", t.name),
            ));
            return Ok(());
        };
        match portal.target.clone() {
            Target::Local => self.add_op(Target::Local, synthetic(b'n')),
            target => self.add_op(target, Op::DescribePortal(t.name.to_owned())),
        }
        Ok(())
    }

    fn on_execute(&mut self, body: &Bytes) -> Result<Deferred, SessionError> {
        let (name, max_rows) = messages::parse_execute(body).map_err(malformed)?;
        let Some(portal) = self.portals.get(name) else {
            self.ext_error(PgError::error(
                sqlstate::INVALID_CURSOR_NAME,
                format!("portal \"{name}\" does not exist"),
            ));
            return Ok(Deferred::Nothing);
        };
        if self.in_failed_block() && !portal.target_is_local() {
            self.ext_error(Session::aborted_error());
            return Ok(Deferred::Nothing);
        }
        match portal.target.clone() {
            Target::Local => return Ok(Deferred::ExecuteLocal(portal.statement.clone())),
            target => self.add_op(target, Op::Execute(name.to_owned(), max_rows)),
        }
        Ok(Deferred::Nothing)
    }

    fn on_close(&mut self, body: &Bytes) -> Result<(), SessionError> {
        let t = messages::parse_target(body, "Close").map_err(malformed)?;
        if t.kind == b'S' {
            // Server connections keep their copy: another use of the same text reuses it.
            self.statements.remove(t.name);
            self.add_op(Target::Local, synthetic(b'3'));
            return Ok(());
        }
        match self.portals.remove(t.name).map(|p| p.target) {
            Some(Target::Shard(s)) if self.held.contains_key(&s) => {
                self.add_op(Target::Shard(s), Op::ClosePortal(t.name.to_owned()));
            }
            _ => self.add_op(Target::Local, synthetic(b'3')),
        }
        Ok(())
    }

    /// Send the pending groups in order and relay their answers.
    ///
    /// Everything up to the client's Sync is one implicit transaction, as in PostgreSQL.
    /// A batch that reaches one shard is sent with its Sync at once. A batch that reaches
    /// several shards (or several groups) is sent with Flush, and only when every part
    /// has answered does each shard get its Sync, preceded by a message that fails on
    /// purpose if any part failed, so that no shard commits part of a failed batch.
    async fn run_groups(&mut self, sync: bool) -> Result<(), SessionError> {
        let mut groups = std::mem::take(&mut self.pending.groups);
        self.pending.bytes = 0;
        let mut server_groups = groups
            .iter()
            .map(|g| &g.target)
            .filter(|t| **t != Target::Local);
        let only_server_group = match (server_groups.next(), server_groups.next()) {
            (Some(Target::Shard(s)), None) => Some(*s),
            _ => None,
        };
        // One shard, nothing left open elsewhere: send the Sync with the messages.
        let router_error = groups
            .iter()
            .any(|g| g.ops.iter().any(|o| matches!(o, Op::Error(_))));
        let fast_sync = sync
            && !self.pending.failed
            && !router_error
            && only_server_group.is_some_and(|s| self.pending.unsynced.iter().all(|u| *u == s));
        // Drained rather than consumed: the emptied list goes back for the next batch.
        for g in groups.drain(..) {
            if self.pending.failed {
                continue;
            }
            let ok = match g.target.clone() {
                Target::Local => {
                    let mut ok = true;
                    for op in g.ops {
                        match op {
                            Op::Synthetic(b) => self.client.wbuf.extend_from_slice(&b),
                            Op::Error(b) => {
                                self.client.wbuf.extend_from_slice(&b);
                                ok = false;
                                break;
                            }
                            _ => {}
                        }
                    }
                    ok
                }
                Target::Shard(s) => self.run_single(s, g.ops, fast_sync).await?,
                Target::Multi(shards, combine) => {
                    Box::pin(self.run_fanout(&shards, g.ops, false, combine)).await?
                }
            };
            if !ok {
                self.pending.failed = true;
            }
        }
        if self.pending.groups.is_empty() {
            self.pending.groups = groups;
        }
        if !sync {
            if self.pending.failed {
                self.skipping = true;
            }
            if !self.held.is_empty() {
                self.batch_open = true;
            }
            return Ok(());
        }
        let failed = std::mem::take(&mut self.pending.failed);
        let unsynced: Vec<ShardId> = std::mem::take(&mut self.pending.unsynced)
            .into_iter()
            .collect();
        for s in unsynced {
            let Some(c) = self.held.get_mut(&s) else {
                continue;
            };
            if failed {
                // Make the shard's implicit transaction fail, then end it.
                messages::execute(&mut c.wbuf, POISON_PORTAL, 0);
                messages::empty_message(&mut c.wbuf, b'S');
                let r = match c.flush().await {
                    Ok(()) => discard_to_ready(c).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    let r: Result<crate::merge::Outcome, RelayError> = Err(RelayError::Backend(e));
                    self.finish_relay(&[s], r)?;
                }
                continue;
            }
            messages::empty_message(&mut c.wbuf, b'S');
            let mut steps = VecDeque::from([Step::Server {
                kind: StepKind::Sync,
                forward: false,
            }]);
            let r = match c.flush().await {
                Ok(()) => relay_single(c, &mut self.client, &mut steps).await,
                Err(e) => Err(RelayError::Backend(e)),
            };
            self.finish_relay(&[s], r)?;
        }
        self.batch_open = false;
        self.sync_txn_status();
        if self.txn.is_none() {
            self.portals.clear();
        }
        Ok(())
    }

    async fn run_single(
        &mut self,
        shard: ShardId,
        ops: Vec<Op>,
        sync: bool,
    ) -> Result<bool, SessionError> {
        if let Err(e) = self.conn_for(shard).await {
            self.fail(e);
            return Ok(false);
        }
        let Some(conn) = self.held.get_mut(&shard) else {
            return Ok(false);
        };
        // The session's queue, reused: no allocation per batch.
        let mut steps = std::mem::take(&mut self.steps);
        steps.clear();
        let mut router_error = false;
        // Statements created by this group: (server step index, hash).
        let mut created: Vec<(usize, u64)> = Vec::new();
        let mut server_steps = 0usize;
        let mut ensure = |conn: &mut crate::backend::ServerConn,
                          steps: &mut VecDeque<Step>,
                          st: &PreparedStatement,
                          server_steps: &mut usize| {
            if st.unnamed {
                // The client's unnamed statement is the server's unnamed one, parsed
                // for each use as PostgreSQL itself does.
                messages::parse(&mut conn.wbuf, "", &st.sql, &st.param_types);
                steps.push_back(Step::Server {
                    kind: StepKind::Parse,
                    forward: false,
                });
                *server_steps += 1;
            } else if conn.prepared.insert(st.hash) {
                messages::parse(&mut conn.wbuf, &st.server_name(), &st.sql, &st.param_types);
                steps.push_back(Step::Server {
                    kind: StepKind::Parse,
                    forward: false,
                });
                created.push((*server_steps, st.hash));
                *server_steps += 1;
            }
        };
        for op in ops {
            match op {
                Op::Bind {
                    portal,
                    statement,
                    rest,
                } => {
                    ensure(conn, &mut steps, &statement, &mut server_steps);
                    messages::rebind(&mut conn.wbuf, &portal, &statement.server_name(), &rest);
                    answer(&mut steps, StepKind::Bind, &mut server_steps);
                }
                Op::DescribeStatement(statement) => {
                    ensure(conn, &mut steps, &statement, &mut server_steps);
                    messages::target(&mut conn.wbuf, b'D', b'S', &statement.server_name());
                    answer(&mut steps, StepKind::DescribeStatement, &mut server_steps);
                }
                Op::DescribePortal(p) => {
                    messages::target(&mut conn.wbuf, b'D', b'P', &p);
                    answer(&mut steps, StepKind::DescribePortal, &mut server_steps);
                }
                Op::Execute(p, n) => {
                    messages::execute(&mut conn.wbuf, &p, n);
                    answer(&mut steps, StepKind::Execute, &mut server_steps);
                }
                Op::ClosePortal(p) => {
                    messages::target(&mut conn.wbuf, b'C', b'P', &p);
                    answer(&mut steps, StepKind::Close, &mut server_steps);
                }
                Op::Synthetic(b) => steps.push_back(Step::Synthetic(b)),
                Op::Error(b) => {
                    router_error = true;
                    steps.push_back(Step::Synthetic(b));
                }
            }
        }
        if sync {
            messages::empty_message(&mut conn.wbuf, b'S');
            steps.push_back(Step::Server {
                kind: StepKind::Sync,
                forward: false,
            });
            self.pending.unsynced.remove(&shard);
        } else {
            // Flush, so the shard answers now; its Sync comes with the client's.
            messages::empty_message(&mut conn.wbuf, b'H');
            self.pending.unsynced.insert(shard);
        }
        let result = match conn.flush().await {
            Ok(()) => relay_single(conn, &mut self.client, &mut steps).await,
            Err(e) => Err(RelayError::Backend(e)),
        };
        if let Ok(out) = &result {
            if let Some(failed_at) = out.failed_step {
                // A Parse that failed, or was skipped after an earlier error, created
                // nothing on the server.
                for (idx, hash) in &created {
                    if *idx >= failed_at {
                        conn.prepared.remove(hash);
                    }
                }
            }
        }
        self.steps = steps;
        let ok = self.finish_relay(&[shard], result)?;
        Ok(ok && !router_error)
    }

    async fn run_fanout(
        &mut self,
        shards: &[ShardId],
        ops: Vec<Op>,
        sync: bool,
        combine: Combine,
    ) -> Result<bool, SessionError> {
        for &s in shards {
            if let Err(e) = self.conn_for(s).await {
                self.fail(e);
                return Ok(false);
            }
        }
        // The same messages go to every shard; statements are sent unnamed each time so
        // every shard's answers line up step for step.
        let mut wire = BytesMut::new();
        // The session's queue, reused: no allocation per batch.
        let mut steps = std::mem::take(&mut self.steps);
        steps.clear();
        let mut router_error = false;
        for op in ops {
            match op {
                Op::Bind {
                    portal,
                    statement,
                    rest,
                } => {
                    messages::parse(&mut wire, "", &statement.sql, &statement.param_types);
                    steps.push_back(Step::Server {
                        kind: StepKind::Parse,
                        forward: false,
                    });
                    messages::rebind(&mut wire, &portal, "", &rest);
                    steps.push_back(Step::Server {
                        kind: StepKind::Bind,
                        forward: true,
                    });
                }
                Op::DescribeStatement(statement) => {
                    messages::parse(&mut wire, "", &statement.sql, &statement.param_types);
                    steps.push_back(Step::Server {
                        kind: StepKind::Parse,
                        forward: false,
                    });
                    messages::target(&mut wire, b'D', b'S', "");
                    steps.push_back(Step::Server {
                        kind: StepKind::DescribeStatement,
                        forward: true,
                    });
                }
                Op::DescribePortal(p) => {
                    messages::target(&mut wire, b'D', b'P', &p);
                    steps.push_back(Step::Server {
                        kind: StepKind::DescribePortal,
                        forward: true,
                    });
                }
                Op::Execute(p, n) => {
                    messages::execute(&mut wire, &p, n);
                    steps.push_back(Step::Server {
                        kind: StepKind::Execute,
                        forward: true,
                    });
                }
                Op::ClosePortal(p) => {
                    messages::target(&mut wire, b'C', b'P', &p);
                    steps.push_back(Step::Server {
                        kind: StepKind::Close,
                        forward: true,
                    });
                }
                Op::Synthetic(b) => steps.push_back(Step::Synthetic(b)),
                Op::Error(b) => {
                    router_error = true;
                    steps.push_back(Step::Synthetic(b));
                }
            }
        }
        if sync {
            messages::empty_message(&mut wire, b'S');
            steps.push_back(Step::Server {
                kind: StepKind::Sync,
                forward: false,
            });
        } else {
            messages::empty_message(&mut wire, b'H');
        }
        let mut conns = Vec::with_capacity(shards.len());
        for (id, c) in self.held.iter_mut() {
            if shards.contains(id) {
                c.wbuf.extend_from_slice(&wire);
                conns.push(&mut **c);
            }
        }
        let mut sent = Ok(());
        for c in conns.iter_mut() {
            if let Err(e) = c.flush().await {
                sent = Err(e);
                break;
            }
        }
        let result = match sent {
            Ok(()) => relay_multi(&mut conns, &mut self.client, &mut steps, combine).await,
            Err(e) => Err(RelayError::Backend(e)),
        };
        for s in shards {
            if sync {
                self.pending.unsynced.remove(s);
            } else {
                self.pending.unsynced.insert(*s);
            }
        }
        let ok = self.finish_relay(shards, result)?;
        Ok(ok && !router_error)
    }
}
