//! The conformance suite every mailbox backend must pass.
