//! The PEM files of a TLS config, read off the runtime's worker threads.

use redis::{ClientTlsConfig, RedisError, RedisResult, TlsCertificates};

use crate::Config;

/// The CA and client certificate of `config`, or None to trust the system's roots with no
/// client certificate.
pub(crate) async fn certificates(config: &Config) -> RedisResult<Option<TlsCertificates>> {
    if !config.tls || (config.ca_file.is_none() && config.cert_file.is_none()) {
        return Ok(None);
    }
    let files = [
        config.ca_file.clone(),
        config.cert_file.clone(),
        config.key_file.clone(),
    ];
    let [ca, cert, key] = tokio::task::spawn_blocking(move || files.map(read))
        .await
        .map_err(|e| invalid(format!("reading the TLS files: {e}")))?;
    let client_tls = match (cert?, key?) {
        (Some(client_cert), Some(client_key)) => Some(ClientTlsConfig {
            client_cert,
            client_key,
        }),
        _ => None,
    };
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert: ca?,
    }))
}

fn read(path: Option<String>) -> RedisResult<Option<Vec<u8>>> {
    let Some(path) = path else { return Ok(None) };
    let pem = std::fs::read(&path).map_err(|e| invalid(format!("reading {path:?}: {e}")))?;
    if !pem.starts_with(b"-----BEGIN") {
        return Err(invalid(format!("{path:?} is not a PEM file")));
    }
    Ok(Some(pem))
}

fn invalid(why: String) -> RedisError {
    RedisError::from((
        redis::ErrorKind::InvalidClientConfig,
        "bad TLS configuration",
        why,
    ))
}
