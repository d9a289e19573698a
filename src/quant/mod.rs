//! Quantizers: pure functions from f32 rows to the bytes of a block format, and back. No I/O.
//!
//! `ggml` holds the table of ggml block types (the layout every GGUF reader agrees on); `legacy`
//! the bit-exact reference quantizers of the 32-value types and the float types; `kquants` those
//! of the 256-value k-quants.

pub mod ggml;
pub mod iq1;
pub mod iq2;
pub mod iq3;
mod iq_grids;
pub(crate) mod iqgrid;
pub mod iq4nl;
pub mod kquants;
pub mod legacy;

use ggml::GgmlType;

/// Whether the quantizers may run their AVX2 builds (the same Rust functions compiled with AVX2
/// enabled; they must give the portable build's bytes, which `portable_and_avx2_builds_agree`
/// checks by turning them off).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2() -> bool {
    #[cfg(test)]
    if tests::PORTABLE_ONLY.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    std::is_x86_feature_detected!("avx2")
}

/// Whether [`quantize_row`] implements `ty` (every type of [`GgmlType`]).
pub fn has_quantizer(_ty: GgmlType) -> bool {
    true
}

/// Appends the ggml encoding of one row `x` (a whole number of blocks) to `out`, exactly as
/// `ggml_quantize_chunk` does: the reference quantizer without an importance vector, the
/// weighted search with one (`imatrix`: one positive weight per column). F16, BF16 and Q8_0
/// ignore the importance vector, as in ggml. Returns false for a type without a quantizer, or
/// without the importance vector it needs ([`GgmlType::requires_importance`]).
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
        GgmlType::IQ3_XXS => iq3::quantize_iq3_xxs(x, imatrix, out),
        GgmlType::IQ3_S => iq3::quantize_iq3_s(x, imatrix, out),
        GgmlType::IQ2_S => iq2::quantize_iq2_s(x, imatrix, out),
        GgmlType::IQ1_M => iq1::quantize_iq1_m(x, imatrix, out),
        GgmlType::IQ2_XXS | GgmlType::IQ2_XS | GgmlType::IQ1_S => {
            // ggml asserts an importance vector for these; the mixes refuse them without one
            let Some(q) = imatrix else { return false };
            match ty {
                GgmlType::IQ2_XXS => iq2::quantize_iq2_xxs(x, q, out),
                GgmlType::IQ2_XS => iq2::quantize_iq2_xs(x, q, out),
                _ => iq1::quantize_iq1_s(x, q, out),
            }
        }
    }
    true
}

/// One 256-value block of a lattice i-quant to floats (`iq3::decode_iq3_xxs`, ...).
pub type DecodeBlock = fn(&[u8], &mut [f32]);

/// The block decoder of a lattice i-quant (IQ3_XXS, IQ3_S, IQ2_*, IQ1_*), the same floats as its
/// dequantizer; `None` for other types.
pub fn block_decoder(ty: GgmlType) -> Option<DecodeBlock> {
    Some(match ty {
        GgmlType::IQ3_XXS => iq3::decode_iq3_xxs,
        GgmlType::IQ3_S => iq3::decode_iq3_s,
        GgmlType::IQ2_XXS => iq2::decode_iq2_xxs,
        GgmlType::IQ2_XS => iq2::decode_iq2_xs,
        GgmlType::IQ2_S => iq2::decode_iq2_s,
        GgmlType::IQ1_S => iq1::decode_iq1_s,
        GgmlType::IQ1_M => iq1::decode_iq1_m,
        _ => return None,
    })
}

/// A row dequantizer: blocks of one type to floats, appended.
pub type Dequantize = fn(&[u8], &mut Vec<f32>);

/// Our dequantizer of a type candle cannot read (the IQ types), as ggml's `dequantize_row_*`
/// computes it; `None` for the types candle reads.
pub fn dequantizer(ty: GgmlType) -> Option<Dequantize> {
    Some(match ty {
        GgmlType::IQ4_NL => iq4nl::dequantize_iq4_nl,
        GgmlType::IQ4_XS => iq4nl::dequantize_iq4_xs,
        GgmlType::IQ3_XXS => iq3::dequantize_iq3_xxs,
        GgmlType::IQ3_S => iq3::dequantize_iq3_s,
        GgmlType::IQ2_XXS => iq2::dequantize_iq2_xxs,
        GgmlType::IQ2_XS => iq2::dequantize_iq2_xs,
        GgmlType::IQ2_S => iq2::dequantize_iq2_s,
        GgmlType::IQ1_S => iq1::dequantize_iq1_s,
        GgmlType::IQ1_M => iq1::dequantize_iq1_m,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Set by the test below; other tests of this process that quantize meanwhile take the
    /// portable build, which gives the same bytes (what the test checks).
    pub(super) static PORTABLE_ONLY: AtomicBool = AtomicBool::new(false);

    /// Every quantizer gives the same bytes through its AVX2 build as through the portable one,
    /// with and without an importance vector, on rows with outliers, zero and constant blocks.
    #[test]
    fn portable_and_avx2_builds_agree() {
        #[cfg(target_arch = "x86_64")]
        if !std::is_x86_feature_detected!("avx2") {
            crate::test_report::note("NOT RUN here: avx2 quantizer builds against the portable ones (this CPU lacks avx2)");
            return;
        }
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let n = 4 * 256;
        let mut x: Vec<f32> = (0..n).map(|i| rnd() * if i % 61 == 0 { 9.0 } else { 1.0 }).collect();
        x[256..288].fill(0.0);
        x[512..544].fill(0.3);
        let imp: Vec<f32> = (0..n).map(|_| 0.01 + (rnd() + 0.5).powi(2) * 3.0).collect();
        let types = [
            GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::Q2_K, GgmlType::Q3_K,
            GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::IQ4_NL, GgmlType::IQ4_XS, GgmlType::F16, GgmlType::BF16,
            GgmlType::IQ3_XXS, GgmlType::IQ3_S, GgmlType::IQ2_XXS, GgmlType::IQ2_XS, GgmlType::IQ2_S, GgmlType::IQ1_S, GgmlType::IQ1_M,
        ];
        for ty in types {
            for imatrix in [None, Some(&imp[..])] {
                if ty.requires_importance() && imatrix.is_none() {
                    continue;
                }
                let (mut fast, mut port) = (Vec::new(), Vec::new());
                PORTABLE_ONLY.store(false, Ordering::Relaxed);
                assert!(quantize_row(ty, &x, imatrix, &mut fast));
                PORTABLE_ONLY.store(true, Ordering::Relaxed);
                assert!(quantize_row(ty, &x, imatrix, &mut port));
                PORTABLE_ONLY.store(false, Ordering::Relaxed);
                assert!(fast == port, "{ty:?} (importance: {}): the AVX2 build differs from the portable one", imatrix.is_some());
                if let Some(d) = dequantizer(ty) {
                    let (mut a, mut b) = (Vec::new(), Vec::new());
                    d(&fast, &mut a);
                    PORTABLE_ONLY.store(true, Ordering::Relaxed);
                    d(&fast, &mut b);
                    PORTABLE_ONLY.store(false, Ordering::Relaxed);
                    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()) && a.len() == b.len(), "{ty:?}: the AVX2 decoder differs");
                }
            }
        }
        crate::test_report::note("ran: avx2 quantizer builds (legacy, k-quants, i-quants) give the portable ones' bytes");
    }
}
