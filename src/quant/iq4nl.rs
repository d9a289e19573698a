//! IQ4_NL and IQ4_XS: 4-bit indices into a fixed non-linear table. IQ4_NL: 32-value blocks, one f16
//! scale each; IQ4_XS: 256-value super-blocks of eight such blocks with 6-bit scales. Bit-exact
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

/// The weights of one 32-value block (`sigma2` from its super-block): the importance times
/// `sqrt(sigma2 + x^2)`, or `x^2` without importance.
fn block_weights(xb: &[f32], qw: Option<&[f32]>, sigma2: f32) -> [f32; QK] {
    let mut weight = [0f32; QK];
    for j in 0..QK {
        weight[j] = match qw {
            Some(q) => q[j] * (sigma2 + xb[j] * xb[j]).sqrt(),
            None => xb[j] * xb[j],
        };
    }
    weight
}

/// `2/n * sum x^2` over a (super-)block, as ggml's `quantize_row_iq4_nl_impl` computes it.
fn sigma2(x: &[f32]) -> f32 {
    let mut s = 0f32;
    for &v in x {
        s += v * v;
    }
    s * (2.0 / x.len() as f32)
}

/// The scale of one 32-value block: the least-squares scale of its nearest-entry indices, tried at
/// 2 * NTRY + 1 starting scales; 0 for an all-zero block.
fn block_scale(xb: &[f32], weight: &[f32; QK]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in xb {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        return 0.0;
    }
    let fit = |id: f32| -> (f32, f32) {
        let (mut sumqx, mut sumq2) = (0f32, 0f32);
        for j in 0..QK {
            let q = KVALUES[best_index(id * xb[j])] as f32;
            let w = weight[j];
            sumqx += w * q * xb[j];
            sumq2 += w * q * q;
        }
        (sumqx, sumq2)
    };
    let (sumqx, sumq2) = fit(1.0 / (-max / KVALUES[0] as f32));
    let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
    let mut best = d * sumqx;
    for itry in -NTRY..=NTRY {
        let (sumqx, sumq2) = fit((itry + KVALUES[0] as i32) as f32 / max);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

/// Packs 32 indices: index j in the low nibble of byte j, index j+16 in the high nibble.
fn pack(xb: &[f32], id: f32, out: &mut Vec<u8>) {
    let l: Vec<u8> = xb.iter().map(|&v| best_index(id * v) as u8).collect();
    for j in 0..QK / 2 {
        out.push(l[j] | (l[j + 16] << 4));
    }
}

/// One row (a whole number of blocks); `imatrix` holds per-column importances for the row.
pub fn quantize_iq4_nl(x: &[f32], imatrix: Option<&[f32]>, out: &mut Vec<u8>) {
    for (b, xb) in x.chunks_exact(QK).enumerate() {
        let weight = block_weights(xb, imatrix.map(|q| &q[QK * b..QK * (b + 1)]), sigma2(xb));
        let scale = block_scale(xb, &weight);
        out.extend_from_slice(&f16::from_f32(scale).to_le_bytes());
        pack(xb, if scale != 0.0 { 1.0 / scale } else { 0.0 }, out);
    }
}

/// IQ4_XS: per 256 values an f16 super-scale `d`, eight 6-bit block scales `ls` (`scales_h`: u16
/// holding the high 2 bits of each; `scales_l`: 4 bytes holding the low 4 bits, two per byte) and
/// 128 bytes of IQ4_NL indices; value = `d * (ls - 32) * table[index]` (136 B per block). Bit-exact
/// with ggml's `quantize_iq4_xs` (each 32-value block searched as IQ4_NL's, `sigma2` over the
/// super-block, then the block scales rounded to 6 bits of `-max/32`).
pub fn quantize_iq4_xs(x: &[f32], imatrix: Option<&[f32]>, out: &mut Vec<u8>) {
    const QKK: usize = 256;
    for (sb, xs) in x.chunks_exact(QKK).enumerate() {
        let s2 = sigma2(xs);
        let mut scales = [0f32; QKK / QK];
        let (mut max_scale, mut amax_scale) = (0f32, 0f32);
        for (ib, xb) in xs.chunks_exact(QK).enumerate() {
            let qw = imatrix.map(|q| &q[QKK * sb + QK * ib..QKK * sb + QK * (ib + 1)]);
            scales[ib] = block_scale(xb, &block_weights(xb, qw, s2));
            if scales[ib].abs() > amax_scale {
                amax_scale = scales[ib].abs();
                max_scale = scales[ib];
            }
        }
        let d = -max_scale / 32.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let (mut scales_h, mut scales_l) = (0u16, [0u8; 4]);
        let mut qs = Vec::with_capacity(QKK / 2);
        for (ib, xb) in xs.chunks_exact(QK).enumerate() {
            let l = crate::quant::kquants::nearest_int(id * scales[ib]).clamp(-32, 31);
            let dl = d * l as f32;
            pack(xb, if dl != 0.0 { 1.0 / dl } else { 0.0 }, &mut qs);
            let l = (l + 32) as u8;
            scales_l[ib / 2] |= (l & 0xf) << (4 * (ib % 2));
            scales_h |= ((l >> 4) as u16) << (2 * (ib % 8));
        }
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend_from_slice(&scales_h.to_le_bytes());
        out.extend_from_slice(&scales_l);
        out.extend_from_slice(&qs);
    }
}

/// Values of IQ4_XS blocks (as ggml's `dequantize_row_iq4_xs`).
pub fn dequantize_iq4_xs(bytes: &[u8], out: &mut Vec<f32>) {
    for blk in bytes.chunks_exact(136) {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let sh = u16::from_le_bytes([blk[2], blk[3]]);
        for ib in 0..8 {
            let ls = ((blk[4 + ib / 2] >> (4 * (ib % 2))) & 0xf) as i32 | ((((sh >> (2 * ib)) & 3) as i32) << 4);
            let dl = d * (ls - 32) as f32;
            let qs = &blk[8 + 16 * ib..8 + 16 * (ib + 1)];
            out.extend(qs.iter().map(|&q| dl * KVALUES[(q & 0xf) as usize] as f32));
            out.extend(qs.iter().map(|&q| dl * KVALUES[(q >> 4) as usize] as f32));
        }
    }
}

/// IQ4_NL blocks rewritten as Q8_0 blocks of the same values, exactly: both are 32 values with
/// one f16 scale, and IQ4_NL's values are `d * KVALUES[i]` with int8 table entries, which Q8_0
/// stores as they are (`d * q`). Twice the bytes of IQ4_NL (34 per 32 values instead of 18), but
/// a type GPU kernels multiply: what the runner holds IQ4_NL as on a GPU.
pub fn iq4_nl_as_q8_0(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() / 18 * 34);
    for blk in bytes.chunks_exact(18) {
        out.extend_from_slice(&blk[..2]);
        let qs = &blk[2..];
        out.extend(qs.iter().map(|&q| KVALUES[(q & 0xf) as usize] as u8));
        out.extend(qs.iter().map(|&q| KVALUES[(q >> 4) as usize] as u8));
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The Q8_0 copy holds IQ4_NL's values bit for bit, read by candle's Q8_0 dequantizer (an
    /// independent reader), over every scale bit pattern class (normal, subnormal, zero, negative).
    #[test]
    fn iq4_nl_as_q8_0_keeps_every_value() {
        let mut s = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let blocks = 4096;
        let mut raw = Vec::with_capacity(blocks * 18);
        for b in 0..blocks {
            // finite f16 scales: every exponent, both signs, some zeros and subnormals
            let d: u16 = match b % 7 {
                0 => 0,
                1 => (next() & 0x83ff) as u16,
                _ => loop {
                    let v = next() as u16;
                    if v & 0x7c00 != 0x7c00 {
                        break v;
                    }
                },
            };
            raw.extend_from_slice(&d.to_le_bytes());
            raw.extend((0..16).map(|_| next() as u8));
        }
        let q8 = iq4_nl_as_q8_0(&raw);
        assert_eq!(q8.len(), blocks * 34);
        let mut want = vec![];
        dequantize_iq4_nl(&raw, &mut want);
        let t = candle_core::quantized::ggml_file::qtensor_from_ggml(
            candle_core::quantized::GgmlDType::Q8_0,
            &q8,
            vec![blocks, 32],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let got = t.dequantize(&candle_core::Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "value {i}: {a} vs {b}");
        }
    }
}
