//! Building a `Topology` from a validated `Config`, and the human-readable summary that
//! `shardwire check` prints.
//!
//! This is the only place that knows both the file format and the runtime types. It
//! re-uses the config module's parsing helpers, so anything `Config::validate` accepts
//! builds; it never trusts that blindly and reports (instead of panicking on) anything
//! that does not resolve.

use foldhash::{HashMap, HashSet};
use std::fmt::Write as _;

use super::{
    Distribution, KeyRange, KeyType, Method, Shard, ShardId, ShardedTable, SlotRange, Topology,
};
use crate::config::{
    fold_identifier, parse_key_bound, parse_slot_spec, Config, ConfigError, DistributionConfig,
    KeyPath,
};

/// The topology `cfg` describes: shards in config order (a `ShardId` is the index),
/// tables keyed by their case-folded name, version 1. Validates first and returns every
/// problem if the config is not valid.
pub fn build(cfg: &Config) -> Result<Topology, Vec<ConfigError>> {
    cfg.validate()?;
    let shards: Vec<Shard> = cfg
        .shards
        .iter()
        .map(|s| Shard {
            name: s.name.clone(),
            host: s.host.clone(),
            port: s.port,
            database: s.database.clone(),
            user: s.user.clone(),
            password: s.password.clone(),
        })
        .collect();

    let root = KeyPath::root();
    let mut distributions = Vec::with_capacity(cfg.distributions.len());
    for (i, d) in cfg.distributions.iter().enumerate() {
        let path = root.key("distributions").index(i);
        distributions.push(build_distribution(d, &path, &shards)?);
    }

    let mut tables = HashMap::default();
    for (i, t) in cfg.tables.iter().enumerate() {
        let path = root.key("tables").index(i);
        let name = fold_identifier(&t.name).map_err(|m| invalid(&path.key("name"), m))?;
        let column = fold_identifier(&t.column).map_err(|m| invalid(&path.key("column"), m))?;
        let distribution = cfg
            .distributions
            .iter()
            .position(|d| d.name == t.distribution)
            .ok_or_else(|| invalid(&path.key("distribution"), "unknown distribution"))?;
        tables.insert(
            name.clone(),
            ShardedTable {
                name,
                column,
                distribution,
            },
        );
    }

    let mut reference_tables = HashSet::default();
    for (i, name) in cfg.reference_tables.iter().enumerate() {
        let path = root.key("reference_tables").index(i);
        reference_tables.insert(fold_identifier(name).map_err(|m| invalid(&path, m))?);
    }

    let default_shard = shard_id(&shards, &cfg.default_shard, &root.key("default_shard"))?;
    Ok(Topology {
        shards,
        distributions,
        tables,
        reference_tables,
        default_shard,
        version: 1,
    })
}

/// The id of the shard named `name`.
fn shard_id(shards: &[Shard], name: &str, path: &KeyPath) -> Result<ShardId, Vec<ConfigError>> {
    shards
        .iter()
        .position(|s| s.name == name)
        .ok_or_else(|| invalid(path, format!("unknown shard `{name}`")))
}

fn invalid(path: &KeyPath, message: impl Into<String>) -> Vec<ConfigError> {
    vec![ConfigError::new(path.to_string(), message)]
}

fn build_distribution(
    d: &DistributionConfig,
    path: &KeyPath,
    shards: &[Shard],
) -> Result<Distribution, Vec<ConfigError>> {
    let key_type = KeyType::parse(&d.key_type.to_ascii_lowercase())
        .ok_or_else(|| invalid(&path.key("key_type"), "unknown key_type"))?;
    let method = match d.method.to_ascii_lowercase().as_str() {
        "hash" => {
            let slots = d.slots.ok_or_else(|| invalid(path, "missing `slots`"))?;
            let mut map = Vec::with_capacity(d.placement.len());
            for (j, p) in d.placement.iter().enumerate() {
                let at = path.key("placement").index(j);
                let spec = p
                    .slots
                    .as_ref()
                    .ok_or_else(|| invalid(&at, "missing `slots`"))?;
                let (first, last) =
                    parse_slot_spec(spec).map_err(|m| invalid(&at.key("slots"), m))?;
                map.push(SlotRange {
                    first,
                    last,
                    shard: shard_id(shards, &p.shard, &at.key("shard"))?,
                });
            }
            map.sort_by_key(|r| r.first);
            Method::Hash { slots, map }
        }
        "range" => {
            let mut map = Vec::with_capacity(d.placement.len());
            for (j, p) in d.placement.iter().enumerate() {
                let at = path.key("placement").index(j);
                let bound = |key: &str, b: &Option<crate::config::BoundValue>| {
                    b.as_ref()
                        .map(|b| parse_key_bound(b, key_type))
                        .transpose()
                        .map_err(|m| invalid(&at.key(key), m))
                };
                map.push(KeyRange {
                    from: bound("from", &p.from)?,
                    to: bound("to", &p.to)?,
                    shard: shard_id(shards, &p.shard, &at.key("shard"))?,
                });
            }
            map.sort_by(|a, b| a.from.cmp(&b.from));
            Method::Range { map }
        }
        _ => return Err(invalid(&path.key("method"), "unknown method")),
    };
    Ok(Distribution {
        name: d.name.clone(),
        key_type,
        method,
    })
}

/// A readable multi-line description of `t`: shards, each distribution's map, tables,
/// reference tables and the default shard.
pub fn summary(t: &Topology) -> String {
    let mut out = String::new();
    let shard_name = |id: ShardId| t.shards.get(id).map_or("?", |s| s.name.as_str());
    let width = t.shards.iter().map(|s| s.name.len()).max().unwrap_or(0);

    let _ = writeln!(out, "shards ({}):", t.shards.len());
    for s in &t.shards {
        let _ = writeln!(
            out,
            "  {:width$}  {}:{}/{}  (user {})",
            s.name, s.host, s.port, s.database, s.user
        );
    }

    for d in &t.distributions {
        match &d.method {
            Method::Hash { slots, map } => {
                let _ = writeln!(
                    out,
                    "distribution {} (key {}, hash, {slots} slots):",
                    d.name, d.key_type
                );
                for r in map {
                    let n = r.last - r.first + 1;
                    let _ = writeln!(
                        out,
                        "  slots {:>11}  -> {}  ({n} slot{})",
                        format!("{}-{}", r.first, r.last),
                        shard_name(r.shard),
                        if n == 1 { "" } else { "s" }
                    );
                }
            }
            Method::Range { map } => {
                let _ = writeln!(out, "distribution {} (key {}, range):", d.name, d.key_type);
                let shown: Vec<String> = map
                    .iter()
                    .map(|r| {
                        let from = r.from.as_ref().map_or("-inf".into(), ToString::to_string);
                        let to = r.to.as_ref().map_or("+inf".into(), ToString::to_string);
                        let open = if r.from.is_some() { "[" } else { "(" };
                        format!("{open}{from}, {to})")
                    })
                    .collect();
                let w = shown.iter().map(String::len).max().unwrap_or(0);
                for (r, text) in map.iter().zip(&shown) {
                    let _ = writeln!(out, "  {text:w$}  -> {}", shard_name(r.shard));
                }
            }
        }
    }

    let mut tables: Vec<&ShardedTable> = t.tables.values().collect();
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    let _ = writeln!(out, "sharded tables ({}):", tables.len());
    let w = tables.iter().map(|x| x.name.len()).max().unwrap_or(0);
    for tab in tables {
        let dist = t
            .distributions
            .get(tab.distribution)
            .map_or("?", |d| d.name.as_str());
        let _ = writeln!(
            out,
            "  {:w$}  by {}  (distribution {dist})",
            tab.name, tab.column
        );
    }

    let mut refs: Vec<&String> = t.reference_tables.iter().collect();
    refs.sort();
    let refs: Vec<&str> = refs.into_iter().map(String::as_str).collect();
    let _ = writeln!(
        out,
        "reference tables: {}",
        if refs.is_empty() {
            "(none)".to_owned()
        } else {
            refs.join(", ")
        }
    );
    let _ = writeln!(out, "default shard: {}", shard_name(t.default_shard));
    out
}
