//! `shardwire check` as operators run it: the repo's configs pass and print a summary;
//! a broken file fails with every problem and its line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

fn check(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardwire"))
        .arg("check")
        .args(args)
        .output()
        .expect("run shardwire check")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A temporary config file, removed on drop.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(name: &str, contents: &str) -> TempConfig {
        let path = std::env::temp_dir().join(format!(
            "shardwire-{name}-{}-{:?}.yaml",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, contents).expect("write temp config");
        TempConfig(path)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8 temp path")
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn repo_config_passes_and_summary_names_every_shard() {
    for name in ["shard-config.yaml", "tests/shard-config.test.yaml"] {
        let path = repo_file(name);
        let out = check(&["--config", path.to_str().expect("utf-8 path")]);
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {}{}",
            stdout,
            text(&out.stderr)
        );
        for shard in ["s0", "s1", "s2", "s3"] {
            assert!(
                stdout.contains(&format!("  {shard}  127.0.0.1:")),
                "{shard}:\n{stdout}"
            );
        }
        for needle in [
            "distribution users (key bigint, hash, 1024 slots)",
            "distribution accounts (key bigint, range)",
            "reference tables: countries",
            "default shard: s0",
        ] {
            assert!(stdout.contains(needle), "`{needle}` not in:\n{stdout}");
        }
    }
}

#[test]
fn list_shards_prints_tab_separated_lines() {
    let path = repo_file("tests/shard-config.test.yaml");
    let out = check(&["--config", path.to_str().expect("utf-8"), "--list-shards"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(
        lines,
        (0..4)
            .map(|i| format!("s{i}\t127.0.0.1\t{}\tapp\tapp\tapp-secret", 25433 + i))
            .collect::<Vec<_>>()
    );
}

#[test]
fn broken_config_fails_with_every_error_and_its_line() {
    let good = std::fs::read_to_string(repo_file("shard-config.yaml")).expect("read");
    let broken = good
        .replace(
            "{ slots: 256-511, shard: s1 }",
            "{ slots: 200-511, shard: s1 }",
        )
        .replace("default_shard: s0", "default_shard: s9");
    assert_ne!(broken, good);
    let line = |needle: &str| {
        broken
            .lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .expect("needle in file")
    };
    let tmp = TempConfig::new("broken", &broken);
    let out = check(&["--config", tmp.arg()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "error: default_shard: unknown shard `s9`; the shards are: s0, s1, s2, s3 (line {}, column",
            line("default_shard: s9")
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "error: distributions[0].placement[1].slots: slots 200-511 overlap 0-255 \
             (placement[0], shard s0) (line {}, column",
            line("200-511")
        )),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no summary for a broken config");

    // Unknown keys are all reported before anything else.
    let typo = good.replace("  checkout_timeout_ms:", "  checkout_timout_ms:");
    let tmp = TempConfig::new("typo", &typo);
    let out = check(&["--config", tmp.arg(), "--list-shards"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("error: pool.checkout_timout_ms: unknown key `checkout_timout_ms` (did you mean `checkout_timeout_ms`?)"),
        "{stderr}"
    );
}

#[test]
fn missing_file_is_an_error() {
    let out = check(&["--config", "/nonexistent/shard-config.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot read /nonexistent/shard-config.yaml"));
}
