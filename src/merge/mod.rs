//! Relaying shard responses to the client: pass-through for one shard, and combining the
//! answers of several shards for a fan-out.
//!
//! The session describes what the client is waiting for as a queue of `Step`s, one per
//! message the client sent (plus responses to messages the router injected, which are
//! swallowed, and answers the router gives itself, which are spliced in at their place).
//! ReadyForQuery is never forwarded: the session writes its own, carrying the
//! transaction status of the whole client session.

mod multi;
mod single;

use bytes::Bytes;

pub use multi::relay_multi;
pub use single::{relay_point, relay_single};

use crate::backend::BackendError;
use crate::frontend::client::ClientError;
use crate::protocol::PgError;

/// Which client message a server response answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// A simple Query: everything up to ReadyForQuery.
    Query,
    Parse,
    Bind,
    /// Describe of a statement: ParameterDescription, then RowDescription or NoData.
    DescribeStatement,
    /// Describe of a portal: RowDescription or NoData.
    DescribePortal,
    /// Describe of a statement that the router sends to learn the statement's shape:
    /// never forwarded; the relay records the answer in `Outcome::shapes`.
    Shape,
    Execute,
    Close,
    Sync,
}

impl StepKind {
    /// Whether a frame with `tag` is the last one answering this step.
    fn is_terminal(self, tag: u8) -> bool {
        match self {
            StepKind::Query | StepKind::Sync => tag == b'Z',
            StepKind::Parse => tag == b'1',
            StepKind::Bind => tag == b'2',
            StepKind::Close => tag == b'3',
            StepKind::DescribeStatement | StepKind::DescribePortal | StepKind::Shape => {
                tag == b'T' || tag == b'n'
            }
            StepKind::Execute => matches!(tag, b'C' | b'I' | b's'),
        }
    }

    /// Whether the server, after an error in this step, skips everything up to Sync.
    fn skips_to_sync(self) -> bool {
        !matches!(self, StepKind::Query | StepKind::Sync)
    }
}

/// One thing the client is owed, in order.
#[derive(Debug, Clone)]
pub enum Step {
    /// An answer the router gives itself (e.g. ParseComplete for a Parse it handled).
    Synthetic(Bytes),
    /// The servers' answer to a message sent to them; `forward: false` for a message the
    /// router injected (a Parse re-creating a statement on this connection).
    Server { kind: StepKind, forward: bool },
}

/// How combined CommandComplete tags are formed for a fan-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// Row counts are added up (reads and writes spread over shards).
    Sum,
    /// Every shard did the same thing (reference-table writes, DDL): report one shard's.
    Replicated,
}

/// What a relay saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// An ErrorResponse reached the client.
    pub error: bool,
    /// The server(s) will skip messages until the client's next Sync (an error in the
    /// extended protocol with no Sync yet in this batch).
    pub skipping: bool,
    /// How many server steps completed before the first error (the index of the step
    /// that failed).
    pub failed_step: Option<usize>,
    /// A notice, ParameterStatus or notification was relayed.
    pub async_frames: bool,
    /// What only some relays see (boxed, so the common answer stays small).
    pub rare: Option<Box<RareOutcome>>,
}

/// The parts of an `Outcome` that only some relays have.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RareOutcome {
    /// The answers to the `StepKind::Shape` steps, in order.
    pub shapes: Vec<StatementShape>,
    /// The first ErrorResponse (as the shard sent it).
    pub first_error: Option<Bytes>,
}

/// What a prepared statement looks like to a client: the answer to Describe of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementShape {
    /// The parameter types (ParameterDescription).
    pub params: Vec<u32>,
    /// The comparable part of its RowDescription (`row_shape`); `None` for NoData.
    pub rows: Option<Vec<u8>>,
}

impl Outcome {
    /// The answers to the `StepKind::Shape` steps, in order.
    pub fn shapes(&self) -> &[StatementShape] {
        self.rare.as_ref().map_or(&[], |r| &r.shapes)
    }

    /// The first ErrorResponse (as the shard sent it), from a single-shard relay.
    pub fn first_error(&self) -> Option<&[u8]> {
        self.rare.as_ref().and_then(|r| r.first_error.as_deref())
    }

    fn rare(&mut self) -> &mut RareOutcome {
        self.rare.get_or_insert_default()
    }

    /// Record a frame answering a `StepKind::Shape` step (ParameterDescription, then
    /// RowDescription or NoData).
    fn record_shape(&mut self, frame: &[u8]) {
        let body = frame.get(5..).unwrap_or_default();
        match frame.first() {
            Some(b't') => {
                // A malformed one (never sent by PostgreSQL) matches no real shape.
                let params = crate::protocol::messages::parse_parameter_description(body)
                    .unwrap_or_else(|_| vec![u32::MAX]);
                self.rare()
                    .shapes
                    .push(StatementShape { params, rows: None });
            }
            Some(b'T') => {
                if let Some(last) = self.rare().shapes.last_mut() {
                    last.rows = Some(row_shape(body));
                }
            }
            _ => {}
        }
    }
}

/// The comparable part of a RowDescription body: column names, types, typmods and
/// formats (table OIDs and column numbers differ between shards and are left out, as
/// PostgreSQL leaves them out when it checks that a cached plan's result type stayed).
fn row_shape(body: &[u8]) -> Vec<u8> {
    let mut shape = Vec::with_capacity(body.len());
    if body.len() < 2 {
        return body.to_vec();
    }
    shape.extend_from_slice(&body[..2]);
    let mut pos = 2;
    while pos < body.len() {
        let Some(end) = body[pos..].iter().position(|b| *b == 0) else {
            shape.extend_from_slice(&body[pos..]);
            break;
        };
        shape.extend_from_slice(&body[pos..pos + end + 1]);
        pos += end + 1;
        // table oid (4) and attnum (2) skipped; type oid 4, typlen 2, typmod 4, format 2 kept.
        let fixed = body.get(pos..pos + 18).unwrap_or(&[]);
        if fixed.len() == 18 {
            shape.extend_from_slice(&fixed[6..]);
        }
        pos += 18;
    }
    shape
}

/// Why a relay stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The router refuses to merge what the shards sent (e.g. differing row shapes).
    #[error("{0}")]
    Refused(PgError),
}

/// The next frame from `conn`. Before waiting on the shard, a notice or error the client
/// is owed is flushed (PostgreSQL sends those at once; other answers wait for the end of
/// the request, so a pipelined batch costs one write to the client); while waiting, the client's socket is watched too, so a client that
/// goes away cancels its statement instead of leaving it running on the shard.
/// Cancel-safe.
pub(crate) async fn next_frame(
    conn: &mut crate::backend::ServerConn,
    client: &mut crate::frontend::client::ClientConn,
) -> Result<bytes::BytesMut, RelayError> {
    let n = next_frame_len(conn, client).await?;
    Ok(conn.read_raw_buffered(n))
}

/// As `next_frame`, but the frame stays in `conn`'s buffer: its length is returned, the
/// bytes are `conn.frame(n)` until `conn.consume(n)`. Cancel-safe.
pub(crate) async fn next_frame_len(
    conn: &mut crate::backend::ServerConn,
    client: &mut crate::frontend::client::ClientConn,
) -> Result<usize, RelayError> {
    if let Some(n) = conn.buffered_frame()? {
        return Ok(n);
    }
    if client.flush_soon {
        client.flush().await?;
    }
    // No timer here: arming one per wait makes tokio wake its own driver (an eventfd
    // write and an extra epoll_wait per statement). Watching the client's socket from
    // the start costs nothing extra either: the one read that finds it empty would
    // otherwise happen when the session next waits for the client.
    loop {
        tokio::select! {
            biased;
            n = conn.ready_frame() => return Ok(n?),
            r = client.fill(), if client.buffered() < (1 << 20) => {
                if let Err(e) = r {
                    conn.broken = true;
                    let (addr, pid, secret) = (conn.addr, conn.pid, conn.secret);
                    tokio::spawn(async move {
                        let _ = crate::backend::conn::cancel(addr, pid, secret).await;
                    });
                    return Err(RelayError::Client(e));
                }
            }
        }
    }
}

/// A shard's ErrorResponse as the client should see it. A FATAL from a shard ends that
/// shard connection, not the client's session, so it is reported as an ERROR saying the
/// shard connection was lost (with the shard's message).
pub(crate) fn client_error(frame: &[u8], shard: &str) -> Option<PgError> {
    let body = frame.get(5..)?;
    let mut severity = &b""[..];
    for field in body.split(|b| *b == 0) {
        if field.first() == Some(&b'S') {
            severity = &field[1..];
            break;
        }
    }
    if severity != b"FATAL" && severity != b"PANIC" {
        return None;
    }
    let (code, msg) = crate::protocol::error::summarize_error(body);
    Some(
        PgError::error(
            crate::protocol::sqlstate::CONNECTION_FAILURE,
            format!("connection to shard \"{shard}\" was lost: {msg}"),
        )
        .with_detail(format!("the shard reported SQLSTATE {code}")),
    )
}

/// Drop queued steps up to (not including) the next Sync; returns whether one was found.
fn skip_to_sync(steps: &mut std::collections::VecDeque<Step>) -> bool {
    while let Some(s) = steps.front() {
        if matches!(
            s,
            Step::Server {
                kind: StepKind::Sync,
                ..
            }
        ) {
            return true;
        }
        steps.pop_front();
    }
    false
}
