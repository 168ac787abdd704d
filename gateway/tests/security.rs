//! Edge security over real sockets: JWT at the handshake (HMAC, RSA, ECDSA, EdDSA, JWKS),
//! token expiry and refresh, claims, Origin, rate limits, client IPs from trusted proxies,
//! and TLS with certificate hot reload. Keys and certificates are made by the `openssl` CLI,
//! as an operator would make them (see docs/security.md).
// Test helpers panic on setup failures by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use loadtest::client::{Client, ConnectError};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

fn now() -> u64 {
    gateway::test_util::now_secs()
}

/// A fresh directory for one test's keys and certificates.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("gw-sec-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `<name>.key` (PKCS#8 private) and `<name>.pub` (SPKI public) with `genpkey`.
fn key_pair(dir: &Path, name: &str, genpkey: &[&str]) -> (Vec<u8>, PathBuf) {
    let key = format!("{name}.key");
    let public = format!("{name}.pub");
    let mut args = vec!["genpkey", "-out", &key];
    args.extend_from_slice(genpkey);
    openssl(dir, &args);
    openssl(dir, &["pkey", "-in", &key, "-pubout", "-out", &public]);
    (
        std::fs::read(dir.join(&key)).expect("key"),
        dir.join(public),
    )
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

fn hs(secret: &str, claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(secret.as_bytes()),
        None,
        claims,
    )
}

/// The audience of the test nodes that verify public keys or a JWKS: without one, a token
/// the issuer minted for another application would be let in (`jwt_audience` is required).
const AUD: &str = "gateway";

fn user(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 3600, "aud": AUD})
}

/// The handshake's status and JSON body, with `headers` added. Reads only the response head
/// on success (the socket then stays open as a WebSocket).
async fn handshake(node: &TestNode, path: &str, headers: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(node.addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n{UPGRADE}{headers}\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(T, s.read(&mut chunk))
            .await
            .expect("answer in time")
            .unwrap_or(0);
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status: u16 = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if status == 101 {
                return (101, Value::Null);
            }
            if body.len() >= len {
                return (
                    status,
                    serde_json::from_str(body).unwrap_or(Value::String(body.into())),
                );
            }
        }
        if n == 0 {
            return (status, Value::Null);
        }
    }
}

async fn with_token(node: &TestNode, token: &str) -> Result<(Client, Value), ConnectError> {
    let auth = format!("Bearer {token}");
    let mut c = Client::connect_with(&node.url(), &[("Authorization", &auth)]).await?;
    let welcome = c.recv_json(T).await.expect("welcome");
    Ok((c, welcome))
}

async fn refused(node: &TestNode, token: &str) -> (u16, Value) {
    handshake(node, "/ws", &format!("Authorization: Bearer {token}\r\n")).await
}

/// Sends `refresh` with `token`; returns the reply.
async fn refresh(c: &mut Client, token: &str, id: u64) -> Value {
    let req = json!({"type":"refresh","token":token,"id":id});
    ask(c, &req.to_string()).await
}

fn hs_config(secret: &str) -> gateway::Config {
    gateway::Config {
        allow_anonymous: false,
        jwt_secret: Some(secret.into()),
        jwt_leeway_secs: 0,
        ..config()
    }
}

#[tokio::test]
async fn hs256_tokens_are_verified_and_rejections_name_the_reason() {
    let secret = "test-secret-0123456789-0123456789-abc";
    let mut cfg = hs_config(secret);
    cfg.jwt_issuer = Some("https://issuer.test".into());
    cfg.jwt_audience = Some("gateway".into());
    let node = start(cfg).await;
    let good = |extra: Value| {
        let mut c =
            json!({"sub":"alice","exp":now()+3600,"iss":"https://issuer.test","aud":"gateway"});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };

    // the header and the query parameter both carry a token; sub becomes user_id
    let (mut bystander, welcome) = with_token(&node, &hs(secret, &good(json!({}))))
        .await
        .expect("valid token");
    assert_eq!(welcome["user_id"], "alice");
    let token = hs(secret, &good(json!({"sub":"bob"})));
    let mut c = Client::connect(&format!("{}?access_token={token}", node.url()))
        .await
        .expect("query token");
    assert_eq!(c.recv_json(T).await.unwrap()["user_id"], "bob");

    let cases: Vec<(&str, String, &str)> = vec![
        ("no token", String::new(), "token_missing"),
        ("not a JWT", "abc.def".into(), "token_malformed"),
        (
            "wrong secret",
            hs("another-secret", &good(json!({}))),
            "bad_signature",
        ),
        (
            "expired",
            hs(secret, &good(json!({"exp": now() - 10}))),
            "token_expired",
        ),
        (
            "not yet valid",
            hs(secret, &good(json!({"nbf": now() + 600}))),
            "token_not_yet_valid",
        ),
        (
            "wrong issuer",
            hs(secret, &good(json!({"iss":"https://evil.test"}))),
            "wrong_issuer",
        ),
        (
            "wrong audience",
            hs(secret, &good(json!({"aud":"other"}))),
            "wrong_audience",
        ),
        (
            "no issuer",
            hs(secret, &json!({"sub":"x","exp":now()+60,"aud":"gateway"})),
            "wrong_issuer",
        ),
        (
            "no audience",
            hs(
                secret,
                &json!({"sub":"x","exp":now()+60,"iss":"https://issuer.test"}),
            ),
            "wrong_audience",
        ),
        (
            "no sub",
            hs(
                secret,
                &json!({"exp":now()+60,"iss":"https://issuer.test","aud":"gateway"}),
            ),
            "token_malformed",
        ),
    ];
    for (name, token, code) in &cases {
        let headers = if token.is_empty() {
            String::new()
        } else {
            format!("Authorization: Bearer {token}\r\n")
        };
        let (status, body) = handshake(&node, "/ws", &headers).await;
        assert_eq!(status, 401, "{name}: {body}");
        assert_eq!(body["error"], *code, "{name}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // a bad token in the query string is refused the same way
    let (status, body) = handshake(&node, "/ws?access_token=abc", "").await;
    assert_eq!(
        (status, body["error"].clone()),
        (401, json!("token_malformed"))
    );

    let m = node.metrics().await;
    assert!(
        has_line(
            &m,
            &format!(
                "gateway_handshakes_total{{outcome=\"unauthorized\"}} {}",
                cases.len() + 1
            )
        ),
        "{m}"
    );
    // the connection opened before all this still works
    request(
        &mut bystander,
        json!({"type":"subscribe","channel":"chat:a","id":1}),
    )
    .await;
}

/// `sub` becomes the user id in Redis keys (hash tags in braces), logs and frames: only
/// 1-200 bytes without control characters or braces get in, at the handshake and on refresh.
#[tokio::test]
async fn subjects_that_cannot_be_user_ids_get_invalid_subject() {
    let secret = "subject-secret-0123456789-0123456789-abc";
    let node = start(hs_config(secret)).await;
    for sub in ["alice", "ümlaut@example.com", "a b", &"x".repeat(200)] {
        let (_c, welcome) = with_token(&node, &hs(secret, &user(sub)))
            .await
            .unwrap_or_else(|e| panic!("{sub}: {e}"));
        assert_eq!(welcome["user_id"], sub);
    }
    let bad = [
        String::new(),
        "x".repeat(201),
        "a\nb".into(),
        "a\u{7f}b".into(),
        "a\u{85}b".into(),
        "{alice}".into(),
        "al}ice".into(),
    ];
    for sub in &bad {
        let (status, body) = refused(&node, &hs(secret, &user(sub))).await;
        assert_eq!(status, 401, "{sub:?}: {body}");
        assert_eq!(body["error"], "invalid_subject", "{sub:?}: {body}");
    }
    node.wait_metric(&format!(
        "gateway_handshakes_total{{outcome=\"unauthorized\"}} {}",
        bad.len()
    ))
    .await;
    // a refresh is verified the same way
    let (mut c, _) = with_token(&node, &hs(secret, &user("bob"))).await.unwrap();
    let reply = refresh(&mut c, &hs(secret, &user("{bob}")), 1).await;
    assert_eq!(reply["code"], "unauthorized", "{reply}");
}

#[tokio::test]
async fn rsa_ecdsa_and_eddsa_keys_verify_and_two_live_keys_allow_rotation() {
    let dir = scratch("asym");
    let rsa = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];
    let (old_rsa, old_rsa_pub) = key_pair(&dir, "old", &rsa);
    let (new_rsa, new_rsa_pub) = key_pair(&dir, "new", &rsa);
    let (stranger, _) = key_pair(&dir, "stranger", &rsa);
    let (ec, ec_pub) = key_pair(
        &dir,
        "ec",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let (ed, ed_pub) = key_pair(&dir, "ed", &["-algorithm", "ed25519"]);
    let node = start(gateway::Config {
        allow_anonymous: false,
        jwt_public_key: vec![old_rsa_pub, new_rsa_pub, ec_pub, ed_pub],
        jwt_audience: Some(AUD.into()),
        ..config()
    })
    .await;

    let rsa_key = |pem: &[u8]| EncodingKey::from_rsa_pem(pem).expect("rsa pem");
    let accepted = [
        ("RS256 old key", Algorithm::RS256, rsa_key(&old_rsa)),
        ("RS256 new key", Algorithm::RS256, rsa_key(&new_rsa)),
        ("RS512", Algorithm::RS512, rsa_key(&new_rsa)),
        ("PS256", Algorithm::PS256, rsa_key(&new_rsa)),
        (
            "ES256",
            Algorithm::ES256,
            EncodingKey::from_ec_pem(&ec).expect("ec pem"),
        ),
        (
            "EdDSA",
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(&ed).expect("ed pem"),
        ),
    ];
    for (name, alg, key) in &accepted {
        let token = sign(*alg, key, None, &user(name));
        let (_c, welcome) = with_token(&node, &token)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(welcome["user_id"], *name);
    }
    let forged = sign(Algorithm::RS256, &rsa_key(&stranger), None, &user("x"));
    assert_eq!(refused(&node, &forged).await.1["error"], "bad_signature");
    // no HMAC secret is configured, so an HS256 token cannot be checked (nor confused with
    // a public key)
    assert_eq!(
        refused(&node, &hs("whatever", &user("x"))).await.1["error"],
        "unsupported_algorithm"
    );
}

/// jsonwebtoken 10+ panics at first use unless a crypto backend feature is enabled. This
/// signs and verifies with every family through the same build the gateway uses.
#[test]
fn jsonwebtoken_has_a_crypto_backend() {
    let dir = scratch("backend");
    let (ec, ec_pub) = key_pair(
        &dir,
        "ec",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
    );
    let token = sign(
        Algorithm::ES384,
        &EncodingKey::from_ec_pem(&ec).unwrap(),
        None,
        &user("u"),
    );
    let key = jsonwebtoken::DecodingKey::from_ec_pem(&std::fs::read(ec_pub).unwrap()).unwrap();
    let mut validation = jsonwebtoken::Validation::new(Algorithm::ES384);
    validation.set_audience(&[AUD]);
    let data = jsonwebtoken::decode::<shared::claims::Claims>(&token, &key, &validation)
        .expect("verifies");
    assert_eq!(data.claims.sub, "u");
}

/// A JWKS endpoint: serves whatever set it holds and counts fetches.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(body: String) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(body));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (b, f) = (body.clone(), fetches.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                f.fetch_add(1, Ordering::SeqCst);
                let body = b.lock().unwrap().clone();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        JwksServer {
            addr,
            body,
            fetches,
        }
    }
}

/// A node that takes its keys from the JWKS at `url` (plain HTTP, as the test servers are).
fn jwks_config(url: String) -> gateway::Config {
    gateway::Config {
        allow_anonymous: false,
        jwks_url: Some(url),
        jwks_allow_http: true,
        jwt_audience: Some(AUD.into()),
        jwks_min_refresh_secs: 1,
        ..config()
    }
}

impl JwksServer {
    fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }
}

/// An Ed25519 JWK for a public key made by openssl: the raw key is the last 32 bytes of the
/// SPKI DER.
fn ed_jwk(dir: &Path, name: &str) -> (EncodingKey, Value) {
    let (pem, _) = key_pair(dir, name, &["-algorithm", "ed25519"]);
    let der = format!("{name}.der");
    openssl(
        dir,
        &[
            "pkey",
            "-in",
            &format!("{name}.key"),
            "-pubout",
            "-outform",
            "DER",
            "-out",
            &der,
        ],
    );
    let der = std::fs::read(dir.join(der)).unwrap();
    let x = base64url(&der[der.len() - 32..]);
    (
        EncodingKey::from_ed_pem(&pem).unwrap(),
        json!({"kty":"OKP","crv":"Ed25519","x":x,"kid":name,"alg":"EdDSA","use":"sig"}),
    )
}

fn base64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn jwks_keys_are_cached_refetched_on_unknown_kid_and_refetches_are_rate_limited() {
    let dir = scratch("jwks");
    let (k1, jwk1) = ed_jwk(&dir, "k1");
    let (k2, jwk2) = ed_jwk(&dir, "k2");
    let server = JwksServer::start(json!({"keys":[jwk1]}).to_string()).await;
    let node = start(jwks_config(server.url())).await;

    let token1 = sign(Algorithm::EdDSA, &k1, Some("k1"), &user("u1"));
    for _ in 0..3 {
        with_token(&node, &token1).await.expect("k1 accepted");
    }
    assert_eq!(server.fetches.load(Ordering::SeqCst), 1, "cached");

    // a flood of unknown kids costs at most one refetch per min-refresh interval; the
    // sleep waits out the interval that began with the first fetch, so one refetch is due
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for i in 0..20 {
        let forged = sign(
            Algorithm::EdDSA,
            &k2,
            Some(&format!("forged{i}")),
            &user("x"),
        );
        assert_eq!(refused(&node, &forged).await.1["error"], "unknown_key");
    }
    assert_eq!(server.fetches.load(Ordering::SeqCst), 2, "one refetch");

    // rotation: the issuer publishes k2 beside k1 and starts signing with it
    *server.body.lock().unwrap() = json!({"keys":[jwk1, jwk2]}).to_string();
    // waits out the min-refresh interval of the refetch above, so k2 may trigger another
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let token2 = sign(Algorithm::EdDSA, &k2, Some("k2"), &user("u2"));
    let (_c, welcome) = with_token(&node, &token2).await.expect("k2 after refetch");
    assert_eq!(welcome["user_id"], "u2");
    with_token(&node, &token1).await.expect("k1 still live");
    // a known kid with the wrong key is a bad signature, not an unknown key
    let wrong = sign(Algorithm::EdDSA, &k2, Some("k1"), &user("x"));
    assert_eq!(refused(&node, &wrong).await.1["error"], "bad_signature");
    assert!(has_line(
        &node.metrics().await,
        "gateway_jwks_fetches_total{outcome=\"ok\"} 3"
    ));
}

#[tokio::test]
async fn jwks_outage_at_start_answers_503() {
    // nothing listens on this port: it is bound (so no one else gets it) but not listening,
    // so connections to it are refused
    let closed = tokio::net::TcpSocket::new_v4().unwrap();
    closed.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("http://{}/jwks.json", closed.local_addr().unwrap());
    let node = start(jwks_config(url)).await;
    let dir = scratch("jwks503");
    let (k, _) = ed_jwk(&dir, "k");
    let (status, body) = refused(&node, &sign(Algorithm::EdDSA, &k, Some("k"), &user("u"))).await;
    assert_eq!(
        (status, body["error"].clone()),
        (503, json!("keys_unavailable"))
    );
}

/// A JWK that names its use or algorithm verifies only that: the same Ed25519 key published
/// for encryption, or for ES256, does not verify an EdDSA token.
#[tokio::test]
async fn jwks_keys_are_used_only_for_their_use_and_alg() {
    let dir = scratch("jwks-use");
    let (k, jwk) = ed_jwk(&dir, "k");
    let variant = |kid: &str, field: &str, value: Value| {
        let mut j = jwk.clone();
        j["kid"] = json!(kid);
        match value {
            Value::Null => j.as_object_mut().unwrap().remove(field),
            v => j.as_object_mut().unwrap().insert(field.into(), v),
        };
        j
    };
    let keys = json!({"keys": [
        jwk.clone(),
        variant("bare", "use", Value::Null),
        variant("enc", "use", json!("enc")),
        variant("other-use", "use", json!("wrap")),
        variant("es256", "alg", json!("ES256")),
        variant("no-alg", "alg", Value::Null),
    ]});
    let server = JwksServer::start(keys.to_string()).await;
    let node = start(jwks_config(server.url())).await;
    let token = |kid: &str| sign(Algorithm::EdDSA, &k, Some(kid), &user(kid));
    for kid in ["k", "bare", "no-alg"] {
        let (_c, welcome) = with_token(&node, &token(kid))
            .await
            .unwrap_or_else(|e| panic!("{kid}: {e}"));
        assert_eq!(welcome["user_id"], kid);
    }
    for kid in ["enc", "other-use", "es256"] {
        let (status, body) = refused(&node, &token(kid)).await;
        assert_eq!(
            (status, body["error"].clone()),
            (401, json!("unknown_key")),
            "{kid}"
        );
    }
}

/// The cached set outlives failed fetches for `jwks_max_stale_secs`, then is dropped: 503
/// `keys_unavailable` until a fetch succeeds again.
#[tokio::test]
async fn jwks_keys_are_dropped_after_max_stale_without_a_successful_fetch() {
    let dir = scratch("jwks-stale");
    let (k, jwk) = ed_jwk(&dir, "k");
    let good = json!({"keys":[jwk]}).to_string();
    let server = JwksServer::start(good.clone()).await;
    let node = start(gateway::Config {
        jwks_refresh_secs: 1,
        jwks_max_stale_secs: 2,
        ..jwks_config(server.url())
    })
    .await;
    let token = sign(Algorithm::EdDSA, &k, Some("k"), &user("u"));
    with_token(&node, &token).await.expect("fresh keys");
    // the endpoint breaks: the cached keys still serve within the staleness bound
    *server.body.lock().unwrap() = "not a key set".into();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    with_token(&node, &token)
        .await
        .expect("cached keys after a failed fetch");
    node.wait_metric("gateway_jwks_keys_expired_total 1").await;
    let (status, body) = refused(&node, &token).await;
    assert_eq!(
        (status, body["error"].clone()),
        (503, json!("keys_unavailable"))
    );
    // the endpoint comes back: so do the keys, at the next refresh
    *server.body.lock().unwrap() = good;
    let deadline = tokio::time::Instant::now() + T;
    while with_token(&node, &token).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "keys did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = node.metrics().await;
    assert!(
        m.contains("gateway_jwks_fetches_total{outcome=\"error\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn expiring_tokens_get_a_warning_a_grace_period_and_4002() {
    let secret = "expiry-secret-0123456789-0123456789-abc";
    let node = start(gateway::Config {
        token_grace_ms: 400,
        ..hs_config(secret)
    })
    .await;
    let short = |sub: &str| hs(secret, &json!({"sub":sub,"exp":now()+1}));

    // no refresh: told in-band, then closed with 4002
    let (mut lazy, _) = with_token(&node, &short("ann")).await.unwrap();
    let warning = lazy.recv_json(Duration::from_secs(4)).await.unwrap();
    assert_eq!(warning, json!({"type":"token_expired","grace_ms":400}));
    let (code, reason) = lazy.recv_close(T).await.unwrap();
    assert_eq!(code, 4002, "{reason}");

    // refresh with the same sub: the connection lives on
    let (mut good, _) = with_token(&node, &short("ann")).await.unwrap();
    assert_eq!(
        good.recv_json(Duration::from_secs(4)).await.unwrap()["type"],
        "token_expired"
    );
    let fresh = hs(secret, &user("ann"));
    request(&mut good, json!({"type":"refresh","token":fresh,"id":7})).await;
    // a check that nothing happens: past the 400 ms grace, no 4002 comes, so it waits
    tokio::time::sleep(Duration::from_millis(700)).await;
    request(
        &mut good,
        json!({"type":"subscribe","channel":"chat:x","id":8}),
    )
    .await;

    // refresh naming someone else: refused, and the clock runs out
    let (mut thief, _) = with_token(&node, &short("ann")).await.unwrap();
    assert_eq!(
        thief.recv_json(Duration::from_secs(4)).await.unwrap()["type"],
        "token_expired"
    );
    let reply = refresh(&mut thief, &hs(secret, &user("mallory")), 9).await;
    assert_eq!(reply["code"], "unauthorized", "{reply}");
    assert_eq!(thief.recv_close(T).await.unwrap().0, 4002);
    // a malformed refresh token is refused too
    let reply = refresh(&mut good, "nope", 10).await;
    assert_eq!(reply["code"], "unauthorized", "{reply}");
    node.wait_metric(
        "gateway_connection_closes_total{blame=\"client\",reason=\"token_expired\"} 2",
    )
    .await;
}

#[tokio::test]
async fn channels_claim_limits_subscriptions_and_publish_claim_extends_publishing() {
    let secret = "claims-secret-0123456789-0123456789-abc";
    let node = start(hs_config(secret)).await;
    let token = hs(
        secret,
        &json!({"sub":"carol","exp":now()+600,"channels":["room:1","news:*"],"publish":["room:*"]}),
    );
    let (mut c, _) = with_token(&node, &token).await.unwrap();
    request(
        &mut c,
        json!({"type":"subscribe","channel":"room:1","id":1}),
    )
    .await;
    request(
        &mut c,
        json!({"type":"subscribe","channel":"news:eu","id":2}),
    )
    .await;
    let reply = ask(&mut c, r#"{"type":"subscribe","channel":"room:2","id":3}"#).await;
    assert_eq!(reply["code"], "forbidden");
    c.send_json(&json!({"type":"publish","channel":"room:1","data":1,"id":4}))
        .await
        .unwrap();
    // the ack and the message itself (we are subscribed) may come in either order
    let mut got = [c.recv_json(T).await.unwrap(), c.recv_json(T).await.unwrap()];
    got.sort_by_key(|v| v["type"].to_string());
    assert_eq!(got[0], json!({"type":"ack","id":4}));
    assert_eq!(
        got[1],
        json!({"type":"message","channel":"room:1","data":1})
    );
    // publish_allow (chat:*) still applies
    request(
        &mut c,
        json!({"type":"publish","channel":"chat:x","data":1,"id":5}),
    )
    .await;
    let reply = ask(
        &mut c,
        r#"{"type":"publish","channel":"other:x","data":1,"id":6}"#,
    )
    .await;
    assert_eq!(reply["code"], "forbidden");
}

#[tokio::test]
async fn refresh_with_a_narrower_channels_claim_ends_the_subscriptions_it_no_longer_allows() {
    let secret = "narrow-secret-0123456789-0123456789-abc";
    let node = start(hs_config(secret)).await;
    let token = |channels: Value| {
        hs(
            secret,
            &json!({"sub":"dora","exp":now()+600,"channels":channels}),
        )
    };
    let (mut c, _) = with_token(&node, &token(json!(["chat:*"]))).await.unwrap();
    for (i, ch) in ["chat:keep", "chat:drop1", "chat:drop2"].iter().enumerate() {
        request(&mut c, json!({"type":"subscribe","channel":ch,"id":i})).await;
    }
    let narrower = token(json!(["chat:keep"]));
    c.send_json(&json!({"type":"refresh","token":narrower,"id":7}))
        .await
        .unwrap();
    let mut dropped = Vec::new();
    for _ in 0..2 {
        let f = c.recv_json(T).await.unwrap();
        assert_eq!(f["type"], "unsubscribed", "{f}");
        assert_eq!(f["code"], "forbidden", "{f}");
        dropped.push(f["channel"].as_str().unwrap().to_owned());
    }
    dropped.sort();
    assert_eq!(dropped, ["chat:drop1", "chat:drop2"]);
    assert_eq!(c.recv_json(T).await.unwrap(), json!({"type":"ack","id":7}));
    // messages stop on the dropped channels and keep coming on the kept one
    let (mut p, _) = with_token(&node, &hs(secret, &user("pub"))).await.unwrap();
    for ch in ["chat:drop1", "chat:keep"] {
        request(
            &mut p,
            json!({"type":"publish","channel":ch,"data":ch,"id":1}),
        )
        .await;
    }
    assert_eq!(c.recv_json(T).await.unwrap()["data"], "chat:keep");
    // a refresh without a channels claim allows everything again, and ends nothing
    let open = hs(secret, &user("dora"));
    request(&mut c, json!({"type":"refresh","token":open,"id":8})).await;
    request(
        &mut c,
        json!({"type":"subscribe","channel":"chat:drop1","id":9}),
    )
    .await;
}

#[tokio::test]
async fn origin_policy_refuses_other_sites_with_403() {
    let mut cfg = config();
    cfg.allowed_origins = vec![
        "https://app.example.com".into(),
        "https://*.example.org".into(),
    ];
    cfg.allow_missing_origin = false;
    let node = start(cfg).await;
    for (origin, status) in [
        ("https://app.example.com", 101),
        ("https://eu.example.org", 101),
        ("https://a.b.example.org", 101),
        ("https://evil.com", 403),
        ("http://app.example.com", 403),
        ("https://example.org", 403),
        ("https://evil.com/.example.org", 403),
        ("https://app.example.com.evil.com", 403),
        ("null", 403),
    ] {
        let (got, body) = handshake(&node, "/ws", &format!("Origin: {origin}\r\n")).await;
        assert_eq!(got, status, "{origin}: {body}");
        if status == 403 {
            assert_eq!(body["error"], "forbidden_origin");
        }
    }
    let (got, body) = handshake(&node, "/ws", "").await;
    assert_eq!(
        (got, body["error"].clone()),
        (403, json!("forbidden_origin"))
    );
    assert!(has_line(
        &node.metrics().await,
        "gateway_handshakes_total{outcome=\"forbidden_origin\"} 7"
    ));

    // default policy: same-origin for browsers (the helper sends `Host: test`), and
    // non-browser clients without an Origin are let in
    let node = start(config()).await;
    assert_eq!(handshake(&node, "/ws", "").await.0, 101);
    assert_eq!(
        handshake(&node, "/ws", "Origin: http://test\r\n").await.0,
        101
    );
    assert_eq!(
        handshake(&node, "/ws", "Origin: http://evil\r\n").await.0,
        403
    );
}

#[tokio::test]
async fn handshake_flood_from_one_ip_gets_429_with_retry_after() {
    let mut cfg = config();
    cfg.handshake_rate_per_ip = 1;
    cfg.handshake_burst_per_ip = 2;
    let node = start(cfg).await;
    let (mut first, _) = node.client().await;
    node.client().await;
    let (status, body) = http(node.addr, "GET", "/ws", "", UPGRADE).await;
    assert_eq!(status, 429, "{body}");
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.write_all(format!("GET /ws HTTP/1.1\r\nHost: t\r\n{UPGRADE}\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(T, s.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_lowercase();
    assert!(head.starts_with("http/1.1 429"), "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    let m = node.metrics().await;
    assert!(
        has_line(&m, "gateway_rate_limit_hits_total{kind=\"handshake\"} 2"),
        "{m}"
    );
    assert!(
        has_line(&m, "gateway_handshakes_total{outcome=\"rate_limited\"} 2"),
        "{m}"
    );
    // connections already open are not affected, and the bucket refills
    request(&mut first, json!({"type":"subscribe","channel":"a","id":1})).await;
    // the bucket refills at 1 handshake per second: the wait is what is under test
    tokio::time::sleep(Duration::from_millis(1100)).await;
    node.client().await;
}

#[tokio::test]
async fn message_and_byte_floods_get_errors_then_1008() {
    let mut cfg = config();
    cfg.message_rate = 2;
    cfg.message_burst = 5;
    cfg.rate_limit_strikes = 3;
    let node = start(cfg).await;
    let mut bystander = node.subscriber("chat:by").await;
    let (mut flooder, _) = node.client().await;
    let mut acks = 0;
    let mut errors = 0;
    for i in 0..40 {
        let req = json!({"type":"subscribe","channel":format!("f{i}"),"id":i}).to_string();
        if flooder.send_text(&req).await.is_err() {
            break;
        }
    }
    let code = loop {
        match flooder.recv(T).await.expect("frame") {
            loadtest::client::Received::Text(t) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str() {
                    Some("ack") => acks += 1,
                    Some("error") => {
                        assert_eq!(v["code"], "rate_limited", "{v}");
                        errors += 1
                    }
                    _ => panic!("{v}"),
                }
            }
            loadtest::client::Received::Close(code, _) => break code,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, 1008);
    assert_eq!(acks, 5, "the burst passes");
    assert_eq!(errors, 3, "one error per strike, then the close");

    // the byte rate works the same way; its burst is four maximal messages
    let mut cfg = config();
    cfg.byte_rate = 100;
    cfg.max_message_bytes = 128;
    cfg.rate_limit_strikes = 1;
    let node2 = start(cfg).await;
    let (mut big, _) = node2.client().await;
    let req =
        json!({"type":"publish","channel":"chat:pad","data":"x".repeat(20),"id":1}).to_string();
    for _ in 0..10 {
        big.send_text(&req).await.unwrap();
    }
    let mut acks = 0;
    let mut reply = big.recv_json(T).await.unwrap();
    while reply == json!({"type":"ack","id":1}) {
        acks += 1;
        reply = big.recv_json(T).await.unwrap();
    }
    assert_eq!(acks, 512 / req.len(), "the burst passes");
    assert_eq!(reply["code"], "rate_limited", "{reply}");
    assert_eq!(big.recv_close(T).await.unwrap().0, 1008);
    node2
        .wait_metric("gateway_rate_limit_hits_total{kind=\"bytes\"} 2")
        .await;

    let m = node.metrics().await;
    assert!(
        has_line(&m, "gateway_rate_limit_hits_total{kind=\"messages\"} 4"),
        "{m}"
    );
    assert!(
        has_line(
            &m,
            "gateway_connection_closes_total{blame=\"client\",reason=\"rate_limited\"} 1"
        ),
        "{m}"
    );
    // the bystander is untouched
    let (mut p, _) = node.client().await;
    request(
        &mut p,
        json!({"type":"publish","channel":"chat:by","data":1,"id":1}),
    )
    .await;
    assert_eq!(bystander.recv_json(T).await.unwrap()["data"], 1);
}

#[tokio::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let limited = |trusted: Vec<String>| gateway::Config {
        handshake_rate_per_ip: 1,
        handshake_burst_per_ip: 1,
        trusted_proxies: trusted,
        ..config()
    };
    let xff = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");

    // untrusted peer: the header is ignored, so both handshakes count against 127.0.0.1
    let node = start(limited(vec![])).await;
    assert_eq!(handshake(&node, "/ws", &xff("203.0.113.1")).await.0, 101);
    assert_eq!(handshake(&node, "/ws", &xff("203.0.113.2")).await.0, 429);

    // trusted peer: each forwarded client has its own bucket
    let node = start(limited(vec!["127.0.0.0/8".into()])).await;
    assert_eq!(handshake(&node, "/ws", &xff("203.0.113.1")).await.0, 101);
    assert_eq!(handshake(&node, "/ws", &xff("203.0.113.2")).await.0, 101);
    assert_eq!(
        handshake(&node, "/ws", &xff("198.51.100.7, 203.0.113.1"))
            .await
            .0,
        429,
        "the right-most untrusted hop is the client"
    );
}

/// Several `X-Forwarded-For` lines are one list in order (RFC 7230 §3.2.2): the client is
/// the right-most untrusted entry of them all, not of the first line (which the client may
/// have written itself).
#[tokio::test]
async fn forwarded_for_lines_are_combined_in_order() {
    let node = start(gateway::Config {
        handshake_rate_per_ip: 1,
        handshake_burst_per_ip: 1,
        trusted_proxies: vec!["127.0.0.0/8".into()],
        ..config()
    })
    .await;
    let two_lines = "X-Forwarded-For: 198.51.100.7\r\nX-Forwarded-For: 203.0.113.1, 127.0.0.2\r\n";
    assert_eq!(handshake(&node, "/ws", two_lines).await.0, 101);
    let xff = |ip: &str| format!("X-Forwarded-For: {ip}\r\n");
    assert_eq!(
        handshake(&node, "/ws", &xff("203.0.113.1")).await.0,
        429,
        "the client was the last line's untrusted hop"
    );
    assert_eq!(
        handshake(&node, "/ws", &xff("198.51.100.7")).await.0,
        101,
        "not the first line's"
    );
}

/// `max_connections_per_ip` counts open connections by client IP (forwarded, with trusted
/// proxies; IPv6 by its /64); the excess gets 429 before the upgrade, and a closed
/// connection gives its place back.
#[tokio::test]
async fn open_connections_per_ip_are_capped_and_ipv6_counts_by_its_64() {
    let node = start(gateway::Config {
        max_connections_per_ip: 2,
        trusted_proxies: vec!["127.0.0.0/8".into()],
        ..config()
    })
    .await;
    let url = node.url();
    let from = |ip: &'static str| {
        let url = url.clone();
        async move {
            match Client::connect_with(&url, &[("X-Forwarded-For", ip)]).await {
                Ok(mut c) => {
                    assert_eq!(c.recv_json(T).await.unwrap()["type"], "welcome");
                    Ok(c)
                }
                Err(ConnectError::Status(s)) => Err(s),
                Err(e) => panic!("{ip}: {e}"),
            }
        }
    };
    let mut first = from("203.0.113.1").await.expect("first");
    let _second = from("203.0.113.1").await.expect("second");
    let (status, body) = handshake(&node, "/ws", "X-Forwarded-For: 203.0.113.1\r\n").await;
    assert_eq!(
        (status, body["error"].clone()),
        (429, json!("ip_connection_limit")),
        "{body}"
    );
    let _other = from("203.0.113.2")
        .await
        .expect("another IP has its own count");
    let _v6a = from("2001:db8:1:1::1").await.expect("v6 first");
    let _v6b = from("2001:db8:1:1:ffff::2")
        .await
        .expect("v6 second, same /64");
    assert_eq!(from("2001:db8:1:1::3").await.err(), Some(429), "same /64");
    let _v6c = from("2001:db8:1:2::1").await.expect("another /64");
    let m = node.metrics().await;
    assert!(
        m.contains("gateway_handshakes_total{outcome=\"ip_limit\"} 2"),
        "{m}"
    );
    // connections already open are untouched, and a closed one gives its place back
    request(&mut first, json!({"type":"subscribe","channel":"a","id":1})).await;
    first.close(1000, "bye").await.unwrap();
    first.recv_close(T).await.unwrap();
    connect_eventually(&url, &[("X-Forwarded-For", "203.0.113.1")]).await;
}

#[tokio::test]
async fn proxy_protocol_v2_names_the_client() {
    let node = start(gateway::Config {
        handshake_rate_per_ip: 1,
        handshake_burst_per_ip: 1,
        trusted_proxies: vec!["127.0.0.0/8".into()],
        proxy_protocol: true,
        ..config()
    })
    .await;
    let via_proxy = |src: &str| {
        let src: SocketAddrV4 = src.parse().unwrap();
        let dst = SocketAddrV4::new([127, 0, 0, 1].into(), node.addr.port());
        let addr = node.addr;
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&gateway::test_util::encode_proxy_v2(src, dst))
                .await
                .unwrap();
            match Client::handshake(s, "t", "/ws", &[]).await {
                Ok(_) => 101,
                Err(ConnectError::Status(s)) => s,
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert_eq!(via_proxy("10.0.0.1:1000").await, 101);
    assert_eq!(via_proxy("10.0.0.2:1000").await, 101);
    assert_eq!(via_proxy("10.0.0.1:1001").await, 429);
    // a trusted peer that does not send the header is dropped without an answer
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.write_all(format!("GET /ws HTTP/1.1\r\nHost: t\r\n{UPGRADE}\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .ok();
    assert!(buf.is_empty());
    assert!(has_line(
        &node.metrics().await,
        "gateway_handshakes_total{outcome=\"bad_request\"} 1"
    ));
}

#[tokio::test]
async fn malformed_http_gets_400_and_a_metric() {
    let node = start(config()).await;
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.write_all(b"\x16\x03\x01 not http at all\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .ok();
    let head = String::from_utf8_lossy(&buf);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    node.wait_metric("gateway_protocol_violations_total{kind=\"malformed_http\"} 1")
        .await;
    node.client().await;
}

// ---- TLS -------------------------------------------------------------------------------

/// A CA and a leaf certificate for `localhost` signed by it, made with openssl.
fn make_leaf(dir: &Path, name: &str) {
    let cfg = dir.join("leaf.ext");
    std::fs::write(
        &cfg,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let crt = format!("{name}.crt");
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &key,
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            &key,
            "-subj",
            &format!("/CN={name}"),
            "-out",
            &csr,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
            "-out",
            &crt,
        ],
    );
}

fn make_ca(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-subj",
            "/CN=test CA",
            "-days",
            "2",
            "-out",
            "ca.crt",
        ],
    );
}

fn tls_client(
    dir: &Path,
    version: &'static rustls::SupportedProtocolVersion,
) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("ca.crt")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[version])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // a resumed session shows the certificate of the session it resumes; full handshakes
    // only, so that each connection shows what the node serves now
    config.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Connects over TLS; returns the client and the certificate the node presented.
async fn wss(node: &TestNode, connector: &tokio_rustls::TlsConnector) -> (Client, Vec<u8>) {
    let tcp = TcpStream::connect(node.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let (_, session) = tls.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]));
    let cert = session.peer_certificates().unwrap()[0].to_vec();
    let mut c = Client::handshake(tls, "localhost", "/ws", &[])
        .await
        .expect("wss handshake");
    assert_eq!(c.recv_json(T).await.unwrap()["type"], "welcome");
    (c, cert)
}

/// Installs `<name>.crt` and `<name>.key` as `tls.crt` and `tls.key`, and starts a node that
/// serves them and checks them for changes every 100 ms.
async fn tls_node(dir: &Path, name: &str) -> TestNode {
    for ext in ["crt", "key"] {
        std::fs::copy(
            dir.join(format!("{name}.{ext}")),
            dir.join(format!("tls.{ext}")),
        )
        .unwrap();
    }
    start(gateway::Config {
        tls_cert: Some(dir.join("tls.crt")),
        tls_key: Some(dir.join("tls.key")),
        tls_reload_interval_ms: 100,
        ..config()
    })
    .await
}

/// Replaces `tls.<ext>` with `<name>.<ext>` as a Secret volume update does: written aside,
/// then renamed into place.
fn rotate(dir: &Path, name: &str, ext: &str) {
    let aside = dir.join(format!("tls.{ext}.tmp"));
    std::fs::copy(dir.join(format!("{name}.{ext}")), &aside).unwrap();
    std::fs::rename(aside, dir.join(format!("tls.{ext}"))).unwrap();
}

#[tokio::test]
async fn tls_serves_wss_and_reloads_rotated_certificates() {
    let dir = scratch("tls");
    make_ca(&dir);
    make_leaf(&dir, "one");
    let node = tls_node(&dir, "one").await;
    let tls13 = tls_client(&dir, &rustls::version::TLS13);
    let tls12 = tls_client(&dir, &rustls::version::TLS12);

    let (mut sub, first) = wss(&node, &tls13).await;
    request(
        &mut sub,
        json!({"type":"subscribe","channel":"chat:tls","id":1}),
    )
    .await;
    let (mut publisher, same) = wss(&node, &tls12).await;
    assert_eq!(first, same);
    // many small frames: each must be flushed through TLS without waiting for more
    for i in 0..50 {
        request(
            &mut publisher,
            json!({"type":"publish","channel":"chat:tls","data":i,"id":i}),
        )
        .await;
        assert_eq!(sub.recv_json(T).await.unwrap()["data"], i);
    }

    // cert-manager style rotation: new files appear; new handshakes get the new certificate
    make_leaf(&dir, "two");
    rotate(&dir, "two", "key");
    rotate(&dir, "two", "crt");
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (_c, cert) = wss(&node, &tls13).await;
        if cert != first {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reload: {}",
            node.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // connections opened before the rotation are untouched
    request(
        &mut publisher,
        json!({"type":"publish","channel":"chat:tls","data":"after","id":99}),
    )
    .await;
    assert_eq!(sub.recv_json(T).await.unwrap()["data"], "after");

    // a plain-text client on the TLS port fails its TLS handshake and nothing else
    let (status, _) = http(node.addr, "GET", "/ws", "", UPGRADE).await;
    assert_eq!(status, 0);
    // counted once the node has dropped the connection, which the client may see first
    node.wait_metric("gateway_tls_handshake_failures_total 1")
        .await;
    let m = node.metrics().await;
    assert!(
        has_series(&m, "gateway_tls_reloads_total{outcome=\"ok\"}"),
        "{m}"
    );
}

/// A certificate and key that do not belong together are refused at start, and on reload,
/// where the old pair stays served (a pair that does not match would fail every handshake).
#[tokio::test]
async fn tls_reload_refuses_a_certificate_that_does_not_match_its_key() {
    let dir = scratch("tls-mismatch");
    make_ca(&dir);
    make_leaf(&dir, "one");
    make_leaf(&dir, "two");
    let bad = start(gateway::Config {
        tls_cert: Some(dir.join("one.crt")),
        tls_key: Some(dir.join("two.key")),
        ..config()
    })
    .await;
    let err = tokio::time::timeout(T, bad.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    let cause = std::error::Error::source(&err).map(|c| c.to_string());
    assert!(
        cause
            .as_deref()
            .is_some_and(|c| c.contains("does not match")),
        "{err}: {cause:?}"
    );

    let node = tls_node(&dir, "one").await;
    let tls = tls_client(&dir, &rustls::version::TLS13);
    let (_c, first) = wss(&node, &tls).await;
    // a half-done rotation: the new certificate, the old key
    rotate(&dir, "two", "crt");
    node.wait_metric("gateway_tls_reloads_total{outcome=\"mismatch\"} 1")
        .await;
    let (_c, served) = wss(&node, &tls).await;
    assert_eq!(served, first, "the old pair is still served");
    // refused once per change, not once per tick
    tokio::time::sleep(Duration::from_millis(400)).await;
    node.wait_metric("gateway_tls_reloads_total{outcome=\"mismatch\"} 1")
        .await;
    // the key arrives: the rotation completes
    rotate(&dir, "two", "key");
    node.wait_metric("gateway_tls_reloads_total{outcome=\"ok\"} 1")
        .await;
    let (_c, served) = wss(&node, &tls).await;
    assert_ne!(served, first, "the new pair once it matches");
}
