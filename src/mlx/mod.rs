//! MLX output: sizes of the affine-quantized layout (what `mlx_lm.convert` writes).

use crate::checkpoint::{expected_tensors, tensor_role, OuroConfig, TensorRole};

/// Whether a tensor is quantized in an MLX output: embeddings and projections are; norms and the
/// exit gate (2,049 parameters that decide compute) stay in the source dtype.
pub fn is_quantized(hf_name: &str) -> bool {
    matches!(
        tensor_role(hf_name),
        Some(TensorRole::Embedding | TensorRole::Linear { .. } | TensorRole::LmHead)
    )
}

/// Bytes of all tensors of an MLX output with `bits` and `group_size`, scales and biases stored in
/// a dtype of `float_bytes` bytes (2 for bf16), unquantized tensors likewise.
pub fn output_bytes(cfg: &OuroConfig, bits: usize, group_size: usize, float_bytes: usize) -> u64 {
    expected_tensors(cfg)
        .iter()
        .map(|t| {
            let numel: usize = t.shape.iter().product();
            if is_quantized(&t.name) {
                let rows = t.shape[0];
                let cols = t.shape[1];
                (rows * cols * bits / 8 + 2 * rows * cols.div_ceil(group_size) * float_bytes) as u64
            } else {
                (numel * float_bytes) as u64
            }
        })
        .sum()
}
