//! ggml's legacy 32-value block formats and the plain float formats, bit-exact with
//! `quantize_row_*_ref` of ggml (`ggml-quants.c`), which llama-quantize runs without an importance
//! matrix. Every expression keeps ggml's order of operations and its casts: the 4/5-bit types
//! truncate `(int8_t)(v + 8.5f)`-style sums, Q8_0 rounds half away from zero (`roundf`), and the
//! block scale is computed in f32 and stored as IEEE f16 (round to nearest even).
//!
//! Block layouts (little-endian):
//! - Q4_0 (18 B): f16 d, 16 B nibbles (value j low nibble of byte j, value j+16 high nibble)
//! - Q4_1 (20 B): f16 d, f16 m, 16 B nibbles
//! - Q5_0 (22 B): f16 d, u32 fifth bits (bit j of value j), 16 B nibbles
//! - Q5_1 (24 B): f16 d, f16 m, u32 fifth bits, 16 B nibbles
//! - Q8_0 (34 B): f16 d, 32 i8

use half::f16;

const QK: usize = 32;

fn push_f16(out: &mut Vec<u8>, x: f32) {
    out.extend_from_slice(&f32_to_f16_bits(x).to_le_bytes());
}

/// IEEE f32 -> f16, round to nearest even, inlined branch-free arithmetic (what ggml's scalar
/// conversion does): two multiplications bring the magnitude into the f16 range (overflowing to
/// infinity or flushing as f16 would), and adding a power of two of the right exponent lets the
/// f32 adder do the rounding. Equal to `half::f16::from_f32` for every non-NaN input (tested);
/// a NaN becomes the quiet NaN 0x7e00 with its sign. Block scales are converted once per 32
/// values, so the call's cost shows in the 4-bit types' throughput.
#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let to_inf = f32::from_bits(0x7780_0000); // 2^112
    let to_zero = f32::from_bits(0x0880_0000); // 2^-110
    let mut base = (x.abs() * to_inf) * to_zero;
    let w = x.to_bits();
    let shl1 = w.wrapping_add(w);
    let sign = w & 0x8000_0000;
    let bias = (shl1 & 0xff00_0000).max(0x7100_0000);
    base += f32::from_bits((bias >> 1) + 0x0780_0000);
    let bits = base.to_bits();
    let nonsign = ((bits >> 13) & 0x7c00) + (bits & 0x0fff);
    ((sign >> 16) | if shl1 > 0xff00_0000 { 0x7e00 } else { nonsign }) as u16
}

/// ggml's fp32 -> bf16: round to nearest even, NaN kept quiet.
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    ((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16
}

/// The value of largest magnitude (the first such one), as ggml's Q4_0/Q5_0 find it. The largest
/// magnitude does not depend on the order it is searched in, so it is found over 8 independent
/// lanes; the first value of that magnitude is then the one ggml's sequential scan keeps.
fn signed_absmax(b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    for c in b.chunks_exact(8) {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if *l < v.abs() { v.abs() } else { *l };
        }
    }
    let amax = lanes.iter().fold(0f32, |a, &l| if a < l { l } else { a });
    if amax == 0.0 {
        return 0.0;
    }
    *b.iter().find(|v| v.abs() == amax).expect("present")
}

/// Smallest and largest value, as ggml's sequential `if (v < min) min = v; if (v > max) max = v`
/// finds them: over 8 lanes (order does not change the values), then, because only the sign of a
/// zero minimum can depend on the order, the first zero in the block when the minimum is zero.
#[inline(always)]
fn min_max(b: &[f32]) -> (f32, f32) {
    let mut lo = [f32::MAX; 8];
    let mut hi = [-f32::MAX; 8];
    for c in b.chunks_exact(8) {
        for i in 0..8 {
            let v = c[i];
            lo[i] = if v < lo[i] { v } else { lo[i] };
            hi[i] = if v > hi[i] { v } else { hi[i] };
        }
    }
    let mut min = lo.iter().fold(f32::MAX, |a, &l| if l < a { l } else { a });
    let max = hi.iter().fold(-f32::MAX, |a, &h| if h > a { h } else { a });
    if min == 0.0 {
        min = *b.iter().find(|&&v| v == 0.0).expect("present");
    }
    (min, max)
}

/// ggml's `MIN(15, (int8_t)v)` for the 4-bit types, where `v` lies in [0.5, 16.5] for finite
/// input. Clamping to [0, 15] first gives the same value there (truncation is monotonic) and makes
/// the conversion a plain vectorizable truncation (NaN, from non-finite input, becomes 0).
#[inline(always)]
fn nibble(v: f32) -> u8 {
    let c = v.max(0.0).min(15.0);
    // SAFETY: `c` is in [0, 15], not NaN (`max` returns the non-NaN operand).
    unsafe { c.to_int_unchecked::<i32>() as u8 }
}

fn inv(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

pub fn quantize_q4_0(x: &[f32], out: &mut Vec<u8>) {
    for b in x.chunks_exact(QK) {
        let d = signed_absmax(b) / -8.0;
        let id = inv(d);
        let mut blk = [0u8; 18];
        blk[..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
        for j in 0..QK / 2 {
            let x0 = b[j] * id;
            let x1 = b[QK / 2 + j] * id;
            let q0 = nibble(x0 + 8.5);
            let q1 = nibble(x1 + 8.5);
            blk[2 + j] = q0 | (q1 << 4);
        }
        out.extend_from_slice(&blk);
    }
}

pub fn quantize_q4_1(x: &[f32], out: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if super::avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { q4_1_avx2(x, out) };
    }
    q4_1(x, out)
}

/// [`quantize_q4_1`] compiled for AVX2 (the same operations; wider vectors).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn q4_1_avx2(x: &[f32], out: &mut Vec<u8>) {
    q4_1(x, out)
}

#[inline(always)]
fn q4_1(x: &[f32], out: &mut Vec<u8>) {
    for b in x.chunks_exact(QK) {
        let (min, max) = min_max(b);
        let d = (max - min) / 15.0;
        let id = inv(d);
        let mut blk = [0u8; 20];
        blk[..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
        blk[2..4].copy_from_slice(&f32_to_f16_bits(min).to_le_bytes());
        for j in 0..QK / 2 {
            let x0 = (b[j] - min) * id;
            let x1 = (b[QK / 2 + j] - min) * id;
            let q0 = nibble(x0 + 0.5);
            let q1 = nibble(x1 + 0.5);
            blk[4 + j] = q0 | (q1 << 4);
        }
        out.extend_from_slice(&blk);
    }
}

fn push_q5(out: &mut Vec<u8>, q: &[u8; QK]) {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= ((v as u32 & 0x10) >> 4) << j;
    }
    let mut blk = [0u8; 20];
    blk[..4].copy_from_slice(&qh.to_le_bytes());
    for j in 0..QK / 2 {
        blk[4 + j] = (q[j] & 0x0f) | ((q[QK / 2 + j] & 0x0f) << 4);
    }
    out.extend_from_slice(&blk);
}

pub fn quantize_q5_0(x: &[f32], out: &mut Vec<u8>) {
    for b in x.chunks_exact(QK) {
        let d = signed_absmax(b) / -16.0;
        let id = inv(d);
        push_f16(out, d);
        let mut q = [0u8; QK];
        for (o, &v) in q.iter_mut().zip(b) {
            *o = ((v * id + 16.5) as i8 as u8).min(31);
        }
        push_q5(out, &q);
    }
}

pub fn quantize_q5_1(x: &[f32], out: &mut Vec<u8>) {
    for b in x.chunks_exact(QK) {
        let (min, max) = min_max(b);
        let d = (max - min) / 31.0;
        let id = inv(d);
        push_f16(out, d);
        push_f16(out, min);
        let mut q = [0u8; QK];
        for (o, &v) in q.iter_mut().zip(b) {
            *o = ((v - min) * id + 0.5) as u8;
        }
        push_q5(out, &q);
    }
}

pub fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    for b in x.chunks_exact(QK) {
        let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = inv(d);
        let mut blk = [0u8; 34];
        blk[..2].copy_from_slice(&f32_to_f16_bits(d).to_le_bytes());
        for (o, &v) in blk[2..].iter_mut().zip(b) {
            *o = (v * id).round() as i8 as u8;
        }
        out.extend_from_slice(&blk);
    }
}

/// IEEE f16, round to nearest even (the slice conversion uses F16C where the CPU has it, which
/// rounds the same way).
pub fn quantize_f16(x: &[f32], out: &mut Vec<u8>) {
    use half::slice::HalfFloatSliceExt;
    let mut h = vec![f16::ZERO; x.len()];
    h.convert_from_f32_slice(x);
    for v in h {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

pub fn quantize_bf16(x: &[f32], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + 2 * x.len(), 0);
    for (o, &v) in out[start..].chunks_exact_mut(2).zip(x) {
        o.copy_from_slice(&f32_to_bf16_bits(v).to_le_bytes());
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes blocks of the legacy types (as ggml's `dequantize_row_*`).
pub fn dequantize_legacy(ty: super::ggml::GgmlType, bytes: &[u8], out: &mut Vec<f32>) {
    use super::ggml::GgmlType as T;
    let bs = ty.block_bytes();
    for blk in bytes.chunks_exact(bs) {
        let d = f16_at(blk, 0);
        match ty {
            T::Q8_0 => out.extend(blk[2..].iter().map(|&q| q as i8 as f32 * d)),
            T::Q4_0 | T::Q4_1 => {
                let (m, qs) = if ty == T::Q4_1 { (f16_at(blk, 2), &blk[4..]) } else { (0.0, &blk[2..]) };
                let lo = qs.iter().map(|&q| (q & 0x0f) as i32);
                let hi = qs.iter().map(|&q| (q >> 4) as i32);
                if ty == T::Q4_0 {
                    out.extend(lo.chain(hi).map(|q| (q - 8) as f32 * d));
                } else {
                    out.extend(lo.chain(hi).map(|q| q as f32 * d + m));
                }
            }
            T::Q5_0 | T::Q5_1 => {
                let (m, rest) = if ty == T::Q5_1 { (f16_at(blk, 2), &blk[4..]) } else { (0.0, &blk[2..]) };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..];
                for j in 0..QK {
                    let nib = if j < QK / 2 { qs[j] & 0x0f } else { qs[j - QK / 2] >> 4 };
                    let q = (nib as u32 | (((qh >> j) & 1) << 4)) as i32;
                    out.push(if ty == T::Q5_0 { (q - 16) as f32 * d } else { q as f32 * d + m });
                }
            }
            T::F16 => unreachable!("F16 has no blocks of 32"),
            other => panic!("{other} is not a legacy block type"),
        }
    }
}

/// Importance weights of block `b` of a row: ggml's legacy `quantize_row_*_impl` use the mean
/// square of the whole row as sigma2.
fn row_weights(row: &[f32], b: usize, qw: &[f32], sigma2: f32) -> [f32; QK] {
    let mut w = [0f32; QK];
    super::kquants::importance_weights(&row[QK * b..QK * (b + 1)], &qw[QK * b..QK * (b + 1)], sigma2, &mut w);
    w
}

fn row_sigma2(row: &[f32]) -> f32 {
    super::kquants::sum_squares(row) / row.len() as f32
}

/// Q4_0 / Q5_0 with an importance vector (`quantize_row_q{4,5}_0_impl`); `bits` 4 or 5.
pub fn quantize_q_0_weighted(row: &[f32], qw: &[f32], bits: u32, out: &mut Vec<u8>) {
    let sigma2 = row_sigma2(row);
    let nmax = 1 << (bits - 1);
    for (b, xb) in row.chunks_exact(QK).enumerate() {
        let w = row_weights(row, b, qw, sigma2);
        let mut l = [0i8; QK];
        let d = super::kquants::make_qx_quants(xb, nmax, &mut l, Some(&w));
        push_f16(out, d);
        let q: [u8; QK] = std::array::from_fn(|j| l[j] as u8);
        if bits == 4 {
            for j in 0..QK / 2 {
                out.push(q[j] | (q[j + 16] << 4));
            }
        } else {
            push_q5(out, &q);
        }
    }
}

/// Q4_1 / Q5_1 with an importance vector (`quantize_row_q{4,5}_1_impl`); `bits` 4 or 5.
pub fn quantize_q_1_weighted(row: &[f32], qw: &[f32], bits: u32, out: &mut Vec<u8>) {
    let sigma2 = row_sigma2(row);
    let nmax = (1 << bits) - 1;
    for (b, xb) in row.chunks_exact(QK).enumerate() {
        let w = row_weights(row, b, qw, sigma2);
        let mut q = [0u8; QK];
        let (d, min) = super::kquants::make_qkx_quants(super::kquants::Search::Qkx3, xb, nmax, &w, &mut q, -0.9, 0.05, 36, false);
        push_f16(out, d);
        push_f16(out, -min);
        if bits == 4 {
            for j in 0..QK / 2 {
                out.push(q[j] | (q[j + 16] << 4));
            }
        } else {
            push_q5(out, &q);
        }
    }
}

#[cfg(test)]
mod f16_tests {
    use super::*;

    #[test]
    fn nibble_is_ggmls_truncation_over_its_range() {
        let mut v = 0.5f32;
        while v <= 16.5 {
            for x in [v, f32::from_bits(v.to_bits() - 1), f32::from_bits(v.to_bits() + 1)] {
                assert_eq!(nibble(x), ((x as i8) as u8).min(15), "{x}");
            }
            v += 1.0 / 64.0;
        }
        assert_eq!(nibble(f32::NAN), 0);
    }

    #[test]
    fn f16_conversion_equals_half_for_every_non_nan() {
        // a stride through all 2^32 patterns plus the edges of the f16 range and the ties
        let mut pats: Vec<u32> = (0..=u32::MAX).step_by(997).collect();
        for e in [0x3380_0000u32, 0x3300_0000, 0x387f_e000, 0x3880_0000, 0x477f_e000, 0x477f_f000, 0x477f_efff, 0x4780_0000, 0x7f80_0000] {
            for d in 0..4096u32 {
                pats.push(e.wrapping_add(d).wrapping_sub(2048));
                pats.push((e.wrapping_add(d).wrapping_sub(2048)) | 0x8000_0000);
            }
        }
        for p in pats {
            let x = f32::from_bits(p);
            if x.is_nan() {
                assert_eq!(f32_to_f16_bits(x) & 0x7fff, 0x7e00);
                continue;
            }
            assert_eq!(f32_to_f16_bits(x), f16::from_f32(x).to_bits(), "{x:e} ({p:#010x})");
        }
    }
}
