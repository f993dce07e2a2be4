//! The analysed, parameter-independent and topology-independent form of a statement.
//!
//! Analysis (`analyze.rs`) turns PostgreSQL's parse tree into this small IR once per
//! distinct statement shape; routing (`route.rs`) evaluates it against a topology and
//! the Bind parameters on every execution. Nothing here names a shard: which tables are
//! sharded, and by which column, is only decided when routing, so a plan stays valid
//! across topology versions.

use super::RouteError;

/// Where a compared or inserted value comes from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// Bind parameter `$n`, stored 0-based.
    Param(usize),
    /// The `idx`-th literal of the query string (see `lexer`); `neg` for `-5`.
    Lit {
        idx: usize,
        neg: bool,
    },
    /// A constant the lexer did not find (e.g. `E'..'`); makes the shape unshareable.
    Const {
        text: String,
    },
    Null,
    /// `DEFAULT` in a VALUES row.
    Default,
    /// Anything else: an expression whose value the router cannot know.
    Expr,
}

/// A column reference as written, resolved against relations only when routing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ColRef {
    /// The scope the reference appears in.
    pub scope: usize,
    /// Table name or alias before the column, if any.
    pub qual: Option<String>,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
}

/// A boolean condition, reduced to what can constrain a shard key.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Pred {
    /// No usable constraint (unknown, NOT, a comparison of non-key things, …).
    Any,
    And(Vec<Pred>),
    Or(Vec<Pred>),
    /// `col = v` or `col IN (v, …)`.
    In {
        col: ColRef,
        vals: Vec<Value>,
    },
    /// `col = ANY(array)` with a whole array literal or parameter.
    AnyArray {
        col: ColRef,
        arr: Value,
    },
    /// `col < v` etc.; only narrows range distributions.
    Cmp {
        col: ColRef,
        op: CmpOp,
        val: Value,
    },
    /// `a.col = b.col`: proves co-location when both are keys of one distribution.
    ColEq(ColRef, ColRef),
}

/// Why a scope exists; decides which shape rules apply to it on a fan-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScopeKind {
    /// The statement itself.
    Top,
    /// A derived table, CTE or set-operation arm: evaluated once per shard, so it must
    /// itself be concat-safe when its data spans shards.
    Derived,
    /// A subquery in an expression (`EXISTS`, `IN`, scalar): fine per row when it is
    /// correlated on the shard key with the outer row.
    Sublink,
    /// Relations found only by pg_query's generic walker: the router did not see how
    /// they are used, so sharded ones there are refused.
    Opaque,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Scope {
    pub parent: Option<usize>,
    pub kind: ScopeKind,
    /// First construct that makes this scope's result not a concatenation of per-shard
    /// results ("ORDER BY", "aggregate count()", …).
    pub unsafe_shape: Option<String>,
    /// WHERE plus inner-join ON conditions.
    pub pred: Pred,
    /// Key equalities from outer-join ON and USING clauses (co-location only).
    pub links: Vec<(ColRef, ColRef)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelKind {
    /// A table (or view) name; sharded, reference or unsharded is decided when routing.
    Table,
    /// A reference to a CTE or an alias of a derived table.
    Derived,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rel {
    /// Unqualified, case-folded name.
    pub name: String,
    /// Schema as written (folded), if any.
    pub schema: Option<String>,
    pub alias: Option<String>,
    pub scope: usize,
    pub kind: RelKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DmlKind {
    Select,
    Insert,
    Update,
    Delete,
    Merge,
}

/// The INSERT part of a statement.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InsertShape {
    /// Named columns; `None` when the statement has no column list.
    pub cols: Option<Vec<String>>,
    /// VALUES rows; `None` for INSERT … SELECT or DEFAULT VALUES.
    pub rows: Option<Vec<Vec<Value>>>,
    /// INSERT … SELECT (as opposed to DEFAULT VALUES when `rows` is `None`).
    pub from_select: bool,
}

/// A SELECT/INSERT/UPDATE/DELETE/MERGE, possibly under EXPLAIN.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct QueryShape {
    pub dml: DmlKind,
    pub rels: Vec<Rel>,
    pub scopes: Vec<Scope>,
    /// Index into `rels` of the written table, for INSERT/UPDATE/DELETE/MERGE.
    pub target: Option<usize>,
    /// Every written table, including those of data-modifying CTEs.
    pub targets: Vec<usize>,
    pub insert: Option<InsertShape>,
    /// Columns assigned by UPDATE SET or ON CONFLICT DO UPDATE SET, with the index into
    /// `rels` of the table they belong to.
    pub assigned: Vec<(usize, String)>,
    /// `EXPLAIN` or `COPY (query)` around the statement: a fan-out is refused.
    pub wrapper: Option<&'static str>,
    /// `SELECT … INTO`, `CREATE TABLE AS` and views: creates objects from the result.
    pub creates: Option<&'static str>,
    /// A data-modifying statement in a WITH clause.
    pub writes_in_cte: bool,
}

/// What routing does with a statement.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Body {
    Query(Box<QueryShape>),
    /// Session and transaction control, SHOW, DO, CALL, other utilities without
    /// tables: the default shard (the proxy handles transaction kinds itself).
    Default,
    /// A utility statement naming these tables: every shard if any is sharded or
    /// reference, else the default shard.
    Ddl {
        tables: Vec<String>,
    },
    /// `COPY table`: refused for sharded tables, refused FROM for reference tables.
    Copy {
        table: String,
        from: bool,
    },
    /// Refused whatever the topology.
    Refuse(RouteError),
}

/// One analysed statement.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StmtShape {
    pub body: Body,
    pub write: bool,
}
