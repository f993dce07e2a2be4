//! Fan-out relay: the same messages ran on several shards; their answers become one.
//!
//! Per step, each shard's answer is read in turn: rows are streamed to the client as they
//! come, the first shard's RowDescription is forwarded and every other shard's must
//! describe the same columns, CommandComplete counts are added up (or, for replicated
//! writes, one shard's is reported) and the first error wins.

use std::collections::VecDeque;

use bytes::BytesMut;

use super::{row_shape, skip_to_sync, Combine, Outcome, RelayError, Step, StepKind};
use crate::backend::ServerConn;
use crate::frontend::client::ClientConn;
use crate::protocol::messages;
use crate::protocol::{sqlstate, PgError};

/// Relay `steps` answered by every connection in `conns`.
pub async fn relay_multi(
    conns: &mut [&mut ServerConn],
    client: &mut ClientConn,
    steps: &mut VecDeque<Step>,
    combine: Combine,
) -> Result<Outcome, RelayError> {
    let mut out = Outcome::default();
    // Shards that hit an error and now skip to the next Sync.
    let mut skipping = vec![false; conns.len()];
    while let Some(step) = steps.pop_front() {
        let (kind, forward) = match step {
            Step::Synthetic(b) => {
                client.wbuf.extend_from_slice(&b);
                continue;
            }
            Step::Server { kind, forward } => (kind, forward),
        };
        let mut acc = StepAccumulator::default();
        for (i, conn) in conns.iter_mut().enumerate() {
            if skipping[i] && kind != StepKind::Sync {
                continue;
            }
            if kind == StepKind::Sync {
                skipping[i] = false;
            }
            loop {
                let frame = super::next_frame(conn, client).await?;
                let tag = frame[0];
                let terminal = kind.is_terminal(tag);
                if kind == StepKind::Shape {
                    out.record_shape(&frame);
                    if tag == b't' {
                        // Parameter types must agree as result columns must.
                        let params = &frame[5..];
                        match &acc.params {
                            None => acc.params = Some(params.to_vec()),
                            Some(first) if first[..] != *params => {
                                acc.refusal.get_or_insert_with(|| {
                                    shards_differ(&conn.shard_name, "infers other parameter types")
                                });
                            }
                            Some(_) => {}
                        }
                    }
                }
                match tag {
                    b'N' | b'A' => {
                        client.wbuf.extend_from_slice(&frame);
                        client.flush_soon = true;
                    }
                    b'S' => {
                        if i == 0 {
                            client.wbuf.extend_from_slice(&frame);
                        }
                    }
                    b'E' => {
                        let frame = match super::client_error(&frame, &conn.shard_name) {
                            Some(e) => {
                                conn.broken = true;
                                let mut b = BytesMut::new();
                                e.encode(&mut b);
                                b
                            }
                            None => frame,
                        };
                        acc.error.get_or_insert(frame);
                        if kind.skips_to_sync() {
                            skipping[i] = true;
                            break;
                        }
                    }
                    b'T' => {
                        let shape = row_shape(&frame[5..]);
                        match &acc.shape {
                            None => {
                                acc.shape = Some(shape);
                                if forward && acc.error.is_none() {
                                    client.wbuf.extend_from_slice(&frame);
                                }
                            }
                            Some(first) if *first != shape => {
                                acc.refusal.get_or_insert_with(|| {
                                    shards_differ(
                                        &conn.shard_name,
                                        "returned different result columns",
                                    )
                                });
                            }
                            Some(_) => {}
                        }
                    }
                    b'D' => {
                        // A replicated write's RETURNING rows are the same on every
                        // shard: the first shard's are the answer.
                        let wanted = combine == Combine::Sum || i == 0;
                        if wanted && forward && acc.error.is_none() && acc.refusal.is_none() {
                            client.wbuf.extend_from_slice(&frame);
                        }
                    }
                    b'C' => acc.add_tag(messages::command_tag(&frame[5..]), combine),
                    b's' => {
                        acc.refusal.get_or_insert_with(|| {
                            PgError::error(sqlstate::FEATURE_NOT_SUPPORTED, "row-limited Execute of a statement that spans shards is not supported")
                                .with_hint("fetch the whole result (max_rows 0), or add a shard-key condition")
                        });
                    }
                    b'G' | b'H' => {
                        acc.refusal.get_or_insert_with(|| {
                            PgError::error(
                                sqlstate::FEATURE_NOT_SUPPORTED,
                                "COPY across shards is not supported",
                            )
                            .with_hint("COPY into or out of each shard directly")
                        });
                        if tag == b'G' {
                            messages::cstr_message(
                                &mut conn.wbuf,
                                b'f',
                                &["COPY across shards is not supported"],
                            );
                            conn.flush().await?;
                        }
                    }
                    b'd' | b'c' => {}
                    _ => {
                        // ParseComplete, BindComplete, CloseComplete, NoData,
                        // ParameterDescription, EmptyQueryResponse: the first shard's.
                        if i == 0 && forward && tag != b'Z' {
                            acc.passthrough.extend_from_slice(&frame);
                        }
                    }
                }
                if terminal {
                    break;
                }
            }
            if client.wbuf.len() > 64 * 1024 {
                client.flush().await?;
            }
        }
        if let Some(refusal) = acc.refusal {
            refusal.encode(&mut client.wbuf);
            out.error = true;
        } else if let Some(err) = acc.error {
            client.wbuf.extend_from_slice(&err);
            out.error = true;
        } else {
            client.wbuf.extend_from_slice(&acc.passthrough);
            if forward {
                if let Some(tag) = acc.tag() {
                    messages::command_complete(&mut client.wbuf, &tag);
                }
            }
            continue;
        }
        if kind.skips_to_sync() && !skip_to_sync(steps) {
            out.skipping = true;
        }
    }
    Ok(out)
}

/// The refusal when `shard` disagrees with the others about a statement (`what` it
/// did: "returned different result columns", …).
fn shards_differ(shard: &str, what: &str) -> PgError {
    PgError::error(
        sqlstate::DATATYPE_MISMATCH,
        format!("shard \"{shard}\" {what} than the others"),
    )
    .with_hint("the shards' schemas differ; make every shard's tables identical")
}

/// What one step's answers add up to across shards.
#[derive(Default)]
struct StepAccumulator {
    /// Column names, types, typmods and formats of the first RowDescription (table OIDs
    /// and column numbers differ between shards and are left out).
    shape: Option<Vec<u8>>,
    /// The first shard's ParameterDescription body (a statement's Shape step).
    params: Option<Vec<u8>>,
    /// The first ErrorResponse any shard sent (raw).
    error: Option<BytesMut>,
    /// An error of the router's own (shards disagree, unsupported shape).
    refusal: Option<PgError>,
    /// The first shard's other completion messages.
    passthrough: BytesMut,
    /// CommandComplete: the tag without its count, and the count so far.
    tag_prefix: Option<String>,
    count: u64,
    /// A tag without a count (CREATE TABLE, …) or a replicated write's tag.
    plain_tag: Option<String>,
}

impl StepAccumulator {
    fn add_tag(&mut self, tag: &[u8], combine: Combine) {
        let tag = String::from_utf8_lossy(tag).into_owned();
        if combine == Combine::Replicated {
            self.plain_tag.get_or_insert(tag);
            return;
        }
        match tag.rsplit_once(' ') {
            Some((prefix, n)) if n.bytes().all(|b| b.is_ascii_digit()) && !n.is_empty() => {
                self.count += n.parse::<u64>().unwrap_or(0);
                self.tag_prefix.get_or_insert_with(|| prefix.to_owned());
            }
            _ => {
                self.plain_tag.get_or_insert(tag);
            }
        }
    }

    fn tag(&self) -> Option<String> {
        if let Some(t) = &self.plain_tag {
            return Some(t.clone());
        }
        self.tag_prefix
            .as_ref()
            .map(|p| format!("{p} {}", self.count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn rowdesc(table_oid: u32, type_oid: u32) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i16(1);
        messages::put_cstr(&mut b, "user_id");
        b.put_u32(table_oid);
        b.put_i16(1);
        b.put_u32(type_oid);
        b.put_i16(8);
        b.put_i32(-1);
        b.put_i16(0);
        b.to_vec()
    }

    #[test]
    fn shapes_ignore_table_oids_but_not_types() {
        assert_eq!(
            row_shape(&rowdesc(16384, 20)),
            row_shape(&rowdesc(16999, 20))
        );
        assert_ne!(
            row_shape(&rowdesc(16384, 20)),
            row_shape(&rowdesc(16384, 23))
        );
    }

    #[test]
    fn command_tags_add_up() {
        let mut a = StepAccumulator::default();
        a.add_tag(b"SELECT 3", Combine::Sum);
        a.add_tag(b"SELECT 4", Combine::Sum);
        assert_eq!(a.tag().as_deref(), Some("SELECT 7"));
        let mut a = StepAccumulator::default();
        a.add_tag(b"INSERT 0 1", Combine::Sum);
        a.add_tag(b"INSERT 0 2", Combine::Sum);
        assert_eq!(a.tag().as_deref(), Some("INSERT 0 3"));
        let mut a = StepAccumulator::default();
        a.add_tag(b"INSERT 0 1", Combine::Replicated);
        a.add_tag(b"INSERT 0 1", Combine::Replicated);
        assert_eq!(a.tag().as_deref(), Some("INSERT 0 1"));
        let mut a = StepAccumulator::default();
        a.add_tag(b"CREATE TABLE", Combine::Sum);
        assert_eq!(a.tag().as_deref(), Some("CREATE TABLE"));
    }
}
