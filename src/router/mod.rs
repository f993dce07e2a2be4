//! The router: decides which shard(s) each statement goes to.
//!
//! `Router::plan` parses a query string once (PostgreSQL's grammar via pg_query) into a
//! cached, parameter-independent `QueryPlan`; `StatementPlan::route` then evaluates one
//! statement against the topology and the Bind parameters and returns a `Route`, or a
//! `RouteError` when the router cannot guarantee a correct result (principle #1).
//!
//! Owns: SQL analysis (`analyze`), shard-key evaluation (`route`), the plan cache, the
//! router's SQLSTATEs. Does not own: sending, merging, transactions (the proxy), or
//! placement arithmetic (the topology).
//!
//! Routing in short (details and the reasons in `route.rs`):
//! - tables in `Topology::tables` are sharded, `reference_tables` copied everywhere,
//!   anything else (catalogs included) lives on the default shard;
//! - conditions on the key (`=`, `IN`, `= ANY`, ranges for range distributions, AND,
//!   OR) pick shards; tables joined on their key columns within one distribution are
//!   co-located and routed together;
//! - a statement over several shards is allowed only when the per-shard results can be
//!   concatenated (plain SELECT, UPDATE/DELETE); otherwise it is refused with 0A000;
//! - writes to reference tables and DDL on sharded/reference tables go to all shards
//!   with `MergePlan::Replicated`.
//!
//! Known gaps (all fail safe: refused or sent wider, never silently narrowed):
//! - user-defined aggregates are not recognised as aggregates (only built-in names and
//!   `*`/`DISTINCT`/`ORDER BY`/`FILTER` calls are); a fan-out of one would concat;
//! - functions, views, triggers and DO blocks can read sharded tables the router
//!   cannot see; DO and CALL go to the default shard;
//! - `DROP INDEX name` cannot tell which table the index belongs to: default shard;
//! - INSERT … SELECT, MERGE and INSERT in a CTE into sharded tables are refused;
//! - co-location is proven only by key equalities in WHERE/ON/USING between tables
//!   (not through derived-table aliases), anything else spanning shards is refused;
//! - string literals are read with `standard_conforming_strings = on`.

mod analyze;
mod error;
mod lexer;
mod parse;
mod route;
mod shape;
pub mod sqlstate;

#[cfg(test)]
mod tests;

use foldhash::HashMap;
use std::cell::RefCell;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock, Weak};

pub use error::RouteError;

use crate::topology::{KeyType, KeyValue, ShardId, Topology};
use lexer::LitSpan;
use route::LitValue;
use shape::StmtShape;

/// Plan-cache capacity, per map (exact text and normalized text).
const CACHE_CAPACITY: usize = 10_000;

/// One statement's text and its routing decision (see `Router::explain`).
pub type Explained = (String, Result<Routed, RouteError>);

/// Parses and caches statements; shared by all client sessions (`&self`, thread-safe).
pub struct Router {
    /// The topology plans are routed against by default. A new topology means a new
    /// `Router` (with an empty cache); plans themselves are topology-independent, so a
    /// plan routed with a newer topology is still correct.
    topology: Arc<Topology>,
    cache: Mutex<PlanCache>,
}

/// Two maps: exact text → plan (a hit costs one lookup), and normalized text → the
/// shared analysis (a hit costs a lexer pass, no parse).
struct PlanCache {
    /// The topology version the entries were made under.
    version: u64,
    exact: HashMap<String, Arc<QueryPlan>>,
    shapes: HashMap<Vec<u8>, Arc<SharedPlan>>,
}

/// The analysis shared by all query strings with the same normalized text.
struct SharedPlan {
    statements: Vec<SharedStatement>,
    /// The literal spans of the text the analysis was made from.
    lits: Vec<LitSpan>,
}

struct SharedStatement {
    kind: StatementKind,
    shape: Arc<StmtShape>,
    /// The statement with its one literal replaced by `$1` (see `BoundForm`).
    bound: Option<Arc<BoundForm>>,
    /// Byte range of the statement in the analysed text.
    start: usize,
    end: usize,
    /// `has_session_effects` of the statement's text: it only looks at keywords and
    /// names, which every text of one normalized shape shares.
    session_effects: bool,
}

/// The analysed statements of one query string.
#[derive(Debug)]
pub struct QueryPlan {
    /// In order; empty for an empty query string.
    pub statements: Vec<StatementPlan>,
}

/// One analysed statement of a query string.
#[derive(Debug, Clone)]
pub struct StatementPlan {
    /// Where this statement's own text lies in the query string (see `text`).
    start: usize,
    end: usize,
    pub kind: StatementKind,
    /// The parameter-independent analysis (shared between texts that differ only in
    /// literal values).
    shape: Arc<StmtShape>,
    /// The literal values of this query string.
    lits: Arc<[LitValue]>,
    /// This statement with its one literal as a parameter, when it has that form.
    bound: Option<Arc<BoundForm>>,
    /// Where `point_route` reads the key from a parameter (`key = $n`), found at the
    /// first `route_quiet` (see `ParamPoint`).
    param_point: OnceLock<ParamPoint>,
    /// The statement may leave session state behind that the router does not track
    /// (`set_config(…, false)`, advisory locks, temporary objects, WITH HOLD cursors):
    /// the server connection must be reset before another client uses it.
    pub session_effects: bool,
}

/// Which parameter pins a statement's shard key (`key = $n` alone, or AND-ed with
/// conditions on other columns, in a single-table statement), and in which
/// distribution: what `point_route` finds before it reads the parameter's value. It
/// holds for one topology, the one it was found under; a `Weak`, so that no later
/// topology can have its address.
#[derive(Debug, Clone)]
struct ParamPoint {
    topology: Weak<Topology>,
    /// (the parameter's index, the distribution's index in `Topology::distributions`)
    at: Option<(usize, usize)>,
}

/// A single SELECT with exactly one literal, a number, written as the same text with
/// `$1` in the literal's place: the proxy can run it as a kept statement with the literal
/// as its parameter (see `StatementPlan::point_literal`). Every query string of one
/// normalized shape has the same form, so it is made once per shape.
#[derive(Debug, PartialEq, Eq)]
pub struct BoundForm {
    /// The statement's text with `$1` for its literal.
    pub sql: String,
    /// `statement_hash(sql, [int4])`.
    pub hash: u64,
    /// The distribution whose key the literal pins (`Topology::distributions`): the
    /// statement's one table is sharded by it and `point_route` reads the key from the
    /// literal. A property of the shape and the topology, found once per shape.
    dist: usize,
}

impl BoundForm {
    /// The shard for the literal written `digits`; `None` unless it is an unsigned
    /// integer that fits 32 bits (a literal PostgreSQL types `int4`, the parameter's type).
    fn shard_for(&self, digits: &[u8], topology: &Topology) -> Option<ShardId> {
        let value = int4_digits(digits)?;
        let dist = topology.distributions.get(self.dist)?;
        match dist.key_type {
            // What `number_shard` reads the digits as, without reading them again.
            KeyType::Int | KeyType::Bigint => dist.shard_for(&KeyValue::Int(value.into())).ok(),
            _ => route::number_shard(std::str::from_utf8(digits).ok()?, dist),
        }
    }
}

/// The value of `digits` when they are one or more ASCII digits whose number fits
/// `int4` (what `str::parse::<i32>` gives for them, without a UTF-8 check first).
fn int4_digits(digits: &[u8]) -> Option<i32> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0i32, |v, &b| {
        let d = b.is_ascii_digit().then(|| i32::from(b - b'0'))?;
        v.checked_mul(10)?.checked_add(d)
    })
}

/// A simple-protocol point SELECT found by `Router::point_query`: what `plan` and then
/// `StatementPlan::point_literal` give for its text, without building the plan.
pub struct PointQuery<'s> {
    pub shard: ShardId,
    pub bound: Arc<BoundForm>,
    /// The literal's digits (the parameter's text value, ASCII), within the query string.
    pub value: &'s [u8],
}

/// The longest point query a `PointMemo` keeps (one per session).
const POINT_MEMO_MAX: usize = 1024;

/// A session's last point query, for `Router::point_query_memo`: most sessions send
/// the same few statements again and again with other values.
#[derive(Default)]
pub struct PointMemo {
    /// The router that found it; a `Weak`, so that no later router can have its address.
    router: Weak<Router>,
    text: Vec<u8>,
    /// Where the literal is in `text`: ASCII digits only.
    digits: Range<usize>,
    bound: Option<Arc<BoundForm>>,
}

impl PointMemo {
    /// Where `sql` has other digits in place of the memo's literal, when it is the
    /// memo's text with only those changed.
    ///
    /// Such a text has the memo text's key. The lexer reads left to right. In the memo
    /// text a number starts at the literal, so every token before it ended before it,
    /// and what the lexer looked at past their ends was at most the literal's first
    /// byte, asking only whether it is a digit (`$1`, `.5`, an identifier running into
    /// it) or one of a few other bytes (`--`, `/*`, a doubled quote, `U&'`): the same
    /// answers for any digit. So over the same bytes before the literal it is in the
    /// same state where the literal starts, and a number starts there. The number ends
    /// where the memo's did: the byte after it, which is the same, did not continue the
    /// memo's number (all digits, so no exponent either). From there the bytes are the
    /// same again. Every byte of it is also the memo text's but the digits, so it is
    /// UTF-8 and holds no NUL, as the memo text.
    fn digits_of(&self, sql: &[u8]) -> Option<Range<usize>> {
        let prefix = self.text.get(..self.digits.start)?;
        let suffix = self.text.get(self.digits.end..)?;
        let end = sql.len().checked_sub(suffix.len())?;
        if end <= prefix.len() || !sql.starts_with(prefix) || !sql.ends_with(suffix) {
            return None;
        }
        let digits = prefix.len()..end;
        sql[digits.clone()]
            .iter()
            .all(u8::is_ascii_digit)
            .then_some(digits)
    }
}

/// The type of `BoundForm`'s parameter: `int4`, the type PostgreSQL gives an integer
/// literal that fits 32 bits (only such literals are bound).
pub const INT4_OID: u32 = 23;

/// Identifies a statement text with its declared parameter types on server connections,
/// the same for every client (the extended protocol's shared unnamed statements and
/// `BoundForm`s use it, so one text is parsed once per connection whichever way it came).
pub fn statement_hash(sql: &str, param_types: &[u32]) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same value in every process and run.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    "shared".hash(&mut h);
    sql.hash(&mut h);
    param_types.hash(&mut h);
    h.finish()
}

/// What kind of statement this is, for the proxy's session and transaction handling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatementKind {
    /// SELECT/VALUES/INSERT/UPDATE/DELETE/MERGE/EXPLAIN; routed by `route()`.
    Query,
    /// BEGIN / START TRANSACTION (any options).
    Begin,
    /// COMMIT / END (also COMMIT AND CHAIN). PREPARE TRANSACTION has this kind but
    /// `route()` refuses it.
    Commit,
    /// ROLLBACK / ABORT (not ROLLBACK TO SAVEPOINT).
    Rollback,
    /// SAVEPOINT / RELEASE / ROLLBACK TO: go to every shard the transaction touched.
    /// `name` as PostgreSQL folds it.
    Savepoint { op: SavepointOp, name: String },
    /// SET [SESSION|LOCAL] name …; `SET TIME ZONE` is "timezone", `SET NAMES` is
    /// "client_encoding", `SET TRANSACTION …` is "transaction" (local). Lower case.
    Set { name: String, local: bool },
    /// RESET name / RESET ALL (`None`).
    Reset { name: Option<String> },
    /// DISCARD ALL/PLANS/SEQUENCES/TEMP, and DEALLOCATE ALL.
    Discard,
    /// SHOW x: default shard.
    Show,
    /// Any other utility statement (DDL, COPY, DO, CALL, …): routed by `route()`.
    Other,
}

/// What a savepoint statement does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SavepointOp {
    Define,
    Release,
    RollbackTo,
}

/// One Bind parameter as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param<'a> {
    /// `None` is SQL NULL.
    pub value: Option<&'a [u8]>,
    /// Binary format (else text).
    pub binary: bool,
    /// Declared type (Parse message); 0 = unspecified.
    pub type_oid: u32,
}

impl Param<'_> {
    /// A NULL of unspecified type.
    pub const NULL: Param<'static> = Param {
        value: None,
        binary: false,
        type_oid: 0,
    };
}

/// A routing decision with its explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub route: Route,
    /// Human text for `shardwire route` and logs: table, key, slot, shard names.
    pub reason: String,
}

/// Where a statement goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Exactly one shard.
    Shard(ShardId),
    /// Two or more shards (sorted), sent concurrently; results combined per `merge`.
    Multi {
        shards: Vec<ShardId>,
        merge: MergePlan,
    },
}

/// How the proxy combines the results of a multi-shard statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MergePlan {
    /// Rows of all shards in any order; CommandComplete counts summed.
    Concat,
    /// The same write applied on every shard (reference tables, DDL): report the first
    /// shard's result (rows and count) as the statement's result, after checking all
    /// shards succeeded.
    Replicated,
}

impl StatementPlan {
    /// This statement's own text within `sql`, the query string it was planned from
    /// (trimmed, without its semicolon): for sending statements one by one.
    pub fn text<'a>(&self, sql: &'a str) -> &'a str {
        statement_text(sql, self.start, self.end)
    }

    /// Whether the statement writes: INSERT/UPDATE/DELETE/MERGE, DDL, SELECT … FOR
    /// UPDATE/SHARE, data-modifying CTEs, COPY FROM, DO/CALL.
    pub fn is_write(&self) -> bool {
        self.shape.write
    }

    /// When this statement is a single-table SELECT that pins the shard key to its only
    /// literal, an integer that fits 32 bits: the shard, the statement with `$1` in the
    /// literal's place, and the literal's digits (the parameter's text value). Bound as
    /// `int4`, the parameter has the type PostgreSQL gives the literal, so the statement
    /// means what the literal text means.
    pub fn point_literal(&self, topology: &Topology) -> Option<(ShardId, &BoundForm, &str)> {
        let bound = self.bound.as_deref()?;
        let [lit] = &*self.lits else {
            return None;
        };
        if lit.string {
            return None;
        }
        let shard = bound.shard_for(lit.text.as_bytes(), topology)?;
        Some((shard, bound, lit.text.as_str()))
    }

    /// Decide where this statement goes given Bind parameters (`$1` = `params[0]`).
    pub fn route(&self, topology: &Topology, params: &[Param<'_>]) -> Result<Routed, RouteError> {
        route::route_statement(&self.shape, &self.lits, topology, params, true)
    }

    /// Like `route`, without the `reason` text (left empty): for the proxy's hot path.
    /// A statement whose key is a parameter (a prepared point query, most of what
    /// drivers send) goes by `ParamPoint`: after its first use under a topology, only
    /// the parameter is read.
    pub fn route_quiet(
        &self,
        topology: &Arc<Topology>,
        params: &[Param<'_>],
    ) -> Result<Routed, RouteError> {
        if !params.is_empty() {
            let point = self.param_point.get_or_init(|| ParamPoint {
                topology: Arc::downgrade(topology),
                at: route::point_param_dist(&self.shape, topology),
            });
            if std::ptr::eq(point.topology.as_ptr(), Arc::as_ptr(topology)) {
                // As `point_route`: a value that is no key is left to `route`.
                let shard = point.at.and_then(|(param, dist)| {
                    route::param_shard(params, param, topology.distributions.get(dist)?)
                });
                if let Some(shard) = shard {
                    return Ok(Routed {
                        route: Route::Shard(shard),
                        reason: String::new(),
                    });
                }
            }
        }
        route::route_statement(&self.shape, &self.lits, topology, params, false)
    }
}

impl Router {
    pub fn new(topology: Arc<Topology>) -> Router {
        let version = topology.version;
        Router {
            topology,
            cache: Mutex::new(PlanCache {
                version,
                exact: HashMap::default(),
                shapes: HashMap::default(),
            }),
        }
    }

    pub fn topology(&self) -> &Arc<Topology> {
        &self.topology
    }

    /// The point SELECT `sql` is, when it is one whose shape is cached: a single
    /// statement whose `StatementPlan::point_literal` holds. The same answer as `plan`
    /// and `point_literal`, for a fraction of the work (no plan is built): the proxy
    /// tries it first on every simple-protocol query.
    pub fn point_query<'s>(&self, sql: &'s [u8]) -> Option<PointQuery<'s>> {
        let (shard, bound, digits) = self.point_span(sql)?;
        let value = &sql[digits];
        Some(PointQuery {
            shard,
            bound,
            value,
        })
    }

    /// `point_query`, first trying the session's last point query: a text that is
    /// `memo`'s with other digits in place of its literal has its key (see
    /// `PointMemo::digits_of`), so it is known without lexing it or looking it up.
    /// A text found the long way becomes the memo.
    pub fn point_query_memo<'s>(
        self: &Arc<Self>,
        sql: &'s [u8],
        memo: &mut PointMemo,
    ) -> Option<PointQuery<'s>> {
        // A memo made by another router (another topology) is not this one's.
        if std::ptr::eq(memo.router.as_ptr(), Arc::as_ptr(self)) {
            if let Some((bound, digits)) = memo.bound.as_ref().zip(memo.digits_of(sql)) {
                // As `point_query`, a value `shard_for` refuses is none.
                let value = &sql[digits];
                let shard = bound.shard_for(value, &self.topology)?;
                return Some(PointQuery {
                    shard,
                    bound: Arc::clone(bound),
                    value,
                });
            }
        }
        let (shard, bound, digits) = self.point_span(sql)?;
        if sql.len() > POINT_MEMO_MAX {
            // Kept for the session's life: not a text of any length.
            return Some(PointQuery {
                shard,
                bound,
                value: &sql[digits],
            });
        }
        memo.router = Arc::downgrade(self);
        memo.text.clear();
        memo.text.extend_from_slice(sql);
        memo.digits = digits.clone();
        memo.bound = Some(Arc::clone(&bound));
        let value = &sql[digits];
        Some(PointQuery {
            shard,
            bound,
            value,
        })
    }

    /// `point_query`'s work: the shard, the statement and where the literal's digits
    /// (all ASCII, as `shard_for` requires) are in `sql`.
    fn point_span(&self, sql: &[u8]) -> Option<(ShardId, Arc<BoundForm>, Range<usize>)> {
        let version = self.topology.version;
        SCRATCH.with(|scratch| {
            let (key, spans) = &mut *scratch.borrow_mut();
            let [lit] = lexer::normalize_into(sql, key, spans).then_some(spans.as_slice())? else {
                return None;
            };
            // A number, so the text is UTF-8 if its key is a cached one (see
            // `normalize_into`): the caller need not have checked it.
            if lit.string {
                return None;
            }
            let shared = self.with_cache(version, |c| c.shapes.get(key.as_slice()).cloned())?;
            let [stmt] = shared.statements.as_slice() else {
                return None;
            };
            let bound = stmt.bound.as_ref()?;
            // As `instantiate` would mark it (a number literal adds no session effects).
            if stmt.session_effects {
                return None;
            }
            let shard = bound.shard_for(sql.get(lit.start..lit.end)?, &self.topology)?;
            Some((shard, Arc::clone(bound), lit.start..lit.end))
        })
    }

    /// Parse (or fetch from cache) a query string that may hold several statements.
    /// A syntax error is a `RouteError` with SQLSTATE 42601 and the 1-based position.
    pub fn plan(&self, sql: &str) -> Result<Arc<QueryPlan>, RouteError> {
        let version = self.topology.version;
        let exact = || self.with_cache(version, |c| c.exact.get(sql).cloned());
        let looked = SCRATCH.with(|scratch| {
            let (key, spans) = &mut *scratch.borrow_mut();
            // A text with literals is found by its shape; the exact-text cache holds
            // the rest: texts without literals, texts the lexer leaves to the parser,
            // and texts whose plan depends on their literal values.
            if !lexer::normalize_into(sql.as_bytes(), key, spans) || spans.is_empty() {
                return exact().ok_or(None);
            }
            match self.with_cache(version, |c| c.shapes.get(key.as_slice()).cloned()) {
                Some(shared) => Ok(Arc::new(instantiate(&shared, sql, spans))),
                None => exact().ok_or_else(|| Some((key.clone(), spans.clone()))),
            }
        });
        let norm = match looked {
            Ok(plan) => return Ok(plan),
            Err(norm) => norm,
        };

        let parsed = parse::parse(sql)?;
        let spans: &[LitSpan] = norm.as_ref().map(|n| n.1.as_slice()).unwrap_or(&[]);
        let mut shareable = norm.is_some();
        let mut shared = Vec::with_capacity(parsed.protobuf.stmts.len());
        // Session effects are judged without the literals (see `SharedStatement`).
        let blanked = without_literals(sql, spans);
        for raw in &parsed.protobuf.stmts {
            let start = usize::try_from(raw.stmt_location)
                .unwrap_or(0)
                .min(sql.len());
            let end = match usize::try_from(raw.stmt_len) {
                Ok(0) | Err(_) => sql.len(),
                Ok(len) => start.saturating_add(len).min(sql.len()),
            };
            let Some(node) = raw.stmt.as_deref().and_then(|n| n.node.as_ref()) else {
                continue;
            };
            let (kind, shape) = analyze::analyze_statement(node, sql, spans, &mut shareable);
            let bound = bound_form(&kind, &shape, sql, start, end, spans, &self.topology);
            shared.push(SharedStatement {
                kind,
                bound,
                shape: Arc::new(shape),
                start,
                end,
                session_effects: has_session_effects(statement_text(&blanked, start, end)),
            });
        }
        let shared = SharedPlan {
            statements: shared,
            lits: spans.to_vec(),
        };
        let plan = Arc::new(instantiate(&shared, sql, spans));
        self.with_cache(version, |c| match (shareable, &norm) {
            // Not in the exact-text cache as well: texts that differ only in literals
            // (every pgbench query) would churn it.
            (true, Some((key, _))) => insert_bounded(&mut c.shapes, key.clone(), &Arc::new(shared)),
            _ => insert_bounded(&mut c.exact, sql.to_owned(), &plan),
        });
        Ok(plan)
    }

    /// Plan and route every statement of `sql` without parameters (for `shardwire
    /// route` and logs).
    pub fn explain(&self, sql: &str) -> Result<Vec<Explained>, RouteError> {
        let plan = self.plan(sql)?;
        Ok(plan
            .statements
            .iter()
            .map(|s| (s.text(sql).to_owned(), s.route(&self.topology, &[])))
            .collect())
    }

    fn with_cache<T>(&self, version: u64, f: impl FnOnce(&mut PlanCache) -> T) -> T {
        // A poisoned lock only means another thread panicked mid-insert; the maps are
        // still valid, so keep using them.
        let mut c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if c.version != version {
            c.exact.clear();
            c.shapes.clear();
            c.version = version;
        }
        f(&mut c)
    }
}

/// Insert, evicting an arbitrary eighth of the entries when full.
fn insert_bounded<K: std::hash::Hash + Eq + Clone, T>(
    map: &mut HashMap<K, Arc<T>>,
    key: K,
    value: &Arc<T>,
) {
    if map.len() >= CACHE_CAPACITY {
        let victims: Vec<K> = map.keys().take(CACHE_CAPACITY / 8).cloned().collect();
        for v in victims {
            map.remove(&v);
        }
    }
    map.insert(key, Arc::clone(value));
}

thread_local! {
    /// The normalized text and literal spans of the query string being planned, in
    /// per-thread buffers: a hit on a shape then allocates only the plan itself (and
    /// `Router::point_query` nothing).
    static SCRATCH: RefCell<(Vec<u8>, Vec<LitSpan>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// A plan for `sql` from a shared analysis. `new_spans` are `sql`'s literal spans; they
/// pair one-to-one with `shared.lits` because the normalized texts are equal.
fn instantiate(shared: &SharedPlan, sql: &str, new_spans: &[LitSpan]) -> QueryPlan {
    let lits: Arc<[LitValue]> = new_spans
        .iter()
        .map(|s| LitValue {
            text: lexer::literal_value(sql, s),
            string: s.string,
        })
        .collect();
    // A string literal can be code that runs later (`DO 'BEGIN … END'`), and texts of
    // one shape differ only in literals: check this text's own strings as well.
    let strings_have_effects = lits
        .iter()
        .any(|l| l.string && has_session_effects(&l.text));
    // Statement boundaries never fall inside a literal, so an offset moves by the
    // length change of every literal before it.
    let shift = |off: usize| -> usize {
        let mut delta: isize = 0;
        for (old, new) in shared.lits.iter().zip(new_spans) {
            if old.end > off {
                break;
            }
            delta += (new.end - new.start) as isize - (old.end - old.start) as isize;
        }
        off.saturating_add_signed(delta).min(sql.len())
    };
    let statements = shared
        .statements
        .iter()
        .map(|s| StatementPlan {
            session_effects: s.session_effects || strings_have_effects,
            start: shift(s.start),
            end: shift(s.end),
            kind: s.kind.clone(),
            shape: Arc::clone(&s.shape),
            lits: Arc::clone(&lits),
            bound: s.bound.clone(),
            param_point: OnceLock::new(),
        })
        .collect();
    QueryPlan { statements }
}

/// The `BoundForm` of the statement at `start..end` of `sql`: a plain SELECT (no
/// EXPLAIN, no INTO) whose text holds exactly one literal, a number that `point_route`
/// reads as the shard key, and no `$` (parameters or dollar quotes). Whether the literal
/// is an integer that fits int4 is decided per query string.
fn bound_form(
    kind: &StatementKind,
    shape: &StmtShape,
    sql: &str,
    start: usize,
    end: usize,
    spans: &[LitSpan],
    topology: &Topology,
) -> Option<Arc<BoundForm>> {
    let shape::Body::Query(q) = &shape.body else {
        return None;
    };
    if *kind != StatementKind::Query
        || q.dml != shape::DmlKind::Select
        || q.wrapper.is_some()
        || q.creates.is_some()
        || q.writes_in_cte
    {
        return None;
    }
    let mut inside = spans.iter().filter(|l| l.start >= start && l.end <= end);
    let (Some(lit), None) = (inside.next(), inside.next()) else {
        return None;
    };
    let text = statement_text(sql, start, end);
    // No `$` (parameters, dollar quotes), only ASCII, and nothing that reads the
    // statement's own text back (`current_query()`, its `pg_stat_activity` row), which
    // would show the `$1` text instead of the client's.
    let reads_own_text = || {
        let lower = text.to_ascii_lowercase();
        ["current_query", "pg_stat_activity", "pg_stat_get_activity"]
            .iter()
            .any(|f| lower.contains(f))
    };
    if lit.string || text.contains('$') || !text.is_ascii() || reads_own_text() {
        return None;
    }
    // Only a literal that is the shard key's value is bound (`key = 42`).
    let dist = route::point_literal_dist(shape, topology)?;
    // `text` is `sql[start..end]` trimmed: find the literal within it.
    let offset = text.as_ptr() as usize - sql.as_ptr() as usize;
    let (from, to) = (lit.start.checked_sub(offset)?, lit.end.checked_sub(offset)?);
    let bound = format!("{}$1{}", text.get(..from)?, text.get(to..)?);
    let hash = statement_hash(&bound, &[INT4_OID]);
    Some(Arc::new(BoundForm {
        sql: bound,
        hash,
        dist,
    }))
}

/// `sql` with each literal blanked out (same length, so offsets still hold).
fn without_literals(sql: &str, spans: &[LitSpan]) -> String {
    let mut out = sql.as_bytes().to_vec();
    for l in spans {
        if let Some(b) = out.get_mut(l.start..l.end) {
            b.fill(b' ');
        }
    }
    // Literal boundaries are character boundaries, so this stays UTF-8.
    String::from_utf8(out).unwrap_or_else(|_| sql.to_owned())
}

/// One statement's text within a query string: trimmed, without its semicolon.
/// Only the whitespace PostgreSQL's scanner skips is trimmed: other Unicode spaces (a
/// no-break space, say) belong to the identifier they touch.
fn statement_text(sql: &str, start: usize, end: usize) -> &str {
    let space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c');
    let text = sql.get(start..end).unwrap_or("").trim_matches(space);
    text.strip_suffix(';')
        .unwrap_or(text)
        .trim_end_matches(space)
}

/// Whether `text` may create session state the router does not track (see
/// `StatementPlan::session_effects`). Errs towards yes: a false alarm costs one reset.
fn has_session_effects(text: &str) -> bool {
    const MARKERS: [&str; 8] = [
        "set_config",
        "into temp",
        "advisory_lock",
        "temporary",
        "temp table",
        "temp sequence",
        "temp view",
        "with hold",
    ];
    let lower = text
        .to_ascii_lowercase()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    MARKERS.iter().any(|m| lower.contains(m))
}
