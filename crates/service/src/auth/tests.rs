use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

use super::*;
use crate::config::Secret;

const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn config() -> Config {
    let mut config = Config::defaults();
    config.jwt_secret = Some(Secret(SECRET.to_owned()));
    config
}

async fn verifier(config: &Config) -> Verifier {
    Verifier::new(config).await.expect("the verifier builds")
}

fn sign(claims: &Value, secret: &str) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes()).expect("an HMAC key");
    jsonwebtoken::encode(&Header::new(jsonwebtoken::Algorithm::HS256), claims, &key)
        .expect("the token signs")
}

fn claims_for(user: &str) -> Value {
    json!({"sub": user, "exp": unix_now() + 3600, "iat": unix_now()})
}

fn unsigned_token(header: &Value, claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(header.to_string());
    let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{claims}.")
}

fn reason(result: Result<Identity, AuthError>) -> String {
    match result {
        Ok(identity) => panic!("the token was accepted for {identity:?}"),
        Err(AuthError::Invalid(reason)) => reason,
        Err(other) => panic!("expected Invalid, found {other:?}"),
    }
}

#[tokio::test]
async fn hs256_valid_token_is_accepted() {
    let verifier = verifier(&config()).await;
    let exp = unix_now() + 3600;
    let token = sign(&json!({"sub": "alice", "exp": exp}), SECRET);

    let identity = verifier.verify(&token).await.expect("accepted");
    assert_eq!(
        identity.user,
        Address::from_id("alice").expect("a valid id")
    );
    assert_eq!(identity.expires_at, exp);
}

#[tokio::test]
async fn hs256_token_is_cached_after_verification() {
    let verifier = verifier(&config()).await;
    let token = sign(&claims_for("alice"), SECRET);

    let first = verifier.verify_cached(&token).await.expect("accepted");
    assert_eq!(verifier.hs256_cache.len(), 1);
    let second = verifier
        .verify_cached(&token)
        .await
        .expect("accepted from the cache");
    assert_eq!(first, second);
}

#[tokio::test]
async fn uncached_verify_leaves_cache_empty() {
    let verifier = verifier(&config()).await;
    let token = sign(&claims_for("alice"), SECRET);
    verifier.verify(&token).await.expect("accepted");
    assert_eq!(verifier.hs256_cache.len(), 0);
}

#[tokio::test]
async fn rejected_token_is_not_cached() {
    let verifier = verifier(&config()).await;
    let token = sign(&claims_for("alice"), "another-secret-of-at-least-32-bytes");
    assert!(verifier.verify_cached(&token).await.is_err());
    assert_eq!(verifier.hs256_cache.len(), 0);
    assert!(
        verifier.verify_cached(&token).await.is_err(),
        "still rejected"
    );
}

#[tokio::test]
async fn cached_token_expires_with_exp_and_leeway() {
    let mut config = config();
    config.auth.leeway_seconds = 1;
    let verifier = verifier(&config).await;
    let exp = unix_now();
    let token = sign(&json!({"sub": "alice", "exp": exp}), SECRET);
    verifier
        .verify_cached(&token)
        .await
        .expect("accepted within the leeway");

    while unix_now() <= exp + 1 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        verifier.verify_cached(&token).await,
        Err(AuthError::Expired)
    );
}

#[tokio::test]
async fn minted_token_is_accepted() {
    let verifier = verifier(&config()).await;
    let token = mint_hs256(SECRET, "bob", Duration::from_secs(60)).expect("mints");
    let identity = verifier.verify(&token).await.expect("accepted");
    assert_eq!(identity.user.id(), "bob");
}

#[tokio::test]
async fn hs256_expired_token_is_expired() {
    let verifier = verifier(&config()).await;
    let token = sign(&json!({"sub": "alice", "exp": unix_now() - 120}), SECRET);
    assert_eq!(verifier.verify(&token).await, Err(AuthError::Expired));
}

#[tokio::test]
async fn hs256_expiry_within_leeway_is_accepted() {
    let verifier = verifier(&config()).await;
    let token = sign(&json!({"sub": "alice", "exp": unix_now() - 5}), SECRET);
    assert!(verifier.verify(&token).await.is_ok());
}

#[tokio::test]
async fn hs256_future_nbf_is_rejected() {
    let verifier = verifier(&config()).await;
    let claims = json!({"sub": "alice", "exp": unix_now() + 3600, "nbf": unix_now() + 600});
    let reason = reason(verifier.verify(&sign(&claims, SECRET)).await);
    assert_eq!(reason, "nbf is in the future");
}

#[tokio::test]
async fn hs256_wrong_secret_is_rejected() {
    let verifier = verifier(&config()).await;
    let token = sign(&claims_for("alice"), "another secret of thirty-two bytes!!");
    assert_eq!(
        reason(verifier.verify(&token).await),
        "the signature does not match"
    );
}

#[tokio::test]
async fn hs256_missing_exp_is_rejected() {
    let verifier = verifier(&config()).await;
    let token = sign(&json!({"sub": "alice"}), SECRET);
    assert_eq!(
        reason(verifier.verify(&token).await),
        "the exp claim is missing"
    );
}

#[tokio::test]
async fn hs256_missing_sub_is_rejected() {
    let verifier = verifier(&config()).await;
    let token = sign(&json!({"exp": unix_now() + 3600}), SECRET);
    assert_eq!(
        reason(verifier.verify(&token).await),
        "the sub claim is missing"
    );
}

#[tokio::test]
async fn hs256_future_iat_is_rejected() {
    let verifier = verifier(&config()).await;
    let claims = json!({"sub": "alice", "exp": unix_now() + 3600, "iat": unix_now() + 600});
    assert_eq!(
        reason(verifier.verify(&sign(&claims, SECRET)).await),
        "iat is in the future"
    );
}

#[tokio::test]
async fn hs256_wrong_iss_is_rejected() {
    let mut config = config();
    config.auth.issuer = Some("https://issuer.example".into());
    let verifier = verifier(&config).await;

    let mut claims = claims_for("alice");
    claims["iss"] = json!("https://other.example");
    assert_eq!(
        reason(verifier.verify(&sign(&claims, SECRET)).await),
        "iss does not match auth.issuer"
    );

    let missing = sign(&claims_for("alice"), SECRET);
    assert_eq!(
        reason(verifier.verify(&missing).await),
        "the iss claim is missing"
    );

    claims["iss"] = json!("https://issuer.example");
    assert!(verifier.verify(&sign(&claims, SECRET)).await.is_ok());
}

#[tokio::test]
async fn hs256_wrong_aud_is_rejected() {
    let mut config = config();
    config.auth.audience = Some("routing".into());
    let verifier = verifier(&config).await;

    let mut claims = claims_for("alice");
    claims["aud"] = json!("billing");
    assert_eq!(
        reason(verifier.verify(&sign(&claims, SECRET)).await),
        "aud does not match auth.audience"
    );

    let missing = sign(&claims_for("alice"), SECRET);
    assert_eq!(
        reason(verifier.verify(&missing).await),
        "the aud claim is missing"
    );

    claims["aud"] = json!(["billing", "routing"]);
    assert!(verifier.verify(&sign(&claims, SECRET)).await.is_ok());
}

#[tokio::test]
async fn invalid_sub_is_rejected() {
    let verifier = verifier(&config()).await;
    for sub in ["has space", "", "ünicode", "urn:sm:user:alice"] {
        let reason = reason(verifier.verify(&sign(&claims_for(sub), SECRET)).await);
        assert!(
            reason.starts_with("sub is not a valid user id"),
            "{sub:?}: {reason}"
        );
    }
}

#[tokio::test]
async fn alg_none_is_rejected() {
    let verifier = verifier(&config()).await;
    let token = unsigned_token(&json!({"alg": "none", "typ": "JWT"}), &claims_for("alice"));
    let reason = reason(verifier.verify(&token).await);
    assert_eq!(
        reason,
        "the header is malformed or names an unsupported algorithm"
    );
}

#[tokio::test]
async fn unconfigured_algorithm_is_rejected() {
    let verifier = verifier(&config()).await;
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": "k"});
    let token = format!("{}AAAA", unsigned_token(&header, &claims_for("alice")));
    assert_eq!(
        reason(verifier.verify(&token).await),
        "the algorithm is not accepted"
    );
}

#[tokio::test]
async fn empty_token_is_missing() {
    let verifier = verifier(&config()).await;
    assert_eq!(verifier.verify("").await, Err(AuthError::Missing));
}

#[tokio::test]
async fn oversized_token_is_rejected() {
    let verifier = verifier(&config()).await;
    let token = "a".repeat(MAX_TOKEN_BYTES + 1);
    assert_eq!(
        reason(verifier.verify(&token).await),
        "the token is longer than 8192 bytes"
    );
}

#[tokio::test]
async fn garbage_token_is_rejected() {
    let verifier = verifier(&config()).await;
    for token in ["abc", "a.b.c", "..", "e30.e30.e30"] {
        assert!(
            matches!(verifier.verify(token).await, Err(AuthError::Invalid(_))),
            "{token}"
        );
    }
}

#[tokio::test]
async fn setup_without_secret_fails() {
    let config = Config::defaults();
    let result = Verifier::new(&config).await;
    assert!(matches!(result, Err(AuthSetupError::MissingSecret)));
}

#[tokio::test]
async fn setup_without_jwks_url_fails() {
    let mut config = config();
    config.auth.algorithms = vec![Algorithm::ES256];
    let result = Verifier::new(&config).await;
    assert!(matches!(
        result,
        Err(AuthSetupError::MissingJwks(Algorithm::ES256))
    ));
}

#[test]
fn verifier_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Verifier>();
}

#[test]
fn mint_rejects_invalid_user() {
    let result = mint_hs256(SECRET, "has space", Duration::from_secs(60));
    assert!(matches!(result, Err(AuthError::Invalid(_))));
}
