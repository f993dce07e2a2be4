//! pgbench through the router in all three query modes (simple, extended, prepared):
//! key lookups on 1,000 users spread over the shards, plus a small write transaction.
//! Each lookup also checks that its row was found (a mis-routed lookup finds nothing
//! and the division by zero aborts the run).

mod common;

use std::collections::BTreeMap;

const LO: i64 = 7_100_000;
const HI: i64 = 7_100_999;

static LOADED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// The users 7_100_000..=7_100_999, each written directly to the shard that owns it.
async fn load_users() {
    LOADED
        .get_or_init(|| async {
            common::ensure_schema().await;
            let topo = common::topology();
            let mut per_shard: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
            for id in LO..=HI {
                per_shard
                    .entry(common::shard_for(&topo, "users", id))
                    .or_default()
                    .push(id);
            }
            for i in 0..common::SHARD_PORTS.len() {
                let c = common::shard(i).await;
                c.execute("DELETE FROM users WHERE user_id BETWEEN $1 AND $2", &[&LO, &HI])
                    .await
                    .expect("clean");
                let ids = per_shard.get(&i).cloned().unwrap_or_default();
                c.execute(
                    "INSERT INTO users (user_id, name, email) \
                     SELECT id, 'bench ' || id, 'b' || id || '@example.com' FROM unnest($1::int8[]) id",
                    &[&ids],
                )
                .await
                .expect("load");
            }
        })
        .await;
}

struct Outcome {
    status: std::process::ExitStatus,
    output: String,
}

async fn pgbench(mode: &str) -> Outcome {
    load_users().await;
    let r = common::router().await;
    let dir = std::env::temp_dir().join(format!(
        "shardwire-pgbench-{}-{mode}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let read = dir.join("read.sql");
    std::fs::write(
        &read,
        format!(
            "\\set uid random({LO}, {HI})\n\
             SELECT * FROM users WHERE user_id = :uid;\n\
             SELECT 1 / count(*)::int AS found FROM users WHERE user_id = :uid;\n"
        ),
    )
    .expect("script");
    let write = dir.join("write.sql");
    std::fs::write(
        &write,
        format!(
            "\\set uid random({LO}, {HI})\n\
             BEGIN;\n\
             UPDATE users SET email = 'b' || :uid || '@example.com' WHERE user_id = :uid;\n\
             SELECT 1 / count(*)::int AS found FROM users WHERE user_id = :uid AND name = 'bench ' || :uid;\n\
             END;\n"
        ),
    )
    .expect("script");
    let port = r.addr.port().to_string();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        tokio::process::Command::new("pgbench")
            .args(["-n", "-T", "3", "-c", "4", "-j", "2", "-M", mode])
            .arg("-f")
            .arg(format!("{}@3", read.display()))
            .arg("-f")
            .arg(format!("{}@1", write.display()))
            .args(["-h", "127.0.0.1", "-p", &port, "-U", "app", "app"])
            .env("PGPASSWORD", "app-secret")
            .env("PGCONNECT_TIMEOUT", "10")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("pgbench hung")
    .expect("pgbench runs (is postgresql-client installed?)");
    let _ = std::fs::remove_dir_all(&dir);
    r.stop().await;
    Outcome {
        status: out.status,
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The number after `label` on its line.
fn number_after(output: &str, label: &str) -> u64 {
    let line = output
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("pgbench printed no `{label}` line:\n{output}"));
    line[line.find(label).expect("label") + label.len()..]
        .split_whitespace()
        .next()
        .and_then(|w| w.split('/').next())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse `{line}`"))
}

fn check(mode: &str, o: &Outcome) {
    assert!(
        o.status.success(),
        "pgbench -M {mode} failed ({}):\n{}",
        o.status,
        o.output
    );
    assert!(
        !o.output.contains("aborted"),
        "pgbench -M {mode}: a client aborted:\n{}",
        o.output
    );
    let failed = number_after(&o.output, "number of failed transactions:");
    assert_eq!(failed, 0, "pgbench -M {mode}:\n{}", o.output);
    let processed = number_after(&o.output, "number of transactions actually processed:");
    assert!(
        processed > 0,
        "pgbench -M {mode} processed nothing:\n{}",
        o.output
    );
}

#[tokio::test]
async fn pgbench_simple() {
    let o = pgbench("simple").await;
    check("simple", &o);
}

#[tokio::test]
async fn pgbench_extended() {
    let o = pgbench("extended").await;
    check("extended", &o);
}

#[tokio::test]
async fn pgbench_prepared() {
    let o = pgbench("prepared").await;
    check("prepared", &o);
}
