//! routing-service: moves sealed envelopes between users. It accepts them
//! over HTTP or WebSocket, stores each in the recipient's mailbox, and pushes
//! it live to every WebSocket connection of the recipient.
//!
//! # Layout
//!
//! - [`config`]: the embedded `config.yaml`, a file, and `ROUTING_` variables.
//! - [`auth`]: JWT verification.
//! - [`mailbox`]: the durable per-recipient log, the truth of the service.
//! - [`presence`]: which instances hold a user's connections (a hint).
//! - [`bus`]: the delivery bus between instances (a hint).
//! - [`router`]: accept, store, then route to presence and the bus.
//! - [`api`]: the HTTP API; [`realtime`]: the WebSocket server.
//! - [`error`]: the one place that maps failures to HTTP statuses and codes.
//! - [`server`]: wiring, start and graceful shutdown; [`telemetry`]: logs and metrics.
//!
//! # Glossary
//!
//! - **envelope**: the sealed message unit; its payload is opaque.
//! - **mailbox**: a recipient's stored messages, ordered by **seq**.
//! - **ack**: the recipient's acknowledgement; acked messages are deleted.
//! - **presence**: leases of (user, instance) pairs.
//! - **delivery bus**: carries deliveries to the instances that hold connections.
//! - **connection**: one WebSocket of a user; **instance**: one process.

pub mod api;
pub mod auth;
pub mod bus;
pub mod config;
pub mod error;
pub mod listener;
pub mod mailbox;
pub mod presence;
pub mod realtime;
pub mod router;
pub mod server;
pub mod telemetry;
