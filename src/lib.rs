//! ouro-quant: convert, validate and run the ByteDance Ouro looped language models.
//!
//! Data flows one way: [`checkpoint`] reads an HF directory, [`quant`] turns rows of f32 into block
//! formats, the format writers put them in files, and every output is verified before it appears
//! ([`output`]).

pub mod batch;
pub mod checkpoint;
pub mod convert;
pub mod corpus;
pub mod error;
pub mod eval;
#[doc(hidden)]
pub mod fuzzing;
pub mod gguf;
pub mod imatrix;
pub mod inspect;
pub mod json;
pub mod mlx;
pub mod model;
pub mod output;
pub mod plan;
pub mod progress;
pub mod quant;
pub mod stfile;
pub mod synth;
#[doc(hidden)]
pub mod test_report;
pub mod verify;

pub use error::{Error, Result};
