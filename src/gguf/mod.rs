//! GGUF output: the container format, the `ouro` architecture mapping, the tokenizer metadata
//! and the llama-quantize mixes.

pub mod arch;
pub mod card;
pub mod file;
pub mod mix;
pub mod tokenizer;
