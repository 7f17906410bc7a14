//! Bearer token verification (JWT) and the `token` command's minting.
//!
//! The accepted algorithms come from `auth.algorithms`. The token header's
//! `alg` only picks one of them: HS256 verifies only with `JWT_SECRET`, and
//! RS256, ES256 and EdDSA only with the JWKS key named by `kid`, whose key
//! type must allow exactly that algorithm. So no key of one kind can verify
//! a token of another, and `none` is never accepted. `sub` and `exp` are
//! required; `nbf`, `iat`, `iss` and `aud` are checked when present or
//! configured.

mod cache;
mod jwks;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use routing_protocol::Address;
use serde::{Deserialize, Serialize};

use crate::config::{Algorithm, Config};
use cache::TokenCache;
use jwks::JwksCache;
pub use jwks::JwksOptions;

/// The maximum token length, in bytes. Longer tokens are rejected before
/// any decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The caller's address, from `sub`.
    pub user: Address,
    /// The token's `exp`, in seconds since the Unix epoch.
    pub expires_at: u64,
}

/// Why a token was rejected. The text is safe to return to the caller and
/// never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("a bearer token is required")]
    Missing,
    /// The token's `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// The token is malformed, badly signed or fails a claim check.
    #[error("the token is invalid: {0}")]
    Invalid(String),
}

/// Why the verifier could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    /// HS256 is accepted but `JWT_SECRET` is not set.
    #[error(
        "JWT_SECRET is not set, but auth.algorithms includes HS256; set JWT_SECRET in the environment"
    )]
    MissingSecret,
    /// No algorithm is configured.
    #[error("auth.algorithms is empty; list at least one of HS256, RS256, ES256, EdDSA")]
    NoAlgorithm,
    /// An asymmetric algorithm is configured without a usable JWKS URL.
    #[error(
        "auth.algorithms includes {0:?}, which needs auth.jwks_url set to an http or https URL"
    )]
    MissingJwks(Algorithm),
    /// The HTTP client for the JWKS could not be built.
    #[error("cannot build the HTTP client for auth.jwks_url: {0}")]
    HttpClient(reqwest::Error),
}

/// The claims this service reads. `sub` and `exp` are optional here only so
/// that a missing one is reported as missing, not as a type error.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// Verifies bearer tokens against the configured keys and claims.
pub struct Verifier {
    hs256: Option<DecodingKey>,
    jwks: Option<JwksCache>,
    /// One validation per accepted algorithm, each accepting only it.
    validations: Vec<(jsonwebtoken::Algorithm, Validation)>,
    leeway: u64,
    /// Verified HS256 tokens, for [`Verifier::verify_cached`].
    hs256_cache: TokenCache,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds a verifier from `auth.*` and `JWT_SECRET`, with the default
    /// JWKS limits. When an asymmetric algorithm is accepted, it fetches the
    /// JWKS once before it returns and starts a background refresh, so it
    /// must run inside a Tokio runtime. A failed first fetch does not fail
    /// the call: it is logged, retried in the background, and tokens that
    /// need a JWKS key are rejected until a fetch succeeds.
    pub async fn new(config: &Config) -> Result<Self, AuthSetupError> {
        Self::with_jwks_options(config, JwksOptions::default()).await
    }

    /// Builds a verifier like [`Verifier::new`], with the given JWKS limits.
    pub async fn with_jwks_options(
        config: &Config,
        options: JwksOptions,
    ) -> Result<Self, AuthSetupError> {
        let auth = &config.auth;
        if auth.algorithms.is_empty() {
            return Err(AuthSetupError::NoAlgorithm);
        }
        let accepted: Vec<_> = auth.algorithms.iter().copied().map(jwt_algorithm).collect();

        let mut hs256 = None;
        if auth.algorithms.contains(&Algorithm::HS256) {
            let secret = config
                .jwt_secret
                .as_ref()
                .ok_or(AuthSetupError::MissingSecret)?;
            let key = DecodingKey::from_secret(secret.0.as_bytes())
                .map_err(|_| AuthSetupError::MissingSecret)?;
            hs256 = Some(key);
        }

        let mut jwks = None;
        let asymmetric = auth
            .algorithms
            .iter()
            .copied()
            .find(|algorithm| *algorithm != Algorithm::HS256);
        if let Some(algorithm) = asymmetric {
            let url = auth
                .jwks_url
                .as_deref()
                .and_then(|url| reqwest::Url::parse(url).ok())
                .filter(|url| matches!(url.scheme(), "http" | "https"))
                .ok_or(AuthSetupError::MissingJwks(algorithm))?;
            let cache = JwksCache::start(url, accepted.clone(), options)
                .await
                .map_err(AuthSetupError::HttpClient)?;
            jwks = Some(cache);
        }

        let validations = accepted
            .iter()
            .map(|algorithm| (*algorithm, validation(config, *algorithm)))
            .collect();
        Ok(Self {
            hs256,
            jwks,
            validations,
            leeway: auth.leeway_seconds,
            hs256_cache: TokenCache::new(cache::MAX_ENTRIES, cache::MAX_ENTRY_AGE),
        })
    }

    /// Verifies a token and returns the caller it names.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify_uncached(token)
            .await
            .map(|(identity, _)| identity)
    }

    /// Verifies a token like [`Verifier::verify`], but first looks it up
    /// among recently verified HS256 tokens and caches it when it is one.
    /// HTTP requests use this: a keep-alive client repeats its token on every
    /// request, while a WebSocket presents it once per connection.
    pub async fn verify_cached(&self, token: &str) -> Result<Identity, AuthError> {
        if let Some(identity) = self.hs256_cache.get(token, unix_now()) {
            return Ok(identity);
        }
        let (identity, algorithm) = self.verify_uncached(token).await?;
        if algorithm == jsonwebtoken::Algorithm::HS256 {
            let accepted_until = identity.expires_at.saturating_add(self.leeway);
            self.hs256_cache.insert(token, &identity, accepted_until);
        }
        Ok(identity)
    }

    /// Verifies a token and returns the caller and the token's algorithm.
    async fn verify_uncached(
        &self,
        token: &str,
    ) -> Result<(Identity, jsonwebtoken::Algorithm), AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(invalid("the token is longer than 8192 bytes"));
        }

        // The header is read unverified only to pick the key and algorithm,
        // both of which must then be configured.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| invalid("the header is malformed or names an unsupported algorithm"))?;
        let Some(validation) = self.validation(header.alg) else {
            return Err(invalid("the algorithm is not accepted"));
        };

        let claims = if header.alg == jsonwebtoken::Algorithm::HS256 {
            let key = self
                .hs256
                .as_ref()
                .ok_or_else(|| invalid("the algorithm is not accepted"))?;
            decode_claims(token, key, validation)?
        } else {
            let key = self.jwks_key(header.alg, header.kid.as_deref()).await?;
            decode_claims(token, &key.key, validation)?
        };
        Ok((self.identity(claims)?, header.alg))
    }

    /// The clock leeway on `exp`, in seconds.
    pub fn leeway(&self) -> u64 {
        self.leeway
    }

    fn validation(&self, algorithm: jsonwebtoken::Algorithm) -> Option<&Validation> {
        self.validations
            .iter()
            .find(|(accepted, _)| *accepted == algorithm)
            .map(|(_, v)| v)
    }

    async fn jwks_key(
        &self,
        algorithm: jsonwebtoken::Algorithm,
        kid: Option<&str>,
    ) -> Result<jwks::JwksKey, AuthError> {
        let jwks = self
            .jwks
            .as_ref()
            .ok_or_else(|| invalid("the algorithm is not accepted"))?;
        // NOTE: a token without `kid` is rejected even when the JWKS has a
        // single key, because picking a key by algorithm alone would be a guess.
        let kid =
            kid.ok_or_else(|| invalid("the header has no kid, so no JWKS key can be chosen"))?;
        let key = jwks
            .key(kid)
            .await
            .ok_or_else(|| invalid("no JWKS key matches the kid"))?;
        if key.algorithm != algorithm {
            return Err(invalid("the algorithm does not match the key named by kid"));
        }
        Ok(key)
    }

    fn identity(&self, claims: Claims) -> Result<Identity, AuthError> {
        let (Some(sub), Some(exp)) = (claims.sub, claims.exp) else {
            return Err(invalid("a required claim is missing"));
        };
        if let Some(iat) = claims.iat
            && iat > unix_now().saturating_add(self.leeway)
        {
            return Err(invalid("iat is in the future"));
        }
        let user = Address::from_id(&sub)
            .map_err(|err| AuthError::Invalid(format!("sub is not a valid user id: {err}")))?;
        Ok(Identity {
            user,
            expires_at: exp,
        })
    }
}

/// Builds the claim checks for tokens signed with `algorithm`.
fn validation(config: &Config, algorithm: jsonwebtoken::Algorithm) -> Validation {
    let auth = &config.auth;
    let mut validation = Validation::new(algorithm);
    validation.leeway = auth.leeway_seconds;
    validation.validate_exp = true;
    validation.validate_nbf = true;

    // jsonwebtoken 12 checks iss and aud only when the token has them, so a
    // configured claim is also made required.
    let mut required = vec!["exp", "sub"];
    match &auth.issuer {
        Some(issuer) => {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        None => validation.iss = None,
    }
    match &auth.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        // NOTE: without auth.audience, a token's aud is not checked at all,
        // because this service then has no audience name to compare with.
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

fn decode_claims(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<Claims, AuthError> {
    jsonwebtoken::decode::<Claims>(token, key, validation)
        .map(|data| data.claims)
        .map_err(|err| map_jwt_error(err.kind()))
}

fn jwt_algorithm(algorithm: Algorithm) -> jsonwebtoken::Algorithm {
    match algorithm {
        Algorithm::HS256 => jsonwebtoken::Algorithm::HS256,
        Algorithm::RS256 => jsonwebtoken::Algorithm::RS256,
        Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
        Algorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
    }
}

fn invalid(reason: &str) -> AuthError {
    AuthError::Invalid(reason.to_owned())
}

fn map_jwt_error(kind: &ErrorKind) -> AuthError {
    let reason = match kind {
        ErrorKind::ExpiredSignature => return AuthError::Expired,
        ErrorKind::InvalidSignature => "the signature does not match",
        ErrorKind::ImmatureSignature => "nbf is in the future",
        ErrorKind::InvalidIssuer => "iss does not match auth.issuer",
        ErrorKind::InvalidAudience => "aud does not match auth.audience",
        ErrorKind::InvalidAlgorithm => "the algorithm is not accepted",
        ErrorKind::MissingRequiredClaim(claim) if claim == "exp" => "the exp claim is missing",
        ErrorKind::MissingRequiredClaim(claim) if claim == "sub" => "the sub claim is missing",
        ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => "the iss claim is missing",
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => "the aud claim is missing",
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        ErrorKind::InvalidClaimFormat(_) | ErrorKind::Json(_) => "a claim has the wrong type",
        _ => "the token is malformed",
    };
    invalid(reason)
}

/// The current time in seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mints an HS256 token for `user_id` that expires after `ttl`.
pub fn mint_hs256(secret: &str, user_id: &str, ttl: Duration) -> Result<String, AuthError> {
    // A URN such as urn:sm:user:bob names the same user as the bare id.
    let user = Address::parse(user_id)
        .map_err(|err| AuthError::Invalid(format!("--user is not a valid user id: {err}")))?;
    let now = unix_now();
    let claims = Claims {
        sub: Some(user.id().to_owned()),
        exp: Some(now.saturating_add(ttl.as_secs())),
        iat: Some(now),
    };
    let key = EncodingKey::from_secret(secret.as_bytes())
        .map_err(|_| AuthError::Invalid("JWT_SECRET is empty".into()))?;
    jsonwebtoken::encode(&Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key)
        .map_err(|err| AuthError::Invalid(format!("signing failed: {err}")))
}

#[cfg(test)]
mod tests;
