//! Wire types of routing-service, shared by the server, its tests, the client
//! library and the load generator.
//!
//! This crate does no I/O. It holds:
//! - [`address`]: user ids and their canonical `urn:sm:user:<id>` form;
//! - [`envelope`]: the envelope as it travels on the wire, and its validation;
//! - [`api`]: HTTP request and response bodies, error codes;
//! - [`frame`]: WebSocket frames in both directions and close codes;
//! - [`json`]: parsing that accepts only JSON objects where one is expected.

pub mod address;
pub mod api;
pub mod envelope;
pub mod frame;
pub mod json;

pub use address::{Address, AddressError};
pub use api::{AckRequest, ErrorBody, ErrorCode, MessageItem, MessagesPage, SendResponse};
pub use envelope::{Envelope, EnvelopeError, WireEnvelope};
pub use frame::{ClientFrame, ServerFrame, close_code};
