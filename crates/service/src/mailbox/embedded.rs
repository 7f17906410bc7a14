//! The embedded mailbox: fjall in `data_dir`, with group commit.
