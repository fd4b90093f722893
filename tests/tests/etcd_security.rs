//! etcd's security options against a real etcd: user/password auth and TLS
//! with client certificates, through `potluck status` (the same client and
//! flags the worker and coordinator use), and a client that outlives its auth
//! token, through potluck-etcd itself.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use potluck_etcd::{EtcdClient, EtcdConfig, LeaseKeeper, WatchEvent};
use potluck_tests::etcd::{Etcd, ServerTls};
use potluck_tests::{http_exchange, http_request, potluck, Run};

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

/// Turns auth on through etcd's JSON gateway: a root user (password `s3cret`) with the root role.
fn enable_auth(e: &str) -> anyhow::Result<()> {
    post(e, "/v3/auth/role/add", r#"{"name":"root"}"#)?;
    post(e, "/v3/auth/user/add", r#"{"name":"root","password":"s3cret"}"#)?;
    post(e, "/v3/auth/user/grant", r#"{"user":"root","role":"root"}"#)?;
    post(e, "/v3/auth/enable", "{}")
}

#[test]
fn user_and_password_auth() -> anyhow::Result<()> {
    let etcd = Etcd::start()?;
    let e = etcd.endpoint();
    enable_auth(&e)?;

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

/// etcd's auth-token lifetime in this test, in seconds (`--auth-token-ttl`).
const TOKEN_TTL: u64 = 2;

/// A token from etcd's gateway, and whether etcd still accepts it for a read.
fn gateway_token(e: &str) -> anyhow::Result<String> {
    let (code, reply) =
        http_request(e, "POST", "/v3/auth/authenticate", Some(r#"{"name":"root","password":"s3cret"}"#))?;
    ensure!(code == 200, "authenticate: {code} {reply}");
    let v: serde_json::Value = serde_json::from_str(&reply)?;
    Ok(v["token"].as_str().context("no token")?.to_string())
}

fn token_accepted(e: &str, token: &str) -> anyhow::Result<bool> {
    let (code, _, body) =
        http_exchange(e, "POST", "/v3/kv/range", br#"{"key":"eA=="}"#, &format!("Authorization: {token}\r\n"))?;
    Ok(code == 200 && !body.contains("invalid auth token"))
}

/// Keeps `lease` alive for three token lifetimes without any other call, so the
/// client's token expires (keep-alives do not renew it).
async fn idle_past_the_token(lease: &mut LeaseKeeper) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + Duration::from_secs(3 * TOKEN_TTL);
    while tokio::time::Instant::now() < until {
        ensure!(lease.refresh().await, "the lease was lost while idle");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// etcd started with a short auth-token TTL: a client keeps its lease alive,
/// writes, opens a watch and a new keep-alive stream, each after its token
/// expired (etcd-client renews the token and retries; the watch and
/// keep-alive openers renew it themselves).
#[test]
fn a_client_outlives_its_auth_token() -> anyhow::Result<()> {
    let ttl = TOKEN_TTL.to_string();
    let etcd = Etcd::start_with(None, &["--auth-token", "simple", "--auth-token-ttl", &ttl])?;
    let e = etcd.endpoint();
    enable_auth(&e)?;
    let control = gateway_token(&e)?;
    ensure!(token_accepted(&e, &control)?, "a fresh gateway token was refused");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut config = EtcdConfig::new(&e);
        config.credentials = Some(("root".into(), "s3cret".into()));
        let client = EtcdClient::connect(config).await?;
        let mut lease = LeaseKeeper::grant(&client, Duration::from_secs(4 * TOKEN_TTL)).await?;
        let key = "/potluck/sec/workers/w";
        client.put(key, b"0".to_vec(), lease.id()).await?;

        idle_past_the_token(&mut lease).await?;
        ensure!(!token_accepted(&e, &control)?, "etcd still takes a token older than its TTL: the test proves nothing");
        client.put(key, b"1".to_vec(), lease.id()).await.context("a write after the token expired")?;
        let kv = client.get(key).await?.context("the key is gone")?;
        ensure!(kv.value == b"1" && kv.lease == lease.id(), "read back {kv:?}");

        idle_past_the_token(&mut lease).await?;
        let mut watch = client.watch_prefix("/potluck/sec/", 0).await.context("a watch after the token expired")?;

        idle_past_the_token(&mut lease).await?;
        let mut stream = client.keep_alive(lease.id()).await.context("a keep-alive stream after the token expired")?;
        stream.refresh().await?;
        client.put(key, b"2".to_vec(), lease.id()).await?;
        let events = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.context("no watch event")??;
        ensure!(
            events.iter().any(|ev| matches!(ev, WatchEvent::Put(kv) if kv.value == b"2")),
            "the watch saw {events:?}"
        );
        ensure!(client.time_to_live(lease.id()).await?.is_some(), "the lease expired");
        Ok(())
    })
}

/// Unusable etcd settings end `potluck status` with an error naming them, not a panic.
#[test]
fn bad_etcd_urls_and_files_are_named() -> anyhow::Result<()> {
    for (etcd, extra, needle) in [
        ("http://bad host:2379", &[][..], "bad host:2379"),
        ("127.0.0.1:1", &["--etcd-ca", "/nonexistent/ca.pem"][..], "/nonexistent/ca.pem"),
        ("http://127.0.0.1:1", &["--etcd-ca", "/nonexistent/ca.pem"][..], "https://"),
    ] {
        let run = status(etcd, extra)?;
        ensure!(!run.success, "{etcd} {extra:?} was accepted: {}", run.stdout);
        ensure!(run.stderr.contains(needle) && !run.stderr.contains("panicked"), "{etcd} {extra:?}: {}", run.stderr);
    }
    Ok(())
}
