//! MLX "affine" quantization, bit-exact with MLX's CPU `mx.quantize` (see `formats/mlx.md`).
//!
//! Per group of `group_size` consecutive values of a row, in f32:
//!
//! ```text
//! n     = 2^bits - 1
//! scale = max((max - min) / n, 1e-7)
//! edge  = min if |min| > |max| else max      (for max the scale is negated)
//! q0    = rint(edge / scale)                 (ties to even)
//! if q0 != 0: scale = edge / q0; bias = edge   else: bias = 0
//! code  = clamp(rint((w - bias) / scale), 0, n)
//! ```
//!
//! The codes are computed with the f32 scale and bias; only then are scale and bias rounded to the
//! weight dtype for storage. A row is one little-endian bitstream (code `i` at bits
//! `[i*bits, (i+1)*bits)`) stored as u32 words.

/// The bit widths MLX's affine mode supports.
pub const BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
/// The group sizes MLX's affine mode supports.
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// Rounds to the nearest integer, ties to even, for `|x| < 2^22` (the codes are clamped to a much
/// smaller range first). Adding and subtracting 1.5 * 2^23 makes the FPU round in the default
/// mode, which vectorises where `round_ties_even` would call libm on baseline x86-64.
#[inline(always)]
fn rint_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    (x + MAGIC) - MAGIC
}

/// Scale and bias of one group (f32, before rounding to the storage dtype).
#[inline]
pub fn group_params(g: &[f32], bits: u32) -> (f32, f32) {
    let n = ((1u32 << bits) - 1) as f32;
    let mut mn = g[0];
    let mut mx = g[0];
    for &v in &g[1..] {
        mn = if v < mn { v } else { mn };
        mx = if v > mx { v } else { mx };
    }
    let mut scale = ((mx - mn) / n).max(1e-7);
    let edge = if mn.abs() > mx.abs() {
        mn
    } else {
        scale = -scale;
        mx
    };
    let q0 = (edge / scale).round_ties_even();
    if q0 != 0.0 {
        (edge / q0, edge)
    } else {
        (scale, 0.0)
    }
}

/// Quantizes one row: `words` gets `x.len() * bits / 32` u32 words, `scales` and `biases` one f32
/// per group. `x.len()` must be a multiple of `group_size` and of 32.
pub fn quantize_row(x: &[f32], bits: u32, group_size: usize, words: &mut [u32], scales: &mut [f32], biases: &mut [f32]) {
    debug_assert_eq!(x.len() % group_size, 0);
    debug_assert_eq!(words.len(), x.len() * bits as usize / 32);
    let n = ((1u32 << bits) - 1) as f32;
    let mut codes = vec![0u8; group_size];
    let mut acc: u64 = 0;
    let mut nacc: u32 = 0;
    let mut wi = 0usize;
    for (gi, g) in x.chunks_exact(group_size).enumerate() {
        let (scale, bias) = group_params(g, bits);
        scales[gi] = scale;
        biases[gi] = bias;
        for (c, &w) in codes.iter_mut().zip(g) {
            let v = ((w - bias) / scale).clamp(-1.0, n + 1.0);
            *c = rint_small(v).clamp(0.0, n) as u8;
        }
        for &c in &codes {
            acc |= (c as u64) << nacc;
            nacc += bits;
            if nacc >= 32 {
                words[wi] = acc as u32;
                wi += 1;
                acc >>= 32;
                nacc -= 32;
            }
        }
    }
    debug_assert_eq!(nacc, 0);
}

/// The code at position `i` of a packed row.
#[inline]
pub fn code_at(words: &[u32], bits: u32, i: usize) -> u32 {
    let bit = i * bits as usize;
    let (w, off) = (bit / 32, (bit % 32) as u32);
    let lo = (words[w] as u64) >> off;
    let v = if off + bits > 32 { lo | ((words[w + 1] as u64) << (32 - off)) } else { lo };
    (v as u32) & ((1u32 << bits) - 1)
}

/// Dequantizes a packed row with stored scales and biases (widened to f32): `scale * q + bias`.
pub fn dequantize_row(words: &[u32], scales: &[f32], biases: &[f32], bits: u32, group_size: usize, out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        let g = i / group_size;
        *o = scales[g] * code_at(words, bits, i) as f32 + biases[g];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_scale_and_edge_bias() {
        // max has the larger magnitude: edge = max, negative scale.
        let g: Vec<f32> = [-1.0f32, 0.5, 2.0, 3.0].repeat(8);
        let (s, b) = group_params(&g, 4);
        assert_eq!(b, 3.0);
        assert_eq!(s, 3.0 / -11.0);
        // min has the larger magnitude: edge = min, positive scale.
        let g: Vec<f32> = [-3.0f32, 0.5, 1.0, 0.0].repeat(8);
        let (s, b) = group_params(&g, 4);
        assert_eq!(b, -3.0);
        assert!(s > 0.0);
        // all zero: bias 0, scale -1e-7.
        let (s, b) = group_params(&[0.0; 32], 4);
        assert_eq!((s, b), (-1e-7, 0.0));
    }

    #[test]
    fn packing_round_trips_for_every_width() {
        for bits in BITS {
            let n = (1u32 << bits) - 1;
            // values exactly on a grid of the group's own scale come back exactly
            let x: Vec<f32> = (0..128).map(|i| (i as u32 % (n + 1)) as f32).collect();
            let mut words = vec![0u32; 128 * bits as usize / 32];
            let (mut s, mut b) = (vec![0f32; 4], vec![0f32; 4]);
            quantize_row(&x, bits, 32, &mut words, &mut s, &mut b);
            let mut back = vec![0f32; 128];
            dequantize_row(&words, &s, &b, bits, 32, &mut back);
            for (i, (a, r)) in x.iter().zip(&back).enumerate() {
                assert!((a - r).abs() < 1e-4 * n as f32, "bits {bits} i {i}: {a} vs {r}");
            }
        }
    }

    #[test]
    fn rint_small_ties_to_even() {
        for (x, want) in [(0.5f32, 0.0f32), (1.5, 2.0), (2.5, 2.0), (-0.5, -0.0), (3.49, 3.0), (14.5, 14.0), (15.5, 16.0)] {
            assert_eq!(rint_small(x), want, "{x}");
            assert_eq!(x.round_ties_even(), want, "{x}");
        }
    }
}
