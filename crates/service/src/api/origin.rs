//! The `Origin` check as a tower layer in front of CORS and routing.
//!
//! A hand-written service instead of `axum::middleware::from_fn`, because
//! that one boxes a future and clones the inner service for every request.

use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use tower::{Layer, Service};

use super::OriginPolicy;

/// Rejects with 403 a request whose `Origin` header is present and not in
/// `cors.allowed_origins`, before the inner service receives it.
#[derive(Debug, Clone)]
pub struct OriginCheckLayer {
    policy: Arc<OriginPolicy>,
}

impl OriginCheckLayer {
    /// Creates the layer for `policy`.
    pub fn new(policy: Arc<OriginPolicy>) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for OriginCheckLayer {
    type Service = OriginCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        OriginCheck {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service that [`OriginCheckLayer`] wraps around an inner service.
#[derive(Debug, Clone)]
pub struct OriginCheck<S> {
    inner: S,
    policy: Arc<OriginPolicy>,
}

impl<S> Service<Request> for OriginCheck<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self.policy.check(request.headers()) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(err) => Either::Left(ready(Ok(err.into_response()))),
        }
    }
}
