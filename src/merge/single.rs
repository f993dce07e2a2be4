//! Pass-through relay for a statement that runs on exactly one shard: frames are
//! forwarded as the bytes the shard sent.

use std::collections::VecDeque;

use super::{skip_to_sync, Outcome, RelayError, Step};
use crate::backend::ServerConn;
use crate::frontend::client::ClientConn;

/// Forward the shard's answers to `steps` to the client until the queue is empty.
/// Cancel-safety: not cancel-safe (a half-relayed answer leaves the connection broken).
pub async fn relay_single(
    conn: &mut ServerConn,
    client: &mut ClientConn,
    steps: &mut VecDeque<Step>,
) -> Result<Outcome, RelayError> {
    let mut out = Outcome::default();
    let mut done = 0usize;
    loop {
        while let Some(Step::Synthetic(b)) = steps.front() {
            client.wbuf.extend_from_slice(b);
            steps.pop_front();
        }
        let Some(Step::Server { kind, forward }) = steps.front().cloned() else {
            return Ok(out);
        };
        // A frame already in the buffer is taken without the wait's machinery: most
        // answers arrive in one read.
        let n = match conn.buffered_frame()? {
            Some(n) => n,
            None => super::next_frame_len(conn, client).await?,
        };
        let tag = conn.frame(n)[0];
        // Most frames are copied to the client straight from the shard's buffer.
        match tag {
            // Asynchronous messages: always the client's.
            b'N' | b'S' | b'A' => {
                client.wbuf.extend_from_slice(conn.frame(n));
                conn.consume(n);
                client.flush_soon = true;
                out.async_frames = true;
            }
            b'Z' if kind.is_terminal(tag) => {
                conn.consume(n);
                steps.pop_front();
                done += 1;
            }
            b'E' => {
                let frame = conn.read_raw_buffered(n);
                // An error goes to the client at once, as PostgreSQL sends it, unless the
                // session may take it back and run the batch again (its Sync is on the way,
                // so it waits at most until ReadyForQuery).
                if out.error || !client.hold_first_error {
                    client.flush_soon = true;
                }
                match super::client_error(&frame, &conn.shard_name) {
                    Some(e) => {
                        conn.broken = true;
                        e.encode(&mut client.wbuf);
                    }
                    None => client.wbuf.extend_from_slice(&frame),
                }
                if !out.error {
                    out.rare().first_error = Some(frame.freeze());
                }
                out.error = true;
                out.failed_step.get_or_insert(done);
                if kind.skips_to_sync() {
                    steps.pop_front();
                    if !skip_to_sync(steps) {
                        out.skipping = true;
                    }
                }
            }
            b'G' => {
                // COPY FROM STDIN: the client streams CopyData until CopyDone/CopyFail.
                client.wbuf.extend_from_slice(conn.frame(n));
                conn.consume(n);
                client.flush().await?;
                copy_in(conn, client, kind == super::StepKind::Execute).await?;
            }
            _ => {
                if forward {
                    client.wbuf.extend_from_slice(conn.frame(n));
                } else if kind == super::StepKind::Shape {
                    out.record_shape(conn.frame(n));
                }
                conn.consume(n);
                if kind.is_terminal(tag) {
                    steps.pop_front();
                    done += 1;
                }
            }
        }
        if client.wbuf.len() > 64 * 1024 {
            client.flush().await?;
        }
    }
}

/// Pump CopyData from the client to the shard until CopyDone or CopyFail. A COPY started
/// by Execute (extended protocol) ignored the Sync sent after it, as PostgreSQL does
/// during COPY; the Sync the client sends after CopyDone is the one that ends it.
async fn copy_in(
    conn: &mut ServerConn,
    client: &mut ClientConn,
    extended: bool,
) -> Result<(), RelayError> {
    loop {
        let frame = client.read_raw().await?;
        match frame[0] {
            b'd' => {
                conn.wbuf.extend_from_slice(&frame);
                if conn.wbuf.len() > 64 * 1024 {
                    conn.flush().await?;
                }
            }
            b'c' | b'f' => {
                conn.wbuf.extend_from_slice(&frame);
                if extended {
                    loop {
                        let next = client.read_raw().await?;
                        if next[0] == b'S' {
                            conn.wbuf.extend_from_slice(&next);
                            break;
                        }
                    }
                }
                conn.flush().await?;
                return Ok(());
            }
            // Flush and Sync are ignored during COPY, as PostgreSQL does.
            b'H' | b'S' => {}
            _ => {
                // Anything else aborts the copy on the server.
                crate::protocol::messages::cstr_message(
                    &mut conn.wbuf,
                    b'f',
                    &["unexpected message during COPY"],
                );
                conn.flush().await?;
                return Ok(());
            }
        }
    }
}
