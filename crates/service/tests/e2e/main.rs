//! End-to-end tests: the real server on port 0, over real HTTP and
//! WebSocket sockets.

mod binary;
mod cluster;
mod http_api;
mod outage;
mod regressions;
mod support;
mod websocket;
