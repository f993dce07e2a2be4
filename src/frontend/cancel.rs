//! Query cancellation: the keys handed to clients, and which shard connections each
//! client is running statements on right now.
//!
//! A CancelRequest with a key we issued reaches exactly those shard connections; an
//! unknown or stale key (wrong secret, finished session) touches nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rand::Rng;

/// Where to send a cancel for one server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerKey {
    pub addr: SocketAddr,
    pub pid: i32,
    pub secret: i32,
}

/// The shard connections a session is using, shared with the registry.
pub type Active = Arc<Mutex<Vec<ServerKey>>>;

#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<i32, (i32, Active)>>,
}

impl CancelRegistry {
    /// Issue a fresh (pid, secret) for a new session.
    pub fn register(&self) -> (i32, i32, Active) {
        let active: Active = Arc::default();
        let mut rng = rand::thread_rng();
        let secret: i32 = rng.gen();
        let Ok(mut map) = self.sessions.lock() else {
            return (0, secret, active);
        };
        loop {
            let pid: i32 = rng.gen_range(1..i32::MAX);
            if let std::collections::hash_map::Entry::Vacant(e) = map.entry(pid) {
                e.insert((secret, active.clone()));
                return (pid, secret, active);
            }
        }
    }

    pub fn unregister(&self, pid: i32) {
        if let Ok(mut map) = self.sessions.lock() {
            map.remove(&pid);
        }
    }

    /// The server connections to cancel for this key, if it is valid.
    pub fn targets(&self, pid: i32, secret: i32) -> Vec<ServerKey> {
        let Ok(map) = self.sessions.lock() else {
            return Vec::new();
        };
        match map.get(&pid) {
            Some((s, active)) if *s == secret => {
                active.lock().map(|a| a.clone()).unwrap_or_default()
            }
            _ => Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_right_secret_finds_targets() {
        let reg = CancelRegistry::default();
        let (pid, secret, active) = reg.register();
        let key = ServerKey {
            addr: "127.0.0.1:5433".parse().expect("addr"),
            pid: 42,
            secret: 7,
        };
        active.lock().expect("lock").push(key);
        assert_eq!(reg.targets(pid, secret), vec![key]);
        assert!(reg.targets(pid, secret.wrapping_add(1)).is_empty());
        assert!(reg.targets(pid.wrapping_add(1), secret).is_empty());
        reg.unregister(pid);
        assert!(reg.targets(pid, secret).is_empty());
    }
}
