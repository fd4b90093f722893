//! How to reach etcd: endpoints, TLS and credentials.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::error::EtcdError;

/// Deadline of one unary etcd call: etcd answers in milliseconds, so a call
/// that takes seconds means etcd is down or partitioned.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Deadline of one connection attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

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

    pub(crate) fn endpoints(&self) -> Result<Vec<Endpoint>, EtcdError> {
        if self.endpoints.is_empty() {
            return Err(EtcdError::Config("no etcd endpoints given".into()));
        }
        let tls = self.tls.as_ref().map(tls_config).transpose()?;
        self.urls()
            .into_iter()
            .map(|url| {
                let mut e = Endpoint::from_shared(url.clone())
                    .map_err(|err| EtcdError::Config(format!("endpoint `{url}`: {err}")))?
                    .connect_timeout(DEFAULT_CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(3))
                    .keep_alive_while_idle(true);
                if let Some(tls) = &tls {
                    e = e
                        .tls_config(tls.clone())
                        .map_err(|err| EtcdError::Config(format!("TLS for `{url}`: {err}")))?;
                }
                Ok(e)
            })
            .collect()
    }
}

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|e| EtcdError::Config(format!("{what} {}: {e}", path.display())))
}

fn tls_config(t: &EtcdTls) -> Result<ClientTlsConfig, EtcdError> {
    let mut c = ClientTlsConfig::new();
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
        assert!(matches!(EtcdConfig::new("").endpoints(), Err(EtcdError::Config(m)) if m.contains("no etcd")));
        let mut c = EtcdConfig::new("127.0.0.1:1");
        c.tls = Some(EtcdTls { cert: Some("/nonexistent.pem".into()), ..EtcdTls::default() });
        assert!(matches!(c.endpoints(), Err(EtcdError::Config(m)) if m.contains("needs its key")));
        c.tls = Some(EtcdTls { ca: Some("/nonexistent.pem".into()), ..EtcdTls::default() });
        assert!(matches!(c.endpoints(), Err(EtcdError::Config(m)) if m.contains("/nonexistent.pem")));
    }
}
