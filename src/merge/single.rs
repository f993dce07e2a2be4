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

/// `relay_single` for the answer to a kept point query: Bind, Describe portal, Execute
/// and Sync, after the answers to `steps` (Close and Parse of kept statements), whose
/// steps this queues. When there are none and the usual answer (BindComplete,
/// RowDescription, DataRows, CommandComplete, ReadyForQuery) is whole in the buffer, as
/// it mostly is after one read, it goes to the client as one copy; any other answer (an
/// error, a notice, a part still on its way) is relayed frame by frame.
/// Cancel-safety: not cancel-safe, as `relay_single`.
pub async fn relay_point(
    conn: &mut ServerConn,
    client: &mut ClientConn,
    steps: &mut VecDeque<Step>,
) -> Result<Outcome, RelayError> {
    use super::StepKind::{Bind, DescribePortal, Execute, Sync};
    if steps.is_empty() {
        // Waits for the first frame (the buffer is empty but for a pipelined answer).
        super::next_frame_len(conn, client).await?;
        if let Some(answer) = point_answer(conn.buffered()) {
            client
                .wbuf
                .extend_from_slice(&conn.buffered()[answer.forward]);
            conn.answered(answer.status, answer.len);
            return Ok(Outcome::default());
        }
    }
    for (kind, forward) in [
        (Bind, false),
        (DescribePortal, true),
        (Execute, true),
        (Sync, false),
    ] {
        steps.push_back(Step::Server { kind, forward });
    }
    relay_single(conn, client, steps).await
}

/// Where a point query's usual answer is in `buf`, when all of it is there.
struct PointAnswer {
    /// RowDescription to CommandComplete: what the client gets.
    forward: std::ops::Range<usize>,
    /// Its ReadyForQuery's transaction status.
    status: u8,
    /// Through the ReadyForQuery.
    len: usize,
}

/// `buf` starts with BindComplete, RowDescription, any DataRows, CommandComplete and
/// ReadyForQuery, each whole (and of a length PostgreSQL gives them).
fn point_answer(buf: &[u8]) -> Option<PointAnswer> {
    // The tag and length of the frame at `at`, when it is whole.
    let frame = |at: usize| -> Option<(u8, usize)> {
        let head = buf.get(at..at + 5)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        (len >= 4 && buf.len() - at > len).then_some((head[0], len + 1))
    };
    let mut at = match frame(0)? {
        (b'2', 5) => 5,
        _ => return None,
    };
    let start = at;
    match frame(at)? {
        (b'T', n) => at += n,
        _ => return None,
    }
    loop {
        match frame(at)? {
            (b'D', n) => at += n,
            (b'C', n) => {
                at += n;
                break;
            }
            _ => return None,
        }
    }
    let forward = start..at;
    match frame(at)? {
        (b'Z', 6) => Some(PointAnswer {
            forward,
            status: buf[at + 5],
            len: at + 6,
        }),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::point_answer;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![tag];
        f.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn a_point_answer_is_found_whole_or_not_at_all() {
        let bind = frame(b'2', b"");
        let desc = frame(
            b'T',
            b"\0\x01abalance\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
        );
        let row = frame(b'D', b"\0\x01\0\0\0\x010");
        let done = frame(b'C', b"SELECT 1\0");
        let ready = frame(b'Z', b"I");
        let answer = |parts: &[&Vec<u8>]| {
            parts
                .iter()
                .flat_map(|p| p.iter().copied())
                .collect::<Vec<u8>>()
        };

        for rows in [0, 1, 3] {
            let mut parts = vec![&bind, &desc];
            parts.extend(std::iter::repeat_n(&row, rows));
            parts.extend([&done, &ready]);
            let mut buf = answer(&parts);
            let whole = buf.len();
            // What follows the ReadyForQuery (never sent unasked, but not ours) stays.
            buf.extend_from_slice(&frame(b'N', b"Sx\0\0"));
            let a = point_answer(&buf).expect("the usual answer");
            assert_eq!(a.len, whole);
            assert_eq!(a.status, b'I');
            assert_eq!(&buf[a.forward], &answer(&parts[1..parts.len() - 1])[..]);
            // Any part of it missing: not yet.
            for cut in 0..whole {
                assert!(
                    point_answer(&buf[..cut]).is_none(),
                    "{rows} rows cut at {cut}"
                );
            }
        }
        let in_block = frame(b'Z', b"T");
        let a = point_answer(&answer(&[&bind, &desc, &row, &done, &in_block])).expect("in a block");
        assert_eq!(a.status, b'T');
        // Anything else is left to the frame-by-frame relay.
        let error = frame(b'E', b"SERROR\0C42P01\0Mno\0\0");
        let notice = frame(b'N', b"SNOTICE\0Mhm\0\0");
        let no_data = frame(b'n', b"");
        let long_ready = frame(b'Z', b"II");
        let wrong_bind = frame(b'2', b"x");
        for other in [
            answer(&[&error, &ready]),
            answer(&[&bind, &error, &ready]),
            answer(&[&bind, &desc, &row, &error, &ready]),
            answer(&[&bind, &notice, &desc, &row, &done, &ready]),
            answer(&[&bind, &desc, &notice, &row, &done, &ready]),
            answer(&[&bind, &desc, &row, &done, &notice, &ready]),
            answer(&[&bind, &no_data, &done, &ready]),
            answer(&[&bind, &desc, &row, &done, &long_ready]),
            answer(&[&wrong_bind, &desc, &row, &done, &ready]),
            answer(&[&desc, &row, &done, &ready]),
        ] {
            assert!(point_answer(&other).is_none(), "{other:?}");
        }
        // A length under 4 is malformed: not the usual answer.
        let mut bad = answer(&[&bind, &desc, &row, &done, &ready]);
        bad[5 + desc.len() + 4] = 3;
        assert!(point_answer(&bad).is_none());
    }
}
