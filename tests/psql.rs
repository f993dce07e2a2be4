//! The real `psql` against the router: describe commands, an error and recovery,
//! a transaction, SET/SHOW. Catalog commands must print exactly what psql prints
//! against the default shard directly.

mod common;

use std::process::Stdio;

use tokio::io::AsyncWriteExt;

/// Run `psql` with `script` on stdin against `port`; stdout and stderr interleaved.
async fn psql(port: u16, script: &str) -> (bool, String) {
    let bin = which_psql();
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec '{bin}' -X -q -v ON_ERROR_STOP=0 -h 127.0.0.1 -p {port} -U app app 2>&1"
        ))
        .env("PGPASSWORD", "app-secret")
        .env("PGCONNECT_TIMEOUT", "10")
        .env("PAGER", "cat")
        .env("PSQL_PAGER", "cat")
        .env("PGOPTIONS", "")
        .env("PGTZ", "UTC")
        .env_remove("PGSERVICE")
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn psql");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(script.as_bytes())
        .await
        .expect("write script");
    drop(stdin);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("psql hung")
        .expect("psql ran");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn which_psql() -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("command -v psql")
        .output()
        .expect("sh");
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !p.is_empty(),
        "psql is not installed (apt-get install postgresql-client)"
    );
    p
}

/// The text between `\echo` markers `from` and `to`.
fn section<'a>(out: &'a str, from: &str, to: &str) -> &'a str {
    let a = out
        .find(from)
        .unwrap_or_else(|| panic!("marker {from} missing in:\n{out}"))
        + from.len();
    let b = out[a..]
        .find(to)
        .unwrap_or_else(|| panic!("marker {to} missing in:\n{out}"))
        + a;
    &out[a..b]
}

#[tokio::test]
async fn psql_session_through_the_router() {
    common::ensure_schema().await;
    let topo = common::topology();
    let id = 7_005_001i64;
    let home = common::shard_for(&topo, "users", id);
    let home_conn = common::shard(home).await;
    home_conn
        .execute("DELETE FROM users WHERE user_id = $1", &[&id])
        .await
        .expect("clean");
    let r = common::router().await;

    let describe = "\\pset pager off\n\
        \\echo @@D@@\n\\d\n\
        \\echo @@DT@@\n\\dt\n\
        \\echo @@DUSERS@@\n\\d users\n\
        \\echo @@DORDERS@@\n\\d+ orders\n\
        \\echo @@DF@@\n\\df pg_catalog.hashint8extended\n\
        \\echo @@END@@\n";
    let (ok, via_router) = psql(r.addr.port(), describe).await;
    assert!(ok, "psql failed:\n{via_router}");
    let (ok, direct) = psql(common::SHARD_PORTS[topo.default_shard], describe).await;
    assert!(ok, "psql against the default shard failed:\n{direct}");
    assert!(
        !via_router.contains("ERROR"),
        "describe commands failed:\n{via_router}"
    );
    assert_eq!(
        via_router, direct,
        "psql's describe output differs between the router and the default shard"
    );
    // And it shows what it should.
    let d_users = section(&via_router, "@@DUSERS@@", "@@DORDERS@@");
    assert!(
        d_users.lines().any(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            cells.len() > 2 && cells[0] == "user_id" && cells[1] == "bigint"
        }),
        "\\d users lacks `user_id | bigint`:\n{d_users}"
    );
    let dt = section(&via_router, "@@DT@@", "@@DUSERS@@");
    for t in ["users", "orders", "events", "accounts", "countries"] {
        assert!(
            dt.lines()
                .any(|l| l.split('|').map(str::trim).nth(1) == Some(t)),
            "\\dt lacks {t}:\n{dt}"
        );
    }

    let script = format!(
        "\\pset pager off\n\
         \\echo @@ERR@@\n\
         SELEC 1;\n\
         SELECT 'after-' || 'error' AS recovered;\n\
         \\echo @@TXN@@\n\
         BEGIN;\n\
         INSERT INTO users (user_id, name) VALUES ({id}, 'psql-user');\n\
         SELECT name || '-in-txn' FROM users WHERE user_id = {id};\n\
         COMMIT;\n\
         SELECT name || '-committed' FROM users WHERE user_id = {id};\n\
         \\echo @@ROLLBACK@@\n\
         BEGIN;\n\
         UPDATE users SET name = 'rolled-back' WHERE user_id = {id};\n\
         ROLLBACK;\n\
         SELECT name || '-still' FROM users WHERE user_id = {id};\n\
         \\echo @@FAILEDTXN@@\n\
         BEGIN;\n\
         SELECT 1/0;\n\
         SELECT 'not-run';\n\
         ROLLBACK;\n\
         SELECT 'back-' || 'to-normal';\n\
         \\echo @@SET@@\n\
         SET application_name = 'psql_test_app';\n\
         SHOW application_name;\n\
         SET TimeZone = 'Asia/Tokyo';\n\
         SHOW TimeZone;\n\
         SELECT to_char(timestamptz '2024-01-01 00:00:00+00', 'HH24:MI') AS tokyo;\n\
         \\echo @@GX@@\n\
         SELECT user_id, name FROM users WHERE user_id = {id} \\gx\n\
         \\echo @@END@@\n"
    );
    let (ok, out) = psql(r.addr.port(), &script).await;
    assert!(ok, "psql exited with failure:\n{out}");

    let err = section(&out, "@@ERR@@", "@@TXN@@");
    let e_at = err
        .find("ERROR:  syntax error at or near \"SELEC\"")
        .unwrap_or_else(|| panic!("no syntax error reported:\n{err}"));
    assert!(
        err.contains("LINE 1: SELEC 1;"),
        "error has a position (LINE/caret):\n{err}"
    );
    let rec_at = err
        .find("after-error")
        .unwrap_or_else(|| panic!("query after the error did not run:\n{err}"));
    assert!(
        rec_at > e_at,
        "the recovery result comes after the error:\n{err}"
    );

    let txn = section(&out, "@@TXN@@", "@@ROLLBACK@@");
    assert!(txn.contains("psql-user-in-txn"), "{txn}");
    assert!(txn.contains("psql-user-committed"), "{txn}");
    assert!(!txn.contains("ERROR"), "{txn}");
    let name: String = home_conn
        .query_one("SELECT name FROM users WHERE user_id = $1", &[&id])
        .await
        .expect("committed row on its home shard")
        .get(0);
    assert_eq!(name, "psql-user");

    let rb = section(&out, "@@ROLLBACK@@", "@@FAILEDTXN@@");
    assert!(
        rb.contains("psql-user-still"),
        "ROLLBACK discarded the update:\n{rb}"
    );
    assert!(!rb.contains("rolled-back-still"), "{rb}");

    let failed = section(&out, "@@FAILEDTXN@@", "@@SET@@");
    assert!(failed.contains("ERROR:  division by zero"), "{failed}");
    assert!(
        failed.contains("ERROR:  current transaction is aborted"),
        "statements in a failed block are refused:\n{failed}"
    );
    assert!(!failed.contains("not-run\n"), "{failed}");
    assert!(failed.contains("back-to-normal"), "{failed}");

    let set = section(&out, "@@SET@@", "@@GX@@");
    assert!(set.contains("psql_test_app"), "{set}");
    assert!(set.contains("Asia/Tokyo"), "{set}");
    assert!(
        set.contains("09:00"),
        "TimeZone applies to later statements:\n{set}"
    );
    assert!(!set.contains("ERROR"), "{set}");

    let gx = section(&out, "@@GX@@", "@@END@@");
    assert!(gx.contains(&format!("user_id | {id}")), "{gx}");
    assert!(gx.contains("name    | psql-user"), "{gx}");

    home_conn
        .execute("DELETE FROM users WHERE user_id = $1", &[&id])
        .await
        .expect("clean");
    r.stop().await;
}
