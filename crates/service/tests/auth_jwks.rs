//! JWKS verification against a JWKS served by a local HTTP server on
//! 127.0.0.1, with the fixed test key pairs in `tests/fixtures`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use routing_service::auth::{AuthError, Identity, JwksOptions, Verifier, unix_now};
use routing_service::config::{self, Config, Secret};
use serde_json::{Value, json};

const RSA_PRIVATE: &[u8] = include_bytes!("fixtures/rsa_private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("fixtures/rsa_public.pem");
const EC_PRIVATE: &[u8] = include_bytes!("fixtures/ec_private.pem");
const EC_PUBLIC: &[u8] = include_bytes!("fixtures/ec_public.pem");
const ED_PRIVATE: &[u8] = include_bytes!("fixtures/ed_private.pem");
const ED_PUBLIC: &[u8] = include_bytes!("fixtures/ed_public.pem");

const HS256_SECRET: &str = "jwks-test-secret-0123456789abcdef-0123";

/// A test key pair: the `kid`, the algorithm, the signing key and its JWK.
struct TestKey {
    kid: &'static str,
    algorithm: Algorithm,
    signing: EncodingKey,
    jwk: Jwk,
}

impl TestKey {
    fn rsa() -> Self {
        let signing = EncodingKey::from_rsa_pem(RSA_PRIVATE).expect("the RSA private key");
        let public = DecodingKey::from_rsa_pem(RSA_PUBLIC).expect("the RSA public key");
        Self::new("rsa-1", Algorithm::RS256, signing, &public)
    }

    fn ec() -> Self {
        let signing = EncodingKey::from_ec_pem(EC_PRIVATE).expect("the EC private key");
        let public = DecodingKey::from_ec_pem(EC_PUBLIC).expect("the EC public key");
        Self::new("ec-1", Algorithm::ES256, signing, &public)
    }

    fn ed() -> Self {
        let signing = EncodingKey::from_ed_pem(ED_PRIVATE).expect("the Ed25519 private key");
        let public = DecodingKey::from_ed_pem(ED_PUBLIC).expect("the Ed25519 public key");
        Self::new("ed-1", Algorithm::EdDSA, signing, &public)
    }

    fn new(
        kid: &'static str,
        algorithm: Algorithm,
        signing: EncodingKey,
        public: &DecodingKey,
    ) -> Self {
        let mut jwk = Jwk::from_decoding_key(public, Some(algorithm)).expect("a JWK");
        jwk.common.key_id = Some(kid.to_owned());
        Self {
            kid,
            algorithm,
            signing,
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        self.sign_with_kid(self.kid, claims)
    }

    fn sign_with_kid(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, claims, &self.signing).expect("the token signs")
    }
}

/// A JWKS server on 127.0.0.1 whose document a test can replace, and which
/// counts the requests it served.
struct JwksServer {
    url: String,
    keys: Arc<Mutex<Vec<Jwk>>>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct ServerState {
    keys: Arc<Mutex<Vec<Jwk>>>,
    requests: Arc<AtomicUsize>,
    padding: usize,
}

async fn serve_jwks(State(state): State<ServerState>) -> String {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let keys = state.keys.lock().expect("the key list lock").clone();
    let mut document = serde_json::to_value(JwkSet { keys }).expect("a JWKS document");
    if state.padding > 0 {
        document["padding"] = json!("x".repeat(state.padding));
    }
    document.to_string()
}

impl JwksServer {
    async fn start(keys: Vec<Jwk>) -> Self {
        Self::start_padded(keys, 0).await
    }

    /// Starts a server whose document also carries `padding` extra bytes.
    async fn start_padded(keys: Vec<Jwk>, padding: usize) -> Self {
        let keys = Arc::new(Mutex::new(keys));
        let requests = Arc::new(AtomicUsize::new(0));
        let state = ServerState {
            keys: keys.clone(),
            requests: requests.clone(),
            padding,
        };
        let app = Router::new()
            .route("/jwks.json", get(serve_jwks))
            .with_state(state);

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1");
        let address = listener.local_addr().expect("the bound address");
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("the JWKS server runs");
        });
        Self {
            url: format!("http://{address}/jwks.json"),
            keys,
            requests,
            task,
        }
    }

    fn add_key(&self, jwk: Jwk) {
        self.keys.lock().expect("the key list lock").push(jwk);
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn jwks_config(url: &str, algorithms: &[config::Algorithm]) -> Config {
    let mut config = Config::defaults();
    config.auth.algorithms = algorithms.to_vec();
    config.auth.jwks_url = Some(url.to_owned());
    config
}

fn all_asymmetric(url: &str) -> Config {
    use config::Algorithm::{ES256, EdDSA, RS256};
    jwks_config(url, &[RS256, ES256, EdDSA])
}

async fn verifier(config: &Config) -> Verifier {
    Verifier::new(config).await.expect("the verifier builds")
}

fn claims(user: &str) -> Value {
    json!({"sub": user, "exp": unix_now() + 600, "iat": unix_now()})
}

fn reason(result: Result<Identity, AuthError>) -> String {
    match result {
        Ok(identity) => panic!("the token was accepted for {identity:?}"),
        Err(AuthError::Invalid(reason)) => reason,
        Err(other) => panic!("expected Invalid, found {other:?}"),
    }
}

#[tokio::test]
async fn rs256_es256_eddsa_accepted() {
    let keys = [TestKey::rsa(), TestKey::ec(), TestKey::ed()];
    let server = JwksServer::start(keys.iter().map(|key| key.jwk.clone()).collect()).await;
    let verifier = verifier(&all_asymmetric(&server.url)).await;

    for key in &keys {
        let token = key.sign(&claims("alice"));
        let identity = verifier
            .verify(&token)
            .await
            .unwrap_or_else(|err| panic!("{}: {err}", key.kid));
        assert_eq!(identity.user.id(), "alice", "{}", key.kid);
    }
    assert_eq!(server.requests(), 1);
}

#[tokio::test]
async fn wrong_kid_rejected() {
    let rsa = TestKey::rsa();
    let server = JwksServer::start(vec![rsa.jwk.clone()]).await;
    let verifier = verifier(&all_asymmetric(&server.url)).await;

    let token = rsa.sign_with_kid("rsa-unknown", &claims("alice"));
    assert_eq!(
        reason(verifier.verify(&token).await),
        "no JWKS key matches the kid"
    );
}

#[tokio::test]
async fn kid_of_other_key_type_rejected() {
    let (rsa, ec) = (TestKey::rsa(), TestKey::ec());
    let server = JwksServer::start(vec![rsa.jwk.clone(), ec.jwk.clone()]).await;
    let verifier = verifier(&all_asymmetric(&server.url)).await;

    // An RS256 token that names the EC key.
    let token = rsa.sign_with_kid(ec.kid, &claims("alice"));
    assert_eq!(
        reason(verifier.verify(&token).await),
        "the algorithm does not match the key named by kid"
    );
}

#[tokio::test]
async fn missing_kid_rejected() {
    let rsa = TestKey::rsa();
    let server = JwksServer::start(vec![rsa.jwk.clone()]).await;
    let verifier = verifier(&all_asymmetric(&server.url)).await;

    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::RS256),
        &claims("alice"),
        &rsa.signing,
    )
    .expect("the token signs");
    assert_eq!(
        reason(verifier.verify(&token).await),
        "the header has no kid, so no JWKS key can be chosen"
    );
}

#[tokio::test]
async fn hs256_signed_with_rsa_public_key_rejected() {
    let rsa = TestKey::rsa();
    let server = JwksServer::start(vec![rsa.jwk.clone()]).await;
    let forger = EncodingKey::from_secret(RSA_PUBLIC).expect("an HMAC key");
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(rsa.kid.to_owned());
    let token =
        jsonwebtoken::encode(&header, &claims("mallory"), &forger).expect("the token signs");

    // With HS256 not accepted, the algorithm alone rejects the token.
    let verifier_rs = verifier(&jwks_config(&server.url, &[config::Algorithm::RS256])).await;
    assert_eq!(
        reason(verifier_rs.verify(&token).await),
        "the algorithm is not accepted"
    );

    // With HS256 accepted too, only JWT_SECRET can verify HS256 tokens.
    let mut config = jwks_config(
        &server.url,
        &[config::Algorithm::HS256, config::Algorithm::RS256],
    );
    config.jwt_secret = Some(Secret(HS256_SECRET.to_owned()));
    let verifier_both = verifier(&config).await;
    assert_eq!(
        reason(verifier_both.verify(&token).await),
        "the signature does not match"
    );
    assert!(
        verifier_both
            .verify(&rsa.sign(&claims("alice")))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn alg_none_rejected() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    let rsa = TestKey::rsa();
    let server = JwksServer::start(vec![rsa.jwk.clone()]).await;
    let verifier = verifier(&all_asymmetric(&server.url)).await;

    for alg in ["none", "None", "NONE"] {
        let header = json!({"alg": alg, "typ": "JWT", "kid": rsa.kid});
        let token = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims("mallory").to_string())
        );
        let reason = reason(verifier.verify(&token).await);
        assert_eq!(
            reason, "the header is malformed or names an unsupported algorithm",
            "{alg}"
        );
    }
}

#[tokio::test]
async fn unknown_kid_refreshes_once() {
    let (rsa, ec) = (TestKey::rsa(), TestKey::ec());
    let server = JwksServer::start(vec![rsa.jwk.clone()]).await;
    let verifier = verifier(&all_asymmetric(&server.url)).await;
    assert_eq!(server.requests(), 1);

    server.add_key(ec.jwk.clone());
    let identity = verifier
        .verify(&ec.sign(&claims("bob")))
        .await
        .expect("accepted after a refresh");
    assert_eq!(identity.user.id(), "bob");
    assert_eq!(server.requests(), 2);

    // Further unknown kids within the minimum gap do not reach the host.
    for attempt in 0..20 {
        let token = rsa.sign_with_kid(&format!("made-up-{attempt}"), &claims("bob"));
        assert_eq!(
            reason(verifier.verify(&token).await),
            "no JWKS key matches the kid"
        );
    }
    assert_eq!(server.requests(), 2);
}

#[tokio::test]
async fn periodic_refresh_loads_new_keys() {
    let (rsa, ed) = (TestKey::rsa(), TestKey::ed());
    let server = JwksServer::start(vec![rsa.jwk.clone()]).await;
    let options = JwksOptions {
        refresh_interval: Duration::from_millis(100),
        ..JwksOptions::default()
    };
    let verifier = Verifier::with_jwks_options(&all_asymmetric(&server.url), options)
        .await
        .expect("the verifier builds");

    // Use up the refresh that an unknown kid may trigger, so that only the
    // periodic refresh can load the new key.
    let made_up = rsa.sign_with_kid("made-up", &claims("carol"));
    assert_eq!(
        reason(verifier.verify(&made_up).await),
        "no JWKS key matches the kid"
    );
    let on_demand_requests = server.requests();

    // The background task fetches one document at a time, so once a third
    // request arrives, the second, sent after the key was added, is cached.
    server.add_key(ed.jwk.clone());
    tokio::time::timeout(Duration::from_secs(5), async {
        while server.requests() < on_demand_requests + 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the cache refreshes in the background");

    let identity = verifier
        .verify(&ed.sign(&claims("carol")))
        .await
        .expect("accepted");
    assert_eq!(identity.user.id(), "carol");
}

#[tokio::test]
async fn expired_token_is_expired() {
    let ed = TestKey::ed();
    let server = JwksServer::start(vec![ed.jwk.clone()]).await;
    let verifier = verifier(&all_asymmetric(&server.url)).await;

    let token = ed.sign(&json!({"sub": "alice", "exp": unix_now() - 600}));
    assert_eq!(verifier.verify(&token).await, Err(AuthError::Expired));
}

#[tokio::test]
async fn iss_and_aud_checked_when_configured() {
    let ec = TestKey::ec();
    let server = JwksServer::start(vec![ec.jwk.clone()]).await;
    let mut config = all_asymmetric(&server.url);
    config.auth.issuer = Some("https://issuer.test".into());
    config.auth.audience = Some("routing".into());
    let verifier = verifier(&config).await;

    let mut good = claims("alice");
    good["iss"] = json!("https://issuer.test");
    good["aud"] = json!("routing");
    assert!(verifier.verify(&ec.sign(&good)).await.is_ok());

    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = json!("https://evil.test");
    assert_eq!(
        reason(verifier.verify(&ec.sign(&wrong_iss)).await),
        "iss does not match auth.issuer"
    );

    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("billing");
    assert_eq!(
        reason(verifier.verify(&ec.sign(&wrong_aud)).await),
        "aud does not match auth.audience"
    );

    let mut no_iss = good.clone();
    no_iss.as_object_mut().expect("an object").remove("iss");
    assert_eq!(
        reason(verifier.verify(&ec.sign(&no_iss)).await),
        "the iss claim is missing"
    );
}

#[tokio::test]
async fn invalid_sub_rejected() {
    let rsa = TestKey::rsa();
    let server = JwksServer::start(vec![rsa.jwk.clone()]).await;
    let verifier = verifier(&all_asymmetric(&server.url)).await;

    let reason = reason(verifier.verify(&rsa.sign(&claims("alice smith"))).await);
    assert!(reason.starts_with("sub is not a valid user id"), "{reason}");
}

#[tokio::test]
async fn unaccepted_key_type_rejected() {
    let ed = TestKey::ed();
    let server = JwksServer::start(vec![ed.jwk.clone()]).await;
    let verifier = verifier(&jwks_config(&server.url, &[config::Algorithm::RS256])).await;

    assert_eq!(
        reason(verifier.verify(&ed.sign(&claims("alice"))).await),
        "the algorithm is not accepted"
    );
}

#[tokio::test]
async fn unreachable_jwks_host_starts_and_rejects() {
    // Bind and release a port so that nothing listens on it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
    let address = listener.local_addr().expect("the bound address");
    drop(listener);

    let config = all_asymmetric(&format!("http://{address}/jwks.json"));
    let verifier = verifier(&config).await;
    let token = TestKey::rsa().sign(&claims("alice"));
    assert_eq!(
        reason(verifier.verify(&token).await),
        "no JWKS key matches the kid"
    );
}

#[tokio::test]
async fn oversized_jwks_document_ignored() {
    let rsa = TestKey::rsa();
    let server = JwksServer::start_padded(vec![rsa.jwk.clone()], 4096).await;
    let options = JwksOptions {
        max_document_bytes: 2048,
        ..JwksOptions::default()
    };
    let verifier = Verifier::with_jwks_options(&all_asymmetric(&server.url), options)
        .await
        .expect("the verifier builds");

    assert_eq!(
        reason(verifier.verify(&rsa.sign(&claims("alice"))).await),
        "no JWKS key matches the kid"
    );
    assert!(server.requests() >= 1);
}

#[tokio::test]
async fn too_many_jwks_keys_ignored() {
    let rsa = TestKey::rsa();
    let server = JwksServer::start(vec![rsa.jwk.clone(); 3]).await;
    let options = JwksOptions {
        max_keys: 2,
        ..JwksOptions::default()
    };
    let verifier = Verifier::with_jwks_options(&all_asymmetric(&server.url), options)
        .await
        .expect("the verifier builds");

    assert_eq!(
        reason(verifier.verify(&rsa.sign(&claims("alice"))).await),
        "no JWKS key matches the kid"
    );
}
