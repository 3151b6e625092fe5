//! The HTTP API of the Consul agent: sessions through consulrs, and KV, `/v1/txn` and
//! blocking queries as plain HTTP on consulrs's own reqwest client. Every request is bounded
//! by the request timeout (a blocking query by its wait plus that), and every failure says
//! whether the request may have been applied.

use std::time::Duration;

use base64::Engine;
use consulrs::{client::ConsulClient, error::ClientError};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use sync_core::{Error, ErrorKind, Result};

use crate::{BACKEND, Config, error::Failure};

/// The `Flags` of every lock key: the value Consul's `api.Lock` (and `consul lock`) writes
/// and checks, so that they and this library recognise each other's locks.
pub(crate) const LOCK_FLAGS: u64 = 0x2ddc_cbc0_58a5_0c18;

/// Consul refuses a transaction of more operations than this.
pub(crate) const MAX_TXN_OPS: usize = 64;

/// Bytes kept in a key's URL path: the unreserved ones and `/`.
const PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// One KV entry as the agent returns it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct KvEntry {
    pub(crate) key: String,
    #[serde(default)]
    pub(crate) flags: u64,
    #[serde(default, deserialize_with = "base64_value")]
    pub(crate) value: Vec<u8>,
    /// The holding session, if the key is locked.
    #[serde(default)]
    pub(crate) session: Option<String>,
    #[serde(default)]
    pub(crate) lock_index: u64,
    pub(crate) create_index: u64,
    pub(crate) modify_index: u64,
}

fn base64_value<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<u8>, D::Error> {
    let text = Option::<String>::deserialize(d)?;
    match text {
        None => Ok(Vec::new()),
        Some(t) => base64::engine::general_purpose::STANDARD
            .decode(t)
            .map_err(serde::de::Error::custom),
    }
}

/// One operation of a `/v1/txn` transaction (its `KV` object).
#[derive(Clone, Debug, Serialize, Default)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct KvOp {
    pub(crate) verb: &'static str,
    pub(crate) key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) flags: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) index: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) session: Option<String>,
}

impl KvOp {
    fn new(verb: &'static str, key: &str) -> KvOp {
        KvOp {
            verb,
            key: key.to_string(),
            ..KvOp::default()
        }
    }

    /// Acquires `key` for `session` (re-entrant for the same session), writing `value` and the
    /// lock flags.
    pub(crate) fn lock(key: &str, session: &str, value: &[u8]) -> KvOp {
        KvOp {
            value: Some(encode(value)),
            flags: Some(LOCK_FLAGS),
            session: Some(session.to_string()),
            ..KvOp::new("lock", key)
        }
    }

    /// Releases `key` if `session` holds it (fails the transaction otherwise), keeping the
    /// key with an empty value: its Session turns empty, as when the session ends.
    pub(crate) fn unlock(key: &str, session: &str) -> KvOp {
        KvOp {
            session: Some(session.to_string()),
            ..KvOp::new("unlock", key)
        }
    }

    /// Fails the transaction unless `session` holds `key`.
    pub(crate) fn check_session(key: &str, session: &str) -> KvOp {
        KvOp {
            session: Some(session.to_string()),
            ..KvOp::new("check-session", key)
        }
    }

    /// Reads `key` (fails the transaction if it is absent).
    pub(crate) fn get(key: &str) -> KvOp {
        KvOp::new("get", key)
    }

    /// Reads every key under `prefix` (none found is no failure: the answer just lacks them).
    pub(crate) fn get_tree(prefix: &str) -> KvOp {
        KvOp::new("get-tree", prefix)
    }

    /// Deletes every key under `prefix`.
    pub(crate) fn delete_tree(prefix: &str) -> KvOp {
        KvOp::new("delete-tree", prefix)
    }

    /// Deletes `key` (whoever holds it).
    pub(crate) fn delete(key: &str) -> KvOp {
        KvOp::new("delete", key)
    }

    /// Deletes `key` if its ModifyIndex is `index`. Consul counts an absent key as deleted:
    /// put [`KvOp::check_index`] first where absence must fail.
    pub(crate) fn delete_cas(key: &str, index: u64) -> KvOp {
        KvOp {
            index: Some(index),
            ..KvOp::new("delete-cas", key)
        }
    }

    /// Writes `key` unconditionally.
    pub(crate) fn set(key: &str, value: &[u8]) -> KvOp {
        KvOp {
            value: Some(encode(value)),
            ..KvOp::new("set", key)
        }
    }

    /// Writes `key` if its ModifyIndex is `index` (0: if it does not exist).
    pub(crate) fn cas(key: &str, value: &[u8], index: u64) -> KvOp {
        KvOp {
            value: Some(encode(value)),
            index: Some(index),
            ..KvOp::new("cas", key)
        }
    }

    /// Fails the transaction unless `key`'s ModifyIndex is `index`.
    pub(crate) fn check_index(key: &str, index: u64) -> KvOp {
        KvOp {
            index: Some(index),
            ..KvOp::new("check-index", key)
        }
    }

    /// Fails the transaction if `key` exists.
    pub(crate) fn check_not_exists(key: &str) -> KvOp {
        KvOp::new("check-not-exists", key)
    }
}

fn encode(value: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(value)
}

#[derive(Serialize)]
struct TxnOp<'a> {
    #[serde(rename = "KV")]
    kv: &'a KvOp,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TxnAnswer {
    #[serde(default)]
    results: Option<Vec<TxnResult>>,
    #[serde(default)]
    errors: Option<Vec<TxnError>>,
}

#[derive(Deserialize)]
struct TxnResult {
    #[serde(rename = "KV")]
    kv: Option<KvEntry>,
}

/// Why a transaction was rolled back: the operation and Consul's words.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct TxnError {
    pub(crate) op_index: usize,
    pub(crate) what: String,
}

/// A transaction's outcome: the entries its operations returned, in order (writes, locks and
/// checks return one without the value, `get` one with it, `get-tree` one per key found;
/// deletes and a passed `check-not-exists` none, so entries line up with operations only when
/// every operation returns one), or why it was rolled back.
pub(crate) enum Txn {
    Done(Vec<Option<KvEntry>>),
    RolledBack(Vec<TxnError>),
}

/// A read, with the index to block on for the next change.
pub(crate) struct Read<T> {
    pub(crate) value: T,
    pub(crate) index: u64,
}

/// The agent's API, shared by every handle of one client.
pub(crate) struct Api {
    consul: ConsulClient,
    base: String,
    token: Option<String>,
    datacenter: Option<String>,
    timeout: Duration,
    wait: Duration,
}

impl Api {
    /// A client for `config` (nothing is sent yet). InvalidArgument for unreadable TLS files.
    pub(crate) fn new(config: &Config) -> Result<Api> {
        let http = http_client(config)?;
        let base = config.base_url();
        let settings = consulrs::client::ConsulClientSettings {
            address: base.clone(),
            ca_certs: Vec::new(),
            client_cert: None,
            client_key: None,
            token: config.token.clone(),
            verify: true,
            version: 1,
        };
        Ok(Api {
            consul: ConsulClient {
                http: rustify::clients::reqwest::Client::new(&base, http),
                settings,
            },
            base,
            token: config.token.clone(),
            datacenter: config.datacenter.clone(),
            timeout: config.request_timeout,
            wait: config.wait,
        })
    }

    fn http(&self) -> &reqwest::Client {
        &self.consul.http.http
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.base)
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .http()
            .request(method, self.url(path))
            .timeout(self.timeout);
        if let Some(token) = &self.token {
            req = req.header("X-Consul-Token", token);
        }
        if let Some(dc) = &self.datacenter {
            req = req.query(&[("dc", dc)]);
        }
        req
    }

    /// A blocking query's request: consistent, waiting for a change past `index` (not at all
    /// for 0), bounded by the wait, Consul's jitter (wait/16) and the request timeout.
    fn blocking(&self, path: &str, index: u64, extra: &[(&str, &str)]) -> reqwest::RequestBuilder {
        let mut req = self
            .request(reqwest::Method::GET, path)
            .query(&[("consistent", "")])
            .query(extra);
        if index > 0 {
            let wait = format!("{}ms", self.wait.as_millis());
            req = req
                .query(&[("index", index.to_string()), ("wait", wait)])
                .timeout(self.wait + self.wait / 16 + self.timeout);
        }
        req
    }

    /// Runs a transaction of at most [`MAX_TXN_OPS`] operations.
    pub(crate) async fn txn(&self, what: &str, ops: &[KvOp]) -> std::result::Result<Txn, Failure> {
        let body: Vec<TxnOp<'_>> = ops.iter().map(|kv| TxnOp { kv }).collect();
        let body = serde_json::to_vec(&body).map_err(|e| Failure::sure(unexpected(what, e)))?;
        // Read-only transactions (checks of held keys) are consistent reads; writes ignore it.
        let res = self
            .request(reqwest::Method::PUT, "txn")
            .query(&[("consistent", "")])
            .body(body)
            .send()
            .await
            .map_err(|e| Failure::transport(what, e))?;
        let status = res.status().as_u16();
        let text = read_body(what, res).await?;
        match status {
            200 | 409 => {}
            _ => return Err(Failure::status(what, status, &text)),
        }
        let answer: TxnAnswer =
            serde_json::from_slice(&text).map_err(|e| Failure::sure(unexpected(what, e)))?;
        match (answer.results, answer.errors) {
            (_, Some(errors)) if !errors.is_empty() => {
                if let Some(denied) = errors.iter().find(|e| is_denial(&e.what)) {
                    return Err(Failure::sure(unauthorized(what, &denied.what)));
                }
                Ok(Txn::RolledBack(errors))
            }
            (Some(results), _) => Ok(Txn::Done(results.into_iter().map(|r| r.kv).collect())),
            (None, _) => Ok(Txn::Done(Vec::new())),
        }
    }

    /// Writes `value` to `key` with a plain PUT, for values too big for a transaction (Consul
    /// bounds a whole `/v1/txn` body by the size of one value, and base64 makes a value a
    /// third bigger there). With `cas`, only if the key's ModifyIndex is that (0: absent).
    /// Whether it was written.
    pub(crate) async fn put(
        &self,
        what: &str,
        key: &str,
        value: Vec<u8>,
        cas: Option<u64>,
    ) -> std::result::Result<bool, Failure> {
        let mut req = self
            .request(reqwest::Method::PUT, &kv_path(key))
            .body(value);
        if let Some(index) = cas {
            req = req.query(&[("cas", index.to_string())]);
        }
        let res = req.send().await.map_err(|e| Failure::transport(what, e))?;
        let status = res.status().as_u16();
        let text = read_body(what, res).await?;
        if status != 200 {
            return Err(Failure::status(what, status, &text));
        }
        parse::<bool>(what, &text)
    }

    /// Reads `key` (consistent), blocking until it changes past `index` when that is not 0.
    pub(crate) async fn get(
        &self,
        what: &str,
        key: &str,
        index: u64,
    ) -> std::result::Result<Read<Option<KvEntry>>, Failure> {
        let read = self.kv_read(what, key, index, &[]).await?;
        Ok(Read {
            value: read.value.into_iter().next(),
            index: read.index,
        })
    }

    /// Every entry under `prefix` (consistent), blocking past `index` when that is not 0.
    pub(crate) async fn list(
        &self,
        what: &str,
        prefix: &str,
        index: u64,
    ) -> std::result::Result<Read<Vec<KvEntry>>, Failure> {
        self.kv_read(what, prefix, index, &[("recurse", "")]).await
    }

    /// A KV read: the entries found (none for a 404, which still carries the index).
    async fn kv_read(
        &self,
        what: &str,
        key: &str,
        index: u64,
        extra: &[(&str, &str)],
    ) -> std::result::Result<Read<Vec<KvEntry>>, Failure> {
        let res = self
            .blocking(&kv_path(key), index, extra)
            .send()
            .await
            .map_err(|e| Failure::transport(what, e))?;
        let index = consul_index(&res);
        let status = res.status().as_u16();
        let text = read_body(what, res).await?;
        let value = match status {
            404 => Vec::new(),
            200 => parse::<Vec<KvEntry>>(what, &text)?,
            _ => return Err(Failure::status(what, status, &text)),
        };
        Ok(Read { value, index })
    }

    /// Whether session `id` exists (consistent), blocking past `index` when not 0.
    pub(crate) async fn session_exists(
        &self,
        id: &str,
        index: u64,
    ) -> std::result::Result<Read<bool>, Failure> {
        let what = "reading the session";
        let res = self
            .blocking(&format!("session/info/{id}"), index, &[])
            .send()
            .await
            .map_err(|e| Failure::transport(what, e))?;
        let index = consul_index(&res);
        let status = res.status().as_u16();
        let text = read_body(what, res).await?;
        if status != 200 {
            return Err(Failure::status(what, status, &text));
        }
        // `null` or `[]` for a session that is gone.
        let found: Option<Vec<serde_json::Value>> = parse(what, &text)?;
        Ok(Read {
            value: found.is_some_and(|s| !s.is_empty()),
            index,
        })
    }

    /// Creates a session: TTL, lock-delay, behaviour `release`, no node checks (only the TTL
    /// decides its life). Its id. Plain HTTP: consulrs's create request cannot name a
    /// datacenter.
    pub(crate) async fn session_create(
        &self,
        name: &str,
        ttl: Duration,
        lock_delay: Duration,
    ) -> std::result::Result<String, Failure> {
        let what = "creating the session";
        let body = serde_json::json!({
            "Name": name,
            "Behavior": "release",
            "TTL": format!("{}s", ttl.as_secs()),
            "LockDelay": format!("{}ms", lock_delay.as_millis()),
            "NodeChecks": [],
        });
        let res = self
            .request(reqwest::Method::PUT, "session/create")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| Failure::transport(what, e))?;
        let status = res.status().as_u16();
        let text = read_body(what, res).await?;
        if status != 200 {
            return Err(Failure::status(what, status, &text));
        }
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        Ok(parse::<Created>(what, &text)?.id)
    }

    /// Renews session `id`: false when Consul no longer has it.
    pub(crate) async fn session_renew(&self, id: &str) -> std::result::Result<bool, Failure> {
        let what = "renewing the session";
        let mut opts = consulrs::api::session::requests::RenewSessionRequest::builder();
        if let Some(dc) = &self.datacenter {
            opts.dc(dc.as_str());
        }
        match self
            .bounded(
                what,
                consulrs::session::renew(&self.consul, id, Some(&mut opts)),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(Failure::Status { code: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Destroys session `id`: Consul releases its locks (their lock-delay applies).
    pub(crate) async fn session_destroy(&self, id: &str) -> std::result::Result<(), Failure> {
        let what = "destroying the session";
        let mut opts = consulrs::api::session::requests::DeleteSessionRequest::builder();
        if let Some(dc) = &self.datacenter {
            opts.dc(dc.as_str());
        }
        self.bounded(
            what,
            consulrs::session::delete(&self.consul, id, Some(&mut opts)),
        )
        .await
        .map(|_| ())
    }

    /// A consulrs call bounded by the request timeout, its error as a [`Failure`].
    async fn bounded<T>(
        &self,
        what: &str,
        call: impl Future<Output = std::result::Result<T, ClientError>>,
    ) -> std::result::Result<T, Failure> {
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(Failure::Unknown(unavailable(
                what,
                format!("no answer within {:?}", self.timeout),
            ))),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(consulrs_failure(what, e)),
        }
    }
}

/// Why TLS to the agent failed, if a certificate was refused: with TLS 1.3 an agent refuses
/// the client's certificate after the client thinks the handshake is done, and the request only
/// sees the connection close. One request with TLS 1.2 at most (refusals come in the
/// handshake) tells.
pub(crate) async fn tls_refusal(config: &Config) -> Option<Error> {
    let builder = reqwest::Client::builder().max_tls_version(reqwest::tls::Version::TLS_1_2);
    let client = http_builder(config, builder).ok()?;
    let url = format!("{}/v1/status/leader", config.base_url());
    let e = client
        .get(url)
        .timeout(config.request_timeout)
        .send()
        .await
        .err()?;
    let e = Failure::transport("connecting with TLS", e).error();
    matches!(
        e.kind(),
        ErrorKind::Unauthorized | ErrorKind::InvalidArgument
    )
    .then_some(e)
}

/// The reqwest client of consulrs, built here: rustls with the configured roots and client
/// identity, and the connect timeout (consulrs's own builder can set neither).
fn http_client(config: &Config) -> Result<reqwest::Client> {
    http_builder(config, reqwest::Client::builder())
}

fn http_builder(config: &Config, builder: reqwest::ClientBuilder) -> Result<reqwest::Client> {
    let mut builder = builder
        .use_rustls_tls()
        .connect_timeout(config.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true);
    if let Some(ca) = &config.ca_file {
        let pem = read_file("ca_file", ca)?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| file_err("ca_file", ca, format!("holds no PEM certificate: {e}")))?;
        if certs.is_empty() {
            return Err(file_err("ca_file", ca, "holds no PEM certificate"));
        }
        builder = builder.tls_built_in_root_certs(false);
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
        let mut pem = read_file("cert_file", cert)?;
        pem.push(b'\n');
        pem.extend(read_file("key_file", key)?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            file_err(
                "cert_file",
                cert,
                format!("and key_file {key:?} are not a PEM certificate and its key: {e}"),
            )
        })?;
        builder = builder.identity(identity);
    }
    builder.build().map_err(|e| {
        Error::invalid(format!("building the HTTP client: {e}"))
            .with_backend(BACKEND)
            .with_source(e)
    })
}

fn read_file(what: &str, path: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| file_err(what, path, format!("cannot be read: {e}")))
}

fn file_err(what: &str, path: &str, why: impl std::fmt::Display) -> Error {
    Error::invalid(format!("{what} {path:?} {why}")).with_backend(BACKEND)
}

/// A key's path under `/v1/kv/`, percent-encoded once.
fn kv_path(key: &str) -> String {
    format!("kv/{}", utf8_percent_encode(key, PATH))
}

fn consul_index(res: &reqwest::Response) -> u64 {
    res.headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn read_body(what: &str, res: reqwest::Response) -> std::result::Result<Vec<u8>, Failure> {
    res.bytes()
        .await
        .map(|b| b.to_vec())
        .map_err(|e| Failure::transport(what, e))
}

fn parse<T: serde::de::DeserializeOwned>(
    what: &str,
    text: &[u8],
) -> std::result::Result<T, Failure> {
    serde_json::from_slice(text).map_err(|e| Failure::sure(unexpected(what, e)))
}

/// Consul's words for a token that may not do this.
pub(crate) fn is_denial(what: &str) -> bool {
    what.contains("Permission denied") || what.contains("ACL not found")
}

fn consulrs_failure(what: &str, e: ClientError) -> Failure {
    match e {
        ClientError::APIError { code, message } => {
            Failure::status(what, code, message.unwrap_or_default().as_bytes())
        }
        ClientError::RestClientError { source } => match source {
            rustify::errors::ClientError::ServerResponseError { code, content } => {
                Failure::status(what, code, content.unwrap_or_default().as_bytes())
            }
            rustify::errors::ClientError::RequestError { source, .. } => {
                match source.downcast::<reqwest::Error>() {
                    Ok(e) => Failure::transport(what, e),
                    Err(e) => Failure::Unknown(unavailable(what, e)),
                }
            }
            other => Failure::sure(unexpected(what, other)),
        },
        other => Failure::sure(unexpected(what, other)),
    }
}

/// Unavailable: the agent could not be reached or did not answer.
pub(crate) fn unavailable(what: &str, why: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Unavailable, format!("{what}: {why}")).with_backend(BACKEND)
}

/// Unauthorized: the token may not do this.
pub(crate) fn unauthorized(what: &str, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Unauthorized,
        format!("{what}: {why} (check the ACL token)"),
    )
    .with_backend(BACKEND)
}

/// An answer this client did not expect.
pub(crate) fn unexpected(what: &str, detail: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Backend,
        format!("{what}: unexpected answer from consul: {detail}"),
    )
    .with_backend(BACKEND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_once() {
        assert_eq!(kv_path("sync/a%2Fb/.lock"), "kv/sync/a%252Fb/.lock");
        assert_eq!(kv_path("sync/ünï"), "kv/sync/%C3%BCn%C3%AF");
    }

    #[test]
    fn entries_parse_with_null_values() {
        let json = r#"[{"LockIndex":1,"Key":"k","Flags":3304740253564472344,"Value":null,
            "Session":"s","CreateIndex":5,"ModifyIndex":7}]"#;
        let e: Vec<KvEntry> = serde_json::from_str(json).unwrap();
        assert_eq!(e[0].value, b"");
        assert_eq!(e[0].flags, LOCK_FLAGS);
        assert_eq!(e[0].session.as_deref(), Some("s"));
    }

    #[test]
    fn ops_serialize_as_consul_expects() {
        let op = KvOp::lock("k", "s", b"v");
        let json = serde_json::to_string(&TxnOp { kv: &op }).unwrap();
        assert_eq!(
            json,
            r#"{"KV":{"Verb":"lock","Key":"k","Value":"dg==","Flags":3304740253564472344,"Session":"s"}}"#
        );
    }
}
