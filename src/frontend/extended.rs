//! The extended query protocol: Parse/Bind/Describe/Execute/Close/Flush/Sync.
//!
//! Messages are gathered into groups that go to the same shard(s); a group is sent when
//! the target changes, at Flush and at Sync. The router answers Parse and Close itself
//! (statements live in the session, not on a particular server connection) and creates
//! each statement on whichever pooled connection runs it, under a name derived from its
//! text and parameter types, so a connection parses it once however many clients use it.
//! A client's named statement keeps the parameter types and result columns the shard
//! described at its first use, as PostgreSQL holds its own statements to them: its
//! copies are named after its shape too, and a new copy is compared with it before use
//! (`Batch::ensure_named`).

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::session::{
    ends_failed_block, flush_all, route_error, write_to, Session, SessionError, StmtError,
};
use crate::merge::{
    relay_multi, relay_point, relay_single, Combine, RelayError, StatementShape, Step, StepKind,
};
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
    /// The text and parameter types (`router::statement_hash`), from which a shared
    /// unnamed statement's names on server connections are derived (`server_key`; a
    /// named statement's come from its shape, `KeptShape::copy` and `named_key`).
    pub hash: u64,
    /// The client's unnamed statement.
    pub unnamed: bool,
    /// An unnamed query kept on server connections under a name of its own
    /// (`pool.reuse_unnamed_statements`) from its text's second use on, and shared by
    /// every client with the same settings: a driver that sends the same text with Parse
    /// before every execution then costs the shard one parse per connection, not one per
    /// execution.
    pub shared: bool,
    /// A named statement's shape, as the shard described it at its first use: the
    /// client decodes its results by it. Every copy it runs as is parsed with these
    /// parameter types and gives these result columns, or using the statement fails as
    /// PostgreSQL fails a statement whose result type changed.
    pub shape: std::sync::OnceLock<KeptShape>,
}

/// A named statement's shape, with the hash its copies are named after.
pub struct KeptShape {
    /// What the shard described at the statement's first use.
    shape: StatementShape,
    /// The text, the parameter types the copies are parsed with and the result columns:
    /// clients share a copy only if their statements have the same ones.
    copy: u64,
}

impl KeptShape {
    fn new(shape: &StatementShape, sql: &str) -> KeptShape {
        let mut h = DefaultHasher::new();
        crate::router::statement_hash(sql, &shape.params).hash(&mut h);
        shape.rows.hash(&mut h);
        KeptShape {
            shape: shape.clone(),
            copy: h.finish(),
        }
    }
}

impl PreparedStatement {
    /// The name of the client's unnamed statement on a connection with session settings
    /// `settings` when it is shared; `None` when it is parsed as the server's unnamed
    /// statement. (Named statements: see `Batch::named_key`.)
    fn server_key(&self, settings: u64, epoch: u64) -> Option<u64> {
        if self.shared {
            // Shared only among sessions with the same settings: under other settings
            // the same text can parse differently (standard_conforming_strings) and a
            // kept plan may have folded constants differently (DateStyle, TimeZone).
            // Unknown settings (u64::MAX): parsed afresh, unnamed. A new schema epoch
            // (DDL through the router) gives every kept statement a new name, so none
            // made before the change is used after it.
            shared_key(self.hash, settings, epoch)
        } else {
            None
        }
    }

    /// A client's named statement (its copies are checked against its shape).
    fn is_named(&self) -> bool {
        !self.unnamed
    }

    /// Whether the new copies' answers to Describe (`found`, one per shard) all give
    /// this statement's kept shape.
    fn gives(&self, found: Option<&[StatementShape]>) -> bool {
        match (self.shape.get(), found) {
            (Some(kept), Some(found)) => {
                !found.is_empty() && found.iter().all(|f| *f == kept.shape)
            }
            _ => false,
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

/// The parameter types a named statement's copy is parsed with: those of its shape
/// (PostgreSQL keeps the types it inferred when it prepared a statement), or the
/// client's before its first use.
fn copy_types(st: &PreparedStatement) -> &[u32] {
    match st.shape.get() {
        Some(kept) => &kept.shape.params,
        None => &st.param_types,
    }
}

/// The name (see `ServerName`) of a statement shared by every client, identified by
/// `hash` (`router::statement_hash`, or `KeptShape::copy` for a named statement), on a
/// connection with session settings `settings` in schema epoch `epoch`; `None` when
/// the connection's settings are unknown.
fn shared_key(hash: u64, settings: u64, epoch: u64) -> Option<u64> {
    (settings != u64::MAX).then(|| {
        hash ^ settings.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ epoch.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)
    })
}

/// A statement's name on server connections, `sw_` and 16 hex digits (or empty for
/// the unnamed statement), built on the stack.
struct ServerName {
    buf: [u8; 19],
    len: usize,
}

impl ServerName {
    fn new(key: Option<u64>) -> ServerName {
        let mut buf = *b"sw_0000000000000000";
        let Some(key) = key else {
            return ServerName { buf, len: 0 };
        };
        buf[3..11].copy_from_slice(&hex8((key >> 32) as u32));
        buf[11..].copy_from_slice(&hex8(key as u32));
        ServerName { buf, len: 19 }
    }

    /// The name's bytes (ASCII).
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// `x` as 8 lower-case hex digits, most significant first, without a loop: each nibble
/// is spread into a byte of its own, and the bytes are made ASCII all at once (a name is
/// written for every statement sent).
fn hex8(x: u32) -> [u8; 8] {
    let mut v = u64::from(x);
    v = (v | v << 16) & 0x0000_ffff_0000_ffff;
    v = (v | v << 8) & 0x00ff_00ff_00ff_00ff;
    v = (v | v << 4) & 0x0f0f_0f0f_0f0f_0f0f;
    // 1 in each byte whose nibble is 10 or more (no byte carries into the next).
    let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (v + 0x3030_3030_3030_3030 + letters * (b'a' - b'0' - 10) as u64).to_be_bytes()
}

/// Texts of the clients' unnamed statements that the router has run, by hash. A text is
/// kept on server connections only from its second use on, so that one-off texts (values
/// spliced into the SQL) do not fill the servers' memory with statements never run again.
#[derive(Default)]
pub struct SeenTexts(std::sync::Mutex<std::collections::HashSet<u64>>);

/// How many texts `SeenTexts` remembers before it starts afresh (about 1 MB at most).
const SEEN_TEXTS_LIMIT: usize = 1 << 16;

impl SeenTexts {
    /// Whether a statement shared by every client (`hash`, `router::statement_hash`)
    /// that a connection holding `held` statements does not have yet is kept there
    /// under its name; otherwise it runs unkept. A text run for the first time may never
    /// come back, and a connection holding the most statements it may takes no more.
    /// Counts this use toward "run before" if `record`.
    fn keep_new(&self, held: usize, hash: u64, record: bool) -> bool {
        held < super::session::MAX_PREPARED_PER_CONN && self.seen_before(hash, record)
    }

    /// Whether the text with this hash was seen before; remembers it if `record`.
    fn seen_before(&self, hash: u64, record: bool) -> bool {
        let Ok(mut seen) = self.0.lock() else {
            return false;
        };
        if seen.contains(&hash) || !record {
            return seen.contains(&hash);
        }
        if seen.len() >= SEEN_TEXTS_LIMIT {
            seen.clear();
        }
        seen.insert(hash);
        false
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

/// Bound portals by client name. The unnamed one, which most drivers bind for every
/// statement, is kept apart: no hashing for each Bind, Describe and Execute.
#[derive(Default)]
pub struct Portals {
    unnamed: Option<Portal>,
    named: foldhash::HashMap<String, Portal>,
}

impl Portals {
    /// Record `portal` as `name`, replacing any portal of that name.
    fn insert(&mut self, name: &str, portal: Portal) {
        if name.is_empty() {
            self.unnamed = Some(portal);
        } else {
            self.named.insert(name.to_owned(), portal);
        }
    }

    fn get(&self, name: &str) -> Option<&Portal> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    fn remove(&mut self, name: &str) -> Option<Portal> {
        if name.is_empty() {
            self.unnamed.take()
        } else {
            self.named.remove(name)
        }
    }

    pub fn clear(&mut self) {
        self.unnamed = None;
        if !self.named.is_empty() {
            self.named.clear();
        }
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
    /// An emptied op list kept for the next group: no allocation per batch.
    spare_ops: Vec<Op>,
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

/// What a statement did in a batch sent to one connection: (what, server step, hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// A Parse that creates the statement on the connection.
    Created,
    /// A Bind or Describe of a shared unnamed statement (one that may have outlived a
    /// schema change).
    Shared,
    /// A Bind or Describe of a named statement's copy.
    Named,
}

impl Use {
    /// The use of a statement's copy kept under a name.
    fn of(st: &PreparedStatement) -> Use {
        if st.is_named() {
            Use::Named
        } else {
            Use::Shared
        }
    }
}

/// Writes a group's messages and queues the steps that answer them.
struct Batch<'a> {
    steps: &'a mut VecDeque<Step>,
    uses: &'a mut Vec<(Use, usize, u64)>,
    /// Server steps queued so far.
    server_steps: usize,
    /// The first server step whose answer goes to the client.
    first_forwarded: Option<usize>,
    /// The router itself raised an error in this batch.
    router_error: bool,
    /// The connection's settings fingerprint, or u64::MAX when its settings may have
    /// changed since it was recorded (shared statements are then not used).
    settings: u64,
    kept: KeptStatements<'a>,
    /// The statements whose shape a `StepKind::Shape` step asks for, in step order.
    shaped: Vec<Arc<PreparedStatement>>,
    /// Encoding stopped before `ops[op]`: a copy of a named statement was made (the
    /// last of `shaped`; named `key`) whose shape must be compared with the statement's
    /// before anything uses it.
    stopped: Option<Stop>,
    /// The named statement whose fresh parse the server's unnamed statement holds: it
    /// was described in this batch (or in the part before, which checked it), so its
    /// uses take it as it is until another text is parsed unnamed.
    unnamed: Option<Arc<PreparedStatement>>,
}

/// Where and why `Batch::encode` stopped early.
#[derive(Clone, Copy)]
struct Stop {
    op: usize,
    /// The statement's name on the connection (`None`: the unnamed statement).
    key: Option<u64>,
}

/// What decides whether (and under which name) a shared statement is kept.
#[derive(Clone, Copy)]
struct KeptStatements<'a> {
    /// The connection's settings fingerprint is its real state.
    settings_known: bool,
    /// The router's schema epoch (see `Shared::schema_epoch`).
    epoch: u64,
    /// Unnamed texts run before: only those are kept on a connection.
    seen: &'a SeenTexts,
    /// The client session's own salt for named statements' copies, used while its
    /// settings are unknown (a copy then serves this session only).
    private: u64,
}

impl<'a> Batch<'a> {
    fn new(
        steps: &'a mut VecDeque<Step>,
        uses: &'a mut Vec<(Use, usize, u64)>,
        settings: u64,
        kept: KeptStatements<'a>,
    ) -> Batch<'a> {
        Batch {
            steps,
            uses,
            server_steps: 0,
            first_forwarded: None,
            router_error: false,
            settings,
            kept,
            shaped: Vec::new(),
            stopped: None,
            unnamed: None,
        }
    }

    /// Queue the answer to a message sent to the server; returns its step index.
    fn step(&mut self, kind: StepKind, forward: bool) -> usize {
        if forward && self.first_forwarded.is_none() {
            self.first_forwarded = Some(self.server_steps);
        }
        self.steps.push_back(Step::Server { kind, forward });
        self.server_steps += 1;
        self.server_steps - 1
    }

    /// The statement's name on this connection, creating it there first unless it
    /// exists. The client's unnamed statement (when not shared) is parsed for each use,
    /// as PostgreSQL itself does; so is every unnamed statement when `prepared` is
    /// `None` (a batch sent to several shards at once, whose answers must line up step
    /// for step; named statements: see `ensure_named`).
    /// `record`: this use counts toward the text's "run before" (a Bind does; a
    /// Describe, which usually precedes the Bind of the same text, does not). `None`
    /// when the batch must stop before `ops[op]` (a named statement's copy to check).
    fn ensure(
        &mut self,
        out: &mut BytesMut,
        prepared: Option<&mut foldhash::HashSet<u64>>,
        st: &Arc<PreparedStatement>,
        record: bool,
        op: usize,
    ) -> Option<(ServerName, Option<u64>)> {
        if st.is_named() {
            return self.ensure_named(out, prepared, st, op);
        }
        let (key, create) = match (st.server_key(self.settings, self.kept.epoch), prepared) {
            (Some(h), Some(prepared)) if prepared.contains(&h) => (Some(h), false),
            (Some(h), Some(prepared)) => {
                if st.shared && !self.kept.seen.keep_new(prepared.len(), st.hash, record) {
                    // Parsed unnamed.
                    (None, true)
                } else {
                    prepared.insert(h);
                    (Some(h), true)
                }
            }
            _ => (None, true),
        };
        let name = ServerName::new(key);
        if create {
            if key.is_none() {
                self.unnamed = None;
            }
            messages::parse(out, name.as_bytes(), &st.sql, &st.param_types);
            let idx = self.step(StepKind::Parse, false);
            if let Some(h) = key {
                self.uses.push((Use::Created, idx, h));
            }
        }
        Some((name, key))
    }

    /// `ensure` for a client's named statement. Its first use runs on a fresh parse as
    /// the server's unnamed statement, described first: what that answers is the
    /// statement's shape, with no round trip more. From then on it runs as a copy named
    /// after its text, kept parameter types and shape (`named_key`), shared by every
    /// client whose statement has the same ones under the same settings. A connection
    /// without the copy gets one, described, and the batch stops there to compare it
    /// with the statement's shape (once per connection and shape). A batch sent to
    /// several shards at once (`prepared` is `None`) parses the statement unnamed and
    /// checks it at every use, as it does while a connection holds the most statements
    /// it may.
    fn ensure_named(
        &mut self,
        out: &mut BytesMut,
        prepared: Option<&mut foldhash::HashSet<u64>>,
        st: &Arc<PreparedStatement>,
        op: usize,
    ) -> Option<(ServerName, Option<u64>)> {
        let (key, held) = match &prepared {
            Some(p) => self.named_key(st, p),
            None => (None, false),
        };
        if held {
            return Some((ServerName::new(key), key));
        }
        if self.unnamed.as_ref().is_some_and(|u| Arc::ptr_eq(u, st)) {
            return Some((ServerName::new(None), None));
        }
        // A use before the statement's shape is known, unless an earlier use in this
        // batch is already learning it (this one is then compared with it).
        let first = st.shape.get().is_none() && !self.shaped.iter().any(|s| Arc::ptr_eq(s, st));
        let name = ServerName::new(key);
        messages::parse(out, name.as_bytes(), &st.sql, copy_types(st));
        self.step(StepKind::Parse, false);
        messages::target(out, b'D', b'S', name.as_bytes());
        self.step(StepKind::Shape, false);
        self.shaped.push(st.clone());
        if first {
            self.unnamed = Some(st.clone());
            return Some((name, key));
        }
        self.stopped = Some(Stop { op, key });
        None
    }

    /// The name of a named statement's copy on this connection (holding `prepared`),
    /// once its shape is known, and whether the connection holds it: shared by every
    /// client under the same settings; while the connection's settings are unknown,
    /// this session's own. `None` (the server's unnamed statement, checked at every use)
    /// when the connection holds the most statements it may. No schema epoch: a copy is
    /// compared with the statement's shape when it is made, and PostgreSQL holds it to
    /// that shape from then on.
    fn named_key(
        &self,
        st: &PreparedStatement,
        prepared: &foldhash::HashSet<u64>,
    ) -> (Option<u64>, bool) {
        let Some(kept) = st.shape.get() else {
            return (None, false);
        };
        let key = shared_key(kept.copy, self.settings, 0).unwrap_or(kept.copy ^ self.kept.private);
        if prepared.contains(&key) {
            (Some(key), true)
        } else if prepared.len() < super::session::MAX_PREPARED_PER_CONN {
            (Some(key), false)
        } else {
            (None, false)
        }
    }

    /// Write `ops` to `out`, each statement named as `ensure` decides, then Sync (or
    /// Flush, so the shard answers now; its Sync comes with the client's). Stops early
    /// where a statement's new copy must be checked first (see `stopped`).
    fn encode(
        &mut self,
        out: &mut BytesMut,
        mut prepared: Option<&mut foldhash::HashSet<u64>>,
        ops: &[Op],
        sync: bool,
    ) {
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Bind {
                    portal,
                    statement,
                    rest,
                } => {
                    let Some((name, key)) =
                        self.ensure(out, prepared.as_deref_mut(), statement, true, i)
                    else {
                        // The shard answers what was sent; the rest follows the check.
                        return messages::empty_message(out, b'H');
                    };
                    messages::rebind(out, portal, name.as_bytes(), rest);
                    let idx = self.step(StepKind::Bind, true);
                    if let Some(h) = key {
                        self.uses.push((Use::of(statement), idx, h));
                    }
                }
                Op::DescribeStatement(statement) => {
                    let Some((name, key)) =
                        self.ensure(out, prepared.as_deref_mut(), statement, false, i)
                    else {
                        return messages::empty_message(out, b'H');
                    };
                    messages::target(out, b'D', b'S', name.as_bytes());
                    let idx = self.step(StepKind::DescribeStatement, true);
                    if let Some(h) = key {
                        self.uses.push((Use::of(statement), idx, h));
                    }
                }
                Op::DescribePortal(p) => {
                    messages::target(out, b'D', b'P', p);
                    self.step(StepKind::DescribePortal, true);
                }
                Op::Execute(p, n) => {
                    messages::execute(out, p, *n);
                    self.step(StepKind::Execute, true);
                }
                Op::ClosePortal(p) => {
                    messages::target(out, b'C', b'P', p);
                    self.step(StepKind::Close, true);
                }
                Op::Synthetic(b) => self.steps.push_back(Step::Synthetic(b.clone())),
                Op::Error(b) => {
                    self.router_error = true;
                    self.steps.push_back(Step::Synthetic(b.clone()));
                }
            }
        }
        if sync {
            messages::empty_message(out, b'S');
            self.step(StepKind::Sync, false);
        } else {
            messages::empty_message(out, b'H');
        }
    }
}

/// Write a group's messages for one connection, with the steps that answer them.
/// Statements found stale on the connection are closed before anything else.
fn encode_single<'a>(
    conn: &mut crate::backend::ServerConn,
    ops: &[Op],
    sync: bool,
    kept: KeptStatements<'a>,
    unnamed: Option<Arc<PreparedStatement>>,
    steps: &'a mut VecDeque<Step>,
    uses: &'a mut Vec<(Use, usize, u64)>,
) -> Batch<'a> {
    steps.clear();
    uses.clear();
    let settings = if kept.settings_known {
        conn.settings
    } else {
        u64::MAX
    };
    let mut batch = Batch::new(steps, uses, settings, kept);
    batch.unnamed = unnamed;
    for hash in std::mem::take(&mut conn.stale) {
        messages::target(
            &mut conn.wbuf,
            b'C',
            b'S',
            ServerName::new(Some(hash)).as_bytes(),
        );
        batch.step(StepKind::Close, false);
    }
    batch.encode(&mut conn.wbuf, Some(&mut conn.prepared), ops, sync);
    batch
}

/// Whether the ErrorResponse at the start of `answer` (a kept statement's, at Parse or
/// Bind) may not be what the statement's own text gives: a statement made stale by DDL
/// (0A000 "cached plan must not change result type", a missing or duplicate statement)
/// or an error with a position, which points into the `$1` text. A cancel, a lock
/// timeout or lack of resources is what the text would have met too.
fn text_may_differ(answer: &[u8]) -> bool {
    let Some((b'E', rest)) = answer.split_first() else {
        return false;
    };
    let Some(len) = rest
        .get(..4)
        .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]))
    else {
        return false;
    };
    let body = rest.get(4..len as usize).unwrap_or_default();
    body.split(|b| *b == 0)
        .any(|field| match field.split_first() {
            Some((b'C', code)) => matches!(code, b"0A000" | b"26000" | b"42P05"),
            Some((b'P', _)) => true,
            _ => false,
        })
}

/// The error for a prepared statement whose result columns changed since it was
/// prepared: PostgreSQL's own (drivers such as pgjdbc and pgx recognise it by its code,
/// message and routine, prepare the statement again and retry).
fn result_type_changed() -> PgError {
    PgError::error(
        sqlstate::FEATURE_NOT_SUPPORTED,
        "cached plan must not change result type",
    )
    .with_detail(
        "the prepared statement's result columns changed since it was prepared (the \
         schema changed); its results would no longer match the columns already \
         described",
    )
    .with_hint("prepare the statement again")
    .with_routine(crate::protocol::error::Routine::RevalidateCachedQuery)
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
        let Pending {
            groups, spare_ops, ..
        } = &mut self.pending;
        match groups.last_mut() {
            Some(g) if g.target == target || target == Target::Local => g.ops.push(op),
            Some(g) if g.target == Target::Local => {
                g.target = target;
                g.ops.push(op);
            }
            _ => groups.push(Group {
                target,
                ops: {
                    let mut ops = std::mem::take(spare_ops);
                    // Room for a whole P/B/D/E batch without growing.
                    ops.reserve(8);
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
        let shared = p.name.is_empty()
            && self.shared.reuse_unnamed_statements
            && plan.statements.len() == 1
            && plan.statements[0].kind == StatementKind::Query;
        let hash = crate::router::statement_hash(p.sql, &p.param_types);
        let stmt = PreparedStatement {
            unnamed: p.name.is_empty(),
            shared,
            sql: p.sql.to_owned(),
            param_types: p.param_types,
            plan,
            hash,
            shape: Default::default(),
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
        if self.in_failed_block() && !stmt.plan.statements.first().is_some_and(ends_failed_block) {
            self.ext_error(Session::aborted_error());
            return Ok(());
        }
        if stmt.is_local() {
            self.portals.insert(
                &portal,
                Portal {
                    statement: stmt,
                    target: Target::Local,
                },
            );
            self.add_op(Target::Local, synthetic(b'2'));
            return Ok(());
        }
        let router = self.shared.router.load();
        let topology = router.topology();
        let target = match stmt.plan.statements.first() {
            None => Target::Shard(self.describe_shard()),
            Some(sp) => {
                self.dirty |= sp.session_effects;
                if super::session::may_change_schema(sp, || sp.text(&stmt.sql)) {
                    self.schema_touched = true;
                }
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
            &portal,
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
            // Server connections keep their copies: other clients' statements, or a
            // later one of this client's, with the same text may use them.
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
        for mut g in groups.drain(..) {
            if self.pending.failed {
                continue;
            }
            let ok = match g.target.clone() {
                Target::Local => {
                    let mut ok = true;
                    for op in g.ops.drain(..) {
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
                Target::Shard(s) => self.run_single(s, &g.ops, fast_sync).await?,
                Target::Multi(shards, combine) => {
                    Box::pin(self.run_fanout(&shards, &g.ops, false, combine)).await?
                }
            };
            g.ops.clear();
            if self.pending.spare_ops.capacity() == 0 {
                self.pending.spare_ops = g.ops;
            }
            if !ok {
                self.pending.failed = true;
            }
        }
        if self.pending.groups.is_empty() {
            self.pending.groups = groups;
        }
        if self.schema_touched {
            self.schema_may_change();
            // Outside a block its implicit transaction commits at the Sync: the epoch
            // moves on again then.
            self.schema_touched = !sync;
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
        // (Only run_single and run_fanout add to the set; nothing below calls them.)
        while let Some(s) = self.pending.unsynced.pop_first() {
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
        ops: &[Op],
        sync: bool,
    ) -> Result<bool, SessionError> {
        if let Err(e) = self.conn_for(shard).await {
            self.fail(e);
            return Ok(false);
        }
        // The batch can be run again after an error only if it is all of the shard's
        // implicit transaction (nothing sent since the client's last Sync: what ran
        // before would have been rolled back by the error) and no transaction block
        // is open (the error failed it).
        let may_rerun = sync && !self.pending.unsynced.contains(&shard) && self.txn.is_none();
        // The session's queues, reused: no allocation per batch.
        let mut steps = std::mem::take(&mut self.steps);
        let mut uses = std::mem::take(&mut self.statement_uses);
        // What the client is owed so far, to take back if the batch is run again.
        let mut mark = self.client.mark();
        let epoch = self.shared.schema_epoch();
        let mut retried = false;
        // Settings changed inside the open block, or by a statement the router cannot
        // follow, are not in the connection's fingerprint yet.
        let settings_known = !self.dirty && self.txn.as_ref().is_none_or(|t| !t.settings_changed);
        // A copy of this session's own is made under the settings of the moment: the
        // block's SETs name it too.
        let private = match &self.txn {
            Some(t) if t.settings_changed => {
                let mut h = DefaultHasher::new();
                t.replay.hash(&mut h);
                self.statement_salt ^ h.finish()
            }
            _ => self.statement_salt,
        };
        // The first op not sent yet: the batch goes in parts when a statement's new
        // copy must be checked before it is used (`Batch::stopped`).
        let mut start = 0;
        let mut synced = sync;
        let mut unnamed = None;
        let mut refused = false;
        let (mut result, router_error) = loop {
            let Some(conn) = self.held.get_mut(&shard) else {
                break (Ok(crate::merge::Outcome::default()), false);
            };
            let kept = KeptStatements {
                settings_known,
                epoch,
                seen: &self.shared.seen_texts,
                private,
            };
            let mut batch = encode_single(
                conn,
                &ops[start..],
                sync,
                kept,
                unnamed.take(),
                &mut steps,
                &mut uses,
            );
            let (router_error, first_forwarded) = (batch.router_error, batch.first_forwarded);
            let (stopped, shaped) = (batch.stopped, std::mem::take(&mut batch.shaped));
            let held_unnamed = batch.unnamed.take();
            synced = sync && stopped.is_none();
            // Only a part that starts the batch can be run again: what an earlier part
            // ran and answered cannot be taken back.
            let rerunnable = may_rerun && start == 0;
            self.client.hold_first_error = rerunnable;
            let result = match conn.flush().await {
                Ok(()) => relay_single(conn, &mut self.client, &mut steps).await,
                Err(e) => Err(RelayError::Backend(e)),
            };
            let Ok(out) = &result else {
                break (result, router_error);
            };
            for (st, shape) in shaped.iter().zip(out.shapes()) {
                st.shape.get_or_init(|| KeptShape::new(shape, &st.sql));
            }
            if let Some(failed_at) = out.failed_step {
                // A Parse that failed, or was skipped after an earlier error, created
                // nothing on the server.
                for (kind, idx, hash) in &uses {
                    if *kind == Use::Created && *idx >= failed_at {
                        conn.prepared.remove(hash);
                    }
                }
                if let Some(key) = stopped.and_then(|stop| stop.key) {
                    // Whether or not its copy was made (closing none is no error).
                    conn.stale.push(key);
                }
                // An error at a kept statement: PostgreSQL revalidates a kept statement
                // against the current schema with the parameter types it inferred when
                // the statement was made, so after DDL it can fail where a fresh parse
                // would not ("cached plan must not change result type", or an operator
                // that no longer exists for the old type). The statement is dropped from
                // the connection; when the batch can run again and nothing but the error
                // reached the client, it runs again with the statement parsed afresh, as
                // PostgreSQL parses the unnamed statement. An error the fresh parse gives
                // too is then reported.
                let kept = uses.iter().find(|(kind, idx, _)| {
                    matches!(kind, Use::Shared | Use::Named) && *idx == failed_at
                });
                let Some(&(kind, _, hash)) = kept else {
                    break (result, router_error);
                };
                // A named statement's copy is dropped only for an error that may be the
                // copy's own (stale, missing, or pointing into its text); an error in
                // the client's values is the statement's, wherever it runs.
                if kind == Use::Named && !out.first_error().is_some_and(text_may_differ) {
                    break (result, router_error);
                }
                conn.retire_statement(hash);
                let rerun = rerunnable
                    && !retried
                    && first_forwarded == Some(failed_at)
                    && !out.async_frames
                    && self.client.unsent_since(mark);
                if !rerun {
                    break (result, router_error);
                }
                if stopped.is_some() {
                    // Sent without a Sync: end the failed implicit transaction first.
                    messages::empty_message(&mut conn.wbuf, b'S');
                    let ended = match conn.flush().await {
                        Ok(()) => discard_to_ready(conn).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = ended {
                        break (Err(RelayError::Backend(e)), router_error);
                    }
                }
                tracing::debug!(shard, "a kept statement failed; running the batch again");
                self.client.take_back(mark);
                retried = true;
                continue;
            }
            let Some(stop) = stopped else {
                break (result, router_error);
            };
            // The stopped part's last Shape step is the new copy's.
            let found = out
                .shapes()
                .get(shaped.len() - 1..)
                .filter(|f| f.len() == 1);
            if !shaped.last().is_some_and(|st| st.gives(found)) {
                // The new copy has other result columns than the client decodes by
                // (DDL since the statement was prepared): refused before it runs, as
                // PostgreSQL refuses its own kept statement then. The shard's
                // transaction is made to fail at the client's Sync.
                conn.stale.extend(stop.key);
                refused = true;
                break (result, router_error);
            }
            conn.prepared.extend(stop.key);
            // A copy checked as the unnamed statement is used as it is; a named copy
            // leaves the unnamed statement as it was.
            unnamed = match stop.key {
                None => shaped.last().cloned(),
                Some(_) => held_unnamed,
            };
            start += stop.op;
            // Notices of the check are the client's whatever happens next.
            mark = self.client.mark();
        };
        self.client.hold_first_error = false;
        self.steps = steps;
        self.statement_uses = uses;
        if synced {
            self.pending.unsynced.remove(&shard);
        } else {
            self.pending.unsynced.insert(shard);
        }
        if refused {
            self.fail(result_type_changed());
            if let Ok(out) = &mut result {
                out.error = true;
            }
        }
        let ok = self.finish_relay(&[shard], result)?;
        Ok(ok && !router_error)
    }

    /// Run a point SELECT of the simple protocol (`StatementPlan::point_literal`) on
    /// `shard` as the kept statement `bound` with `value` as its parameter, and relay
    /// its answer as the answer to the simple query `text`. The text is sent as it is
    /// instead the first time its shape is seen, when the connection's settings are
    /// unknown or it holds the most statements it may; and again, in place of an answer
    /// nobody saw yet, when the kept statement fails before it runs (a Parse or Bind
    /// error: after DDL, say, or any error whose position would point into `bound`), so
    /// the client always gets the answer and error text of its own query.
    pub(super) async fn run_point(
        &mut self,
        shard: ShardId,
        bound: &crate::router::BoundForm,
        value: &[u8],
        text: &[u8],
    ) -> Result<bool, SessionError> {
        if let Err(e) = self.conn_for(shard).await {
            self.fail(e);
            return Ok(false);
        }
        if self.client.flush_soon {
            // Owed to the client already (a notice of an earlier statement): sent now,
            // so that a flush while this answer is relayed means it has been seen.
            self.client.flush().await?;
        }
        let epoch = self.shared.schema_epoch();
        let Some(conn) = self.held.get_mut(&shard) else {
            return Ok(false);
        };
        let Some(key) = shared_key(bound.hash, conn.settings, epoch) else {
            return self.run_point_text(shard, text).await;
        };
        let create = !conn.prepared.contains(&key);
        if create
            && !self
                .shared
                .seen_texts
                .keep_new(conn.prepared.len(), bound.hash, true)
        {
            return self.run_point_text(shard, text).await;
        }
        let mut steps = std::mem::take(&mut self.steps);
        steps.clear();
        for hash in std::mem::take(&mut conn.stale) {
            let name = ServerName::new(Some(hash));
            messages::target(&mut conn.wbuf, b'C', b'S', name.as_bytes());
            steps.push_back(Step::Server {
                kind: StepKind::Close,
                forward: false,
            });
        }
        let name = ServerName::new(Some(key));
        if create {
            messages::parse(
                &mut conn.wbuf,
                name.as_bytes(),
                &bound.sql,
                &[crate::router::INT4_OID],
            );
            steps.push_back(Step::Server {
                kind: StepKind::Parse,
                forward: false,
            });
            conn.prepared.insert(key);
        }
        messages::bind_one_text(&mut conn.wbuf, "", name.as_bytes(), value);
        // The answers up to the Bind's are the kept statement's, not the query's: an
        // error among them is the statement's, and the query runs as text instead.
        // (`relay_point` queues the steps of the Bind and what follows it.)
        let before_run = steps.len();
        // A SELECT's portal always has a RowDescription, which the simple protocol sends
        // before the rows.
        messages::describe_execute_sync_unnamed(&mut conn.wbuf);
        let mark = self.client.mark();
        self.client.hold_first_error = true;
        let result = match conn.flush().await {
            Ok(()) => relay_point(conn, &mut self.client, &mut steps).await,
            Err(e) => Err(RelayError::Backend(e)),
        };
        self.client.hold_first_error = false;
        self.steps = steps;
        if let Ok(out) = &result {
            if out.failed_step.is_some_and(|at| at <= before_run) {
                // Dropped from the connection (closed before its next batch), and the
                // query run as its text if nothing of this answer reached the client
                // and the text can answer otherwise: the error is one of a statement
                // made stale by DDL, or has a position (which points into `$1` text).
                conn.retire_statement(key);
                let error = self.client.queued_since(mark);
                if !conn.broken
                    && !out.async_frames
                    && self.client.unsent_since(mark)
                    && text_may_differ(error)
                {
                    tracing::debug!(shard, "a kept point query failed; running its text");
                    self.client.take_back(mark);
                    return self.run_point_text(shard, text).await;
                }
            }
        }
        self.finish_relay(&[shard], result)
    }

    /// `run_point`'s way out: the query run as its text. The text is UTF-8 (it matched
    /// a cached key, or came as a `str`); were it not, it gets PostgreSQL's error.
    async fn run_point_text(&mut self, shard: ShardId, text: &[u8]) -> Result<bool, SessionError> {
        match std::str::from_utf8(text) {
            Ok(sql) => self.run_on(&[shard], sql, Combine::Sum).await,
            Err(_) => {
                self.fail(super::session::invalid_utf8());
                Ok(false)
            }
        }
    }

    async fn run_fanout(
        &mut self,
        shards: &[ShardId],
        ops: &[Op],
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
        // The session's queues, reused: no allocation per batch.
        let mut steps = std::mem::take(&mut self.steps);
        let mut uses = std::mem::take(&mut self.statement_uses);
        let kept = KeptStatements {
            settings_known: false,
            epoch: 0,
            seen: &self.shared.seen_texts,
            private: self.statement_salt,
        };
        // As in `run_single`, the batch goes in parts when a statement's new copies must
        // be checked before they are used.
        let mut start = 0;
        let mut unnamed = None;
        let mut synced;
        let mut refused = false;
        let (mut result, router_error) = loop {
            steps.clear();
            wire.clear();
            let mut batch = Batch::new(&mut steps, &mut uses, u64::MAX, kept);
            batch.unnamed = unnamed.take();
            batch.encode(&mut wire, None, &ops[start..], sync);
            let router_error = batch.router_error;
            let (stopped, shaped) = (batch.stopped, std::mem::take(&mut batch.shaped));
            synced = sync && stopped.is_none();
            let mut conns = write_to(&mut self.held, shards, |b| b.extend_from_slice(&wire));
            let result = match flush_all(&mut conns).await {
                Ok(()) => relay_multi(&mut conns, &mut self.client, &mut steps, combine).await,
                Err(e) => Err(RelayError::Backend(e)),
            };
            let Ok(out) = &result else {
                break (result, router_error);
            };
            // Each Shape step is answered by every shard in turn; after an error every
            // later step is skipped, so only the failed step's answers can be short.
            let per_step = conns.len().max(1);
            for (st, shapes) in shaped.iter().zip(out.shapes().chunks_exact(per_step)) {
                st.shape.get_or_init(|| KeptShape::new(&shapes[0], &st.sql));
            }
            let Some(stop) = stopped else {
                break (result, router_error);
            };
            if out.error {
                break (result, router_error);
            }
            // The stopped part's last Shape step is the new copies', one per shard.
            let found = out
                .shapes()
                .get((shaped.len() - 1) * per_step..)
                .filter(|f| f.len() == per_step);
            if !shaped.last().is_some_and(|st| st.gives(found)) {
                refused = true;
                break (result, router_error);
            }
            unnamed = shaped.last().cloned();
            start += stop.op;
        };
        self.steps = steps;
        self.statement_uses = uses;
        for s in shards {
            if synced {
                self.pending.unsynced.remove(s);
            } else {
                self.pending.unsynced.insert(*s);
            }
        }
        if refused {
            self.fail(result_type_changed());
            if let Ok(out) = &mut result {
                out.error = true;
            }
        }
        let ok = self.finish_relay(shards, result)?;
        Ok(ok && !router_error)
    }
}

#[cfg(test)]
mod tests {
    use super::{text_may_differ, ServerName};
    use crate::protocol::{sqlstate, PgError};

    #[test]
    fn server_names() {
        assert_eq!(ServerName::new(None).as_bytes(), b"");
        assert_eq!(
            ServerName::new(Some(0x0123_4567_89ab_cdef)).as_bytes(),
            b"sw_0123456789abcdef"
        );
        assert_eq!(
            ServerName::new(Some(u64::MAX)).as_bytes(),
            b"sw_ffffffffffffffff"
        );
        // Every nibble value in every place, as the formatter writes it.
        let mut key = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            key = key.wrapping_mul(0x5851_f42d_4c95_7f2d).wrapping_add(1);
            assert_eq!(
                ServerName::new(Some(key)).as_bytes(),
                format!("sw_{key:016x}").as_bytes()
            );
        }
        for nibble in 0..16u64 {
            for place in 0..16 {
                let key = nibble << (4 * place);
                assert_eq!(
                    ServerName::new(Some(key)).as_bytes(),
                    format!("sw_{key:016x}").as_bytes()
                );
            }
        }
    }

    #[test]
    fn only_stale_statements_and_positioned_errors_run_the_text_again() {
        let encoded = |e: PgError| {
            let mut b = bytes::BytesMut::new();
            e.encode(&mut b);
            b
        };
        let stale = PgError::error(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "cached plan must not change result type",
        );
        assert!(text_may_differ(&encoded(stale)));
        let positioned =
            PgError::error("42703", "column \"x\" does not exist").with_position(Some(8));
        assert!(text_may_differ(&encoded(positioned)));
        for code in ["57014", "55P03", "53200", "42703"] {
            assert!(
                !text_may_differ(&encoded(PgError::error(code, "m"))),
                "{code}"
            );
        }
        assert!(!text_may_differ(b"C\0\0\0\x04"));
        assert!(!text_may_differ(b"E\0"));
    }
}
