//! Parsing a query string with PostgreSQL's grammar (pg_query), and turning a syntax
//! error into a `RouteError` with PostgreSQL's 1-based cursor position.
//!
//! pg_query's Rust API drops the position of a parse error, so on the error path only
//! this module asks libpg_query (already linked through the `pg_query` crate) again
//! through its C entry point, whose error struct carries `cursorpos`.

use std::ffi::{c_char, c_int, CStr, CString};

use super::{sqlstate, RouteError};

/// `PgQueryError` from libpg_query's `pg_query.h`.
#[repr(C)]
struct PgQueryError {
    message: *mut c_char,
    funcname: *mut c_char,
    filename: *mut c_char,
    lineno: c_int,
    cursorpos: c_int,
    context: *mut c_char,
}

/// `PgQueryParseResult` from libpg_query's `pg_query.h`.
#[repr(C)]
struct PgQueryParseResult {
    parse_tree: *mut c_char,
    stderr_buffer: *mut c_char,
    error: *mut PgQueryError,
}

extern "C" {
    fn pg_query_parse(input: *const c_char) -> PgQueryParseResult;
    fn pg_query_free_parse_result(result: PgQueryParseResult);
}

/// Parse `sql` into pg_query's protobuf tree.
pub(crate) fn parse(sql: &str) -> Result<pg_query::ParseResult, RouteError> {
    if sql.contains('\0') {
        return Err(RouteError::new(
            sqlstate::SYNTAX_ERROR,
            "query string contains a zero byte",
        ));
    }
    pg_query::parse(sql, 0).map_err(|e| {
        let (message, position) = error_detail(sql).unwrap_or_else(|| (e.to_string(), None));
        let err = RouteError::new(sqlstate::SYNTAX_ERROR, message);
        match position {
            Some(p) => err.with_position(p),
            None => err,
        }
    })
}

/// Message and 1-based character position of the parse error in `sql`, if any.
fn error_detail(sql: &str) -> Option<(String, Option<u32>)> {
    let input = CString::new(sql).ok()?;
    // SAFETY: `input` is a valid NUL-terminated string that outlives the call; the
    // result is read only before it is freed, exactly once, by libpg_query's own free.
    unsafe {
        let result = pg_query_parse(input.as_ptr());
        let out = if result.error.is_null() {
            None
        } else {
            let err = &*result.error;
            let message = if err.message.is_null() {
                "syntax error".to_owned()
            } else {
                CStr::from_ptr(err.message).to_string_lossy().into_owned()
            };
            let pos = u32::try_from(err.cursorpos).ok().filter(|&p| p > 0);
            Some((message, pos))
        };
        pg_query_free_parse_result(result);
        out
    }
}
