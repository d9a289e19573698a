//! Importance matrices (llama.cpp's "imatrix"): per weight, the mean squared input activation of
//! each input column over a calibration text, which the quantizers use to weight their error
//! (`quant::quantize_row` with an importance vector). [`collect`] computes one with the model,
//! loop-aware; [`file`] reads and writes llama.cpp's two layouts.

pub mod collect;
pub mod file;

pub use collect::{collect, Calibration, Weighting};
pub use file::{Format, Imatrix};

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// An importance matrix and the path it was read from (as given: recorded in the output).
#[derive(Debug, Clone)]
pub struct ImatrixInput {
    pub path: PathBuf,
    pub matrix: Imatrix,
}

impl ImatrixInput {
    pub fn read(path: &Path) -> Result<Self> {
        Ok(ImatrixInput { path: path.to_path_buf(), matrix: Imatrix::read(path)? })
    }
}

/// The importance vector of a weight (by GGUF tensor name) with `cols` columns, checked as
/// llama-quantize checks it: an entry of another length is an error (this matrix was made for
/// another model), except for the token embedding, which llama-quantize quantizes without one.
/// `None`: the matrix has no entry (the weight is quantized without importance).
pub fn importance_for(im: &ImatrixInput, name: &str, cols: usize) -> Result<Option<Vec<f32>>> {
    match im.matrix.weights(name) {
        Some(w) if w.len() == cols => Ok(Some(w)),
        Some(_) if name == "token_embd.weight" => Ok(None),
        Some(w) => Err(Error::tensor(
            &im.path,
            name,
            format!("holds {} importance values, but the weight has {cols} columns: this importance matrix was made for another model", w.len()),
        )),
        None => Ok(None),
    }
}
