//! The JWKS key cache for RS256, ES256 and EdDSA tokens.
//!
//! Keys are fetched from `auth.jwks_url` and cached by `kid`. The cache is
//! refreshed every [`JwksOptions::refresh_interval`], and a token whose `kid`
//! is not cached triggers one refresh at most every
//! [`JwksOptions::min_refresh_gap`], so a flood of made-up `kid`s cannot
//! flood the JWKS host. A failed fetch keeps the cached keys.
//!
//! Only keys that can verify one of the configured asymmetric algorithms are
//! cached, each with the one algorithm its key type allows. Symmetric (`oct`)
//! keys are never loaded, so a JWKS can never make HS256 accept a key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Timing and size limits of the JWKS cache.
#[derive(Debug, Clone)]
pub struct JwksOptions {
    /// The period of the background refresh. Default: 10 minutes.
    pub refresh_interval: Duration,
    /// The minimum time between two refreshes triggered by an unknown `kid`,
    /// and the retry period while no fetch has succeeded. Default: 30 s.
    pub min_refresh_gap: Duration,
    /// The timeout of one fetch, connection included. Default: 10 s.
    pub request_timeout: Duration,
    /// The maximum size of the JWKS document, in bytes. Default: 1 MiB.
    pub max_document_bytes: usize,
    /// The maximum number of keys in the JWKS document. Default: 100.
    pub max_keys: usize,
}

impl Default for JwksOptions {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(600),
            min_refresh_gap: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            max_document_bytes: 1024 * 1024,
            max_keys: 100,
        }
    }
}

/// A cached verification key and the one algorithm it may verify.
#[derive(Clone)]
pub(crate) struct JwksKey {
    pub(crate) algorithm: Algorithm,
    pub(crate) key: DecodingKey,
}

/// The failure of one JWKS fetch. Its text never contains the URL, which
/// may contain a password.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error("the request failed: {0}")]
    Request(reqwest::Error),
    #[error("the server returned HTTP status {0}")]
    Status(reqwest::StatusCode),
    #[error("the document is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the document is not a JWKS: {0}")]
    Json(serde_json::Error),
    #[error("the document lists {count} keys, more than the maximum of {max}")]
    TooManyKeys { count: usize, max: usize },
}

impl From<reqwest::Error> for FetchError {
    fn from(err: reqwest::Error) -> Self {
        Self::Request(err.without_url())
    }
}

/// The cache, shared by the verifier and the background refresh task.
struct Shared {
    url: reqwest::Url,
    client: reqwest::Client,
    accepted: Vec<Algorithm>,
    options: JwksOptions,
    keys: RwLock<Arc<HashMap<String, JwksKey>>>,
    has_keys_from_fetch: AtomicBool,
    /// The time of the last refresh triggered by an unknown `kid`. The lock
    /// also makes concurrent lookups of unknown `kid`s wait for one fetch.
    last_on_demand_refresh: Mutex<Option<Instant>>,
}

/// The JWKS cache of one verifier. Dropping it stops the background refresh.
pub(crate) struct JwksCache {
    shared: Arc<Shared>,
    refresher: AbortHandle,
}

impl Drop for JwksCache {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

impl JwksCache {
    /// Fetches the keys once and starts the background refresh. A failed
    /// first fetch is logged and retried in the background, so the service
    /// starts while the JWKS host is down and rejects asymmetric tokens until
    /// keys arrive. Must be called inside a Tokio runtime.
    pub(crate) async fn start(
        url: reqwest::Url,
        accepted: Vec<Algorithm>,
        options: JwksOptions,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(options.request_timeout)
            .timeout(options.request_timeout)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .map_err(reqwest::Error::without_url)?;
        let shared = Arc::new(Shared {
            url,
            client,
            accepted,
            options,
            keys: RwLock::new(Arc::default()),
            has_keys_from_fetch: AtomicBool::new(false),
            last_on_demand_refresh: Mutex::new(None),
        });

        shared.refresh().await;
        let refresher = tokio::spawn(refresh_periodically(Arc::downgrade(&shared))).abort_handle();
        Ok(Self { shared, refresher })
    }

    /// Finds the key for `kid`, refreshing the cache once if it is unknown
    /// and no refresh of that kind ran within the minimum gap.
    pub(crate) async fn key(&self, kid: &str) -> Option<JwksKey> {
        if let Some(key) = self.shared.cached(kid) {
            return Some(key);
        }

        let mut last_refresh = self.shared.last_on_demand_refresh.lock().await;
        // Another task may have refreshed the cache while this one waited.
        if let Some(key) = self.shared.cached(kid) {
            return Some(key);
        }
        let gap = self.shared.options.min_refresh_gap;
        if last_refresh.is_some_and(|at| at.elapsed() < gap) {
            return None;
        }
        *last_refresh = Some(Instant::now());
        self.shared.refresh().await;
        self.shared.cached(kid)
    }
}

impl Shared {
    fn cached(&self, kid: &str) -> Option<JwksKey> {
        let keys = self
            .keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        keys.get(kid).cloned()
    }

    /// Replaces the cached keys with a fresh fetch, or keeps them and logs
    /// a warning when the fetch fails.
    async fn refresh(&self) {
        let host = self.url.host_str().unwrap_or_default();
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(host, keys = keys.len(), "JWKS keys loaded");
                if keys.is_empty() {
                    tracing::warn!(host, "JWKS has no key usable with auth.algorithms");
                }
                *self
                    .keys
                    .write()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(keys);
                self.has_keys_from_fetch.store(true, Ordering::Relaxed);
            }
            Err(err) => {
                tracing::warn!(host, error = %err, "JWKS fetch failed, keeping the cached keys");
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, JwksKey>, FetchError> {
        let max_bytes = self.options.max_document_bytes;
        let mut response = self
            .client
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status()));
        }
        if response
            .content_length()
            .is_some_and(|length| length > max_bytes as u64)
        {
            return Err(FetchError::TooLarge(max_bytes));
        }

        // Read chunk by chunk, because Content-Length may be absent or false.
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > max_bytes {
                return Err(FetchError::TooLarge(max_bytes));
            }
            body.extend_from_slice(&chunk);
        }
        parse_key_set(&body, &self.accepted, self.options.max_keys)
    }
}

/// Refreshes the cache every `refresh_interval`, or every `min_refresh_gap`
/// until a fetch has succeeded. Ends when the cache is dropped.
async fn refresh_periodically(shared: Weak<Shared>) {
    loop {
        let wait = match shared.upgrade() {
            Some(shared) if shared.has_keys_from_fetch.load(Ordering::Relaxed) => {
                shared.options.refresh_interval
            }
            Some(shared) => shared.options.min_refresh_gap,
            None => return,
        };
        tokio::time::sleep(wait).await;

        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.refresh().await;
    }
}

#[derive(Deserialize)]
struct RawKeySet {
    keys: Vec<serde_json::Value>,
}

/// Parses a JWKS document into the usable keys by `kid`. Keys that cannot
/// be used are skipped, and the first of two keys with one `kid` wins.
fn parse_key_set(
    body: &[u8],
    accepted: &[Algorithm],
    max_keys: usize,
) -> Result<HashMap<String, JwksKey>, FetchError> {
    let set: RawKeySet = serde_json::from_slice(body).map_err(FetchError::Json)?;
    if set.keys.len() > max_keys {
        return Err(FetchError::TooManyKeys {
            count: set.keys.len(),
            max: max_keys,
        });
    }

    let mut keys = HashMap::new();
    for raw in set.keys {
        let parsed = serde_json::from_value::<Jwk>(raw)
            .map_err(|_| "it is not a valid JWK")
            .and_then(|jwk| usable_key(&jwk, accepted));
        match parsed {
            Ok((kid, key)) => {
                keys.entry(kid).or_insert(key);
            }
            Err(reason) => tracing::debug!(reason, "JWKS key skipped"),
        }
    }
    Ok(keys)
}

/// Returns the `kid` and verification key of a JWK, or why it is skipped.
fn usable_key(jwk: &Jwk, accepted: &[Algorithm]) -> Result<(String, JwksKey), &'static str> {
    let kid = jwk.common.key_id.clone().ok_or("it has no kid")?;
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|usage| *usage != PublicKeyUse::Signature)
    {
        return Err("its use is not sig");
    }
    if let Some(operations) = &jwk.common.key_operations
        && !operations.contains(&KeyOperations::Verify)
    {
        return Err("its key_ops do not include verify");
    }

    let algorithm = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(params) if params.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::OctetKeyPair(params) if params.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return Err("its key type or curve is not supported"),
    };
    if jwk
        .common
        .key_algorithm
        .is_some_and(|named| named != KeyAlgorithm::from(algorithm))
    {
        return Err("its alg is not the one algorithm this service verifies with its key type");
    }
    if !accepted.contains(&algorithm) {
        return Err("its algorithm is not in auth.algorithms");
    }

    let key = DecodingKey::from_jwk(jwk).map_err(|_| "its key material is invalid")?;
    Ok((kid, JwksKey { algorithm, key }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];

    fn jwk(value: serde_json::Value) -> Jwk {
        serde_json::from_value(value).expect("a valid JWK")
    }

    fn ed_key(extra: serde_json::Value) -> Jwk {
        let mut value = serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "kid": "ed",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
        });
        let object = value.as_object_mut().expect("an object");
        for (name, field) in extra.as_object().expect("an object") {
            object.insert(name.clone(), field.clone());
        }
        jwk(value)
    }

    #[test]
    fn okp_key_is_eddsa() {
        let (kid, key) = usable_key(&ed_key(serde_json::json!({})), &ALL).expect("usable");
        assert_eq!(kid, "ed");
        assert_eq!(key.algorithm, Algorithm::EdDSA);
    }

    #[test]
    fn symmetric_key_is_skipped() {
        let oct = jwk(serde_json::json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0c2VjcmV0"}));
        assert!(usable_key(&oct, &ALL).is_err());
    }

    #[test]
    fn key_without_kid_is_skipped() {
        let mut key = ed_key(serde_json::json!({}));
        key.common.key_id = None;
        assert_eq!(usable_key(&key, &ALL).err(), Some("it has no kid"));
    }

    #[test]
    fn encryption_key_is_skipped() {
        let key = ed_key(serde_json::json!({"use": "enc"}));
        assert_eq!(usable_key(&key, &ALL).err(), Some("its use is not sig"));
    }

    #[test]
    fn mismatched_alg_is_skipped() {
        let key = ed_key(serde_json::json!({"alg": "RS256"}));
        assert!(usable_key(&key, &ALL).is_err());
    }

    #[test]
    fn unaccepted_algorithm_is_skipped() {
        let key = ed_key(serde_json::json!({}));
        let reason = usable_key(&key, &[Algorithm::RS256]).err();
        assert_eq!(reason, Some("its algorithm is not in auth.algorithms"));
    }

    #[test]
    fn key_set_skips_bad_keys() {
        let body = br#"{"keys": [
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "oct", "kid": "h", "k": "c2VjcmV0"},
            {"kty": "weird"},
            42
        ]}"#;
        let keys = parse_key_set(body, &ALL, 10).expect("parses");
        assert_eq!(keys.len(), 1);
        assert!(keys.contains_key("ed"));
    }

    #[test]
    fn key_set_over_max_is_rejected() {
        let body = br#"{"keys": [{}, {}, {}]}"#;
        let result = parse_key_set(body, &ALL, 2);
        assert!(matches!(
            result,
            Err(FetchError::TooManyKeys { count: 3, max: 2 })
        ));
    }

    #[test]
    fn non_jwks_document_is_rejected() {
        assert!(matches!(
            parse_key_set(b"[]", &ALL, 2),
            Err(FetchError::Json(_))
        ));
    }
}
