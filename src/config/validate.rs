//! Semantic checks of a parsed config: references, duplicates, and that every
//! distribution places every key on exactly one shard.
//!
//! `check` collects every problem rather than stopping at the first. The parsing helpers
//! here (`parse_slot_spec`, `parse_key_bound`, `fold_identifier`) are also what
//! `topology::build` uses, so a config that passes is one that builds.

use std::collections::HashMap;

use base64::Engine as _;

use super::locate::KeyPath;
use super::{BoundValue, Config, ConfigError, DistributionConfig, SlotSpec};
use crate::topology::{KeyType, KeyValue};

/// Smallest `pool.max_message_bytes` accepted: room for any startup packet.
const MIN_MESSAGE_BYTES: u64 = 1024;

/// Parse a slot interval: `"a-b"` (inclusive), `"a"`, or a YAML integer.
pub fn parse_slot_spec(spec: &SlotSpec) -> Result<(u32, u32), String> {
    let (first, last) = match spec {
        SlotSpec::Single(n) => (*n, *n),
        SlotSpec::Interval(text) => {
            let bad = || format!("`{text}` is not a slot interval like 0-511 or a slot number");
            let num = |s: &str| s.trim().parse::<u32>().map_err(|_| bad());
            match text.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => {
                    let n = num(text)?;
                    (n, n)
                }
            }
        }
    };
    if first > last {
        return Err(format!(
            "slot interval {first}-{last} is backwards (write the smaller slot first)"
        ));
    }
    Ok((first, last))
}

/// Parse a range bound for a key of type `ty`. Integers may be YAML integers or
/// strings; text and uuid bounds must be strings.
pub fn parse_key_bound(bound: &BoundValue, ty: KeyType) -> Result<KeyValue, String> {
    let parsed = match (bound, ty) {
        (BoundValue::Int(v), KeyType::Bigint | KeyType::Int) => {
            Some(KeyValue::Int(*v)).filter(|k| k.fits(ty))
        }
        (BoundValue::Int(v), KeyType::Text | KeyType::Uuid) => {
            return Err(format!(
                "{v} is a number but the key type is {ty}; write it as a quoted string"
            ))
        }
        (BoundValue::Text(s), _) => KeyValue::from_text(s, ty),
    };
    parsed.ok_or_else(|| {
        let shown = match bound {
            BoundValue::Int(v) => v.to_string(),
            BoundValue::Text(s) => format!("\"{s}\""),
        };
        format!("{shown} is not a valid {ty} value")
    })
}

/// Fold an identifier as PostgreSQL does: lower-case unless in double quotes (where `""`
/// stands for one `"`). Names must be unqualified (no schema).
pub fn fold_identifier(name: &str) -> Result<String, String> {
    if let Some(inner) = name.strip_prefix('"') {
        let Some(inner) = inner.strip_suffix('"') else {
            return Err(format!(
                "`{name}` has an opening double quote but no closing one"
            ));
        };
        if inner.replace("\"\"", "").contains('"') {
            return Err(format!(
                "`{name}`: a double quote inside a quoted name must be doubled (\"\")"
            ));
        }
        if inner.is_empty() {
            return Err("a quoted name must not be empty".into());
        }
        return Ok(inner.replace("\"\"", "\""));
    }
    if name.is_empty() {
        return Err("the name must not be empty".into());
    }
    if name.contains('.') {
        return Err(format!(
            "`{name}` looks schema-qualified; give the table or column name alone"
        ));
    }
    let mut chars = name.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_alphabetic() || c == '_');
    if !starts_well
        || !name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '$')
    {
        return Err(format!(
            "`{name}` is not a plain SQL identifier; to use it as written, put it in double \
             quotes inside the YAML string ('\"{name}\"')"
        ));
    }
    Ok(name.to_ascii_lowercase())
}

/// Collects errors, locating each in the source text.
struct Checker<'a> {
    src: &'a str,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    /// An error about the value at `path`.
    fn at(&mut self, path: &KeyPath, message: impl Into<String>) {
        let pos = if self.src.is_empty() {
            None
        } else {
            path.locate(self.src)
        };
        self.push(path, message.into(), pos);
    }

    /// An error about the key that ends `path` (a key that should not be there).
    fn at_key(&mut self, path: &KeyPath, message: impl Into<String>) {
        let pos = if self.src.is_empty() {
            None
        } else {
            path.locate_key(self.src)
        };
        self.push(path, message.into(), pos);
    }

    fn push(&mut self, path: &KeyPath, message: String, pos: Option<(usize, usize)>) {
        let (line, column) = pos.unzip();
        self.errors.push(ConfigError {
            path: path.to_string(),
            message,
            line,
            column,
        });
    }

    fn non_empty(&mut self, path: &KeyPath, value: &str) {
        if value.trim().is_empty() {
            self.at(path, "must not be empty");
        }
    }

    /// Values that end up in tab-separated output and connection strings.
    fn plain_text(&mut self, path: &KeyPath, value: &str) {
        if value.chars().any(char::is_control) {
            self.at(
                path,
                "must not contain tabs, newlines or other control characters",
            );
        }
    }

    fn address(&mut self, path: &KeyPath, value: &str) {
        let ok = value.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
        if !ok {
            self.at(
                path,
                format!("`{value}` is not a host:port address (e.g. 127.0.0.1:6432)"),
            );
        }
    }
}

/// Every problem with `cfg`, in file order.
pub(super) fn check(cfg: &Config) -> Vec<ConfigError> {
    let mut c = Checker {
        src: &cfg.source,
        errors: Vec::new(),
    };
    let root = KeyPath::root();

    c.address(&root.key("listen"), &cfg.listen);
    if let Some(http) = &cfg.http {
        c.address(&root.key("http"), http);
    }
    c.non_empty(&root.key("database"), &cfg.database);

    check_users(&mut c, cfg, &root);
    let shard_ids = check_shards(&mut c, cfg, &root);
    check_pool(&mut c, cfg, &root);

    if !cfg.shards.is_empty() && !shard_ids.contains_key(cfg.default_shard.as_str()) {
        c.at(
            &root.key("default_shard"),
            unknown_shard(&cfg.default_shard, cfg),
        );
    }

    let mut dist_names: HashMap<&str, usize> = HashMap::new();
    for (i, d) in cfg.distributions.iter().enumerate() {
        let path = root.key("distributions").index(i);
        c.non_empty(&path.key("name"), &d.name);
        if let Some(prev) = dist_names.insert(&d.name, i) {
            c.at(
                &path.key("name"),
                format!(
                    "duplicate distribution name `{}` (also distributions[{prev}])",
                    d.name
                ),
            );
        }
        check_distribution(&mut c, cfg, d, &path);
    }

    check_tables(&mut c, cfg, &root, &dist_names);

    c.errors
        .sort_by_key(|e| (e.line.is_none(), e.line, e.column));
    c.errors
}

fn check_users(c: &mut Checker<'_>, cfg: &Config, root: &KeyPath) {
    if cfg.users.is_empty() {
        c.at(&root.key("users"), "at least one user is needed");
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, u) in cfg.users.iter().enumerate() {
        let path = root.key("users").index(i);
        c.non_empty(&path.key("name"), &u.name);
        if let Some(prev) = seen.insert(&u.name, i) {
            c.at(
                &path.key("name"),
                format!("duplicate user name `{}` (also users[{prev}])", u.name),
            );
        }
        c.non_empty(&path.key("password"), &u.password);
        if u.password.starts_with("SCRAM-SHA-256$") && !is_scram_verifier(&u.password) {
            c.at(
                &path.key("password"),
                "malformed SCRAM verifier; expected \
                 SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey> (base64)",
            );
        }
    }
}

/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, as PostgreSQL stores it.
fn is_scram_verifier(s: &str) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some(rest) = s.strip_prefix("SCRAM-SHA-256$") else {
        return false;
    };
    let Some((iter_salt, keys)) = rest.split_once('$') else {
        return false;
    };
    let Some((iterations, salt)) = iter_salt.split_once(':') else {
        return false;
    };
    let Some((stored, server)) = keys.split_once(':') else {
        return false;
    };
    iterations.parse::<u32>().is_ok_and(|n| n > 0)
        && b64.decode(salt).is_ok_and(|v| !v.is_empty())
        && b64.decode(stored).is_ok_and(|v| v.len() == 32)
        && b64.decode(server).is_ok_and(|v| v.len() == 32)
}

fn check_shards<'c>(
    c: &mut Checker<'_>,
    cfg: &'c Config,
    root: &KeyPath,
) -> HashMap<&'c str, usize> {
    if cfg.shards.is_empty() {
        c.at(&root.key("shards"), "at least one shard is needed");
    }
    let mut ids: HashMap<&str, usize> = HashMap::new();
    for (i, s) in cfg.shards.iter().enumerate() {
        let path = root.key("shards").index(i);
        for (key, value) in [
            ("name", &s.name),
            ("host", &s.host),
            ("database", &s.database),
            ("user", &s.user),
        ] {
            c.non_empty(&path.key(key), value);
        }
        for (key, value) in [
            ("name", &s.name),
            ("host", &s.host),
            ("database", &s.database),
            ("user", &s.user),
            ("password", &s.password),
        ] {
            c.plain_text(&path.key(key), value);
        }
        if s.port == 0 {
            c.at(&path.key("port"), "port 0 is not a valid port");
        }
        if let Some(prev) = ids.insert(&s.name, i) {
            c.at(
                &path.key("name"),
                format!("duplicate shard name `{}` (also shards[{prev}])", s.name),
            );
            // Keep the first definition as the one references resolve to.
            ids.insert(&cfg.shards[prev].name, prev);
        }
    }
    ids
}

fn check_pool(c: &mut Checker<'_>, cfg: &Config, root: &KeyPath) {
    let path = root.key("pool");
    let p = &cfg.pool;
    if p.size == 0 {
        c.at(&path.key("size"), "pool size must be at least 1");
    }
    if p.connect_timeout_ms == 0 {
        c.at(&path.key("connect_timeout_ms"), "must be at least 1 ms");
    }
    if p.checkout_timeout_ms == 0 {
        c.at(&path.key("checkout_timeout_ms"), "must be at least 1 ms");
    }
    if p.max_message_bytes < MIN_MESSAGE_BYTES {
        c.at(
            &path.key("max_message_bytes"),
            format!("must be at least {MIN_MESSAGE_BYTES} bytes"),
        );
    }
}

fn unknown_shard(name: &str, cfg: &Config) -> String {
    let mut known: Vec<&str> = cfg.shards.iter().map(|s| s.name.as_str()).collect();
    known.dedup();
    format!(
        "unknown shard `{name}`; the shards are: {}",
        known.join(", ")
    )
}

fn check_distribution(c: &mut Checker<'_>, cfg: &Config, d: &DistributionConfig, path: &KeyPath) {
    let key_type = KeyType::parse(&d.key_type.to_ascii_lowercase());
    if key_type.is_none() {
        c.at(
            &path.key("key_type"),
            format!(
                "unknown key_type `{}`; expected bigint, int, text or uuid",
                d.key_type
            ),
        );
    }
    for (j, p) in d.placement.iter().enumerate() {
        if !cfg.shards.iter().any(|s| s.name == p.shard) {
            let at = path.key("placement").index(j).key("shard");
            c.at(&at, unknown_shard(&p.shard, cfg));
        }
    }
    match d.method.to_ascii_lowercase().as_str() {
        "hash" => check_hash(c, d, path),
        "range" => check_range(c, d, key_type, path),
        other => c.at(
            &path.key("method"),
            format!("unknown method `{other}`; expected hash or range"),
        ),
    }
}

fn show_slots(first: u32, last: u32) -> String {
    if first == last {
        format!("slot {first}")
    } else {
        format!("slots {first}-{last}")
    }
}

fn check_hash(c: &mut Checker<'_>, d: &DistributionConfig, path: &KeyPath) {
    let slots = match d.slots {
        None => {
            c.at(
                path,
                "a hash distribution needs `slots`, the number of hash slots (e.g. 1024)",
            );
            None
        }
        Some(0) => {
            c.at(&path.key("slots"), "slots must be at least 1");
            None
        }
        Some(n) => Some(n),
    };
    let mut intervals: Vec<(u32, u32, usize)> = Vec::new();
    let mut complete = true;
    for (j, p) in d.placement.iter().enumerate() {
        let at = path.key("placement").index(j);
        for (key, present) in [("from", p.from.is_some()), ("to", p.to.is_some())] {
            if present {
                c.at_key(
                    &at.key(key),
                    format!("`{key}` is for range distributions; hash placements use `slots`"),
                );
            }
        }
        let Some(spec) = &p.slots else {
            c.at(
                &at,
                "missing `slots` (a slot interval like 0-511, or one slot number)",
            );
            complete = false;
            continue;
        };
        match parse_slot_spec(spec) {
            Err(msg) => {
                c.at(&at.key("slots"), msg);
                complete = false;
            }
            Ok((first, last)) => match slots {
                Some(n) if last >= n => {
                    c.at(
                        &at.key("slots"),
                        format!(
                            "{} are outside 0-{} (the distribution has {n} slots)",
                            show_slots(first, last),
                            n - 1
                        ),
                    );
                    complete = false;
                }
                _ => intervals.push((first, last, j)),
            },
        }
    }
    let Some(n) = slots else {
        return;
    };

    intervals.sort_by_key(|&(first, _, j)| (first, j));
    // The interval reaching furthest so far: any later interval starting at or before
    // its end overlaps it.
    let mut reach: Option<(u32, u32, usize)> = None;
    for &(first, last, j) in &intervals {
        if let Some((rf, rl, rj)) = reach {
            if first <= rl {
                c.at(
                    &path.key("placement").index(j).key("slots"),
                    format!(
                        "{} overlap {rf}-{rl} (placement[{rj}], shard {})",
                        show_slots(first, last),
                        d.placement[rj].shard
                    ),
                );
            }
        }
        if reach.is_none_or(|(_, rl, _)| last > rl) {
            reach = Some((first, last, j));
        }
    }

    if !complete {
        return;
    }
    let mut gaps: Vec<(u32, u32)> = Vec::new();
    let mut next: u64 = 0;
    for &(first, last, _) in &intervals {
        if u64::from(first) > next {
            // `next` < `first` <= u32::MAX here, so it fits.
            gaps.push((next as u32, first - 1));
        }
        next = next.max(u64::from(last) + 1);
    }
    if next < u64::from(n) {
        gaps.push((next as u32, n - 1));
    }
    if !gaps.is_empty() {
        let mut shown: Vec<String> = gaps
            .iter()
            .take(8)
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        if gaps.len() > 8 {
            shown.push(format!("and {} more intervals", gaps.len() - 8));
        }
        c.at(
            &path.key("placement"),
            format!(
                "slots {} are not placed on any shard (placements must cover 0-{})",
                shown.join(", "),
                n - 1
            ),
        );
    }
}

fn show_bound(b: Option<&KeyValue>, below: bool) -> String {
    match b {
        Some(v) => v.to_string(),
        None if below => "-inf".into(),
        None => "+inf".into(),
    }
}

fn check_range(
    c: &mut Checker<'_>,
    d: &DistributionConfig,
    key_type: Option<KeyType>,
    path: &KeyPath,
) {
    if d.slots.is_some() {
        c.at_key(
            &path.key("slots"),
            "`slots` is only for hash distributions; a range distribution places keys by \
             `from`/`to`",
        );
    }
    let mut pieces: Vec<(Option<KeyValue>, Option<KeyValue>, usize)> = Vec::new();
    let mut complete = key_type.is_some();
    for (j, p) in d.placement.iter().enumerate() {
        let at = path.key("placement").index(j);
        if p.slots.is_some() {
            c.at_key(
                &at.key("slots"),
                "`slots` is for hash distributions; range placements use `from`/`to`",
            );
        }
        let Some(ty) = key_type else {
            continue;
        };
        let mut parse = |key: &str, b: &Option<BoundValue>| match b {
            None => Some(None),
            Some(b) => match parse_key_bound(b, ty) {
                Ok(v) => Some(Some(v)),
                Err(msg) => {
                    c.at(&at.key(key), msg);
                    None
                }
            },
        };
        let (Some(from), Some(to)) = (parse("from", &p.from), parse("to", &p.to)) else {
            complete = false;
            continue;
        };
        if let (Some(f), Some(t)) = (&from, &to) {
            if f >= t {
                c.at(
                    &at,
                    format!("empty range: from {f} is not below to {t} (ranges are [from, to))"),
                );
                complete = false;
                continue;
            }
        }
        pieces.push((from, to, j));
    }
    if !complete {
        return;
    }
    if pieces.is_empty() {
        c.at(
            &path.key("placement"),
            "no key ranges: every key must be placed on a shard (e.g. `- { shard: s0 }` for all keys)",
        );
        return;
    }
    // `None < Some(_)`, so an unbounded `from` sorts first, as it should.
    pieces.sort_by(|a, b| (&a.0, a.2).cmp(&(&b.0, b.2)));
    let (first_from, _, first_j) = &pieces[0];
    if let Some(f) = first_from {
        c.at(
            &path.key("placement").index(*first_j),
            format!(
                "keys below {f} are not placed on any shard (leave out `from` on the lowest range)"
            ),
        );
    }
    // The piece reaching furthest so far (`None` = to +inf).
    let mut reach: Option<(Option<KeyValue>, usize)> = None;
    for (from, to, j) in &pieces {
        if let Some((reach_to, rj)) = &reach {
            let at = path.key("placement").index(*j);
            let this = format!(
                "[{}, {})",
                show_bound(from.as_ref(), true),
                show_bound(to.as_ref(), false)
            );
            let prev = &d.placement[*rj];
            match (reach_to, from) {
                (Some(t), Some(f)) if t < f => c.at(
                    &at,
                    format!("keys [{t}, {f}) are not placed on any shard (gap before this range)"),
                ),
                (Some(t), Some(f)) if t == f => {}
                _ => c.at(
                    &at,
                    format!(
                        "range {this} overlaps placement[{rj}] (shard {}), which reaches {}",
                        prev.shard,
                        show_bound(reach_to.as_ref(), false)
                    ),
                ),
            }
        }
        let further = match (&reach, to) {
            (None, _) => true,
            (Some((None, _)), _) => false,
            (Some(_), None) => true,
            (Some((Some(r), _)), Some(t)) => t > r,
        };
        if further {
            reach = Some((to.clone(), *j));
        }
    }
    if let Some((Some(t), rj)) = &reach {
        c.at(
            &path.key("placement").index(*rj),
            format!(
                "keys from {t} up are not placed on any shard (leave out `to` on the highest range)"
            ),
        );
    }
}

fn check_tables(
    c: &mut Checker<'_>,
    cfg: &Config,
    root: &KeyPath,
    dist_names: &HashMap<&str, usize>,
) {
    let mut seen: HashMap<String, String> = HashMap::new();
    for (i, t) in cfg.tables.iter().enumerate() {
        let path = root.key("tables").index(i);
        match fold_identifier(&t.name) {
            Err(msg) => c.at(&path.key("name"), msg),
            Ok(name) => {
                if let Some(prev) = first_use(&mut seen, name.clone(), format!("tables[{i}]")) {
                    c.at(
                        &path.key("name"),
                        format!("duplicate table `{name}` (also {prev})"),
                    );
                }
            }
        }
        if let Err(msg) = fold_identifier(&t.column) {
            c.at(&path.key("column"), msg);
        }
        if !dist_names.contains_key(t.distribution.as_str()) {
            let known: Vec<&str> = cfg.distributions.iter().map(|d| d.name.as_str()).collect();
            c.at(
                &path.key("distribution"),
                format!(
                    "unknown distribution `{}`; the distributions are: {}",
                    t.distribution,
                    if known.is_empty() {
                        "(none)".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            );
        }
    }
    for (i, name) in cfg.reference_tables.iter().enumerate() {
        let path = root.key("reference_tables").index(i);
        match fold_identifier(name) {
            Err(msg) => c.at(&path, msg),
            Ok(folded) => {
                if let Some(prev) =
                    first_use(&mut seen, folded.clone(), format!("reference_tables[{i}]"))
                {
                    let why = if prev.starts_with("tables") {
                        "; a table is either sharded or a reference table"
                    } else {
                        ""
                    };
                    c.at(
                        &path,
                        format!("duplicate table `{folded}` (also {prev}){why}"),
                    );
                }
            }
        }
    }
}

/// Record where `name` is first used; on a later use, return the first place.
fn first_use(seen: &mut HashMap<String, String>, name: String, here: String) -> Option<String> {
    match seen.entry(name) {
        std::collections::hash_map::Entry::Occupied(e) => Some(e.get().clone()),
        std::collections::hash_map::Entry::Vacant(e) => {
            e.insert(here);
            None
        }
    }
}
