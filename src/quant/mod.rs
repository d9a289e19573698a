//! Quantizers: pure functions from f32 rows to the bytes of a block format, and back. No I/O.
//!
//! `ggml` holds the table of ggml block types (the layout every GGUF reader agrees on).

pub mod ggml;
