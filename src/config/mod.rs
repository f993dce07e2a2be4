//! shard-config.yaml: the serde model, loading, and validation with line/column errors.
//!
//! The file format is a contract with operators and tests (see DESIGN.md): existing keys
//! keep their names and meanings; new keys must be optional. This module only describes
//! and checks the file; turning a valid config into a `Topology` is `topology::build`.
//!
//! Loading happens in three steps, each of which reports every problem it can find:
//! 1. YAML syntax (one error, from the parser, with its position);
//! 2. unknown keys anywhere in the file (all of them, each with its line);
//! 3. typed deserialization (wrong types, missing required keys) and then
//!    [`Config::validate`] (coverage, overlaps, references, duplicates, …).

mod error;
mod keys;
mod locate;
mod validate;

#[cfg(test)]
mod tests;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use error::{ConfigError, LoadError};
pub use locate::{KeyPath, Segment};
pub use validate::{fold_identifier, parse_key_bound, parse_slot_spec};

/// Default address clients connect to.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:6432";
/// Default frontend message size limit: 1 GiB, PostgreSQL's own ceiling for a message.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 1 << 30;

/// The whole shard-config.yaml file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `host:port` the router accepts client connections on (default `127.0.0.1:6432`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `host:port` for the HTTP endpoints `/metrics` and `/healthz`; absent = no HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// The database name clients ask for in their startup message.
    pub database: String,
    /// Who may connect to the router. At least one.
    pub users: Vec<UserConfig>,
    /// The PostgreSQL servers holding the data, in order; a shard's id is its index here.
    pub shards: Vec<ShardConfig>,
    /// Backend connection pool settings (all keys optional).
    #[serde(default)]
    pub pool: PoolConfig,
    /// Shard for catalog queries, unsharded tables and statements without a table.
    pub default_shard: String,
    /// Named key spaces (range or hash) and which shard owns which part of them.
    #[serde(default)]
    pub distributions: Vec<DistributionConfig>,
    /// Sharded tables: which column is the shard key and which distribution it uses.
    #[serde(default)]
    pub tables: Vec<TableConfig>,
    /// Tables copied to every shard: reads go to any shard, writes to all of them.
    #[serde(default)]
    pub reference_tables: Vec<String>,
    /// The YAML text this config was parsed from, kept so that `validate()` can point at
    /// lines; empty for configs built in code (their errors then carry no position).
    #[serde(skip)]
    pub source: String,
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_owned()
}

/// A user allowed to connect to the router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The user name clients send in their startup message.
    pub name: String,
    /// Plaintext password, or a PostgreSQL SCRAM verifier
    /// (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`, as in `pg_authid`),
    /// so that plaintext need not be stored.
    pub password: String,
    /// Whether this user may use the admin console (`SHOW …`, `RELOAD`, rebalancing).
    #[serde(default)]
    pub admin: bool,
}

/// One PostgreSQL server (shard) and the credentials the router uses to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// Operator-facing name (`s0`), referenced by `placement` and `default_shard`.
    pub name: String,
    /// Host name or IP address of the server.
    pub host: String,
    /// TCP port of the server (1–65535).
    pub port: u16,
    /// Database on that server (may differ from the name clients ask for).
    pub database: String,
    /// Role the router logs in as.
    pub user: String,
    /// That role's password (sent with SCRAM-SHA-256, MD5 or cleartext as the server asks).
    pub password: String,
}

/// How backend connections are pooled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Maximum server connections per shard (default 20).
    #[serde(default = "default_pool_size")]
    pub size: u32,
    /// How long to wait for a new server connection, in milliseconds (default 3000).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// How long a client waits for a pooled connection, in milliseconds (default 5000).
    #[serde(default = "default_checkout_timeout_ms")]
    pub checkout_timeout_ms: u64,
    /// `transaction` (default): a server connection is held for one transaction;
    /// `session`: for the client's whole session.
    #[serde(default)]
    pub mode: PoolMode,
    /// Largest message a client may send, in bytes (default 1 GiB = 1073741824, the
    /// PostgreSQL limit). A client announcing a longer message is refused with an error
    /// before the router buffers it, which bounds the memory one client can take.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
    /// Keep a client's unnamed extended-protocol query (Parse "" before every Bind, as
    /// pgbench -M extended and many drivers send) as a named statement on each server
    /// connection from its text's second use on, shared by clients with the same
    /// settings, so the shard parses and plans a repeated text once per connection
    /// instead of on every execution (default true). PostgreSQL then plans it as it plans any prepared statement
    /// (custom plans first, a generic plan when it is no costlier).
    #[serde(default = "default_true")]
    pub reuse_unnamed_statements: bool,
    /// Run a single-table SELECT sent with the simple protocol that pins the shard key to
    /// its only literal (`… WHERE id = 42`) as a statement kept on server connections, with
    /// the literal as its parameter, from the text's second shape-equal use on (default
    /// true). The shard then parses and plans such queries once per connection, as it does
    /// for prepared statements.
    #[serde(default = "default_true")]
    pub prepare_point_queries: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: default_pool_size(),
            connect_timeout_ms: default_connect_timeout_ms(),
            checkout_timeout_ms: default_checkout_timeout_ms(),
            mode: PoolMode::default(),
            max_message_bytes: default_max_message_bytes(),
            reuse_unnamed_statements: true,
            prepare_point_queries: true,
        }
    }
}

fn default_pool_size() -> u32 {
    20
}
fn default_connect_timeout_ms() -> u64 {
    3000
}
fn default_checkout_timeout_ms() -> u64 {
    5000
}
fn default_true() -> bool {
    true
}
fn default_max_message_bytes() -> u64 {
    DEFAULT_MAX_MESSAGE_BYTES
}

/// When a pooled server connection goes back to the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// After each transaction (or each statement outside a transaction).
    #[default]
    Transaction,
    /// When the client disconnects.
    Session,
}

/// A named key space: key type, method, and the map from key or slot ranges to shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributionConfig {
    /// Name referenced by `tables[].distribution`.
    pub name: String,
    /// SQL type of the key: `bigint`, `int`, `text` or `uuid` (also accepted: `int8`,
    /// `int4`, `integer`, `varchar`). Kept as text so that a typo is reported together
    /// with every other problem instead of stopping the parse.
    pub key_type: String,
    /// `hash` (slot = hash(key) mod slots) or `range` (half-open key intervals).
    pub method: String,
    /// Number of hash slots (hash only), e.g. 1024. Fixed for the life of the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<u32>,
    /// Which shard owns which slots (hash) or key intervals (range). Together the
    /// entries must cover the key space exactly once.
    pub placement: Vec<PlacementConfig>,
}

/// One entry of a distribution's placement: `{ slots, shard }` for hash distributions,
/// `{ from?, to?, shard }` for range distributions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementConfig {
    /// Hash only: an inclusive slot interval `"a-b"` or a single slot number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<SlotSpec>,
    /// Range only: inclusive lower bound; absent = unbounded below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<BoundValue>,
    /// Range only: exclusive upper bound; absent = unbounded above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<BoundValue>,
    /// Name of the shard that owns these keys.
    pub shard: String,
}

/// A slot interval as written: `0-511` (a YAML string) or `7` (a YAML integer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SlotSpec {
    /// A single slot.
    Single(u32),
    /// `"first-last"`, inclusive (a single number as a string is accepted too).
    Interval(String),
}

/// A range bound as written: a YAML integer (integer keys) or a string (any key type,
/// parsed in PostgreSQL's text format for the distribution's key type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BoundValue {
    Int(i64),
    Text(String),
}

/// A sharded table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Unqualified table name; folded to lower case unless written in double quotes
    /// (`'"Orders"'`), as PostgreSQL does with identifiers.
    pub name: String,
    /// The shard-key column (folded the same way).
    pub column: String,
    /// Name of the distribution the key belongs to.
    pub distribution: String,
}

impl Config {
    /// Parse YAML text. Reports syntax errors, every unknown key, and type errors; does
    /// not check cross-references or coverage (that is [`Config::validate`]).
    pub fn from_yaml(src: &str) -> Result<Config, Vec<ConfigError>> {
        let mut value: serde_norway::Value =
            serde_norway::from_str(src).map_err(|e| vec![ConfigError::from_yaml_error(&e)])?;
        // `<<` merge keys are applied by the typed parse too; apply them here so that
        // the unknown-key walk sees the same mappings.
        value
            .apply_merge()
            .map_err(|e| vec![ConfigError::from_yaml_error(&e)])?;
        let unknown = keys::unknown_keys(&value, src);
        if !unknown.is_empty() {
            return Err(unknown);
        }
        let mut cfg: Config =
            serde_norway::from_str(src).map_err(|e| vec![ConfigError::from_yaml_error(&e)])?;
        cfg.source = src.to_owned();
        Ok(cfg)
    }

    /// Read, parse and validate a config file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, LoadError> {
        let path = path.as_ref();
        let src = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = Config::from_yaml(&src).map_err(LoadError::Invalid)?;
        cfg.validate().map_err(LoadError::Invalid)?;
        Ok(cfg)
    }

    /// Serialize back to YAML (without comments).
    pub fn to_yaml(&self) -> Result<String, serde_norway::Error> {
        serde_norway::to_string(self)
    }

    /// Every problem with this config, each naming its key path and, when the config
    /// came from text, its line and column. `Ok` means `topology::build` will succeed.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let errors = validate::check(self);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}
