//! How to reach etcd: endpoints, TLS and credentials.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};
use tonic::transport::Endpoint;

use crate::error::EtcdError;

/// Deadline of one unary etcd call: etcd answers in milliseconds, so a call
/// that takes seconds means etcd is down or partitioned.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of one connection attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings on the etcd connection: a dead etcd (or path) is noticed in
/// seconds, so streams are reopened promptly when it returns.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a ping may go unanswered before the connection counts as dead.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// TLS settings for etcd's client port.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM CA bundle that signed etcd's server certificate.
    pub ca: Option<PathBuf>,
    /// PEM client certificate (etcd's `--client-cert-auth`).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// Name expected in etcd's certificate (default: the endpoint's host).
    pub domain: Option<String>,
}

/// Where etcd is and how to authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379` (a bare `host:port` gets `http://`, or `https://` with TLS).
    pub endpoints: Vec<String>,
    /// TLS, if etcd serves it.
    pub tls: Option<EtcdTls>,
    /// User name and password, if etcd has auth enabled.
    pub credentials: Option<(String, String)>,
    /// Deadline of each unary call.
    pub call_timeout: Duration,
}

impl EtcdConfig {
    /// Plain-text, no auth, for `endpoints` (comma-separated lists are split).
    pub fn new(endpoints: &str) -> Self {
        Self {
            endpoints: endpoints.split(',').map(str::trim).filter(|e| !e.is_empty()).map(String::from).collect(),
            tls: None,
            credentials: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
        }
    }

    /// The endpoints as URLs with the scheme TLS implies.
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.endpoints.iter().map(|e| if e.contains("://") { e.clone() } else { format!("{scheme}://{e}") }).collect()
    }

    /// The endpoint URLs, each checked, and etcd-client's options (TLS files
    /// read now, so a missing one is named before any connection is tried).
    pub(crate) fn connect_options(&self) -> Result<(Vec<String>, ConnectOptions), EtcdError> {
        if self.endpoints.is_empty() {
            return Err(EtcdError::Config("no etcd endpoints given".into()));
        }
        let urls = self.urls();
        for url in &urls {
            Endpoint::from_shared(url.clone()).map_err(|err| EtcdError::Config(format!("endpoint `{url}`: {err}")))?;
            if self.tls.is_some() && url.starts_with("http://") {
                return Err(EtcdError::Config(format!("endpoint `{url}`: TLS needs an https:// URL")));
            }
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(DEFAULT_CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true)
            // An expired token (or one etcd forgot when it restarted) is renewed
            // with the credentials and the call retried, instead of failing.
            .with_auto_token_refresh(true);
        if let Some((user, password)) = &self.credentials {
            options = options.with_user(user, password);
        }
        if let Some(t) = &self.tls {
            options = options.with_tls(tls_config(t)?);
        }
        Ok((urls, options))
    }
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|e| EtcdError::Config(format!("{what} {}: {e}", path.display())))
}

fn tls_config(t: &EtcdTls) -> Result<TlsOptions, EtcdError> {
    let mut c = TlsOptions::new();
    if let Some(ca) = &t.ca {
        c = c.ca_certificate(Certificate::from_pem(read(ca, "CA file")?));
    }
    match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => {
            c = c.identity(Identity::from_pem(read(cert, "client certificate")?, read(key, "client key")?));
        }
        (None, None) => {}
        _ => return Err(EtcdError::Config("a client certificate needs its key, and a key its certificate".into())),
    }
    if let Some(d) = &t.domain {
        c = c.domain_name(d.clone());
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_the_scheme_tls_implies() {
        let mut c = EtcdConfig::new("127.0.0.1:2379, http://h:1,");
        assert_eq!(c.urls(), ["http://127.0.0.1:2379", "http://h:1"]);
        c.tls = Some(EtcdTls::default());
        assert_eq!(c.urls(), ["https://127.0.0.1:2379", "http://h:1"]);
    }

    #[test]
    fn bad_settings_are_named() {
        let err = |c: &EtcdConfig| match c.connect_options() {
            Err(EtcdError::Config(m)) => m,
            other => panic!("expected a configuration error, got {:?}", other.map(|(urls, _)| urls)),
        };
        assert!(err(&EtcdConfig::new("")).contains("no etcd"));
        assert!(err(&EtcdConfig::new("http://bad host:1")).contains("bad host"));
        let mut c = EtcdConfig::new("127.0.0.1:1");
        c.tls = Some(EtcdTls { cert: Some("/nonexistent.pem".into()), ..EtcdTls::default() });
        assert!(err(&c).contains("needs its key"));
        c.tls = Some(EtcdTls { ca: Some("/nonexistent.pem".into()), ..EtcdTls::default() });
        assert!(err(&c).contains("/nonexistent.pem"));
        let mut plain = EtcdConfig::new("http://127.0.0.1:1");
        plain.tls = Some(EtcdTls::default());
        assert!(err(&plain).contains("https://"));
        assert!(EtcdConfig::new("127.0.0.1:1").connect_options().is_ok());
    }
}
