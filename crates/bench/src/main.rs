//! routing-bench: the load generator of routing-service.

fn main() {}
