//! The SQLSTATE codes the router itself raises. Backend errors never pass through here.
//!
//! Each constant is a real PostgreSQL code, chosen to be what PostgreSQL would say for
//! the nearest equivalent situation.

/// A statement shape the router cannot execute correctly across shards.
pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
/// The statement does not parse with PostgreSQL's grammar.
pub const SYNTAX_ERROR: &str = "42601";
/// A shard-key literal or text parameter that is not a valid value of the key type
/// (`user_id = 'abc'` for a bigint key), as PostgreSQL's input functions report it.
pub const INVALID_TEXT_REPRESENTATION: &str = "22P02";
/// A binary Bind parameter for a shard key whose bytes do not decode as the key type.
pub const INVALID_BINARY_REPRESENTATION: &str = "22P03";
/// An integer key literal outside the key type's range in an INSERT.
pub const NUMERIC_VALUE_OUT_OF_RANGE: &str = "22003";
/// No placement of the distribution covers the key. PostgreSQL raises this code for
/// "no partition of relation found for row", the closest analogue.
pub const CHECK_VIOLATION: &str = "23514";
/// An INSERT into a sharded table gives NULL as the shard key.
pub const NOT_NULL_VIOLATION: &str = "23502";
