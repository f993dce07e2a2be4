//! Evaluates an analysed statement against a topology and Bind parameters: which
//! tables are sharded, which keys the conditions pin down, which shards that means,
//! and whether the statement's shape is correct when fanned out.
//!
//! Pure: no I/O, no caching, no mutation of the plan. Every "cannot prove it" path ends
//! in a `RouteError`, never in a guess.

use std::collections::BTreeSet;
use std::ops::Bound;

use super::analyze::conjunct_links;
use super::shape::{
    Body, CmpOp, ColRef, DmlKind, Pred, QueryShape, RelKind, ScopeKind, StmtShape, Value,
};
use super::{sqlstate, MergePlan, Param, Route, RouteError, Routed};
use crate::topology::{Distribution, KeyType, KeyValue, Method, ShardId, ShardedTable, Topology};

/// How many key notes a reason string carries at most.
const MAX_NOTES: usize = 4;

/// Literal values of the query string, indexed like `Value::Lit`.
pub(crate) type Literals = [LitValue];

/// One literal's text (string quotes removed) and class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LitValue {
    pub text: String,
    pub string: bool,
}

/// What a table name in a statement turned out to be.
#[derive(Clone, Copy)]
enum Class<'t> {
    Sharded(&'t ShardedTable),
    Reference,
    Catalog,
    Unsharded,
    Derived,
}

/// Shards a condition allows: all of the distribution, or a set (possibly empty).
#[derive(Debug, Clone, PartialEq)]
enum KSet {
    All,
    Set(BTreeSet<ShardId>),
}

impl KSet {
    fn and(self, other: KSet) -> KSet {
        match (self, other) {
            (KSet::All, x) | (x, KSet::All) => x,
            (KSet::Set(a), KSet::Set(b)) => KSet::Set(a.intersection(&b).copied().collect()),
        }
    }

    fn or(self, other: KSet) -> KSet {
        match (self, other) {
            (KSet::All, _) | (_, KSet::All) => KSet::All,
            (KSet::Set(mut a), KSet::Set(b)) => {
                a.extend(b);
                KSet::Set(a)
            }
        }
    }
}

/// A decoded comparison value.
enum Keys {
    /// These keys (an empty list matches nothing).
    Some(Vec<KeyValue>),
    /// The value is not known before execution: no narrowing.
    Unknown,
}

/// How a value is used; decides what a value that does not decode means.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    Filter,
    Insert,
}

/// Route a statement. With `explain` false the `reason` is left empty: the hot path
/// does not pay for formatting text nobody reads.
pub(crate) fn route_statement(
    shape: &StmtShape,
    lits: &Literals,
    topo: &Topology,
    params: &[Param<'_>],
    explain: bool,
) -> Result<Routed, RouteError> {
    let default = topo.default_shard;
    match &shape.body {
        Body::Default => Ok(Routed {
            route: Route::Shard(default),
            reason: if explain {
                format!(
                    "no sharded table → default shard {}",
                    shard_name(topo, default)
                )
            } else {
                String::new()
            },
        }),
        Body::Refuse(e) => Err(e.clone()),
        Body::Ddl { tables } => {
            let spread: Vec<&String> = tables
                .iter()
                .filter(|t| topo.table(t).is_some() || topo.is_reference(t))
                .collect();
            match spread.first() {
                Some(t) => Ok(everywhere(
                    topo,
                    format!("utility statement on sharded or reference table {t} → all shards"),
                )),
                None => Ok(Routed {
                    route: Route::Shard(default),
                    reason: format!(
                        "utility statement on no sharded table → default shard {}",
                        shard_name(topo, default)
                    ),
                }),
            }
        }
        Body::Copy { table, from } => {
            if topo.table(table).is_some() {
                return Err(RouteError::unsupported(
                    format!("COPY of sharded table {table}"),
                    "INSERT through the router, or COPY into each shard directly",
                ));
            }
            if *from && topo.is_reference(table) {
                return Err(RouteError::unsupported(
                    format!("COPY FROM into reference table {table}"),
                    "INSERT through the router, or COPY into each shard directly",
                ));
            }
            Ok(Routed {
                route: Route::Shard(default),
                reason: format!(
                    "COPY of unsharded table {table} → default shard {}",
                    shard_name(topo, default)
                ),
            })
        }
        Body::Query(q) => {
            let router = Router {
                q,
                lits,
                topo,
                params,
                explain,
                notes: Vec::new(),
                classes: Vec::new(),
            };
            if !explain {
                if let Some(s) = router.point_route() {
                    return Ok(Routed {
                        route: Route::Shard(s),
                        reason: String::new(),
                    });
                }
            }
            router.route()
        }
    }
}

/// The distribution (index in `Topology::distributions`) whose key `point_route` reads
/// from literal 0 of this statement (`key = 5`), whatever that literal's value: `None`
/// for any other statement.
pub(crate) fn point_literal_dist(shape: &StmtShape, topo: &Topology) -> Option<usize> {
    point_key_of(shape, topo, |val, dist| match val {
        Value::Lit { idx: 0, neg: false } => Some(dist),
        _ => None,
    })
}

/// The parameter index and the distribution (as `point_literal_dist`) when `point_route`
/// reads this statement's key from a parameter (`key = $n`), whatever its value: `None`
/// for any other statement.
pub(crate) fn point_param_dist(shape: &StmtShape, topo: &Topology) -> Option<(usize, usize)> {
    point_key_of(shape, topo, |val, dist| match val {
        Value::Param(i) => Some((*i, dist)),
        _ => None,
    })
}

/// `found` of where `point_route` reads this statement's key from (not read: no values
/// are at hand) and the distribution's index, when it has one.
fn point_key_of<T>(
    shape: &StmtShape,
    topo: &Topology,
    found: impl FnOnce(&Value, usize) -> Option<T>,
) -> Option<T> {
    let Body::Query(q) = &shape.body else {
        return None;
    };
    let router = Router {
        q,
        lits: &[],
        topo,
        params: &[],
        explain: false,
        notes: Vec::new(),
        classes: Vec::new(),
    };
    let (val, dist) = router.point_key()?;
    found(val, dist)
}

/// The shard `point_route` gives for a key read from `params[i]` in `dist`: `None`
/// when there is no such parameter or its value is NULL or no key.
pub(crate) fn param_shard(params: &[Param<'_>], i: usize, dist: &Distribution) -> Option<ShardId> {
    let p = params.get(i)?;
    dist.shard_for(&param_key(p.value?, p.binary, dist.key_type)?)
        .ok()
}

/// The shard of a number literal written `digits` as the key of `dist` (what
/// `point_route` gives for it).
pub(crate) fn number_shard(digits: &str, dist: &Distribution) -> Option<ShardId> {
    dist.shard_for(&number_key(digits, dist.key_type)?).ok()
}

fn shard_name(topo: &Topology, s: ShardId) -> &str {
    topo.shards.get(s).map(|s| s.name.as_str()).unwrap_or("?")
}

fn shard_list(topo: &Topology, set: &BTreeSet<ShardId>) -> String {
    set.iter()
        .map(|&s| shard_name(topo, s))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A write that every shard must apply (reference tables, DDL).
fn everywhere(topo: &Topology, reason: String) -> Routed {
    let shards: Vec<ShardId> = topo.all_shards().into_iter().collect();
    let route = match shards.as_slice() {
        [one] => Route::Shard(*one),
        _ => Route::Multi {
            shards,
            merge: MergePlan::Replicated,
        },
    };
    Routed { route, reason }
}

struct Router<'a> {
    q: &'a QueryShape,
    lits: &'a Literals,
    topo: &'a Topology,
    params: &'a [Param<'a>],
    /// Whether to write the reason string at all.
    explain: bool,
    /// Key decisions for the reason string.
    notes: Vec<String>,
    classes: Vec<Class<'a>>,
}

impl<'a> Router<'a> {
    fn classify(&self, i: usize) -> Class<'a> {
        let Some(r) = self.q.rels.get(i) else {
            return Class::Derived;
        };
        if r.kind == RelKind::Derived {
            return Class::Derived;
        }
        let schema = r.schema.as_deref();
        if matches!(schema, Some("pg_catalog" | "information_schema")) {
            return Class::Catalog;
        }
        if let Some(t) = self.topo.table(&r.name) {
            return Class::Sharded(t);
        }
        if self.topo.is_reference(&r.name) {
            return Class::Reference;
        }
        if schema.is_none() && r.name.starts_with("pg_") {
            return Class::Catalog;
        }
        Class::Unsharded
    }

    fn sharded(&self, i: usize) -> Option<&'a ShardedTable> {
        match self.classes.get(i) {
            Some(Class::Sharded(t)) => Some(t),
            _ => None,
        }
    }

    fn rel_name(&self, i: usize) -> &str {
        self.q.rels.get(i).map(|r| r.name.as_str()).unwrap_or("?")
    }

    /// Whether scope `s` is `anc` or nested inside it.
    fn within(&self, mut s: usize, anc: usize) -> bool {
        loop {
            if s == anc {
                return true;
            }
            match self.q.scopes.get(s).and_then(|sc| sc.parent) {
                Some(p) => s = p,
                None => return false,
            }
        }
    }

    /// The relation a column reference names, following SQL scoping outward.
    fn resolve(&self, col: &ColRef) -> Option<usize> {
        let mut scope = Some(col.scope);
        while let Some(s) = scope {
            let in_scope = || {
                self.q
                    .rels
                    .iter()
                    .enumerate()
                    .filter(move |(_, r)| r.scope == s)
            };
            match &col.qual {
                Some(q) => {
                    if let Some((i, _)) = in_scope().find(|(_, r)| match &r.alias {
                        Some(a) => a == q,
                        None => &r.name == q,
                    }) {
                        return Some(i);
                    }
                }
                None => {
                    let mut found = None;
                    let mut count = 0;
                    for (i, _) in in_scope() {
                        if self.sharded(i).is_some_and(|t| t.column == col.name) {
                            found = Some(i);
                            count += 1;
                        }
                    }
                    if count == 1 {
                        return found;
                    }
                    if count > 1 || in_scope().next().is_some() {
                        return None;
                    }
                }
            }
            scope = self.q.scopes.get(s).and_then(|sc| sc.parent);
        }
        None
    }

    fn is_key(&self, col: &ColRef, rel: usize, table: &ShardedTable) -> bool {
        col.name == table.column && self.resolve(col) == Some(rel)
    }

    /// The common case, decided without allocating: one sharded table, no joins or
    /// subqueries, and a WHERE that pins its key to one value (`key = literal` or
    /// `key = $n`, possibly AND-ed with conditions on other columns). Gives the shard
    /// `route` would give, or `None` to let `route` decide (anything else, including
    /// every error and every value that does not decode as a key).
    fn point_route(&self) -> Option<ShardId> {
        let (val, dist) = self.point_key()?;
        self.point_shard(val, self.topo.distributions.get(dist)?)
    }

    /// The shard of key value `val` in `dist`, for `point_route`.
    fn point_shard(&self, val: &Value, dist: &Distribution) -> Option<ShardId> {
        let ty = dist.key_type;
        let key = match val {
            Value::Lit { idx, neg: false } => {
                let lit = self.lits.get(*idx)?;
                if !lit.string {
                    return number_shard(&lit.text, dist);
                }
                KeyValue::from_text(&lit.text, ty)?
            }
            Value::Param(i) => return param_shard(self.params, *i, dist),
            _ => return None,
        };
        dist.shard_for(&key).ok()
    }

    /// The value `point_route` reads the key from, and the table's distribution (its
    /// index in `Topology::distributions`).
    fn point_key(&self) -> Option<(&'a Value, usize)> {
        let q = self.q;
        let [rel] = q.rels.as_slice() else {
            return None;
        };
        let [scope] = q.scopes.as_slice() else {
            return None;
        };
        if rel.kind != RelKind::Table
            || rel.scope != 0
            || scope.kind != ScopeKind::Top
            || q.creates.is_some()
            || matches!(q.dml, DmlKind::Insert | DmlKind::Merge)
            || q.targets.iter().any(|&t| t != 0)
        {
            return None;
        }
        let Class::Sharded(t) = self.classify(0) else {
            return None;
        };
        if q.assigned.iter().any(|(_, c)| c == &t.column) {
            return None;
        }
        // `key = v` alone, or AND-ed with conditions that never involve the key column.
        let not_key = |p: &Pred| match p {
            Pred::Any | Pred::ColEq(..) => true,
            Pred::In { col, .. } | Pred::AnyArray { col, .. } | Pred::Cmp { col, .. } => {
                col.name != t.column
            }
            Pred::And(_) | Pred::Or(_) => false,
        };
        let point = |p: &'a Pred| match p {
            Pred::In { col, vals } if vals.len() == 1 => Some((col, &vals[0])),
            _ => None,
        };
        let (col, val) = match &scope.pred {
            Pred::And(items) => {
                let mut found = None;
                for p in items {
                    match point(p) {
                        Some(cv) if cv.0.name == t.column => {
                            if found.replace(cv).is_some() {
                                return None;
                            }
                        }
                        _ if not_key(p) => {}
                        _ => return None,
                    }
                }
                found?
            }
            p => point(p)?,
        };
        // The column names this table's key (`resolve` with one table in scope).
        let qual_ok = match &col.qual {
            None => true,
            Some(qual) => match &rel.alias {
                Some(a) => a == qual,
                None => &rel.name == qual,
            },
        };
        if col.name != t.column || col.scope != 0 || !qual_ok {
            return None;
        }
        Some((val, t.distribution))
    }

    fn route(mut self) -> Result<Routed, RouteError> {
        let q = self.q;
        self.classes = (0..q.rels.len()).map(|i| self.classify(i)).collect();
        let sharded: Vec<usize> = (0..q.rels.len())
            .filter(|&i| self.sharded(i).is_some())
            .collect();

        // Refusals that do not depend on keys.
        for &i in &sharded {
            let scope = q.rels.get(i).map(|r| r.scope).unwrap_or(0);
            if q.scopes.get(scope).map(|s| s.kind) == Some(ScopeKind::Opaque) {
                return Err(RouteError::unsupported(
                    format!(
                        "sharded table {} used where the router cannot analyse it",
                        self.rel_name(i)
                    ),
                    "rewrite the statement so the table appears in FROM/JOIN or a plain subquery",
                ));
            }
            if let Some(what) = q.creates {
                return Err(RouteError::unsupported(
                    format!("{what} over sharded table {}", self.rel_name(i)),
                    "query the sharded table through the router, or create the object on each shard directly",
                ));
            }
        }
        for (rel, col) in &q.assigned {
            if let Some(t) = self.sharded(*rel) {
                if &t.column == col {
                    return Err(RouteError::unsupported(
                        format!("UPDATE of shard key column {}.{}", t.name, t.column),
                        "changing the key would move the row to another shard: DELETE it and INSERT it again",
                    ));
                }
            }
        }
        if q.dml == DmlKind::Merge {
            if let Some(t) = q.target.and_then(|i| self.sharded(i)) {
                return Err(RouteError::unsupported(
                    format!("MERGE into sharded table {}", t.name),
                    "use INSERT … ON CONFLICT, UPDATE and DELETE with the shard key",
                ));
            }
        }

        // Writes to reference tables go everywhere, and must not depend on other data.
        if let Some(&t) = q
            .targets
            .iter()
            .find(|&&t| matches!(self.classes.get(t), Some(Class::Reference)))
        {
            let name = self.rel_name(t).to_owned();
            if let Some(&s) = sharded.first() {
                return Err(RouteError::unsupported(
                    format!(
                        "write to reference table {name} reading sharded table {}",
                        self.rel_name(s)
                    ),
                    "write reference tables with values only",
                ));
            }
            if let Some(u) =
                (0..q.rels.len()).find(|&i| matches!(self.classes[i], Class::Unsharded))
            {
                return Err(RouteError::unsupported(
                    format!(
                        "write to reference table {name} together with unsharded table {}",
                        self.rel_name(u)
                    ),
                    "write reference tables in statements of their own",
                ));
            }
            return Ok(everywhere(
                self.topo,
                format!("write to reference table {name} → all shards"),
            ));
        }

        if sharded.is_empty() {
            let what = if (0..q.rels.len()).any(|i| matches!(self.classes[i], Class::Reference)) {
                "reference tables only"
            } else {
                "no sharded table"
            };
            let d = self.topo.default_shard;
            return Ok(Routed {
                route: Route::Shard(d),
                reason: if self.explain {
                    format!("{what} → default shard {}", shard_name(self.topo, d))
                } else {
                    String::new()
                },
            });
        }

        // Per-table shard sets.
        let mut sets: Vec<(usize, KSet)> = Vec::with_capacity(sharded.len());
        for &i in &sharded {
            let set = if Some(i) == q.target && q.dml == DmlKind::Insert {
                KSet::Set(self.insert_shards(i)?)
            } else {
                let scope = q.rels.get(i).map(|r| r.scope).unwrap_or(0);
                match q.scopes.get(scope) {
                    Some(s) => self.eval(&s.pred, i)?,
                    None => KSet::All,
                }
            };
            sets.push((i, set));
        }

        // Co-location: key equalities between tables of one distribution.
        let mut comp: Vec<usize> = (0..sharded.len()).collect();
        fn find(c: &mut [usize], mut x: usize) -> usize {
            while c[x] != x {
                c[x] = c[c[x]];
                x = c[x];
            }
            x
        }
        for s in &q.scopes {
            let mut links = s.links.clone();
            conjunct_links(&s.pred, &mut links);
            for (a, b) in &links {
                let (Some(ra), Some(rb)) = (self.resolve(a), self.resolve(b)) else {
                    continue;
                };
                let (Some(ta), Some(tb)) = (self.sharded(ra), self.sharded(rb)) else {
                    continue;
                };
                if ta.column != a.name || tb.column != b.name || ta.distribution != tb.distribution
                {
                    continue;
                }
                let (Some(ia), Some(ib)) = (
                    sharded.iter().position(|&x| x == ra),
                    sharded.iter().position(|&x| x == rb),
                ) else {
                    continue;
                };
                let (fa, fb) = (find(&mut comp, ia), find(&mut comp, ib));
                comp[fa] = fb;
            }
        }
        // Components: (members, distribution, shard set).
        let mut comps: Vec<(Vec<usize>, usize, KSet)> = Vec::new();
        let mut root_of: Vec<(usize, usize)> = Vec::new();
        for (k, (rel, set)) in sets.into_iter().enumerate() {
            let root = find(&mut comp, k);
            let dist = self.sharded(rel).map(|t| t.distribution).unwrap_or(0);
            match root_of.iter().find(|(r, _)| *r == root) {
                Some(&(_, ci)) => {
                    let c = &mut comps[ci];
                    c.0.push(rel);
                    let old = std::mem::replace(&mut c.2, KSet::All);
                    c.2 = old.and(set);
                }
                None => {
                    root_of.push((root, comps.len()));
                    comps.push((vec![rel], dist, set));
                }
            }
        }
        let concrete: Vec<BTreeSet<ShardId>> = comps
            .iter()
            .map(|(_, d, set)| match set {
                KSet::All => self
                    .topo
                    .distributions
                    .get(*d)
                    .map(Distribution::shards)
                    .unwrap_or_default(),
                KSet::Set(s) => s.clone(),
            })
            .collect();

        // One shard for everything?
        let nonempty: Vec<&BTreeSet<ShardId>> = concrete.iter().filter(|s| !s.is_empty()).collect();
        let single = match nonempty.first() {
            Some(first) if first.len() == 1 && nonempty.iter().all(|s| s == first) => {
                first.iter().next().copied()
            }
            Some(_) => None,
            None => {
                // Every key condition contradicts itself: no rows anywhere. Any shard
                // that holds all the tables gives the right (empty) answer.
                let mut common: Option<BTreeSet<ShardId>> = None;
                for (_, d, _) in &comps {
                    let s = self
                        .topo
                        .distributions
                        .get(*d)
                        .map(Distribution::shards)
                        .unwrap_or_default();
                    common = Some(match common {
                        None => s,
                        Some(c) => c.intersection(&s).copied().collect(),
                    });
                }
                let pick = common.and_then(|c| c.into_iter().next());
                if pick.is_some() {
                    self.notes.push("key conditions match no row".to_owned());
                }
                pick
            }
        };
        let single = single.filter(|&s| {
            // Empty components must be on a shard that has their tables.
            comps.iter().zip(&concrete).all(|((_, d, _), set)| {
                !set.is_empty()
                    || self
                        .topo
                        .distributions
                        .get(*d)
                        .is_some_and(|dist| dist.shards().contains(&s))
            })
        });

        if let Some(s) = single {
            self.check_unsharded_mix(&sharded, Some(s))?;
            let reason = if !self.explain {
                String::new()
            } else if self.notes.is_empty() {
                format!(
                    "{} → shard {} (only shard of its distribution)",
                    self.rel_name(sharded[0]),
                    shard_name(self.topo, s)
                )
            } else {
                self.notes.join("; ")
            };
            return Ok(Routed {
                route: Route::Shard(s),
                reason,
            });
        }

        // Several shards. First the shapes that cannot be merged, then the joins.
        let all: BTreeSet<ShardId> = concrete.iter().flatten().copied().collect();
        let n = all.len();
        let key_hint = self
            .sharded(comps[0].0[0])
            .map(|t| {
                format!(
                    "add a condition on {}.{} to reach one shard",
                    t.name, t.column
                )
            })
            .unwrap_or_default();
        if let Some(w) = q.wrapper {
            return Err(RouteError::unsupported(
                format!("{w} of a statement spanning {n} shards"),
                format!("{key_hint}, or run it on one shard directly"),
            ));
        }
        let holds_sharded = |si: usize| {
            sharded
                .iter()
                .any(|&r| q.rels.get(r).is_some_and(|rel| self.within(rel.scope, si)))
        };
        for (si, s) in q.scopes.iter().enumerate() {
            if matches!(s.kind, ScopeKind::Top | ScopeKind::Derived) && holds_sharded(si) {
                if let Some(c) = &s.unsafe_shape {
                    return Err(RouteError::unsupported(
                        format!("{c} on a query that spans {n} shards"),
                        format!("{key_hint}; merge support for this shape is planned"),
                    ));
                }
            }
        }
        if comps.len() > 1 {
            let (a, b) = (
                self.rel_name(comps[0].0[0]).to_owned(),
                self.rel_name(comps[1].0[0]).to_owned(),
            );
            let (ta, tb) = (self.sharded(comps[0].0[0]), self.sharded(comps[1].0[0]));
            let same_dist = ta.map(|t| t.distribution) == tb.map(|t| t.distribution);
            let in_sublink = comps.iter().any(|(m, _, _)| {
                m.iter().all(|&r| {
                    q.rels
                        .get(r)
                        .and_then(|r| q.scopes.get(r.scope))
                        .map(|s| s.kind)
                        == Some(ScopeKind::Sublink)
                })
            });
            let msg = if !same_dist {
                format!(
                    "statement uses sharded tables {a} and {b} of different distributions that are not on one shard"
                )
            } else if in_sublink {
                format!("subquery over sharded table {b} needs rows from other shards than {a}")
            } else {
                format!("join of sharded tables {a} and {b} across shards")
            };
            let key = ta
                .map(|t| format!("{}.{}", t.name, t.column))
                .unwrap_or_default();
            return Err(RouteError::unsupported(
                msg,
                format!(
                    "constrain every sharded table to the same key (e.g. {key} = …), or join on the shard key columns"
                ),
            ));
        }

        // A fan-out over one co-located group of tables.
        let shards = concrete.into_iter().next().unwrap_or_default();
        let (members, _, _) = &comps[0];
        self.check_unsharded_mix(&sharded, None)?;
        for (si, s) in q.scopes.iter().enumerate() {
            if s.kind != ScopeKind::Sublink || !holds_sharded(si) {
                continue;
            }
            // Fine per row only if correlated on the key with a table outside.
            let linked_outside = members
                .iter()
                .any(|&r| q.rels.get(r).is_some_and(|rel| !self.within(rel.scope, si)));
            if !linked_outside {
                let inner = sharded
                    .iter()
                    .find(|&&r| q.rels.get(r).is_some_and(|rel| self.within(rel.scope, si)))
                    .map(|&r| self.rel_name(r))
                    .unwrap_or("?");
                return Err(RouteError::unsupported(
                    format!("subquery over sharded table {inner} across {n} shards"),
                    format!("{key_hint}, or correlate the subquery on the shard key column"),
                ));
            }
        }
        let names: Vec<&str> = members.iter().map(|&r| self.rel_name(r)).collect();
        let reason = if !self.explain {
            String::new()
        } else if self.notes.is_empty() {
            format!(
                "no shard key on {} → all {n} shards ({})",
                names.join(", "),
                shard_list(self.topo, &shards)
            )
        } else {
            format!(
                "{} → {n} shards ({})",
                self.notes.join("; "),
                shard_list(self.topo, &shards)
            )
        };
        let shards: Vec<ShardId> = shards.into_iter().collect();
        let route = match shards.as_slice() {
            [one] => Route::Shard(*one),
            _ => Route::Multi {
                shards,
                merge: MergePlan::Concat,
            },
        };
        Ok(Routed { route, reason })
    }

    /// Unsharded tables live on the default shard only.
    fn check_unsharded_mix(
        &self,
        sharded: &[usize],
        single: Option<ShardId>,
    ) -> Result<(), RouteError> {
        if single == Some(self.topo.default_shard) {
            return Ok(());
        }
        let Some(u) = (0..self.q.rels.len()).find(|&i| matches!(self.classes[i], Class::Unsharded))
        else {
            return Ok(());
        };
        let s = sharded.first().map(|&s| self.rel_name(s)).unwrap_or("?");
        Err(RouteError::unsupported(
            format!(
                "statement mixes sharded table {s} with unsharded table {}",
                self.rel_name(u)
            ),
            "unsharded tables live on the default shard only: make the table a reference table, or query it separately",
        ))
    }

    /// The shards an INSERT's VALUES rows go to (at most one, or an error).
    fn insert_shards(&mut self, rel: usize) -> Result<BTreeSet<ShardId>, RouteError> {
        let Some(t) = self.sharded(rel) else {
            return Ok(BTreeSet::new());
        };
        let dist = self.dist(t)?;
        let ins = self.q.insert.as_ref();
        let Some(cols) = ins.and_then(|i| i.cols.as_ref()) else {
            return Err(RouteError::unsupported(
                format!("INSERT into sharded table {} without a column list", t.name),
                format!("name the columns, including {}", t.column),
            ));
        };
        if ins.is_some_and(|i| i.from_select) {
            return Err(RouteError::unsupported(
                format!("INSERT … SELECT into sharded table {}", t.name),
                "insert the rows with VALUES, one shard's rows per statement",
            ));
        }
        let must_give = || {
            RouteError::unsupported(
                format!(
                    "INSERT into sharded table {} must give {}",
                    t.name, t.column
                ),
                format!("add {} to the column list with a value", t.column),
            )
        };
        let Some(idx) = cols.iter().position(|c| c == &t.column) else {
            return Err(must_give());
        };
        let Some(rows) = ins.and_then(|i| i.rows.as_ref()) else {
            return Err(must_give());
        };
        let mut out = BTreeSet::new();
        for row in rows {
            let v = row.get(idx).ok_or_else(must_give)?;
            match v {
                Value::Null => {
                    return Err(RouteError::new(
                        sqlstate::NOT_NULL_VIOLATION,
                        format!("null value in shard key column {}.{}", t.name, t.column),
                    )
                    .with_hint("every row of a sharded table needs a key"))
                }
                Value::Default => {
                    return Err(RouteError::unsupported(
                        format!("DEFAULT for shard key column {}.{}", t.name, t.column),
                        "give the key value explicitly (e.g. take it from the sequence first)",
                    ))
                }
                Value::Expr => {
                    return Err(RouteError::unsupported(
                        format!(
                            "INSERT into sharded table {} needs a constant or parameter for {}",
                            t.name, t.column
                        ),
                        "compute the key in the application and send it as a value",
                    ))
                }
                _ => {}
            }
            match self.keys(v, dist, Use::Insert)? {
                Keys::Some(keys) => {
                    for k in keys {
                        out.insert(self.place(t, dist, &k)?);
                    }
                }
                Keys::Unknown => return Err(must_give()),
            }
        }
        if out.len() > 1 {
            return Err(RouteError::unsupported(
                format!(
                    "multi-row INSERT into {} with rows on shards {}",
                    t.name,
                    shard_list(self.topo, &out)
                ),
                "send one row per statement, or only rows of one shard per statement",
            ));
        }
        Ok(out)
    }

    fn dist(&self, t: &ShardedTable) -> Result<&'a Distribution, RouteError> {
        self.topo.distributions.get(t.distribution).ok_or_else(|| {
            RouteError::new(
                "XX000",
                format!("table {} names a distribution that does not exist", t.name),
            )
        })
    }

    /// The shard of one key, noting the decision for the reason string.
    fn place(
        &mut self,
        t: &ShardedTable,
        dist: &Distribution,
        key: &KeyValue,
    ) -> Result<ShardId, RouteError> {
        let s = dist.shard_for(key)?;
        if self.explain && self.notes.len() < MAX_NOTES {
            let shard = shard_name(self.topo, s);
            self.notes.push(match dist.slot_of(key) {
                Some(slot) => format!(
                    "{}.{} = {key} → slot {slot} → shard {shard} (distribution {})",
                    t.name, t.column, dist.name
                ),
                None => format!(
                    "{}.{} = {key} → shard {shard} (distribution {}, range)",
                    t.name, t.column, dist.name
                ),
            });
        }
        Ok(s)
    }

    /// The shards a condition allows for table `rel`.
    fn eval(&mut self, p: &Pred, rel: usize) -> Result<KSet, RouteError> {
        let Some(t) = self.sharded(rel) else {
            return Ok(KSet::All);
        };
        let dist = self.dist(t)?;
        Ok(match p {
            Pred::Any | Pred::ColEq(..) => KSet::All,
            Pred::Or(v) => {
                let mut acc = KSet::Set(BTreeSet::new());
                for c in v {
                    acc = acc.or(self.eval(c, rel)?);
                    if acc == KSet::All {
                        break;
                    }
                }
                acc
            }
            Pred::And(v) => {
                let mut acc = KSet::All;
                let mut lo: Option<(KeyValue, bool)> = None; // (value, inclusive)
                let mut hi: Option<(KeyValue, bool)> = None;
                let mut ranged = false;
                for c in v {
                    if let Pred::Cmp { col, op, val } = c {
                        if self.is_range(dist) && self.is_key(col, rel, t) {
                            match self.keys(val, dist, Use::Filter)? {
                                Keys::Some(ks) => match ks.into_iter().next() {
                                    Some(k) => {
                                        ranged = true;
                                        tighten(&mut lo, &mut hi, *op, k);
                                    }
                                    None => return Ok(KSet::Set(BTreeSet::new())),
                                },
                                Keys::Unknown => {}
                            }
                            continue;
                        }
                    }
                    acc = acc.and(self.eval(c, rel)?);
                }
                if ranged {
                    acc = acc.and(KSet::Set(interval(dist, &lo, &hi)));
                }
                acc
            }
            Pred::In { col, vals } => {
                if !self.is_key(col, rel, t) {
                    return Ok(KSet::All);
                }
                let mut out = BTreeSet::new();
                for v in vals {
                    match self.keys(v, dist, Use::Filter)? {
                        Keys::Some(ks) => {
                            for k in ks {
                                out.insert(self.place(t, dist, &k)?);
                            }
                        }
                        Keys::Unknown => return Ok(KSet::All),
                    }
                }
                KSet::Set(out)
            }
            Pred::AnyArray { col, arr } => {
                if !self.is_key(col, rel, t) {
                    return Ok(KSet::All);
                }
                match self.array_keys(arr, dist)? {
                    Keys::Some(ks) => {
                        let mut out = BTreeSet::new();
                        for k in ks {
                            out.insert(self.place(t, dist, &k)?);
                        }
                        KSet::Set(out)
                    }
                    Keys::Unknown => KSet::All,
                }
            }
            Pred::Cmp { col, op, val } => {
                if !self.is_range(dist) || !self.is_key(col, rel, t) {
                    return Ok(KSet::All);
                }
                match self.keys(val, dist, Use::Filter)? {
                    Keys::Some(ks) => match ks.into_iter().next() {
                        Some(k) => {
                            let (mut lo, mut hi) = (None, None);
                            tighten(&mut lo, &mut hi, *op, k);
                            KSet::Set(interval(dist, &lo, &hi))
                        }
                        None => KSet::Set(BTreeSet::new()),
                    },
                    Keys::Unknown => KSet::All,
                }
            }
        })
    }

    fn is_range(&self, dist: &Distribution) -> bool {
        matches!(dist.method, Method::Range { .. })
    }

    /// Decode a scalar value as a key of `dist`. NULL matches nothing.
    fn keys(&self, v: &Value, dist: &Distribution, usage: Use) -> Result<Keys, RouteError> {
        let ty = dist.key_type;
        match v {
            Value::Null => Ok(Keys::Some(Vec::new())),
            Value::Default | Value::Expr => Ok(Keys::Unknown),
            Value::Lit { idx, neg } => {
                let Some(lit) = self.lits.get(*idx) else {
                    return Ok(Keys::Unknown);
                };
                let text = if *neg {
                    format!("-{}", lit.text)
                } else {
                    lit.text.clone()
                };
                if lit.string {
                    parse_text(&text, ty).map(|k| Keys::Some(vec![k]))
                } else {
                    match number_key(&text, ty) {
                        Some(k) => Ok(Keys::Some(vec![k])),
                        None if usage == Use::Insert => Err(RouteError::new(
                            sqlstate::NUMERIC_VALUE_OUT_OF_RANGE,
                            format!("value {text} is not a valid {ty} shard key"),
                        )),
                        // `user_id = 5.0` or out of range: let every shard decide.
                        None => Ok(Keys::Unknown),
                    }
                }
            }
            Value::Const { text } => parse_text(text, ty).map(|k| Keys::Some(vec![k])),
            Value::Param(i) => {
                let Some(p) = self.params.get(*i) else {
                    return Ok(Keys::Unknown);
                };
                let Some(bytes) = p.value else {
                    return Ok(Keys::Some(Vec::new()));
                };
                let loose = matches!(p.type_oid, 700 | 701 | 1700);
                match param_key(bytes, p.binary, ty) {
                    Some(k) => Ok(Keys::Some(vec![k])),
                    None if loose && usage == Use::Filter => Ok(Keys::Unknown),
                    None if p.binary => Err(RouteError::new(
                        sqlstate::INVALID_BINARY_REPRESENTATION,
                        format!(
                            "binary parameter ${} ({} bytes) is not a valid {ty} shard key",
                            i + 1,
                            bytes.len()
                        ),
                    )),
                    None => Err(RouteError::new(
                        sqlstate::INVALID_TEXT_REPRESENTATION,
                        format!(
                            "invalid input syntax for type {ty}: \"{}\"",
                            String::from_utf8_lossy(bytes)
                        ),
                    )),
                }
            }
        }
    }

    /// Decode an array value (`'{1,2}'`, `$1` as text or binary array) into keys.
    fn array_keys(&self, v: &Value, dist: &Distribution) -> Result<Keys, RouteError> {
        let ty = dist.key_type;
        let text_array = |s: &str| -> Result<Keys, RouteError> {
            match parse_text_array(s) {
                Some(items) => items
                    .iter()
                    .map(|i| parse_text(i, ty))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Keys::Some),
                None => Ok(Keys::Unknown),
            }
        };
        match v {
            Value::Null => Ok(Keys::Some(Vec::new())),
            Value::Lit { idx, .. } => match self.lits.get(*idx) {
                Some(l) if l.string => text_array(&l.text),
                _ => Ok(Keys::Unknown),
            },
            Value::Const { text } => text_array(text),
            Value::Param(i) => {
                let Some(p) = self.params.get(*i) else {
                    return Ok(Keys::Unknown);
                };
                let Some(bytes) = p.value else {
                    return Ok(Keys::Some(Vec::new()));
                };
                if p.binary {
                    match parse_binary_array(bytes) {
                        Some(items) => items
                            .iter()
                            .map(|b| {
                                KeyValue::from_binary(b, ty).ok_or_else(|| {
                                    RouteError::new(
                                        sqlstate::INVALID_BINARY_REPRESENTATION,
                                        format!(
                                            "binary array parameter ${} holds an element that is not a valid {ty} shard key",
                                            i + 1
                                        ),
                                    )
                                })
                            })
                            .collect::<Result<Vec<_>, _>>()
                            .map(Keys::Some),
                        None => Ok(Keys::Unknown),
                    }
                } else {
                    match std::str::from_utf8(bytes) {
                        Ok(s) => text_array(s),
                        Err(_) => Ok(Keys::Unknown),
                    }
                }
            }
            Value::Default | Value::Expr => Ok(Keys::Unknown),
        }
    }
}

/// The key a number literal stands for. A text key meets a number only through a cast
/// (`code = 007::text`), and PostgreSQL casts the number's value, not its spelling: an
/// integer is written without leading zeros or `+`. Any other number (`1.50`, `1e3`)
/// gives `None`: its text depends on the type it is read as.
fn number_key(text: &str, ty: KeyType) -> Option<KeyValue> {
    if ty != KeyType::Text {
        return KeyValue::from_text(text, ty);
    }
    let (neg, digits) = match text.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value = match digits.trim_start_matches('0') {
        "" => "0",
        v => v,
    };
    let canonical = if neg && value != "0" {
        format!("-{value}")
    } else {
        value.to_owned()
    };
    Some(KeyValue::Text(canonical))
}

/// A Bind parameter's bytes as a key of type `ty`, if they decode as one.
fn param_key(bytes: &[u8], binary: bool, ty: KeyType) -> Option<KeyValue> {
    if binary {
        KeyValue::from_binary(bytes, ty)
    } else {
        KeyValue::from_text(std::str::from_utf8(bytes).ok()?, ty)
    }
}

fn parse_text(text: &str, ty: KeyType) -> Result<KeyValue, RouteError> {
    KeyValue::from_text(text, ty).ok_or_else(|| {
        RouteError::new(
            sqlstate::INVALID_TEXT_REPRESENTATION,
            format!("invalid input syntax for type {ty}: \"{text}\""),
        )
    })
}

/// Narrow `[lo, hi]` by `key op k`.
fn tighten(
    lo: &mut Option<(KeyValue, bool)>,
    hi: &mut Option<(KeyValue, bool)>,
    op: CmpOp,
    k: KeyValue,
) {
    match op {
        CmpOp::Gt | CmpOp::Ge => {
            let incl = op == CmpOp::Ge;
            let replace = match lo {
                None => true,
                Some((v, i)) => k > *v || (k == *v && *i && !incl),
            };
            if replace {
                *lo = Some((k, incl));
            }
        }
        CmpOp::Lt | CmpOp::Le => {
            let incl = op == CmpOp::Le;
            let replace = match hi {
                None => true,
                Some((v, i)) => k < *v || (k == *v && *i && !incl),
            };
            if replace {
                *hi = Some((k, incl));
            }
        }
    }
}

fn interval(
    dist: &Distribution,
    lo: &Option<(KeyValue, bool)>,
    hi: &Option<(KeyValue, bool)>,
) -> BTreeSet<ShardId> {
    if let (Some((l, li)), Some((h, hi_))) = (&lo, &hi) {
        if l > h || (l == h && !(*li && *hi_)) {
            return BTreeSet::new();
        }
    }
    let lb = match &lo {
        None => Bound::Unbounded,
        Some((v, true)) => Bound::Included(v),
        Some((v, false)) => Bound::Excluded(v),
    };
    let hb = match &hi {
        None => Bound::Unbounded,
        Some((v, true)) => Bound::Included(v),
        Some((v, false)) => Bound::Excluded(v),
    };
    dist.shards_for_interval(lb, hb)
}

/// A one-dimensional PostgreSQL array literal `{a,"b c",NULL}`; NULL elements are
/// dropped (they match nothing). `None` for anything more complex.
pub(crate) fn parse_text_array(s: &str) -> Option<Vec<String>> {
    let s = s.trim();
    let inner = s.strip_prefix('{')?.strip_suffix('}')?;
    let mut out = Vec::new();
    if inner.trim().is_empty() {
        return Some(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut item = String::new();
        let mut quoted = false;
        if chars.peek() == Some(&'"') {
            quoted = true;
            chars.next();
            loop {
                match chars.next()? {
                    '\\' => item.push(chars.next()?),
                    '"' => break,
                    c => item.push(c),
                }
            }
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' || c == '}' || c == '"' {
                    return None;
                }
                if c == '\\' {
                    chars.next();
                    item.push(chars.next()?);
                    continue;
                }
                item.push(c);
                chars.next();
            }
            item = item.trim().to_owned();
        }
        if quoted || !item.eq_ignore_ascii_case("null") {
            out.push(item);
        }
        match chars.next() {
            None => return Some(out),
            Some(',') => continue,
            Some(_) => return None,
        }
    }
}

/// PostgreSQL's binary array format (any number of dimensions, flattened); NULL
/// elements dropped. `None` if malformed.
pub(crate) fn parse_binary_array(b: &[u8]) -> Option<Vec<&[u8]>> {
    let i32_at = |off: usize| -> Option<i32> {
        let s = b.get(off..off + 4)?;
        Some(i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    };
    let ndim = usize::try_from(i32_at(0)?).ok()?;
    if ndim > 6 {
        return None;
    }
    let mut off = 12;
    let mut count: usize = if ndim == 0 { 0 } else { 1 };
    for _ in 0..ndim {
        let len = usize::try_from(i32_at(off)?).ok()?;
        count = count.checked_mul(len)?;
        off += 8;
    }
    let mut out = Vec::new();
    for _ in 0..count {
        let len = i32_at(off)?;
        off += 4;
        if len < 0 {
            continue;
        }
        let len = usize::try_from(len).ok()?;
        out.push(b.get(off..off.checked_add(len)?)?);
        off += len;
    }
    (off == b.len()).then_some(out)
}
