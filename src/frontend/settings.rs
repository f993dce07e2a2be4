//! A client's session settings (startup parameters and SET), replayed on every pooled
//! connection it checks out and never left behind for another client.
//!
//! Each setting is kept as the SQL that establishes it, in the order set. A fingerprint
//! of the whole list tells whether a pooled connection already carries exactly these
//! settings, so the common case (same settings as last time) costs nothing.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

/// Startup parameters that are connection plumbing, not settings to replay.
const NOT_SETTINGS: &[&str] = &["user", "database", "options", "replication"];

/// What brings a server connection back to a clean session before a client's settings
/// are applied: identity, every parameter, cursors, temporary objects, advisory locks and
/// LISTENs (`DISCARD ALL` would also drop the router's prepared statements).
const RESET_SESSION: &str = "RESET SESSION AUTHORIZATION\n;\nRESET ROLE\n;\nRESET ALL\n;\nCLOSE ALL\n;\n\
                             DISCARD TEMP\n;\nSELECT pg_catalog.pg_advisory_unlock_all()\n;\nUNLISTEN *";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// From the startup packet: what RESET returns to, as in PostgreSQL.
    base: Vec<(String, String)>,
    /// Set since (lower-case name, SQL that sets it), in order.
    entries: Vec<(String, String)>,
    fingerprint: u64,
}

impl Settings {
    /// Settings from a startup packet: every parameter except plumbing, plus `-c name=value`
    /// pairs from `options`.
    pub fn from_startup(params: &[(String, String)]) -> Settings {
        let mut s = Settings::default();
        for (k, v) in params {
            if k == "options" {
                for (name, value) in parse_options(v) {
                    s.set(&name, startup_sql(&name, &value));
                }
            } else if !NOT_SETTINGS.contains(&k.as_str()) {
                s.set(k, startup_sql(k, v));
            }
        }
        s.base = std::mem::take(&mut s.entries);
        s.refresh();
        s
    }

    /// Record `sql` as the way to establish setting `name`, replacing an earlier one.
    pub fn set(&mut self, name: &str, sql: String) {
        let name = name.to_ascii_lowercase();
        self.entries.retain(|(n, _)| *n != name);
        self.entries.push((name, sql));
        self.refresh();
    }

    /// `RESET name` (`None`: RESET ALL): back to the startup value, if there was one.
    pub fn reset(&mut self, name: Option<&str>) {
        match name {
            Some(n) => {
                let n = n.to_ascii_lowercase();
                self.entries.retain(|(k, _)| *k != n);
            }
            None => self.entries.clear(),
        }
        self.refresh();
    }

    /// Whether a RESET of `name` on a server connection leaves it different from these
    /// settings (it resets to the server's default, not to the client's startup value).
    pub fn reset_differs(&self, name: Option<&str>) -> bool {
        match name {
            None => !self.base.is_empty(),
            Some(n) => self.base.iter().any(|(k, _)| k.eq_ignore_ascii_case(n)),
        }
    }

    fn refresh(&mut self) {
        if self.entries.is_empty() && self.base.is_empty() {
            self.fingerprint = 0;
            return;
        }
        let mut h = DefaultHasher::new();
        self.base.hash(&mut h);
        self.entries.hash(&mut h);
        // 0 means "no settings" and u64::MAX "unknown state"; keep both for that.
        self.fingerprint = h.finish().clamp(1, u64::MAX - 1);
    }

    /// 0 when there are no settings.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// SQL that brings a connection in any state to exactly these settings. Statements
    /// are separated by newlines so a client's trailing `-- comment` ends where it should.
    pub fn apply_sql(&self) -> String {
        let mut sql = String::from(RESET_SESSION);
        let overridden = |n: &str| self.entries.iter().any(|(k, _)| k == n);
        for (n, s) in &self.base {
            if !overridden(n) {
                sql.push_str("\n;\n");
                sql.push_str(s);
            }
        }
        for (_, s) in &self.entries {
            sql.push_str("\n;\n");
            sql.push_str(s);
        }
        sql
    }
}

/// SQL giving setting `name` the startup-parameter `value` exactly as PostgreSQL reads
/// it at startup (`search_path=a,b` is two schemas, which `SET x TO 'a,b'` would make
/// one).
pub fn startup_sql(name: &str, value: &str) -> String {
    format!(
        "SELECT pg_catalog.set_config('{}', '{}', false)",
        name.replace('\'', "''"),
        value.replace('\'', "''")
    )
}

/// `-c name=value` / `--name=value` pairs of the `options` startup parameter
/// (backslash escapes a space).
fn parse_options(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut out = Vec::new();
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let pair = if w == "-c" {
            it.next()
        } else if let Some(rest) = w.strip_prefix("--") {
            Some(rest.to_owned())
        } else {
            w.strip_prefix("-c").map(str::to_owned)
        };
        if let Some((k, v)) = pair.as_deref().and_then(|p| p.split_once('=')) {
            out.push((k.replace('-', "_"), v.to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_parameters_become_settings() {
        let mut s = Settings::from_startup(&[
            ("user".into(), "app".into()),
            ("database".into(), "app".into()),
            ("application_name".into(), "psql".into()),
            (
                "options".into(),
                "-c search_path=a,b --statement-timeout=5s -c x=it\\'s\\ ok".into(),
            ),
        ]);
        let want = format!(
            "{RESET_SESSION}\n;\nSELECT pg_catalog.set_config('application_name', 'psql', false)\n;\n\
             SELECT pg_catalog.set_config('search_path', 'a,b', false)\n;\n\
             SELECT pg_catalog.set_config('statement_timeout', '5s', false)\n;\n\
             SELECT pg_catalog.set_config('x', 'it''s ok', false)"
        );
        assert_eq!(s.apply_sql(), want);
        // A SET overrides the startup value; RESET brings the startup value back.
        let start = s.fingerprint();
        s.set(
            "search_path",
            "SET search_path = c -- trailing comment".into(),
        );
        assert!(s
            .apply_sql()
            .ends_with("SET search_path = c -- trailing comment"));
        assert!(!s.apply_sql().contains("'a,b'"));
        assert!(s.reset_differs(Some("search_path")));
        assert!(!s.reset_differs(Some("work_mem")));
        s.reset(None);
        assert_eq!(s.fingerprint(), start);
        assert_eq!(s.apply_sql(), want);
    }

    #[test]
    fn fingerprints_track_changes() {
        let mut s = Settings::default();
        assert_eq!(s.fingerprint(), 0);
        s.set("TimeZone", "SET TimeZone TO 'UTC'".into());
        let f1 = s.fingerprint();
        assert_ne!(f1, 0);
        s.set("timezone", "SET TimeZone TO 'UTC'".into());
        assert_eq!(s.fingerprint(), f1, "same setting again changes nothing");
        s.set("datestyle", "SET DateStyle TO ISO".into());
        assert_ne!(s.fingerprint(), f1);
        s.reset(Some("DateStyle"));
        assert_eq!(s.fingerprint(), f1);
        s.reset(None);
        assert_eq!(s.fingerprint(), 0);
    }
}
