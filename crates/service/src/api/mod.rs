//! The HTTP API on `api_port`: one file per resource, and the shared state,
//! extractors and origin policy.

use std::sync::Arc;

use axum::Router as HttpRouter;
use axum::extract::DefaultBodyLimit;
use axum::handler::Handler as _;
use axum::http::{HeaderName, Method, StatusCode, header};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use routing_protocol::ErrorCode;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};
use tower_http::timeout::{Timeout, TimeoutLayer};

use crate::auth::Verifier;
use crate::config::Config;
use crate::error::ApiError;
use crate::router::Router;

mod extract;
mod health;
pub mod messages;
mod origin;
mod send;

pub use origin::{OriginCheck, OriginCheckLayer};

pub use extract::{AuthUser, bearer_token, json_error};
pub use health::routes as health_routes;

/// What every handler of both servers shares.
#[derive(Clone)]
pub struct AppState {
    /// Accept, read and ack.
    pub router: Arc<Router>,
    /// Token verification.
    pub verifier: Arc<Verifier>,
    /// The effective configuration.
    pub config: Arc<Config>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Allowed browser origins.
    pub origins: Arc<OriginPolicy>,
    /// Bounds the `GET /messages` pages built at once, and so their memory.
    pub page_reads: Arc<tokio::sync::Semaphore>,
}

/// Browser origins allowed by `cors.allowed_origins`, compared as whole strings.
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    any: bool,
    allowed: Vec<String>,
}

impl OriginPolicy {
    /// Builds the policy from the configured list; `*` allows any origin.
    pub fn new(allowed_origins: &[String]) -> Self {
        Self {
            any: allowed_origins.iter().any(|origin| origin == "*"),
            allowed: allowed_origins.to_vec(),
        }
    }

    /// Whether a request with this `Origin` header value may proceed.
    pub fn allows(&self, origin: &[u8]) -> bool {
        self.any
            || self
                .allowed
                .iter()
                .any(|allowed| allowed.as_bytes() == origin)
    }

    /// Rejects a request whose `Origin` header is present and not allowed.
    pub fn check(&self, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
        match headers.get(header::ORIGIN) {
            Some(origin) if !self.allows(origin.as_bytes()) => Err(ApiError::new(
                ErrorCode::Forbidden,
                "the Origin of this request is not in cors.allowed_origins",
            )),
            _ => Ok(()),
        }
    }

    fn cors_layer(self: &Arc<Self>) -> CorsLayer {
        let origins = if self.any {
            AllowOrigin::any()
        } else {
            // A predicate over the shared policy, not a copied list, because
            // the CORS service is cloned for every request.
            let policy = self.clone();
            AllowOrigin::predicate(move |origin, _| policy.allows(origin.as_bytes()))
        };
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .expose_headers([HeaderName::from_static("retry-after")])
            .max_age(std::time::Duration::from_secs(600))
    }
}

/// The HTTP API service: the Origin check, CORS and the request timeout
/// around the router.
pub type ApiService = OriginCheck<Cors<Timeout<HttpRouter>>>;

/// Builds the HTTP API service.
///
/// The middleware wraps the finished router once. Added with
/// `Router::layer`, each layer would wrap every route in another boxed
/// service, and each of those is cloned for every request.
pub fn router(state: AppState) -> ApiService {
    let origin_check = OriginCheckLayer::new(state.origins.clone());
    let cors = state.origins.cors_layer();
    let timeout = TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        state.config.limits.request_timeout,
    );
    // One byte above the limit, so an oversized body is seen and answered 413.
    let send_limit = DefaultBodyLimit::max(state.config.limits.max_envelope_bytes + 1);
    let ack_limit = DefaultBodyLimit::max(messages::MAX_ACK_BODY_BYTES);
    let router = HttpRouter::new()
        .route("/send", post(send::send.layer(send_limit)))
        .route("/messages", get(messages::list))
        .route("/messages/ack", post(messages::ack.layer(ack_limit)))
        .merge(health::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    ServiceBuilder::new()
        .layer(origin_check)
        .layer(cors)
        .layer(timeout)
        .service(router)
}

/// Answers unknown paths with the contract's JSON 404.
pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such path")
}

/// Answers a known path with a wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this path does not accept this method",
    )
}
