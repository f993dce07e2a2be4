//! Pass-through relay for a statement that runs on exactly one shard: frames are
//! forwarded as the bytes the shard sent.

use std::collections::VecDeque;

use super::{skip_to_sync, Outcome, RelayError, Step};
use crate::backend::{ServerConn, MAX_BACKEND_MESSAGE};
use crate::frontend::client::ClientConn;

/// The client's write buffer is sent once it holds more than this, mid-answer.
const CLIENT_FLUSH_AT: usize = 64 * 1024;

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
        // Ordinary frames already in the buffer (most answers arrive in one read) go
        // in one pass and one copy.
        let buf = conn.buffered();
        let budget = CLIENT_FLUSH_AT.saturating_sub(client.wbuf.len());
        let scanned = scan_buffered(buf, steps.iter(), budget, |r| {
            client.wbuf.extend_from_slice(&buf[r])
        });
        if scanned.len > 0 {
            conn.relayed(scanned.len, scanned.ready);
            steps.drain(..scanned.ended);
            done += scanned.ended;
            if client.wbuf.len() > CLIENT_FLUSH_AT {
                client.flush().await?;
            }
            continue;
        }
        // Anything else goes frame by frame; a frame already in the buffer is taken
        // without the wait's machinery.
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
        if client.wbuf.len() > CLIENT_FLUSH_AT {
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
            conn.relayed(answer.len, Some(answer.status));
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

/// The tag and length (tag included) of the frame at `at` in `buf`, when it is whole and
/// of a length a shard may send.
fn whole_frame(buf: &[u8], at: usize) -> Option<(u8, usize)> {
    let head = buf.get(at..at + 5)?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    (len >= 4 && len as u64 <= MAX_BACKEND_MESSAGE && buf.len() - at > len)
        .then_some((head[0], len + 1))
}

/// `buf` starts with BindComplete, RowDescription, any DataRows, CommandComplete and
/// ReadyForQuery, each whole (and of a length PostgreSQL gives them): the usual answer
/// to a point query's four steps, which `scan_buffered` would relay too. Only that
/// answer is looked for (anything else is left to `relay_single`), with less work on
/// the router's hottest path: no steps queued, no step checked frame by frame.
fn point_answer(buf: &[u8]) -> Option<PointAnswer> {
    let frame = |at: usize| whole_frame(buf, at);
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

/// How far `scan_buffered` relayed the buffer.
#[derive(Debug, PartialEq, Eq)]
struct Scanned {
    /// The bytes relayed (whole frames from the buffer's start).
    len: usize,
    /// The transaction status of the last ReadyForQuery among them.
    ready: Option<u8>,
    /// How many steps they ended.
    ended: usize,
}

/// The frame-by-frame loop of `relay_single` for the ordinary frames already whole at
/// the start of `buf` (the usual answer, after one read), answering `steps` in order:
/// a frame answering a forwarded step is the client's, given to `to_client` as a range
/// of `buf`, consecutive ones in one range (one copy); one answering an injected step
/// is dropped; a frame that ends its step moves on to the next (`Scanned::ended`
/// counts them). Stops at anything the loop must look at itself: a frame not whole yet
/// (or of a length no shard sends), an error, a notice, ParameterStatus or
/// notification, COPY, an answer to a `Shape` step, a ReadyForQuery that ends no step
/// or is not 6 bytes long, and a `Synthetic` step; and before a frame once `budget`
/// bytes are relayed (the client's buffer is flushed in between).
fn scan_buffered<'s>(
    buf: &[u8],
    steps: impl IntoIterator<Item = &'s Step>,
    budget: usize,
    mut to_client: impl FnMut(std::ops::Range<usize>),
) -> Scanned {
    let (mut at, mut run, mut ready, mut ended) = (0, 0, None, 0);
    let mut steps = steps.into_iter();
    let mut step = steps.next();
    while let Some(&Step::Server { kind, forward }) = step {
        if at >= budget {
            break;
        }
        let Some((tag, n)) = whole_frame(buf, at) else {
            break;
        };
        let ends = kind.is_terminal(tag);
        match tag {
            b'N' | b'S' | b'A' | b'E' | b'G' => break,
            // Never forwarded: the session writes its own.
            b'Z' if ends && n == 6 => ready = Some(buf[at + 5]),
            b'Z' => break,
            _ if kind == super::StepKind::Shape => break,
            _ => {}
        }
        if !forward || tag == b'Z' {
            if run < at {
                to_client(run..at);
            }
            run = at + n;
        }
        at += n;
        if ends {
            ended += 1;
            step = steps.next();
        }
    }
    if run < at {
        to_client(run..at);
    }
    Scanned {
        len: at,
        ready,
        ended,
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
    use std::collections::VecDeque;

    use super::{point_answer, scan_buffered, Scanned};
    use crate::merge::{Step, StepKind};

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut f = vec![tag];
        f.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    fn steps(kinds: &[(StepKind, bool)]) -> VecDeque<Step> {
        kinds
            .iter()
            .map(|&(kind, forward)| Step::Server { kind, forward })
            .collect()
    }

    /// Scan `buf` against `steps`: what it found, the client's bytes, how many copies
    /// they took, and how many steps ended.
    fn scan(buf: &[u8], steps: &mut VecDeque<Step>) -> (Scanned, Vec<u8>, usize, usize) {
        let (mut client, mut copies) = (Vec::new(), 0);
        let scanned = scan_buffered(buf, steps.iter(), usize::MAX, |r| {
            client.extend_from_slice(&buf[r]);
            copies += 1;
        });
        steps.drain(..scanned.ended);
        let ended = scanned.ended;
        (scanned, client, copies, ended)
    }

    /// A point query's answer, frame by frame: BindComplete, RowDescription, a DataRow,
    /// CommandComplete, ReadyForQuery.
    fn point_frames() -> [Vec<u8>; 5] {
        [
            frame(b'2', b""),
            frame(
                b'T',
                b"\0\x01abalance\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
            ),
            frame(b'D', b"\0\x01\0\0\0\x010"),
            frame(b'C', b"SELECT 1\0"),
            frame(b'Z', b"I"),
        ]
    }

    fn cat(parts: &[&Vec<u8>]) -> Vec<u8> {
        parts.iter().flat_map(|p| p.iter().copied()).collect()
    }

    /// The usual answer to a point query with `rows` rows, frame by frame.
    fn point_answer_parts(frames: &[Vec<u8>; 5], rows: usize) -> Vec<&Vec<u8>> {
        let [bind, desc, row, done, ready] = frames;
        let mut parts = vec![bind, desc];
        parts.extend(std::iter::repeat_n(row, rows));
        parts.extend([done, ready]);
        parts
    }

    use StepKind::{Bind, DescribePortal, Execute, Parse, Query, Shape, Sync};
    const POINT: &[(StepKind, bool)] = &[
        (Bind, false),
        (DescribePortal, true),
        (Execute, true),
        (Sync, false),
    ];

    #[test]
    fn whole_ordinary_answers_go_in_one_copy_and_end_their_steps() {
        let frames = point_frames();
        for rows in [0, 1, 3] {
            let parts = point_answer_parts(&frames, rows);
            let mut buf = cat(&parts);
            let whole = buf.len();
            // What follows the last answer (nothing the steps ask for) stays.
            buf.extend_from_slice(&frame(b'N', b"Sx\0\0"));
            let mut q = steps(POINT);
            let (s, client, copies, done) = scan(&buf, &mut q);
            assert_eq!(
                s,
                Scanned {
                    len: whole,
                    ready: Some(b'I'),
                    ended: 4,
                }
            );
            // BindComplete answered an unforwarded step: dropped.
            assert_eq!(client, cat(&parts[1..parts.len() - 1]));
            assert_eq!((copies, done, q.len()), (1, 4, 0));
            // Cut anywhere: the whole frames before the cut, and nothing of the rest.
            let ends: Vec<usize> = parts
                .iter()
                .scan(0, |at, p| {
                    *at += p.len();
                    Some(*at)
                })
                .collect();
            for cut in 0..whole {
                let mut q = steps(POINT);
                let (s, client, _, done) = scan(&buf[..cut], &mut q);
                let whole_frames = ends.iter().filter(|e| **e <= cut).count();
                assert_eq!(s.len, ends[..whole_frames].last().copied().unwrap_or(0));
                assert_eq!(s.ready, None, "cut at {cut}");
                let forwarded = parts[..whole_frames].get(1..).unwrap_or_default();
                assert_eq!(client, cat(forwarded), "cut at {cut}");
                // Bind ends at its frame, Describe at the RowDescription, Execute at
                // CommandComplete.
                let ended = [1, 2, 2 + rows + 1]
                    .iter()
                    .filter(|f| **f <= whole_frames)
                    .count();
                assert_eq!((done, q.len()), (ended, 4 - ended), "cut at {cut}");
            }
        }
    }

    #[test]
    fn runs_break_at_dropped_answers_and_ready_for_query_and_go_on() {
        let parsed = frame(b'1', b"");
        let bind = frame(b'2', b"");
        let row = frame(b'D', b"\0\x01\0\0\0\x017");
        let done_ = frame(b'C', b"SELECT 1\0");
        let idle = frame(b'Z', b"I");
        let in_block = frame(b'Z', b"T");
        // An injected Parse, then a pipelined second batch: the last status counts.
        let buf = cat(&[
            &parsed, &bind, &row, &done_, &idle, &bind, &row, &done_, &in_block,
        ]);
        let mut q = steps(&[
            (Parse, false),
            (Bind, true),
            (Execute, true),
            (Sync, false),
            (Bind, true),
            (Execute, true),
            (Sync, false),
        ]);
        let (s, client, copies, done) = scan(&buf, &mut q);
        assert_eq!(
            s,
            Scanned {
                len: buf.len(),
                ready: Some(b'T'),
                ended: 7,
            }
        );
        assert_eq!(client, cat(&[&bind, &row, &done_, &bind, &row, &done_]));
        assert_eq!((copies, done, q.len()), (2, 7, 0));
        // A simple query's answer, all forwarded but its ReadyForQuery.
        let mut q = steps(&[(Query, true)]);
        let buf = cat(&[&row, &done_, &row, &done_, &idle]);
        let (s, client, copies, _) = scan(&buf, &mut q);
        assert_eq!((s.len, s.ready), (buf.len(), Some(b'I')));
        assert_eq!((client, copies), (cat(&[&row, &done_, &row, &done_]), 1));
        // A budget stops the scan before the frame that starts past it.
        let buf = cat(&[&bind, &row, &done_]);
        for (budget, relayed) in [
            (0, 0),
            (1, bind.len()),
            (bind.len() + 1, bind.len() + row.len()),
        ] {
            let mut q = steps(&[(Bind, true), (Execute, true)]);
            let (mut client, mut done) = (Vec::new(), 0);
            let s = scan_buffered(&buf, q.iter(), budget, |r| {
                client.extend_from_slice(&buf[r])
            });
            done += s.ended;
            q.drain(..s.ended);
            assert_eq!((s.len, client.len()), (relayed, relayed), "budget {budget}");
            assert_eq!(done, usize::from(relayed > 0));
        }
        // A Synthetic step stops the scan; its bytes come before what follows.
        let mut q = steps(&[(Bind, true)]);
        q.push_back(Step::Synthetic(bytes::Bytes::from_static(b"n\0\0\0\x04")));
        q.push_back(Step::Server {
            kind: Execute,
            forward: true,
        });
        let buf = cat(&[&bind, &row, &done_]);
        let (s, client, _, done) = scan(&buf, &mut q);
        assert_eq!(
            (s.len, client, done, q.len()),
            (bind.len(), bind.clone(), 1, 2)
        );
    }

    #[test]
    fn anything_but_an_ordinary_whole_frame_is_left_to_the_frame_by_frame_loop() {
        let bind = frame(b'2', b"");
        let row = frame(b'D', b"\0\x01\0\0\0\x017");
        let done_ = frame(b'C', b"SELECT 1\0");
        let extended = &[(Bind, true), (Execute, true), (Sync, false)];
        let mid_execute = vec![&bind, &row];
        let after_execute = vec![&bind, &row, &done_];
        for (before, stop) in [
            (&mid_execute, frame(b'E', b"SERROR\0C42P01\0Mno\0\0")),
            (&mid_execute, frame(b'N', b"SNOTICE\0Mhm\0\0")),
            (&mid_execute, frame(b'S', b"a\0b\0")),
            (&mid_execute, frame(b'A', b"\0\0\0\x01c\0\0")),
            (&mid_execute, frame(b'G', b"\0\0\0")),
            // A ReadyForQuery in the middle of a step, or of another length.
            (&mid_execute, frame(b'Z', b"I")),
            (&after_execute, frame(b'Z', b"II")),
        ] {
            let mut buf = cat(before);
            buf.extend_from_slice(&stop);
            buf.extend_from_slice(&done_);
            let (s, client, _, _) = scan(&buf, &mut steps(extended));
            assert_eq!(s.len, cat(before).len(), "{stop:?}");
            assert_eq!(client, cat(before), "{stop:?}");
            assert_eq!(s.ready, None);
        }
        // A length under 4 is malformed: left for the loop to report.
        let mut bad = cat(&[&bind, &row]);
        bad[bind.len() + 4] = 3;
        let (s, _, _, _) = scan(&bad, &mut steps(extended));
        assert_eq!(s.len, bind.len());
        // A Shape step's answer is recorded by the loop, not relayed.
        let described = frame(b't', b"\0\0");
        let (s, client, _, _) = scan(&described, &mut steps(&[(Shape, false)]));
        assert_eq!((s.len, client.len()), (0, 0));
    }

    #[test]
    fn a_point_answer_is_found_whole_or_not_at_all() {
        let frames = point_frames();
        let [bind, desc, row, done, ready] = frames.clone();
        for rows in [0, 1, 3] {
            let parts = point_answer_parts(&frames, rows);
            let mut buf = cat(&parts);
            let whole = buf.len();
            // What follows the ReadyForQuery (never sent unasked, but not ours) stays.
            buf.extend_from_slice(&frame(b'N', b"Sx\0\0"));
            let a = point_answer(&buf).expect("the usual answer");
            assert_eq!(a.len, whole);
            assert_eq!(a.status, b'I');
            assert_eq!(&buf[a.forward], &cat(&parts[1..parts.len() - 1])[..]);
            // Any part of it missing: not yet.
            for cut in 0..whole {
                assert!(
                    point_answer(&buf[..cut]).is_none(),
                    "{rows} rows cut at {cut}"
                );
            }
        }
        let in_block = frame(b'Z', b"T");
        let a = point_answer(&cat(&[&bind, &desc, &row, &done, &in_block])).expect("in a block");
        assert_eq!(a.status, b'T');
        // Anything else is left to the frame-by-frame relay.
        let error = frame(b'E', b"SERROR\0C42P01\0Mno\0\0");
        let notice = frame(b'N', b"SNOTICE\0Mhm\0\0");
        let no_data = frame(b'n', b"");
        let long_ready = frame(b'Z', b"II");
        let wrong_bind = frame(b'2', b"x");
        for other in [
            cat(&[&error, &ready]),
            cat(&[&bind, &error, &ready]),
            cat(&[&bind, &desc, &row, &error, &ready]),
            cat(&[&bind, &notice, &desc, &row, &done, &ready]),
            cat(&[&bind, &desc, &notice, &row, &done, &ready]),
            cat(&[&bind, &desc, &row, &done, &notice, &ready]),
            cat(&[&bind, &no_data, &done, &ready]),
            cat(&[&bind, &desc, &row, &done, &long_ready]),
            cat(&[&wrong_bind, &desc, &row, &done, &ready]),
            cat(&[&desc, &row, &done, &ready]),
        ] {
            assert!(point_answer(&other).is_none(), "{other:?}");
        }
        // A length under 4 is malformed: not the usual answer.
        let mut bad = cat(&[&bind, &desc, &row, &done, &ready]);
        bad[5 + desc.len() + 4] = 3;
        assert!(point_answer(&bad).is_none());
    }
}
