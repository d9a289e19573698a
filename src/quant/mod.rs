//! Quantizers: pure functions from f32 rows to the bytes of a block format, and back. No I/O.
//!
//! `ggml` holds the table of ggml block types (the layout every GGUF reader agrees on); `legacy`
//! the bit-exact reference quantizers of the 32-value types and the float types; `kquants` those
//! of the 256-value k-quants.

pub mod ggml;
pub mod iq4nl;
pub mod kquants;
pub mod legacy;

use ggml::GgmlType;

/// Whether [`quantize_row`] implements `ty` (every type of [`GgmlType`]).
pub fn has_quantizer(_ty: GgmlType) -> bool {
    true
}

/// Appends the ggml encoding of one row `x` (a whole number of blocks) to `out`, exactly as
/// `ggml_quantize_chunk` does: the reference quantizer without an importance vector, the
/// weighted search with one (`imatrix`: one positive weight per column). F16, BF16 and Q8_0
/// ignore the importance vector, as in ggml. Returns false for a type without a quantizer.
pub fn quantize_row(ty: GgmlType, x: &[f32], imatrix: Option<&[f32]>, out: &mut Vec<u8>) -> bool {
    debug_assert_eq!(x.len() % ty.block_size(), 0);
    if let Some(q) = imatrix {
        match ty {
            GgmlType::Q4_0 => return { legacy::quantize_q_0_weighted(x, q, 4, out); true },
            GgmlType::Q5_0 => return { legacy::quantize_q_0_weighted(x, q, 5, out); true },
            GgmlType::Q4_1 => return { legacy::quantize_q_1_weighted(x, q, 4, out); true },
            GgmlType::Q5_1 => return { legacy::quantize_q_1_weighted(x, q, 5, out); true },
            _ => {}
        }
    }
    match ty {
        GgmlType::F32 => out.extend(x.iter().flat_map(|v| v.to_le_bytes())),
        GgmlType::F16 => legacy::quantize_f16(x, out),
        GgmlType::BF16 => legacy::quantize_bf16(x, out),
        GgmlType::Q4_0 => legacy::quantize_q4_0(x, out),
        GgmlType::Q4_1 => legacy::quantize_q4_1(x, out),
        GgmlType::Q5_0 => legacy::quantize_q5_0(x, out),
        GgmlType::Q5_1 => legacy::quantize_q5_1(x, out),
        GgmlType::Q8_0 => legacy::quantize_q8_0(x, out),
        GgmlType::Q2_K => kquants::quantize_q2_k(x, imatrix, out),
        GgmlType::Q3_K => kquants::quantize_q3_k(x, imatrix, out),
        GgmlType::Q4_K => kquants::quantize_q4_k(x, imatrix, out),
        GgmlType::Q5_K => kquants::quantize_q5_k(x, imatrix, out),
        GgmlType::Q6_K => kquants::quantize_q6_k(x, imatrix, out),
        GgmlType::IQ4_NL => iq4nl::quantize_iq4_nl(x, imatrix, out),
        GgmlType::IQ4_XS => iq4nl::quantize_iq4_xs(x, imatrix, out),
    }
    true
}
