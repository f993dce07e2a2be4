//! Turns PostgreSQL's parse tree (pg_query protobuf) into the routing IR of `shape.rs`.
//!
//! The walk is written out by hand for every statement and expression node that can
//! hold a relation, a subquery or an aggregate. As a safety net, pg_query's own generic
//! walker is run afterwards: any relation or function call it finds that this walk did
//! not visit is recorded as "opaque", and routing refuses to fan such a statement out or
//! to use a sharded table it could not see the use of.
//!
//! This module knows nothing about the topology; it must not decide routes.

use std::collections::HashSet;

use pg_query::protobuf::{
    self, AExprKind, BoolExprType, JoinType, LimitOption, SetOperation, TransactionStmtKind,
    VariableSetKind,
};
use pg_query::{NodeEnum, NodeRef};

use super::lexer::LitSpan;
use super::shape::{
    Body, CmpOp, ColRef, DmlKind, InsertShape, Pred, QueryShape, Rel, RelKind, Scope, ScopeKind,
    StmtShape, Value,
};
use super::{RouteError, SavepointOp, StatementKind};

/// Names of built-in aggregate functions (an aggregate call without `*`, `DISTINCT`,
/// `ORDER BY` or `FILTER` looks like any other function call in the raw parse tree).
const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "array_agg",
    "string_agg",
    "bool_and",
    "bool_or",
    "every",
    "bit_and",
    "bit_or",
    "bit_xor",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "json_agg_strict",
    "jsonb_agg_strict",
    "json_object_agg_strict",
    "jsonb_object_agg_strict",
    "json_object_agg_unique",
    "jsonb_object_agg_unique",
    "json_object_agg_unique_strict",
    "jsonb_object_agg_unique_strict",
    "json_arrayagg",
    "json_objectagg",
    "xmlagg",
    "range_agg",
    "range_intersect_agg",
    "any_value",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "variance",
    "var_pop",
    "var_samp",
    "corr",
    "covar_pop",
    "covar_samp",
    "regr_avgx",
    "regr_avgy",
    "regr_count",
    "regr_intercept",
    "regr_r2",
    "regr_slope",
    "regr_sxx",
    "regr_sxy",
    "regr_syy",
    "percentile_cont",
    "percentile_disc",
    "mode",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "grouping",
];

/// Analyse one top-level statement. `sql` is the whole query string (node locations are
/// offsets into it) and `lits` the literals the lexer found in it (empty if it
/// declined). Clears `*shareable` if the analysis depends on text the lexer treats as a
/// literal in a way the literal index cannot express.
pub(crate) fn analyze_statement(
    node: &NodeEnum,
    sql: &str,
    lits: &[LitSpan],
    shareable: &mut bool,
) -> (StatementKind, StmtShape) {
    let mut a = Analyzer {
        sql,
        lits,
        shareable: true,
        q: QueryShape {
            dml: DmlKind::Select,
            rels: Vec::new(),
            scopes: Vec::new(),
            target: None,
            targets: Vec::new(),
            insert: None,
            assigned: Vec::new(),
            wrapper: None,
            creates: None,
            writes_in_cte: false,
        },
        ctes: Vec::new(),
        seen_rels: HashSet::new(),
        seen_funcs: HashSet::new(),
        locking: false,
    };
    let out = a.statement(node);
    if !a.shareable {
        *shareable = false;
    }
    out
}

struct Analyzer<'a> {
    sql: &'a str,
    lits: &'a [LitSpan],
    shareable: bool,
    /// The query being built (used by query-like statements only).
    q: QueryShape,
    /// CTE names visible at the current point, innermost last.
    ctes: Vec<Vec<String>>,
    /// Locations of RangeVars and FuncCalls this walk visited (for the safety net).
    seen_rels: HashSet<i32>,
    seen_funcs: HashSet<i32>,
    /// `FOR UPDATE` / `FOR SHARE` somewhere.
    locking: bool,
}

fn refuse(kind: StatementKind, err: RouteError) -> (StatementKind, StmtShape) {
    (
        kind,
        StmtShape {
            body: Body::Refuse(err),
            write: false,
        },
    )
}

fn simple(kind: StatementKind, write: bool) -> (StatementKind, StmtShape) {
    (
        kind,
        StmtShape {
            body: Body::Default,
            write,
        },
    )
}

impl Analyzer<'_> {
    fn statement(&mut self, node: &NodeEnum) -> (StatementKind, StmtShape) {
        use StatementKind as K;
        match node {
            NodeEnum::SelectStmt(_)
            | NodeEnum::InsertStmt(_)
            | NodeEnum::UpdateStmt(_)
            | NodeEnum::DeleteStmt(_)
            | NodeEnum::MergeStmt(_) => self.query(node, None),
            NodeEnum::ExplainStmt(e) => match e.query.as_deref().and_then(|n| n.node.as_ref()) {
                Some(inner @ (NodeEnum::SelectStmt(_)
                | NodeEnum::InsertStmt(_)
                | NodeEnum::UpdateStmt(_)
                | NodeEnum::DeleteStmt(_)
                | NodeEnum::MergeStmt(_))) => self.query(inner, Some("EXPLAIN")),
                // EXPLAIN of CREATE TABLE AS and the like: route like a utility.
                Some(inner) => {
                    let (_, shape) = self.statement(inner);
                    (K::Query, shape)
                }
                None => simple(K::Query, false),
            },
            NodeEnum::CreateTableAsStmt(c) => {
                let what = match protobuf::ObjectType::try_from(c.objtype) {
                    Ok(protobuf::ObjectType::ObjectMatview) => "CREATE MATERIALIZED VIEW",
                    _ => "CREATE TABLE AS",
                };
                if let Some(into) = &c.into {
                    if let Some(r) = &into.rel {
                        self.seen_rels.insert(r.location);
                    }
                }
                match c.query.as_deref().and_then(|n| n.node.as_ref()) {
                    Some(inner) => {
                        let (_, mut shape) = self.query(inner, None);
                        if let Body::Query(q) = &mut shape.body {
                            q.creates = Some(what);
                        }
                        shape.write = true;
                        (K::Other, shape)
                    }
                    None => simple(K::Other, true),
                }
            }
            NodeEnum::ViewStmt(v) => {
                if let Some(r) = &v.view {
                    self.seen_rels.insert(r.location);
                }
                match v.query.as_deref().and_then(|n| n.node.as_ref()) {
                    Some(inner) => {
                        let (_, mut shape) = self.query(inner, None);
                        if let Body::Query(q) = &mut shape.body {
                            q.creates = Some("CREATE VIEW");
                        }
                        shape.write = true;
                        (K::Other, shape)
                    }
                    None => simple(K::Other, true),
                }
            }
            NodeEnum::TransactionStmt(t) => match TransactionStmtKind::try_from(t.kind) {
                Ok(TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart) => {
                    simple(K::Begin, false)
                }
                Ok(TransactionStmtKind::TransStmtCommit) => simple(K::Commit, false),
                Ok(TransactionStmtKind::TransStmtRollback) => simple(K::Rollback, false),
                Ok(k @ (TransactionStmtKind::TransStmtSavepoint
                | TransactionStmtKind::TransStmtRelease
                | TransactionStmtKind::TransStmtRollbackTo)) => {
                    let op = match k {
                        TransactionStmtKind::TransStmtSavepoint => SavepointOp::Define,
                        TransactionStmtKind::TransStmtRelease => SavepointOp::Release,
                        _ => SavepointOp::RollbackTo,
                    };
                    let name = t.savepoint_name.clone();
                    simple(K::Savepoint { op, name }, false)
                }
                Ok(TransactionStmtKind::TransStmtPrepare) => refuse(
                    K::Commit,
                    RouteError::unsupported(
                        "PREPARE TRANSACTION through the router",
                        "two-phase commit is managed by the router; use COMMIT",
                    ),
                ),
                _ => refuse(
                    K::Other,
                    RouteError::unsupported(
                        "COMMIT PREPARED / ROLLBACK PREPARED through the router",
                        "run it on the shard that holds the prepared transaction",
                    ),
                ),
            },
            NodeEnum::VariableSetStmt(v) => match VariableSetKind::try_from(v.kind) {
                Ok(VariableSetKind::VarReset) => simple(
                    K::Reset {
                        name: Some(v.name.to_lowercase()),
                    },
                    false,
                ),
                Ok(VariableSetKind::VarResetAll) => simple(K::Reset { name: None }, false),
                Ok(VariableSetKind::VarSetMulti) => {
                    // SET TRANSACTION … / SET SESSION CHARACTERISTICS AS TRANSACTION …
                    let local = v.name.eq_ignore_ascii_case("transaction");
                    let name = if local {
                        "transaction".to_owned()
                    } else {
                        "default_transaction_characteristics".to_owned()
                    };
                    simple(K::Set { name, local }, false)
                }
                _ => simple(
                    K::Set {
                        name: v.name.to_lowercase(),
                        local: v.is_local,
                    },
                    false,
                ),
            },
            NodeEnum::VariableShowStmt(_) => simple(K::Show, false),
            NodeEnum::DiscardStmt(_) => simple(K::Discard, false),
            NodeEnum::DeallocateStmt(d) if d.isall => simple(K::Discard, false),
            NodeEnum::DeallocateStmt(_) | NodeEnum::PrepareStmt(_) | NodeEnum::ExecuteStmt(_) => {
                refuse(
                    K::Other,
                    RouteError::unsupported(
                        "SQL-level PREPARE / EXECUTE / DEALLOCATE through the router",
                        "use protocol-level prepared statements (Parse/Bind); pooled server connections cannot keep SQL-level ones",
                    ),
                )
            }
            NodeEnum::ListenStmt(_) | NodeEnum::NotifyStmt(_) | NodeEnum::UnlistenStmt(_) => {
                refuse(
                    K::Other,
                    RouteError::unsupported(
                        "LISTEN / NOTIFY / UNLISTEN through the router",
                        "connect to a shard directly for notifications",
                    ),
                )
            }
            NodeEnum::DoStmt(_) | NodeEnum::CallStmt(_) => simple(K::Other, true),
            NodeEnum::CheckPointStmt(_) | NodeEnum::LoadStmt(_) => simple(K::Other, false),
            NodeEnum::CopyStmt(c) => self.copy(c),
            _ => {
                let tables = utility_tables(node);
                (
                    K::Other,
                    StmtShape {
                        body: Body::Ddl { tables },
                        write: true,
                    },
                )
            }
        }
    }

    fn copy(&mut self, c: &protobuf::CopyStmt) -> (StatementKind, StmtShape) {
        if let Some(r) = &c.relation {
            return (
                StatementKind::Other,
                StmtShape {
                    body: Body::Copy {
                        table: r.relname.clone(),
                        from: c.is_from,
                    },
                    write: c.is_from,
                },
            );
        }
        match c.query.as_deref().and_then(|n| n.node.as_ref()) {
            Some(inner) => {
                let (_, shape) = self.query(inner, Some("COPY"));
                (StatementKind::Other, shape)
            }
            None => simple(StatementKind::Other, false),
        }
    }

    /// SELECT / INSERT / UPDATE / DELETE / MERGE (optionally under EXPLAIN or COPY).
    fn query(
        &mut self,
        node: &NodeEnum,
        wrapper: Option<&'static str>,
    ) -> (StatementKind, StmtShape) {
        let top = self.new_scope(None, ScopeKind::Top);
        let mut write = true;
        match node {
            NodeEnum::SelectStmt(s) => {
                self.q.dml = DmlKind::Select;
                self.select(s, top);
                write = false;
            }
            NodeEnum::InsertStmt(i) => self.insert(i, top),
            NodeEnum::UpdateStmt(u) => self.update(u, top),
            NodeEnum::DeleteStmt(d) => self.delete(d, top),
            NodeEnum::MergeStmt(m) => self.merge(m, top),
            _ => {}
        }
        self.safety_net(node);
        self.q.wrapper = wrapper;
        let write = write || self.locking || self.q.writes_in_cte;
        let q = std::mem::replace(
            &mut self.q,
            QueryShape {
                dml: DmlKind::Select,
                rels: Vec::new(),
                scopes: Vec::new(),
                target: None,
                targets: Vec::new(),
                insert: None,
                assigned: Vec::new(),
                wrapper: None,
                creates: None,
                writes_in_cte: false,
            },
        );
        (
            StatementKind::Query,
            StmtShape {
                body: Body::Query(Box::new(q)),
                write,
            },
        )
    }

    fn new_scope(&mut self, parent: Option<usize>, kind: ScopeKind) -> usize {
        self.q.scopes.push(Scope {
            parent,
            kind,
            unsafe_shape: None,
            pred: Pred::Any,
            links: Vec::new(),
        });
        self.q.scopes.len() - 1
    }

    fn mark_unsafe(&mut self, scope: usize, what: impl FnOnce() -> String) {
        if let Some(s) = self.q.scopes.get_mut(scope) {
            if s.unsafe_shape.is_none() {
                s.unsafe_shape = Some(what());
            }
        }
    }

    fn add_pred(&mut self, scope: usize, p: Pred) {
        if matches!(p, Pred::Any) {
            return;
        }
        if let Some(s) = self.q.scopes.get_mut(scope) {
            let old = std::mem::replace(&mut s.pred, Pred::Any);
            s.pred = match old {
                Pred::Any => p,
                Pred::And(mut v) => {
                    v.push(p);
                    Pred::And(v)
                }
                other => Pred::And(vec![other, p]),
            };
        }
    }

    fn with_clause(&mut self, w: Option<&protobuf::WithClause>, scope: usize) {
        let Some(w) = w else {
            self.ctes.push(Vec::new());
            return;
        };
        let names: Vec<String> = w
            .ctes
            .iter()
            .filter_map(|n| match &n.node {
                Some(NodeEnum::CommonTableExpr(c)) => Some(c.ctename.clone()),
                _ => None,
            })
            .collect();
        // Visible to each other (and to themselves when recursive) and to the body.
        self.ctes.push(names);
        let parent = self.q.scopes.get(scope).and_then(|s| s.parent);
        for n in &w.ctes {
            let Some(NodeEnum::CommonTableExpr(c)) = &n.node else {
                continue;
            };
            let Some(inner) = c.ctequery.as_deref().and_then(|n| n.node.as_ref()) else {
                continue;
            };
            let sc = self.new_scope(parent.or(Some(scope)), ScopeKind::Derived);
            match inner {
                NodeEnum::SelectStmt(s) => self.select(s, sc),
                NodeEnum::InsertStmt(i) => {
                    self.q.writes_in_cte = true;
                    // An INSERT in a CTE is not key-routed: make its table opaque, so a
                    // sharded target is refused and an unsharded one routes normally.
                    let opaque = self.new_scope(Some(sc), ScopeKind::Opaque);
                    if let Some(r) = &i.relation {
                        let t = self.push_table(r, opaque);
                        self.q.targets.push(t);
                    }
                    if let Some(NodeEnum::SelectStmt(s)) =
                        i.select_stmt.as_deref().and_then(|n| n.node.as_ref())
                    {
                        self.select(s, sc);
                    }
                }
                NodeEnum::UpdateStmt(u) => {
                    self.q.writes_in_cte = true;
                    self.update(u, sc);
                }
                NodeEnum::DeleteStmt(d) => {
                    self.q.writes_in_cte = true;
                    self.delete(d, sc);
                }
                NodeEnum::MergeStmt(m) => {
                    self.q.writes_in_cte = true;
                    self.merge(m, sc);
                }
                _ => {}
            }
        }
    }

    fn is_cte(&self, name: &str) -> bool {
        self.ctes
            .iter()
            .any(|level| level.iter().any(|c| c == name))
    }

    fn push_table(&mut self, r: &protobuf::RangeVar, scope: usize) -> usize {
        self.seen_rels.insert(r.location);
        let kind = if r.schemaname.is_empty() && self.is_cte(&r.relname) {
            RelKind::Derived
        } else {
            RelKind::Table
        };
        self.q.rels.push(Rel {
            name: r.relname.clone(),
            schema: (!r.schemaname.is_empty()).then(|| r.schemaname.clone()),
            alias: r.alias.as_ref().map(|a| a.aliasname.clone()),
            scope,
            kind,
        });
        self.q.rels.len() - 1
    }

    fn select(&mut self, s: &protobuf::SelectStmt, scope: usize) {
        self.with_clause(s.with_clause.as_ref(), scope);
        let op = SetOperation::try_from(s.op).unwrap_or(SetOperation::SetopNone);
        if !matches!(op, SetOperation::SetopNone | SetOperation::Undefined) {
            let name = match op {
                SetOperation::SetopUnion => "UNION",
                SetOperation::SetopIntersect => "INTERSECT",
                _ => "EXCEPT",
            };
            self.mark_unsafe(scope, || name.to_owned());
            for arm in [&s.larg, &s.rarg].into_iter().flatten() {
                let sc = self.new_scope(Some(scope), ScopeKind::Derived);
                self.select(arm, sc);
            }
        }
        if !s.distinct_clause.is_empty() {
            let what = if s.distinct_clause.iter().any(|n| n.node.is_some()) {
                "DISTINCT ON"
            } else {
                "DISTINCT"
            };
            self.mark_unsafe(scope, || what.to_owned());
        }
        for item in &s.from_clause {
            self.range_item(item, scope);
        }
        for t in &s.target_list {
            self.expr(t, scope);
        }
        for row in &s.values_lists {
            self.expr(row, scope);
        }
        if let Some(w) = s.where_clause.as_deref() {
            self.expr(w, scope);
            let p = self.pred(w, scope);
            self.add_pred(scope, p);
        }
        if !s.group_clause.is_empty() {
            self.mark_unsafe(scope, || "GROUP BY".to_owned());
            for g in &s.group_clause {
                self.expr(g, scope);
            }
        }
        if let Some(h) = s.having_clause.as_deref() {
            self.mark_unsafe(scope, || "HAVING".to_owned());
            self.expr(h, scope);
        }
        if !s.window_clause.is_empty() {
            self.mark_unsafe(scope, || "WINDOW clause".to_owned());
        }
        if !s.sort_clause.is_empty() {
            self.mark_unsafe(scope, || "ORDER BY".to_owned());
            for o in &s.sort_clause {
                self.expr(o, scope);
            }
        }
        if s.limit_count.is_some() || s.limit_offset.is_some() {
            let what = if LimitOption::try_from(s.limit_option) == Ok(LimitOption::WithTies) {
                "FETCH … WITH TIES"
            } else if s.limit_count.is_some() {
                "LIMIT"
            } else {
                "OFFSET"
            };
            self.mark_unsafe(scope, || what.to_owned());
            for n in [&s.limit_count, &s.limit_offset].into_iter().flatten() {
                self.expr(n, scope);
            }
        }
        if !s.locking_clause.is_empty() {
            self.locking = true;
            for l in &s.locking_clause {
                if let Some(NodeEnum::LockingClause(lc)) = &l.node {
                    for r in &lc.locked_rels {
                        if let Some(NodeEnum::RangeVar(v)) = &r.node {
                            self.seen_rels.insert(v.location);
                        }
                    }
                }
            }
        }
        if let Some(into) = &s.into_clause {
            if let Some(r) = &into.rel {
                self.seen_rels.insert(r.location);
            }
            self.q.creates = Some("SELECT INTO");
        }
        self.ctes.pop();
    }

    /// A FROM item; returns the tables directly in it (for USING).
    fn range_item(&mut self, node: &protobuf::Node, scope: usize) -> Vec<usize> {
        match &node.node {
            Some(NodeEnum::RangeVar(r)) => vec![self.push_table(r, scope)],
            Some(NodeEnum::JoinExpr(j)) => {
                let mut left = j
                    .larg
                    .as_deref()
                    .map(|n| self.range_item(n, scope))
                    .unwrap_or_default();
                let right = j
                    .rarg
                    .as_deref()
                    .map(|n| self.range_item(n, scope))
                    .unwrap_or_default();
                let inner = JoinType::try_from(j.jointype) == Ok(JoinType::JoinInner);
                if let Some(q) = j.quals.as_deref() {
                    self.expr(q, scope);
                    let p = self.pred(q, scope);
                    if inner {
                        self.add_pred(scope, p);
                    } else {
                        let mut eqs = Vec::new();
                        conjunct_links(&p, &mut eqs);
                        if let Some(s) = self.q.scopes.get_mut(scope) {
                            s.links.extend(eqs);
                        }
                    }
                }
                for u in &j.using_clause {
                    let Some(NodeEnum::String(col)) = &u.node else {
                        continue;
                    };
                    for &l in &left {
                        for &r in &right {
                            let (lq, rq) = (self.rel_label(l), self.rel_label(r));
                            let pair = (
                                ColRef {
                                    scope,
                                    qual: Some(lq),
                                    name: col.sval.clone(),
                                },
                                ColRef {
                                    scope,
                                    qual: Some(rq),
                                    name: col.sval.clone(),
                                },
                            );
                            if let Some(s) = self.q.scopes.get_mut(scope) {
                                s.links.push(pair);
                            }
                        }
                    }
                }
                left.extend(right);
                left
            }
            Some(NodeEnum::RangeSubselect(rs)) => {
                let sc = self.new_scope(Some(scope), ScopeKind::Derived);
                if let Some(NodeEnum::SelectStmt(s)) =
                    rs.subquery.as_deref().and_then(|n| n.node.as_ref())
                {
                    self.select(s, sc);
                }
                self.push_derived(rs.alias.as_ref(), scope);
                Vec::new()
            }
            Some(NodeEnum::RangeFunction(rf)) => {
                for f in &rf.functions {
                    self.expr(f, scope);
                }
                self.push_derived(rf.alias.as_ref(), scope);
                Vec::new()
            }
            Some(NodeEnum::RangeTableSample(ts)) => match ts.relation.as_deref() {
                Some(n) => self.range_item(n, scope),
                None => Vec::new(),
            },
            _ => Vec::new(),
        }
    }

    fn push_derived(&mut self, alias: Option<&protobuf::Alias>, scope: usize) {
        if let Some(a) = alias {
            self.q.rels.push(Rel {
                name: a.aliasname.clone(),
                schema: None,
                alias: Some(a.aliasname.clone()),
                scope,
                kind: RelKind::Derived,
            });
        }
    }

    fn rel_label(&self, rel: usize) -> String {
        self.q
            .rels
            .get(rel)
            .map(|r| r.alias.clone().unwrap_or_else(|| r.name.clone()))
            .unwrap_or_default()
    }

    fn returning(&mut self, r: Option<&protobuf::ReturningClause>, scope: usize) {
        if let Some(r) = r {
            for e in &r.exprs {
                self.expr(e, scope);
            }
        }
    }

    fn insert(&mut self, i: &protobuf::InsertStmt, top: usize) {
        self.q.dml = DmlKind::Insert;
        self.with_clause(i.with_clause.as_ref(), top);
        let Some(rel) = &i.relation else {
            self.ctes.pop();
            return;
        };
        let target = self.push_table(rel, top);
        self.q.target = Some(target);
        self.q.targets.push(target);
        let cols = (!i.cols.is_empty()).then(|| {
            i.cols
                .iter()
                .filter_map(|c| match &c.node {
                    Some(NodeEnum::ResTarget(t)) => Some(t.name.clone()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        });
        let mut rows = None;
        let mut from_select = false;
        if let Some(NodeEnum::SelectStmt(s)) =
            i.select_stmt.as_deref().and_then(|n| n.node.as_ref())
        {
            let plain_values = !s.values_lists.is_empty()
                && s.from_clause.is_empty()
                && s.with_clause.is_none()
                && s.sort_clause.is_empty()
                && s.limit_count.is_none()
                && s.limit_offset.is_none();
            if plain_values {
                let mut out = Vec::new();
                for row in &s.values_lists {
                    self.expr(row, top);
                    if let Some(NodeEnum::List(l)) = &row.node {
                        out.push(l.items.iter().map(|v| self.value(v)).collect());
                    }
                }
                rows = Some(out);
            } else {
                from_select = true;
                let sc = self.new_scope(Some(top), ScopeKind::Derived);
                self.select(s, sc);
            }
        }
        self.q.insert = Some(InsertShape {
            cols,
            rows,
            from_select,
        });
        if let Some(oc) = i.on_conflict_clause.as_deref() {
            for t in &oc.target_list {
                if let Some(NodeEnum::ResTarget(rt)) = &t.node {
                    self.q.assigned.push((target, rt.name.clone()));
                    self.expr(t, top);
                }
            }
            if let Some(w) = oc.where_clause.as_deref() {
                self.expr(w, top);
            }
        }
        self.returning(i.returning_clause.as_ref(), top);
        self.ctes.pop();
    }

    fn update(&mut self, u: &protobuf::UpdateStmt, scope: usize) {
        if scope == 0 {
            self.q.dml = DmlKind::Update;
        }
        self.with_clause(u.with_clause.as_ref(), scope);
        if let Some(rel) = &u.relation {
            let t = self.push_table(rel, scope);
            self.q.targets.push(t);
            if scope == 0 {
                self.q.target = Some(t);
            }
            for item in &u.target_list {
                if let Some(NodeEnum::ResTarget(rt)) = &item.node {
                    self.q.assigned.push((t, rt.name.clone()));
                }
                self.expr(item, scope);
            }
        }
        for f in &u.from_clause {
            self.range_item(f, scope);
        }
        if let Some(w) = u.where_clause.as_deref() {
            self.expr(w, scope);
            let p = self.pred(w, scope);
            self.add_pred(scope, p);
        }
        self.returning(u.returning_clause.as_ref(), scope);
        self.ctes.pop();
    }

    fn delete(&mut self, d: &protobuf::DeleteStmt, scope: usize) {
        if scope == 0 {
            self.q.dml = DmlKind::Delete;
        }
        self.with_clause(d.with_clause.as_ref(), scope);
        if let Some(rel) = &d.relation {
            let t = self.push_table(rel, scope);
            self.q.targets.push(t);
            if scope == 0 {
                self.q.target = Some(t);
            }
        }
        for f in &d.using_clause {
            self.range_item(f, scope);
        }
        if let Some(w) = d.where_clause.as_deref() {
            self.expr(w, scope);
            let p = self.pred(w, scope);
            self.add_pred(scope, p);
        }
        self.returning(d.returning_clause.as_ref(), scope);
        self.ctes.pop();
    }

    fn merge(&mut self, m: &protobuf::MergeStmt, scope: usize) {
        if scope == 0 {
            self.q.dml = DmlKind::Merge;
        }
        self.with_clause(m.with_clause.as_ref(), scope);
        if let Some(rel) = &m.relation {
            let t = self.push_table(rel, scope);
            self.q.targets.push(t);
            if scope == 0 {
                self.q.target = Some(t);
            }
        }
        if let Some(src) = m.source_relation.as_deref() {
            self.range_item(src, scope);
        }
        if let Some(j) = m.join_condition.as_deref() {
            self.expr(j, scope);
            let p = self.pred(j, scope);
            let mut eqs = Vec::new();
            conjunct_links(&p, &mut eqs);
            if let Some(s) = self.q.scopes.get_mut(scope) {
                s.links.extend(eqs);
            }
        }
        for w in &m.merge_when_clauses {
            if let Some(NodeEnum::MergeWhenClause(c)) = &w.node {
                if let Some(cond) = c.condition.as_deref() {
                    self.expr(cond, scope);
                }
                for t in c.target_list.iter().chain(c.values.iter()) {
                    self.expr(t, scope);
                }
            }
        }
        self.returning(m.returning_clause.as_ref(), scope);
        self.ctes.pop();
    }

    /// Walk an expression for subqueries, aggregates and window functions.
    fn expr(&mut self, node: &protobuf::Node, scope: usize) {
        let Some(n) = &node.node else { return };
        match n {
            NodeEnum::SubLink(sl) => {
                if let Some(t) = sl.testexpr.as_deref() {
                    self.expr(t, scope);
                }
                let sc = self.new_scope(Some(scope), ScopeKind::Sublink);
                if let Some(NodeEnum::SelectStmt(s)) =
                    sl.subselect.as_deref().and_then(|n| n.node.as_ref())
                {
                    self.select(s, sc);
                }
            }
            NodeEnum::FuncCall(f) => {
                self.seen_funcs.insert(f.location);
                let name = f
                    .funcname
                    .last()
                    .and_then(|n| match &n.node {
                        Some(NodeEnum::String(s)) => Some(s.sval.to_lowercase()),
                        _ => None,
                    })
                    .unwrap_or_default();
                if f.over.is_some() {
                    self.mark_unsafe(scope, || format!("window function {name}()"));
                } else if f.agg_star
                    || f.agg_distinct
                    || f.agg_within_group
                    || !f.agg_order.is_empty()
                    || f.agg_filter.is_some()
                    || AGGREGATES.contains(&name.as_str())
                {
                    self.mark_unsafe(scope, || format!("aggregate {name}()"));
                }
                for a in &f.args {
                    self.expr(a, scope);
                }
                for a in &f.agg_order {
                    self.expr(a, scope);
                }
                if let Some(a) = f.agg_filter.as_deref() {
                    self.expr(a, scope);
                }
                if let Some(w) = f.over.as_deref() {
                    for a in w.partition_clause.iter().chain(w.order_clause.iter()) {
                        self.expr(a, scope);
                    }
                }
            }
            NodeEnum::AExpr(e) => {
                for x in [&e.lexpr, &e.rexpr].into_iter().flatten() {
                    self.expr(x, scope);
                }
            }
            NodeEnum::BoolExpr(e) => self.exprs(&e.args, scope),
            NodeEnum::TypeCast(c) => self.opt_expr(c.arg.as_deref(), scope),
            NodeEnum::NullTest(t) => self.opt_expr(t.arg.as_deref(), scope),
            NodeEnum::BooleanTest(t) => self.opt_expr(t.arg.as_deref(), scope),
            NodeEnum::CaseExpr(c) => {
                self.opt_expr(c.arg.as_deref(), scope);
                self.exprs(&c.args, scope);
                self.opt_expr(c.defresult.as_deref(), scope);
            }
            NodeEnum::CaseWhen(w) => {
                self.opt_expr(w.expr.as_deref(), scope);
                self.opt_expr(w.result.as_deref(), scope);
            }
            NodeEnum::CoalesceExpr(c) => self.exprs(&c.args, scope),
            NodeEnum::MinMaxExpr(m) => self.exprs(&m.args, scope),
            NodeEnum::RowExpr(r) => self.exprs(&r.args, scope),
            NodeEnum::AArrayExpr(a) => self.exprs(&a.elements, scope),
            NodeEnum::List(l) => self.exprs(&l.items, scope),
            NodeEnum::ResTarget(t) => {
                self.opt_expr(t.val.as_deref(), scope);
                self.exprs(&t.indirection, scope);
            }
            NodeEnum::AIndirection(i) => {
                self.opt_expr(i.arg.as_deref(), scope);
                self.exprs(&i.indirection, scope);
            }
            NodeEnum::AIndices(i) => {
                self.opt_expr(i.lidx.as_deref(), scope);
                self.opt_expr(i.uidx.as_deref(), scope);
            }
            NodeEnum::CollateClause(c) => self.opt_expr(c.arg.as_deref(), scope),
            NodeEnum::SortBy(s) => self.opt_expr(s.node.as_deref(), scope),
            NodeEnum::NamedArgExpr(a) => self.opt_expr(a.arg.as_deref(), scope),
            NodeEnum::GroupingSet(g) => self.exprs(&g.content, scope),
            NodeEnum::GroupingFunc(g) => self.exprs(&g.args, scope),
            NodeEnum::MultiAssignRef(m) => self.opt_expr(m.source.as_deref(), scope),
            NodeEnum::XmlExpr(x) => {
                self.exprs(&x.named_args, scope);
                self.exprs(&x.args, scope);
            }
            _ => {}
        }
    }

    fn exprs(&mut self, nodes: &[protobuf::Node], scope: usize) {
        for n in nodes {
            self.expr(n, scope);
        }
    }

    fn opt_expr(&mut self, node: Option<&protobuf::Node>, scope: usize) {
        if let Some(n) = node {
            self.expr(n, scope);
        }
    }

    /// The key-relevant meaning of a boolean condition.
    fn pred(&mut self, node: &protobuf::Node, scope: usize) -> Pred {
        match &node.node {
            Some(NodeEnum::BoolExpr(b)) => match BoolExprType::try_from(b.boolop) {
                Ok(BoolExprType::AndExpr) => {
                    Pred::And(b.args.iter().map(|a| self.pred(a, scope)).collect())
                }
                Ok(BoolExprType::OrExpr) => {
                    Pred::Or(b.args.iter().map(|a| self.pred(a, scope)).collect())
                }
                _ => Pred::Any,
            },
            Some(NodeEnum::AExpr(e)) => self.aexpr_pred(e, scope),
            _ => Pred::Any,
        }
    }

    fn aexpr_pred(&mut self, e: &protobuf::AExpr, scope: usize) -> Pred {
        let op = op_name(&e.name);
        let (Some(l), Some(r)) = (e.lexpr.as_deref(), e.rexpr.as_deref()) else {
            return Pred::Any;
        };
        match AExprKind::try_from(e.kind) {
            Ok(AExprKind::AexprOp) => {
                let (lc, rc) = (col_ref(l, scope), col_ref(r, scope));
                match (lc, rc, op) {
                    (Some(a), Some(b), "=") => Pred::ColEq(a, b),
                    (Some(col), None, "=") => Pred::In {
                        col,
                        vals: vec![self.value(r)],
                    },
                    (None, Some(col), "=") => Pred::In {
                        col,
                        vals: vec![self.value(l)],
                    },
                    (Some(col), None, o) => match cmp_op(o) {
                        Some(op) => Pred::Cmp {
                            col,
                            op,
                            val: self.value(r),
                        },
                        None => Pred::Any,
                    },
                    (None, Some(col), o) => match cmp_op(o).map(flip) {
                        Some(op) => Pred::Cmp {
                            col,
                            op,
                            val: self.value(l),
                        },
                        None => Pred::Any,
                    },
                    _ => Pred::Any,
                }
            }
            Ok(AExprKind::AexprIn) if op == "=" => {
                let (Some(col), Some(NodeEnum::List(list))) = (col_ref(l, scope), &r.node) else {
                    return Pred::Any;
                };
                Pred::In {
                    col,
                    vals: list.items.iter().map(|v| self.value(v)).collect(),
                }
            }
            Ok(AExprKind::AexprOpAny) if op == "=" => {
                let Some(col) = col_ref(l, scope) else {
                    return Pred::Any;
                };
                match &r.node {
                    Some(NodeEnum::AArrayExpr(a)) => Pred::In {
                        col,
                        vals: a.elements.iter().map(|v| self.value(v)).collect(),
                    },
                    _ => Pred::AnyArray {
                        col,
                        arr: self.value(r),
                    },
                }
            }
            Ok(AExprKind::AexprBetween) => {
                let (Some(col), Some(NodeEnum::List(list))) = (col_ref(l, scope), &r.node) else {
                    return Pred::Any;
                };
                let [lo, hi] = list.items.as_slice() else {
                    return Pred::Any;
                };
                Pred::And(vec![
                    Pred::Cmp {
                        col: col.clone(),
                        op: CmpOp::Ge,
                        val: self.value(lo),
                    },
                    Pred::Cmp {
                        col,
                        op: CmpOp::Le,
                        val: self.value(hi),
                    },
                ])
            }
            _ => Pred::Any,
        }
    }

    /// The value of a constant, parameter or simple cast of one.
    fn value(&mut self, node: &protobuf::Node) -> Value {
        match &node.node {
            Some(NodeEnum::AConst(c)) => self.constant(c),
            Some(NodeEnum::ParamRef(p)) => match usize::try_from(p.number) {
                Ok(n) if n >= 1 => Value::Param(n - 1),
                _ => Value::Expr,
            },
            // A cast to a type with a modifier changes the value itself
            // (`'abcdef'::varchar(3)` is 'abc'): not a value the router knows.
            Some(NodeEnum::TypeCast(tc))
                if tc.type_name.as_ref().is_some_and(|t| !t.typmods.is_empty()) =>
            {
                Value::Expr
            }
            Some(NodeEnum::TypeCast(tc)) => match tc.arg.as_deref().map(|a| &a.node) {
                Some(Some(NodeEnum::AConst(c))) => self.constant(c),
                Some(Some(NodeEnum::ParamRef(p))) => match usize::try_from(p.number) {
                    Ok(n) if n >= 1 => Value::Param(n - 1),
                    _ => Value::Expr,
                },
                _ => Value::Expr,
            },
            Some(NodeEnum::SetToDefault(_)) => Value::Default,
            _ => Value::Expr,
        }
    }

    fn constant(&mut self, c: &protobuf::AConst) -> Value {
        use protobuf::a_const::Val;
        if c.isnull {
            return Value::Null;
        }
        let text = match &c.val {
            Some(Val::Ival(i)) => i.ival.to_string(),
            Some(Val::Fval(f)) => f.fval.clone(),
            Some(Val::Sval(s)) => s.sval.clone(),
            Some(Val::Bsval(b)) => b.bsval.clone(),
            Some(Val::Boolval(_)) | None => return Value::Expr,
        };
        let Ok(loc) = usize::try_from(c.location) else {
            self.shareable = false;
            return Value::Const { text };
        };
        if let Ok(idx) = self.lits.binary_search_by_key(&loc, |l| l.start) {
            return Value::Lit { idx, neg: false };
        }
        // `-5` is folded into one constant located at the minus sign.
        let bytes = self.sql.as_bytes();
        if bytes.get(loc) == Some(&b'-') {
            let mut j = loc + 1;
            while bytes.get(j).is_some_and(u8::is_ascii_whitespace) {
                j += 1;
            }
            if let Ok(idx) = self.lits.binary_search_by_key(&j, |l| l.start) {
                if self.lits.get(idx).is_some_and(|l| !l.string) {
                    return Value::Lit { idx, neg: true };
                }
            }
        }
        self.shareable = false;
        Value::Const { text }
    }

    /// pg_query's generic walker as a cross-check: relations and function calls this
    /// walk did not visit make the statement partly opaque.
    fn safety_net(&mut self, node: &NodeEnum) {
        let mut opaque = None;
        for (n, _, _, _) in node.nodes() {
            match n {
                NodeRef::RangeVar(r) if !self.seen_rels.contains(&r.location) => {
                    let sc = match opaque {
                        Some(s) => s,
                        None => {
                            let s = self.new_scope(Some(0), ScopeKind::Opaque);
                            opaque = Some(s);
                            s
                        }
                    };
                    self.seen_rels.insert(r.location);
                    self.q.rels.push(Rel {
                        name: r.relname.clone(),
                        schema: (!r.schemaname.is_empty()).then(|| r.schemaname.clone()),
                        alias: r.alias.as_ref().map(|a| a.aliasname.clone()),
                        scope: sc,
                        kind: RelKind::Table,
                    });
                }
                NodeRef::FuncCall(f) if !self.seen_funcs.contains(&f.location) => {
                    self.seen_funcs.insert(f.location);
                    self.mark_unsafe(0, || {
                        "a function call inside an expression the router cannot analyse".to_owned()
                    });
                }
                _ => {}
            }
        }
    }
}

/// Key equalities among the top-level conjuncts of a predicate.
pub(crate) fn conjunct_links(p: &Pred, out: &mut Vec<(ColRef, ColRef)>) {
    match p {
        Pred::ColEq(a, b) => out.push((a.clone(), b.clone())),
        Pred::And(v) => v.iter().for_each(|c| conjunct_links(c, out)),
        _ => {}
    }
}

fn op_name(name: &[protobuf::Node]) -> &str {
    // `OPERATOR(pg_catalog.=)` has the schema first; the operator is last.
    match name.last().and_then(|n| n.node.as_ref()) {
        Some(NodeEnum::String(s)) => s.sval.as_str(),
        _ => "",
    }
}

fn cmp_op(op: &str) -> Option<CmpOp> {
    match op {
        "<" => Some(CmpOp::Lt),
        "<=" => Some(CmpOp::Le),
        ">" => Some(CmpOp::Gt),
        ">=" => Some(CmpOp::Ge),
        _ => None,
    }
}

/// `5 < col` is `col > 5`.
fn flip(op: CmpOp) -> CmpOp {
    match op {
        CmpOp::Lt => CmpOp::Gt,
        CmpOp::Le => CmpOp::Ge,
        CmpOp::Gt => CmpOp::Lt,
        CmpOp::Ge => CmpOp::Le,
    }
}

/// `col`, `t.col` or `schema.t.col` (not `t.*`, not a cast of a column).
fn col_ref(node: &protobuf::Node, scope: usize) -> Option<ColRef> {
    let Some(NodeEnum::ColumnRef(c)) = &node.node else {
        return None;
    };
    let names: Vec<&str> = c
        .fields
        .iter()
        .map(|f| match &f.node {
            Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    let (name, rest) = names.split_last()?;
    Some(ColRef {
        scope,
        qual: rest.last().map(|q| (*q).to_owned()),
        name: (*name).to_owned(),
    })
}

/// Table names a utility statement (DDL, TRUNCATE, GRANT, …) acts on.
fn utility_tables(node: &NodeEnum) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (n, _, _, _) in node.nodes() {
        if let NodeRef::RangeVar(r) = n {
            out.push(r.relname.clone());
        }
    }
    let object_names = |objects: &[protobuf::Node], out: &mut Vec<String>, drop_last: bool| {
        for o in objects {
            if let Some(NodeEnum::List(l)) = &o.node {
                let names: Vec<&str> = l
                    .items
                    .iter()
                    .filter_map(|i| match &i.node {
                        Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
                        _ => None,
                    })
                    .collect();
                let names = if drop_last {
                    names.split_last().map(|(_, r)| r).unwrap_or(&[])
                } else {
                    &names[..]
                };
                if let Some(t) = names.last() {
                    out.push((*t).to_owned());
                }
            }
        }
    };
    use protobuf::ObjectType as O;
    match node {
        NodeEnum::DropStmt(d) => match O::try_from(d.remove_type) {
            Ok(O::ObjectTable | O::ObjectView | O::ObjectMatview | O::ObjectForeignTable) => {
                object_names(&d.objects, &mut out, false)
            }
            Ok(O::ObjectRule | O::ObjectTrigger | O::ObjectPolicy) => {
                object_names(&d.objects, &mut out, true)
            }
            _ => {}
        },
        NodeEnum::CommentStmt(c) => match O::try_from(c.objtype) {
            Ok(O::ObjectTable | O::ObjectView) => {
                if let Some(o) = c.object.as_deref() {
                    object_names(std::slice::from_ref(o), &mut out, false)
                }
            }
            Ok(O::ObjectColumn) => {
                if let Some(o) = c.object.as_deref() {
                    object_names(std::slice::from_ref(o), &mut out, true)
                }
            }
            _ => {}
        },
        _ => {}
    }
    out
}
