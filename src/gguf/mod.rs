//! GGUF output: which ggml type each tensor gets (the llama-quantize mixes).

pub mod mix;
