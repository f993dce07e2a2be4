//! Server-side SCRAM-SHA-256 (RFC 5802 / 7677 as PostgreSQL uses it) for clients of the
//! router. Owns verifiers and the two-round exchange; does no I/O (the frontend moves
//! the messages).
//!
//! Channel binding is not offered (no TLS yet), so `p=` GS2 headers are refused.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// PostgreSQL's default iteration count.
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// What the server keeps for a password: salt, iterations, StoredKey, ServerKey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Derive a verifier from a plaintext password with a fresh random salt.
    pub fn from_password(password: &str) -> ScramVerifier {
        let mut salt = vec![0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        Self::derive(password, salt, DEFAULT_ITERATIONS)
    }

    fn derive(password: &str, salt: Vec<u8>, iterations: u32) -> ScramVerifier {
        // PostgreSQL applies SASLprep; for ASCII passwords it is the identity. Non-ASCII
        // passwords are used as their UTF-8 bytes, as PostgreSQL does when SASLprep fails.
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), &salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac(&salted, b"Server Key");
        ScramVerifier {
            iterations,
            salt,
            stored_key,
            server_key,
        }
    }

    /// Parse `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>` (PostgreSQL's format).
    pub fn parse(s: &str) -> Option<ScramVerifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iter, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations = iter.parse().ok().filter(|i| *i > 0)?;
        let salt = B64.decode(salt).ok()?;
        let stored_key = B64.decode(stored).ok()?.try_into().ok()?;
        let server_key = B64.decode(server).ok()?.try_into().ok()?;
        Some(ScramVerifier {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }

    /// A config password: a stored verifier, or plaintext to derive one from.
    pub fn from_config(password: &str) -> ScramVerifier {
        if password.starts_with("SCRAM-SHA-256$") {
            if let Some(v) = Self::parse(password) {
                return v;
            }
        }
        Self::from_password(password)
    }

    /// A verifier no password matches, for unknown users: the exchange runs to the end
    /// and fails like a wrong password, so user names cannot be probed.
    pub fn impossible() -> ScramVerifier {
        let mut v = Self::from_password("");
        rand::thread_rng().fill_bytes(&mut v.stored_key);
        v
    }

    pub fn encode(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so new_from_slice cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("password authentication failed")]
    BadProof,
}

/// The server's side of one exchange, between the client-first and client-final messages.
pub struct ScramServer {
    verifier: ScramVerifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ScramServer {
    /// Take the client-first message; returns the server-first message to send.
    pub fn start(
        verifier: ScramVerifier,
        client_first: &[u8],
    ) -> Result<(ScramServer, String), ScramError> {
        let msg =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: "n,," or "y,," (client could bind, thinks we can't); "p=…" binds.
        let bare = if let Some(r) = msg.strip_prefix("n,") {
            r
        } else if let Some(r) = msg.strip_prefix("y,") {
            r
        } else if msg.starts_with("p=") {
            return Err(ScramError::ChannelBinding);
        } else {
            return Err(ScramError::Malformed("bad GS2 header"));
        };
        // Optional authzid, then the bare message.
        let (_authzid, bare) = bare
            .split_once(',')
            .ok_or(ScramError::Malformed("bad GS2 header"))?;
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(ScramError::Malformed("missing nonce"))?;
        let mut raw = [0u8; 18];
        rand::thread_rng().fill_bytes(&mut raw);
        let nonce = format!("{client_nonce}{}", B64.encode(raw));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let server = ScramServer {
            verifier,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((server, server_first))
    }

    /// Check the client-final message; returns the server-final message on success.
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let msg =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("missing proof"))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("missing channel binding"))?;
        // "biws" is base64("n,,"); "eSws" is base64("y,,").
        if binding != "biws" && binding != "eSws" {
            return Err(ScramError::ChannelBinding);
        }
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("missing nonce"))?;
        if nonce != self.nonce {
            return Err(ScramError::Malformed("nonce mismatch"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::Malformed("proof has the wrong length"));
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ signature[i];
        }
        let check: [u8; 32] = Sha256::digest(client_key).into();
        // Constant-time comparison.
        let diff = check
            .iter()
            .zip(self.verifier.stored_key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(server_pw: &str, client_pw: &str) -> Result<(), ScramError> {
        let verifier = ScramVerifier::from_config(server_pw);
        let mut client = ScramSha256::new(client_pw.as_bytes(), ChannelBinding::unsupported());
        let (server, first) = ScramServer::start(verifier, client.message())?;
        client
            .update(first.as_bytes())
            .expect("client accepts server-first");
        let fin = server.finish(client.message())?;
        client
            .finish(fin.as_bytes())
            .expect("client verifies the server");
        Ok(())
    }

    #[test]
    fn a_real_client_authenticates() {
        assert_eq!(exchange("app-secret", "app-secret"), Ok(()));
    }

    #[test]
    fn wrong_passwords_fail() {
        assert_eq!(
            exchange("app-secret", "app-secreT"),
            Err(ScramError::BadProof)
        );
    }

    #[test]
    fn stored_verifiers_round_trip() {
        let v = ScramVerifier::from_password("pw");
        let s = v.encode();
        assert_eq!(ScramVerifier::parse(&s), Some(v));
        assert_eq!(exchange(&s, "pw"), Ok(()));
        assert_eq!(exchange(&s, "nope"), Err(ScramError::BadProof));
        assert_eq!(ScramVerifier::parse("SCRAM-SHA-256$x:abc$a:b"), None);
    }

    #[test]
    fn channel_binding_and_garbage_are_refused() {
        let v = ScramVerifier::from_password("pw");
        assert!(matches!(
            ScramServer::start(v.clone(), b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::ChannelBinding)
        ));
        assert!(ScramServer::start(v.clone(), b"garbage").is_err());
        assert!(ScramServer::start(v.clone(), b"n,,n=,r=").is_err());
        let (s, _) = ScramServer::start(v, b"n,,n=,r=abc").expect("ok");
        assert!(s.finish(b"c=biws,r=wrong,p=AAAA").is_err());
    }
}
