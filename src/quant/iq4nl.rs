//! IQ4_NL: 32-value blocks of 4-bit indices into a fixed non-linear table, one f16 scale. Bit-exact
//! with ggml's `quantize_iq4_nl` (what llama-quantize runs: 7 scale trials either side, weighted by
//! x^2 or by an importance vector), which differs from `quantize_row_iq4_nl_ref` (no trials).
//!
//! Block (18 B): f16 d, 16 B: index j in the low nibble of byte j, index j+16 in the high nibble.

use half::f16;

/// ggml's `kvalues_iq4nl`.
pub const KVALUES: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

const QK: usize = 32;
const GROUP_MAX_EPS: f32 = 1e-15;
const NTRY: i32 = 7;

/// The nearest table entry: `x` picks entry i once it reaches the midpoint of entries i-1 and i
/// (ties go up), by branch-free binary search over the sorted table.
fn best_index(x: f32) -> usize {
    let x2 = x + x;
    let mut idx = 0usize;
    let mut step = KVALUES.len() >> 1;
    while step > 0 {
        let j = idx + step;
        if x2 >= (KVALUES[j - 1] as i32 + KVALUES[j] as i32) as f32 {
            idx = j;
        }
        step >>= 1;
    }
    idx
}

/// One row (a whole number of blocks); `imatrix` holds per-column importances for the row.
pub fn quantize_iq4_nl(x: &[f32], imatrix: Option<&[f32]>, out: &mut Vec<u8>) {
    for (b, xb) in x.chunks_exact(QK).enumerate() {
        let mut sigma2 = 0f32;
        for &v in xb {
            sigma2 += v * v;
        }
        sigma2 *= 2.0 / QK as f32;
        let mut weight = [0f32; QK];
        for j in 0..QK {
            weight[j] = match imatrix {
                Some(q) => q[QK * b + j] * (sigma2 + xb[j] * xb[j]).sqrt(),
                None => xb[j] * xb[j],
            };
        }
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let mut l = [0usize; QK];
        let scale = if amax < GROUP_MAX_EPS {
            0.0
        } else {
            let mut d = -max / KVALUES[0] as f32;
            let mut id = 1.0 / d;
            let (mut sumqx, mut sumq2) = (0f32, 0f32);
            for j in 0..QK {
                let li = best_index(id * xb[j]);
                l[j] = li;
                let q = KVALUES[li] as f32;
                let w = weight[j];
                sumqx += w * q * xb[j];
                sumq2 += w * q * q;
            }
            d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
            let mut best = d * sumqx;
            for itry in -NTRY..=NTRY {
                id = (itry + KVALUES[0] as i32) as f32 / max;
                sumqx = 0.0;
                sumq2 = 0.0;
                for j in 0..QK {
                    let q = KVALUES[best_index(id * xb[j])] as f32;
                    let w = weight[j];
                    sumqx += w * q * xb[j];
                    sumq2 += w * q * q;
                }
                if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                    d = sumqx / sumq2;
                    best = d * sumqx;
                }
            }
            d
        };
        out.extend_from_slice(&f16::from_f32(scale).to_le_bytes());
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        for (j, lj) in l.iter_mut().enumerate() {
            *lj = best_index(id * xb[j]);
        }
        for j in 0..QK / 2 {
            out.push(l[j] as u8 | ((l[j + 16] as u8) << 4));
        }
    }
}

/// Values of IQ4_NL blocks (as ggml's `dequantize_row_iq4_nl`).
pub fn dequantize_iq4_nl(bytes: &[u8], out: &mut Vec<f32>) {
    for blk in bytes.chunks_exact(18) {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let qs = &blk[2..];
        out.extend(qs.iter().map(|&q| d * KVALUES[(q & 0xf) as usize] as f32));
        out.extend(qs.iter().map(|&q| d * KVALUES[(q >> 4) as usize] as f32));
    }
}
