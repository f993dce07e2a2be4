//! Pool behaviour under contention: a checkout that waits too long is an error, not a
//! hang, and waiting clients are served in the order they arrived.
mod common;

use std::time::Duration;

/// Pool of one connection per shard, short checkout timeout.
async fn small_router(timeout: Duration) -> shardwire::server::RunningRouter {
    let mut opts = common::options();
    opts.pool.size = 1;
    opts.pool.checkout_timeout = timeout;
    shardwire::server::start(opts).await.expect("router starts")
}

#[tokio::test]
async fn checkout_timeout_is_an_error_not_a_hang() {
    let r = small_router(Duration::from_millis(500)).await;
    let holder = common::connect(&r).await;
    // An open transaction holds the default shard's only connection.
    holder
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");
    let waiter = common::connect(&r).await;
    let res = tokio::time::timeout(Duration::from_secs(20), waiter.simple_query("SELECT 2"))
        .await
        .expect("the waiting client gets an answer, not a hang");
    let e = common::expect_sqlstate(res, "53300", "checkout beyond pool.checkout_timeout_ms");
    assert!(
        e.message().contains("s0"),
        "error names the shard: {}",
        e.message()
    );
    // Once the holder is done, the waiter is served again.
    served_after_commit(&holder, &waiter).await;
    r.stop().await;
}

/// `holder` ends its block; `waiter`, which timed out before, is served now.
async fn served_after_commit(holder: &tokio_postgres::Client, waiter: &tokio_postgres::Client) {
    holder.batch_execute("COMMIT").await.expect("commit");
    let rows = waiter
        .simple_query("SELECT 3")
        .await
        .expect("served after the holder committed");
    assert_eq!(rows.len(), 3);
}

/// Waits end by one timer per pool (`watch` in src/backend/pool.rs): each waiter still
/// gets its own full checkout timeout, never less, and a wait after the pool had no one
/// waiting times out too. (Lower bounds only: a slow machine cannot break them.)
#[tokio::test]
async fn each_waiter_gets_its_own_full_checkout_timeout() {
    let timeout = Duration::from_millis(800);
    let r = small_router(timeout).await;
    let holder = common::connect(&r).await;
    holder
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");
    let wait_once = |c: tokio_postgres::Client| async move {
        let started = std::time::Instant::now();
        let res = tokio::time::timeout(Duration::from_secs(20), c.simple_query("SELECT 2"))
            .await
            .expect("the waiting client gets an answer, not a hang");
        common::expect_sqlstate(res, "53300", "checkout beyond pool.checkout_timeout_ms");
        (started.elapsed(), c)
    };
    // Two waiters, the second joining halfway through the first one's wait.
    let first = tokio::spawn(wait_once(common::connect(&r).await));
    tokio::time::sleep(timeout / 2).await;
    let second = tokio::spawn(wait_once(common::connect(&r).await));
    let (waited_first, _) = first.await.expect("first waiter");
    let (waited_second, c) = second.await.expect("second waiter");
    assert!(
        waited_first >= timeout,
        "first waiter gave up after {waited_first:?}"
    );
    assert!(
        waited_second >= timeout,
        "second waiter gave up after {waited_second:?}"
    );
    // Nobody waits now; the next wait is timed all the same.
    let (waited_again, c) = wait_once(c).await;
    assert!(
        waited_again >= timeout,
        "a later wait gave up after {waited_again:?}"
    );
    served_after_commit(&holder, &c).await;
    r.stop().await;
}

#[tokio::test]
async fn waiting_clients_are_served_in_arrival_order() {
    let r = small_router(Duration::from_secs(20)).await;
    let holder = common::connect(&r).await;
    holder
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");
    // Five clients queue up one after another behind the held connection.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..5 {
        let c = common::connect(&r).await;
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            c.simple_query(&format!("SELECT {i}"))
                .await
                .expect("served");
            tx.send(i).expect("send");
        }));
        // Let this client's statement reach the queue before the next one's.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    holder.batch_execute("COMMIT").await.expect("commit");
    let mut order = Vec::new();
    for _ in 0..5 {
        order.push(
            tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .expect("served in time")
                .expect("value"),
        );
    }
    assert_eq!(order, vec![0, 1, 2, 3, 4], "first come, first served");
    for t in tasks {
        t.await.expect("task");
    }
    r.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_statement_has_it_cancelled() {
    let r = common::router().await;
    let (client, conn) = tokio_postgres::connect(&common::conninfo(&r), tokio_postgres::NoTls)
        .await
        .expect("connect");
    let conn_task = tokio::spawn(conn);
    let query = tokio::spawn(async move {
        let _ = client
            .simple_query("SELECT pg_sleep(60) /* pool_disconnect_marker */")
            .await;
    });
    let s0 = common::shard(0).await;
    let running = "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
                   AND query LIKE '%pool_disconnect_marker%' AND pid <> pg_backend_pid()";
    // Wait until the statement runs on the shard.
    let mut seen = false;
    for _ in 0..100 {
        let n: i64 = s0.query_one(running, &[]).await.expect("activity").get(0);
        if n > 0 {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "the statement reached the shard");
    // The client goes away: its socket closes.
    conn_task.abort();
    query.abort();
    let mut gone = false;
    for _ in 0..100 {
        let n: i64 = s0.query_one(running, &[]).await.expect("activity").get(0);
        if n == 0 {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone,
        "the shard stopped running the statement of a client that left"
    );
    r.stop().await;
}

#[tokio::test]
async fn a_broken_connection_frees_its_slot_for_the_next_waiter() {
    let r = small_router(Duration::from_secs(20)).await;
    let holder = common::connect(&r).await;
    holder.batch_execute("BEGIN").await.expect("begin");
    let pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("backend pid")
        .get(0);
    // A second client queues behind the only connection.
    let waiter = common::connect(&r).await;
    let queued = tokio::spawn(async move { waiter.simple_query("SELECT 42").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !queued.is_finished(),
        "the waiter queues behind the held connection"
    );
    // The held backend dies; the holder's COMMIT meets the dead connection, which is
    // dropped instead of going back to the pool.
    let s0 = common::shard(0).await;
    let killed: bool = s0
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate")
        .get(0);
    assert!(killed, "the holder's backend was terminated");
    let commit = holder.batch_execute("COMMIT").await;
    assert!(commit.is_err(), "COMMIT on a terminated backend fails");
    // The freed slot goes to the waiter, which opens a new connection: it is served,
    // and not with a checkout timeout after 20 s.
    let rows = tokio::time::timeout(Duration::from_secs(60), queued)
        .await
        .expect("the waiter gets an answer")
        .expect("task")
        .expect("the waiter is served over a new connection");
    assert_eq!(rows.len(), 3, "row, description and command complete");
    r.stop().await;
}

/// Clients in line behind connect attempts that fail each learn the connect failure,
/// the real reason, rather than that they waited too long: a failed attempt hands its
/// slot to the next in line, which tries for itself within what is left of its wait.
#[tokio::test]
async fn waiters_behind_a_failing_connect_learn_the_connect_failure() {
    // The default shard is a socket that accepts and never answers: every connect
    // attempt holds the pool's only slot until the connect timeout.
    let (port, _) = common::silent_server().await;
    let mut opts = common::options();
    opts.topology.shards[0].port = port;
    opts.pool.size = 1;
    opts.pool.connect_timeout = Duration::from_millis(1000);
    opts.pool.checkout_timeout = Duration::from_millis(1500);
    let r = shardwire::server::start(opts).await.expect("router starts");
    let query = |c: tokio_postgres::Client| async move {
        let res = tokio::time::timeout(Duration::from_secs(20), c.simple_query("SELECT 1"))
            .await
            .expect("an answer, not a hang");
        (res, c)
    };
    // `first` takes the slot; its connect fails after 1 s. `second` then gets the slot
    // and tries until its own wait is over; `third` gets it last, with what is left
    // of its wait (at least a short try), or runs out of time and is told the failure
    // it waited through.
    // (Connected first: a client's start waits on the default shard too.)
    let clients = [
        common::connect(&r).await,
        common::connect(&r).await,
        common::connect(&r).await,
    ];
    let [a, b, c] = clients;
    let first = tokio::spawn(query(a));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = tokio::spawn(query(b));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let third = tokio::spawn(query(c));
    let mut tried_ms = Vec::new();
    for (who, task) in [("first", first), ("second", second), ("third", third)] {
        let (res, _c) = task.await.expect("client task");
        let e = common::expect_sqlstate(res, "08001", who);
        assert!(
            e.message().contains("s0") && e.message().contains("timed out"),
            "{who}: the connect failure, naming the shard: {e:?}"
        );
        let ms = e
            .message()
            .split("timed out after ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{who}: how long it tried: {e:?}"));
        tried_ms.push(ms);
    }
    // The first tried for the whole connect timeout; the second, in line for about a
    // second by then, only for what was left of its wait.
    assert_eq!(tried_ms[0], 1000, "first: {tried_ms:?}");
    assert!(tried_ms[1] < 1000, "second tried too long: {tried_ms:?}");
    r.stop().await;
}
