//! Bearer token verification (JWT) and the `token` command's minting.
//!
//! The accepted algorithms come from `auth.algorithms`, never from the token
//! header. `sub` and `exp` are required; `nbf`, `iat`, `iss` and `aud` are
//! checked when present or configured.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use routing_protocol::Address;
use serde::{Deserialize, Serialize};

use crate::config::{Algorithm, Config};

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
    /// An asymmetric algorithm is configured without a JWKS URL.
    #[error("auth.algorithms includes {0:?}, which needs auth.jwks_url")]
    MissingJwks(Algorithm),
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// Verifies bearer tokens against the configured keys and claims.
pub struct Verifier {
    hs256: Option<DecodingKey>,
    validation: Validation,
    leeway: u64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds a verifier from `auth.*` and `JWT_SECRET`.
    pub fn new(config: &Config) -> Result<Self, AuthSetupError> {
        let auth = &config.auth;
        if auth.algorithms.is_empty() {
            return Err(AuthSetupError::NoAlgorithm);
        }
        let mut hs256 = None;
        let mut algorithms = Vec::new();
        for algorithm in &auth.algorithms {
            match algorithm {
                Algorithm::HS256 => {
                    let secret = config
                        .jwt_secret
                        .as_ref()
                        .ok_or(AuthSetupError::MissingSecret)?;
                    let key = DecodingKey::from_secret(secret.0.as_bytes())
                        .map_err(|_| AuthSetupError::MissingSecret)?;
                    hs256 = Some(key);
                    algorithms.push(jsonwebtoken::Algorithm::HS256);
                }
                // TODO: RS256, ES256 and EdDSA need keys fetched from
                // auth.jwks_url; until that lands they are rejected at start.
                other => return Err(AuthSetupError::MissingJwks(*other)),
            }
        }

        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = auth.leeway_seconds;
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        match &auth.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &auth.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }

        Ok(Self {
            hs256,
            validation,
            leeway: auth.leeway_seconds,
        })
    }

    /// Verifies a token and returns the caller it names.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let Some(key) = &self.hs256 else {
            return Err(AuthError::Invalid(
                "no key is configured for this token".into(),
            ));
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|err| map_jwt_error(err.kind()))?;
        let claims = data.claims;

        if let Some(iat) = claims.iat
            && iat > unix_now().saturating_add(self.leeway)
        {
            return Err(AuthError::Invalid("iat is in the future".into()));
        }
        let user = Address::from_id(&claims.sub)
            .map_err(|err| AuthError::Invalid(format!("sub is not a valid user id: {err}")))?;
        Ok(Identity {
            user,
            expires_at: claims.exp,
        })
    }

    /// The clock leeway on `exp`, in seconds.
    pub fn leeway(&self) -> u64 {
        self.leeway
    }
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
        ErrorKind::MissingRequiredClaim(_) => "a required claim is missing",
        ErrorKind::InvalidClaimFormat(_) | ErrorKind::Json(_) => "a claim has the wrong type",
        _ => "the token is malformed",
    };
    AuthError::Invalid(reason.into())
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
    Address::from_id(user_id)
        .map_err(|err| AuthError::Invalid(format!("--user is not a valid user id: {err}")))?;
    let now = unix_now();
    let claims = Claims {
        sub: user_id.to_owned(),
        exp: now + ttl.as_secs(),
        iat: Some(now),
    };
    let key = EncodingKey::from_secret(secret.as_bytes())
        .map_err(|_| AuthError::Invalid("JWT_SECRET is empty".into()))?;
    jsonwebtoken::encode(&Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key)
        .map_err(|err| AuthError::Invalid(format!("signing failed: {err}")))
}
