//! etcd's security options against a real etcd: user/password auth and TLS
//! with client certificates, through `potluck status` (the same client and
//! flags the worker and coordinator use).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::ensure;
use potluck_tests::etcd::{Etcd, ServerTls};
use potluck_tests::{http_request, potluck, Run};

/// `potluck status` for `etcd` with extra flags.
fn status(etcd: &str, extra: &[&str]) -> anyhow::Result<Run> {
    let mut args = vec!["status", "--etcd", etcd, "--cluster", "sec"];
    args.extend_from_slice(extra);
    potluck(&args)
}

fn post(etcd: &str, path: &str, body: &str) -> anyhow::Result<()> {
    let (code, reply) = http_request(etcd, "POST", path, Some(body))?;
    ensure!(code == 200, "{path}: {code} {reply}");
    Ok(())
}

#[test]
fn user_and_password_auth() -> anyhow::Result<()> {
    let etcd = Etcd::start()?;
    let e = etcd.endpoint();
    // Turn auth on through etcd's JSON gateway: a root user with the root role.
    post(&e, "/v3/auth/role/add", r#"{"name":"root"}"#)?;
    post(&e, "/v3/auth/user/add", r#"{"name":"root","password":"s3cret"}"#)?;
    post(&e, "/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#)?;
    post(&e, "/v3/auth/enable", "{}")?;

    let ok = status(&e, &["--etcd-user", "root", "--etcd-password", "s3cret"])?;
    ensure!(ok.success, "with the right password: {}", ok.stderr);
    ensure!(ok.stdout.contains("cluster sec") && ok.stdout.contains("workers 0"), "{}", ok.stdout);

    let wrong = status(&e, &["--etcd-user", "root", "--etcd-password", "nope"])?;
    ensure!(!wrong.success, "a wrong password was accepted: {}", wrong.stdout);
    ensure!(wrong.stderr.contains("Auth.Authenticate"), "unclear error: {}", wrong.stderr);

    let anonymous = status(&e, &[])?;
    ensure!(!anonymous.success, "no credentials, yet: {}", anonymous.stdout);
    ensure!(anonymous.stderr.contains("KV.Range"), "unclear error: {}", anonymous.stderr);

    let half = status(&e, &["--etcd-user", "root"])?;
    ensure!(!half.success && half.stderr.contains("--etcd-password"), "{}", half.stderr);
    Ok(())
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl").current_dir(dir).args(args).output()?;
    ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, by the openssl CLI.
fn certificates(dir: &Path) -> anyhow::Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=potluck-test-ca",
        ],
    )?;
    for (name, ext) in [
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext)?;
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        )?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        )?;
    }
    Ok(())
}

#[test]
fn tls_with_client_certificates() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    certificates(dir.path())?;
    let p = |f: &str| dir.path().join(f);
    let etcd = Etcd::start_tls(ServerTls { ca: p("ca.pem"), cert: p("server.pem"), key: p("server.key") })?;
    let e = etcd.endpoint();
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client.key"));
    let s = |x: &Path| x.to_string_lossy().into_owned();
    let (ca, cert, key) = (s(&ca), s(&cert), s(&key));

    // etcd may still be finishing its start: retry the good client for a while.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ok = loop {
        let run = status(&e, &["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key])?;
        if run.success || Instant::now() > deadline {
            break run;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(ok.success, "TLS with a client certificate: {}", ok.stderr);
    ensure!(ok.stdout.contains("cluster sec"), "{}", ok.stdout);

    let no_cert = status(&e, &["--etcd-ca", &ca])?;
    ensure!(!no_cert.success, "etcd accepted a client without a certificate: {}", no_cert.stdout);
    let plain = status(&e, &[])?;
    ensure!(!plain.success, "plain text to a TLS etcd succeeded: {}", plain.stdout);
    let missing = status(&e, &["--etcd-ca", "/nonexistent/ca.pem"])?;
    ensure!(!missing.success && missing.stderr.contains("/nonexistent/ca.pem"), "{}", missing.stderr);
    Ok(())
}
