//! The start of a client connection: SSL/GSS refusal, protocol version, database check,
//! SCRAM-SHA-256 authentication, and the ParameterStatus/BackendKeyData greeting.
//! Cancel requests arrive here too (they come on a connection of their own).

use bytes::{BufMut, BytesMut};

use super::client::{ClientConn, ClientError};
use super::Shared;
use crate::auth::{ScramServer, ScramVerifier};
use crate::protocol::codec::StartupPacket;
use crate::protocol::messages;
use crate::protocol::{sqlstate, PgError};

/// A client that finished the handshake.
pub struct Greeted {
    pub user: String,
    pub params: Vec<(String, String)>,
}

/// How the handshake ended without a session.
pub enum Handshake {
    Session(Greeted),
    /// A CancelRequest was served, or the client went away.
    Done,
}

/// Run the handshake. Errors the client should see are sent before returning `Done`.
pub async fn handshake(client: &mut ClientConn, shared: &Shared) -> Result<Handshake, ClientError> {
    loop {
        let pkt = match client.read_startup().await {
            Ok(p) => p,
            Err(ClientError::Startup(e)) => {
                fatal(
                    client,
                    PgError::fatal(sqlstate::PROTOCOL_VIOLATION, e.to_string()),
                )
                .await?;
                return Ok(Handshake::Done);
            }
            Err(e) => return Err(e),
        };
        match pkt {
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                if client.has_pending_input() {
                    // Data after SSLRequest before our answer would be read as if it
                    // came over TLS; PostgreSQL refuses this too (CVE-2021-23214).
                    fatal(
                        client,
                        PgError::fatal(
                            sqlstate::PROTOCOL_VIOLATION,
                            "received unencrypted data after SSL request",
                        ),
                    )
                    .await?;
                    return Ok(Handshake::Done);
                }
                client.write_now(b"N").await?;
            }
            StartupPacket::Cancel { pid, secret } => {
                let targets = shared.cancels.targets(pid, secret);
                for t in targets {
                    if let Err(e) = crate::backend::conn::cancel(t.addr, t.pid, t.secret).await {
                        tracing::warn!(error = %e, "cancel request to shard failed");
                    }
                }
                return Ok(Handshake::Done);
            }
            StartupPacket::Startup { version, params } => {
                return startup(client, shared, version, params).await
            }
        }
    }
}

async fn fatal(client: &mut ClientConn, e: PgError) -> Result<(), ClientError> {
    client.send_error(&e);
    client.flush().await
}

async fn startup(
    client: &mut ClientConn,
    shared: &Shared,
    version: i32,
    params: Vec<(String, String)>,
) -> Result<Handshake, ClientError> {
    let major = version >> 16;
    let minor = version & 0xffff;
    if major != 3 {
        let msg =
            format!("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0");
        fatal(client, PgError::fatal(sqlstate::FEATURE_NOT_SUPPORTED, msg)).await?;
        return Ok(Handshake::Done);
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(user) = get("user").filter(|u| !u.is_empty()) else {
        let e = PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
            "no PostgreSQL user name specified in startup packet",
        );
        fatal(client, e).await?;
        return Ok(Handshake::Done);
    };
    if get("replication").is_some_and(|r| r != "false" && r != "off" && r != "0" && r != "no") {
        let e = PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            "replication connections are not supported by shardwire",
        )
        .with_hint("connect to a shard directly for replication");
        fatal(client, e).await?;
        return Ok(Handshake::Done);
    }
    // Minor versions above 3.0 and _pq_ options: say what we speak, as PostgreSQL does.
    let unknown_opts: Vec<&str> = params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("_pq_."))
        .collect();
    if minor > 0 || !unknown_opts.is_empty() {
        let at = messages::begin(&mut client.wbuf, b'v');
        client.wbuf.put_i32(PROTOCOL_MINOR);
        client.wbuf.put_i32(unknown_opts.len() as i32);
        for o in &unknown_opts {
            messages::put_cstr(&mut client.wbuf, o);
        }
        messages::finish(&mut client.wbuf, at);
    }
    if let Some(enc) = get("client_encoding").filter(|e| !encoding_ok(e)) {
        let e = PgError::fatal(
            sqlstate::FEATURE_NOT_SUPPORTED,
            format!("client_encoding \"{enc}\" is not supported by shardwire"),
        )
        .with_hint(
            "use UTF8 (for psql: PGCLIENTENCODING=UTF8); shard keys are read and hashed as UTF-8",
        );
        fatal(client, e).await?;
        return Ok(Handshake::Done);
    }
    let database = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());

    // Authenticate before saying anything about the database, as PostgreSQL does.
    let verifier = shared.users.get(&user).map(|u| u.verifier.clone());
    let known = verifier.is_some();
    let verifier = verifier.unwrap_or_else(ScramVerifier::impossible);
    if !authenticate(client, verifier).await? || !known {
        let e = PgError::fatal(
            sqlstate::INVALID_PASSWORD,
            format!("password authentication failed for user \"{user}\""),
        );
        fatal(client, e).await?;
        tracing::info!(user = %user, peer = %client.peer(), "authentication failed");
        return Ok(Handshake::Done);
    }
    if database != shared.database {
        let e = PgError::fatal(
            sqlstate::INVALID_CATALOG_NAME,
            format!("database \"{database}\" does not exist"),
        )
        .with_hint(format!(
            "this router serves database \"{}\"",
            shared.database
        ));
        fatal(client, e).await?;
        return Ok(Handshake::Done);
    }
    messages::authentication(&mut client.wbuf, 0, &[]);
    Ok(Handshake::Session(Greeted { user, params }))
}

const PROTOCOL_MINOR: i32 = 0;

/// SCRAM-SHA-256 exchange; `Ok(false)` if the client failed it (message not yet sent).
async fn authenticate(
    client: &mut ClientConn,
    verifier: ScramVerifier,
) -> Result<bool, ClientError> {
    messages::authentication(&mut client.wbuf, 10, b"SCRAM-SHA-256\0\0");
    client.flush().await?;
    let first = client.read_raw().await?;
    if first[0] != b'p' {
        return Ok(false);
    }
    let body = &first[5..];
    let Some(mech_end) = body.iter().position(|b| *b == 0) else {
        return Ok(false);
    };
    if &body[..mech_end] != b"SCRAM-SHA-256" || body.len() < mech_end + 5 {
        return Ok(false);
    }
    let data = &body[mech_end + 5..];
    let Ok((server, server_first)) = ScramServer::start(verifier, data) else {
        return Ok(false);
    };
    messages::authentication(&mut client.wbuf, 11, server_first.as_bytes());
    client.flush().await?;
    let fin = client.read_raw().await?;
    if fin[0] != b'p' {
        return Ok(false);
    }
    match server.finish(&fin[5..]) {
        Ok(server_final) => {
            messages::authentication(&mut client.wbuf, 12, server_final.as_bytes());
            Ok(true)
        }
        Err(_) => Ok(false),
    }
}

/// ParameterStatus values a client is greeted with: the default shard's, with the
/// client's own startup settings and identity on top.
pub fn greeting(shared: &Shared, g: &Greeted, pid: i32, secret: i32, out: &mut BytesMut) {
    let mut params = shared.server_params();
    let mut set =
        |k: &str, v: &str| match params.iter_mut().find(|(n, _)| n.eq_ignore_ascii_case(k)) {
            Some(p) => p.1 = v.to_owned(),
            None => params.push((k.to_owned(), v.to_owned())),
        };
    set("session_authorization", &g.user);
    set("is_superuser", "off");
    for (k, v) in &g.params {
        if REPORTED.iter().any(|r| r.eq_ignore_ascii_case(k)) {
            set(k, v);
        }
    }
    for (k, v) in &params {
        messages::parameter_status(out, k, v);
    }
    messages::backend_key_data(out, pid, secret);
    messages::ready_for_query(out, b'I');
}

/// Settings PostgreSQL reports with ParameterStatus (GUC_REPORT) that a client may set
/// at startup.
const REPORTED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
];

/// Client encodings the router can read statements in: UTF-8, and SQL_ASCII (bytes
/// passed through, which is what a C-locale psql asks for).
pub fn encoding_ok(name: &str) -> bool {
    let n: String = name
        .chars()
        .filter(|c| *c != '-' && *c != '_' && *c != '\'' && *c != '"')
        .collect::<String>()
        .to_ascii_lowercase();
    matches!(
        n.trim(),
        "utf8" | "unicode" | "sqlascii" | "auto" | "default"
    )
}
