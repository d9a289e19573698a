//! Importance matrices (llama.cpp's "imatrix"): per weight, the mean squared input activation of
//! each input column over a calibration text, which the quantizers use to weight their error
//! (`quant::quantize_row` with an importance vector). [`collect`] computes one with the model,
//! loop-aware; [`file`] reads and writes llama.cpp's two layouts.

pub mod collect;
pub mod file;

pub use collect::{collect, Calibration, Weighting};
pub use file::{Format, Imatrix};
