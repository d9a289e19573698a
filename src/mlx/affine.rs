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

/// 1.5 * 2^23: for `|x| < 2^22`, the f32 sum `x + MAGIC` is rounded by the FPU to an integer
/// (ties to even, the default mode) and its bit pattern is `MAGIC_BITS + rint(x)`. This gives
/// `rint` and the integer in two vectorisable operations, where `round_ties_even` and a float to
/// int cast would not vectorise on baseline x86-64. The codes are clamped to a small range first.
const MAGIC: f32 = 12_582_912.0;
const MAGIC_BITS: i32 = 0x4B40_0000;

#[cfg(test)]
#[inline(always)]
fn rint_small(x: f32) -> f32 {
    (x + MAGIC) - MAGIC
}

/// Scale and bias of one group (f32, before rounding to the storage dtype).
pub fn group_params(g: &[f32], bits: u32) -> (f32, f32) {
    let (mn, mx) = min_max(g);
    params_from_range(mn, mx, bits)
}

/// Minimum and maximum of a group (finite values; a multiple of 8 of them). The sign of a zero
/// extreme may depend on the order of comparisons, but never reaches the output: a zero edge
/// means an all-zero group, whose bias is 0 either way.
#[inline(always)]
fn min_max(g: &[f32]) -> (f32, f32) {
    let (mut mn, mut mx) = ([g[0]; 8], [g[0]; 8]);
    for c in g.chunks_exact(8) {
        for k in 0..8 {
            mn[k] = if c[k] < mn[k] { c[k] } else { mn[k] };
            mx[k] = if c[k] > mx[k] { c[k] } else { mx[k] };
        }
    }
    reduce8(mn, mx)
}

#[inline(always)]
fn reduce8(mn: [f32; 8], mx: [f32; 8]) -> (f32, f32) {
    let lo = mn.into_iter().fold(mn[0], |a, b| if b < a { b } else { a });
    let hi = mx.into_iter().fold(mx[0], |a, b| if b > a { b } else { a });
    (lo, hi)
}

/// [`min_max`] with AVX instructions (LLVM does not turn the portable loop into packed min/max).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn min_max_avx2(g: &[f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    assert!(g.len() >= 8 && g.len() % 8 == 0);
    // SAFETY: every load reads 8 values inside `g` (checked above); AVX is enabled.
    unsafe {
        let p = g.as_ptr();
        let mut mn = _mm256_loadu_ps(p);
        let mut mx = mn;
        let mut i = 8;
        while i < g.len() {
            let v = _mm256_loadu_ps(p.add(i));
            mn = _mm256_min_ps(v, mn);
            mx = _mm256_max_ps(v, mx);
            i += 8;
        }
        // a tree over the 8 lanes (the order only decides the sign of a zero extreme; see above)
        let mn4 = _mm_min_ps(_mm256_castps256_ps128(mn), _mm256_extractf128_ps::<1>(mn));
        let mx4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps::<1>(mx));
        let mn2 = _mm_min_ps(mn4, _mm_movehl_ps(mn4, mn4));
        let mx2 = _mm_max_ps(mx4, _mm_movehl_ps(mx4, mx4));
        let mn1 = _mm_min_ss(mn2, _mm_movehdup_ps(mn2));
        let mx1 = _mm_max_ss(mx2, _mm_movehdup_ps(mx2));
        (_mm_cvtss_f32(mn1), _mm_cvtss_f32(mx1))
    }
}

#[inline(always)]
fn params_from_range(mn: f32, mx: f32, bits: u32) -> (f32, f32) {
    let n = ((1u32 << bits) - 1) as f32;
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
/// per group. `x.len()` must be a multiple of `group_size`, itself a multiple of 32.
pub fn quantize_row(x: &[f32], bits: u32, group_size: usize, words: &mut [u32], scales: &mut [f32], biases: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2. The same code compiled with wider vectors gives the same
        // bits: every operation is an IEEE single operation and Rust never fuses a multiply-add.
        return unsafe { quantize_row_avx2(x, bits, group_size, words, scales, biases) };
    }
    quantize_row_portable(x, bits, group_size, words, scales, biases)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(x: &[f32], bits: u32, group_size: usize, words: &mut [u32], scales: &mut [f32], biases: &mut [f32]) {
    quantize_row_bits::<true>(x, bits, group_size, words, scales, biases)
}

/// The kernel compiled for the build's baseline target.
pub fn quantize_row_portable(x: &[f32], bits: u32, group_size: usize, words: &mut [u32], scales: &mut [f32], biases: &mut [f32]) {
    quantize_row_bits::<false>(x, bits, group_size, words, scales, biases)
}

#[inline(always)]
fn quantize_row_bits<const AVX2: bool>(x: &[f32], bits: u32, group_size: usize, words: &mut [u32], scales: &mut [f32], biases: &mut [f32]) {
    match bits {
        2 => quantize_row_b::<2, AVX2>(x, group_size, words, scales, biases),
        3 => quantize_row_b::<3, AVX2>(x, group_size, words, scales, biases),
        4 => quantize_row_b::<4, AVX2>(x, group_size, words, scales, biases),
        5 => quantize_row_b::<5, AVX2>(x, group_size, words, scales, biases),
        6 => quantize_row_b::<6, AVX2>(x, group_size, words, scales, biases),
        8 => quantize_row_b::<8, AVX2>(x, group_size, words, scales, biases),
        _ => panic!("MLX affine quantization has no {bits}-bit mode"),
    }
}

#[inline(always)]
fn quantize_row_b<const B: u32, const AVX2: bool>(x: &[f32], group_size: usize, words: &mut [u32], scales: &mut [f32], biases: &mut [f32]) {
    assert!(group_size % 32 == 0 && x.len() % group_size == 0);
    assert_eq!(words.len(), x.len() * B as usize / 32);
    let words_per_group = group_size * B as usize / 32;
    for (gi, (g, wg)) in x.chunks_exact(group_size).zip(words.chunks_exact_mut(words_per_group)).enumerate() {
        (scales[gi], biases[gi]) = quantize_group::<B, AVX2>(g, wg);
    }
}

/// Quantizes one group into its words; returns (scale, bias).
#[inline(always)]
fn quantize_group<const B: u32, const AVX2: bool>(g: &[f32], wg: &mut [u32]) -> (f32, f32) {
    let n = (1i32 << B) - 1;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 is true only when called from the AVX2 entry point, after detection.
    let (mn, mx) = if AVX2 { unsafe { min_max_avx2(g) } } else { min_max(g) };
    #[cfg(not(target_arch = "x86_64"))]
    let (mn, mx) = min_max(g);
    let (scale, bias) = params_from_range(mn, mx, B);
    #[cfg(target_arch = "x86_64")]
    if AVX2 && (B == 4 || B == 8) {
        for (g32, w) in g.chunks_exact(32).zip(wg.chunks_exact_mut(B as usize)) {
            // SAFETY: as above.
            unsafe { codes32_avx2::<B>(g32, scale, bias, w) };
        }
        return (scale, bias);
    }
    for (g32, w) in g.chunks_exact(32).zip(wg.chunks_exact_mut(B as usize)) {
        let mut codes = [0u32; 32];
        codes_of(g32, scale, bias, n, &mut codes);
        pack32::<B>(&codes, w);
    }
    (scale, bias)
}

/// [`quantize_row`] straight from a row of little-endian bf16 bytes (what HF checkpoints hold):
/// each group is widened into a small buffer and checked for NaN and infinity on its way in, so
/// the row is read once. `Err(i)`: a group holds a non-finite value; `i` is the group's first
/// element (the caller names the exact value). Same results as widening then [`quantize_row`].
pub fn quantize_row_bf16(
    x: &[u8],
    bits: u32,
    group_size: usize,
    words: &mut [u32],
    scales: &mut [f32],
    biases: &mut [f32],
) -> Result<(), usize> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2.
        return unsafe { quantize_row_bf16_avx2(x, bits, group_size, words, scales, biases) };
    }
    quantize_row_bf16_bits::<false>(x, bits, group_size, words, scales, biases)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_bf16_avx2(x: &[u8], bits: u32, gs: usize, words: &mut [u32], scales: &mut [f32], biases: &mut [f32]) -> Result<(), usize> {
    quantize_row_bf16_bits::<true>(x, bits, gs, words, scales, biases)
}

#[inline(always)]
fn quantize_row_bf16_bits<const AVX2: bool>(x: &[u8], bits: u32, gs: usize, words: &mut [u32], scales: &mut [f32], biases: &mut [f32]) -> Result<(), usize> {
    match bits {
        2 => quantize_row_bf16_b::<2, AVX2>(x, gs, words, scales, biases),
        3 => quantize_row_bf16_b::<3, AVX2>(x, gs, words, scales, biases),
        4 => quantize_row_bf16_b::<4, AVX2>(x, gs, words, scales, biases),
        5 => quantize_row_bf16_b::<5, AVX2>(x, gs, words, scales, biases),
        6 => quantize_row_bf16_b::<6, AVX2>(x, gs, words, scales, biases),
        8 => quantize_row_bf16_b::<8, AVX2>(x, gs, words, scales, biases),
        _ => panic!("MLX affine quantization has no {bits}-bit mode"),
    }
}

#[inline(always)]
fn quantize_row_bf16_b<const B: u32, const AVX2: bool>(x: &[u8], gs: usize, words: &mut [u32], scales: &mut [f32], biases: &mut [f32]) -> Result<(), usize> {
    assert!(gs % 32 == 0 && gs <= 128 && x.len() % (2 * gs) == 0);
    assert_eq!(words.len(), x.len() / 2 * B as usize / 32);
    let wpg = gs * B as usize / 32;
    let mut buf = [0f32; 128];
    for (gi, (src, wg)) in x.chunks_exact(2 * gs).zip(words.chunks_exact_mut(wpg)).enumerate() {
        let g = &mut buf[..gs];
        // widen, and collect the exponent bits that mark NaN and infinity (all ones)
        let mut special = false;
        for (o, b) in g.iter_mut().zip(src.chunks_exact(2)) {
            let h = u16::from_le_bytes([b[0], b[1]]);
            special |= h & 0x7f80 == 0x7f80;
            *o = f32::from_bits((h as u32) << 16);
        }
        if special {
            return Err(gi * gs);
        }
        (scales[gi], biases[gi]) = quantize_group::<B, AVX2>(g, wg);
    }
    Ok(())
}

/// The codes of 32 values, packed into `B` words, for `B` = 4 or 8: the portable loop's operations
/// (subtract, divide, clamp to [-1, n+1], round by the magic constant, clamp to [0, n]) on four
/// vectors of 8, then packed with vector instructions: the 32 codes are narrowed to 32 bytes in
/// order, and for 4 bits each pair of bytes becomes one (`lo + 16 * hi`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn codes32_avx2<const B: u32>(g: &[f32], scale: f32, bias: f32, out: &mut [u32]) {
    use std::arch::x86_64::*;
    assert!(g.len() == 32 && out.len() == B as usize && (B == 4 || B == 8));
    let n = (1i32 << B) - 1;
    let (vb, vs) = (_mm256_set1_ps(bias), _mm256_set1_ps(scale));
    let (lo, hi) = (_mm256_set1_ps(-1.0), _mm256_set1_ps(n as f32 + 1.0));
    let (magic, magic_bits) = (_mm256_set1_ps(MAGIC), _mm256_set1_epi32(MAGIC_BITS));
    let (zero, top) = (_mm256_setzero_si256(), _mm256_set1_epi32(n));
    let code8 = |k: usize| {
        let v = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(g.as_ptr().add(8 * k)), vb), vs);
        // the portable `if v < lo {lo} else if v > hi {hi} else {v}` for finite v
        let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        let r = _mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(v, magic)), magic_bits);
        _mm256_min_epi32(_mm256_max_epi32(r, zero), top)
    };
    let (a, b, c, d) = (code8(0), code8(1), code8(2), code8(3));
    // per 128-bit lane: [a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7] as bytes; dwords back in order
    let bytes = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    if B == 8 {
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, bytes);
    } else {
        // byte j of the result: code 2j + 16 * code 2j+1 (at most 255)
        let pairs = _mm256_maddubs_epi16(bytes, _mm256_set1_epi16(0x1001));
        let packed = _mm256_packus_epi16(pairs, pairs);
        let packed = _mm256_permute4x64_epi64::<0b1000>(packed);
        _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, _mm256_castsi256_si128(packed));
    }
}

/// Packs 32 codes of `B` bits into `B` words (a little-endian bitstream): every 8 codes make `B`
/// whole bytes, built in a u64 with constant shifts.
#[inline(always)]
fn pack32<const B: u32>(codes: &[u32; 32], out: &mut [u32]) {
    let mut bytes = [0u8; 32];
    for (k, c8) in codes.chunks_exact(8).enumerate() {
        let mut v = 0u64;
        for (j, &c) in c8.iter().enumerate() {
            v |= (c as u64) << (j as u32 * B);
        }
        bytes[k * B as usize..(k + 1) * B as usize].copy_from_slice(&v.to_le_bytes()[..B as usize]);
    }
    for (w, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// Fractions of a group's range tried as the clipped-off part at either end by
/// [`quantize_row_weighted`].
const SHRINK: [f32; 6] = [0.0, 0.025, 0.05, 0.075, 0.1, 0.15];

/// Codes for `scale` and `bias`: `clamp(rint((v - bias) / scale), 0, n)` (MLX's rule, half to even).
#[inline(always)]
fn codes_of(g: &[f32], scale: f32, bias: f32, n: i32, out: &mut [u32]) {
    let (lo, hi) = (-1.0f32, n as f32 + 1.0);
    for (c, &v) in out.iter_mut().zip(g) {
        let v = (v - bias) / scale;
        let v = if v < lo { lo } else if v > hi { hi } else { v };
        let r = ((v + MAGIC).to_bits() as i32).wrapping_sub(MAGIC_BITS);
        *c = r.clamp(0, n) as u32;
    }
}

/// `sum_j w_j (x_j - (scale * q_j + bias))^2` in f64.
fn weighted_error(g: &[f32], w: &[f32], q: &[u32], scale: f32, bias: f32) -> f64 {
    g.iter().zip(w).zip(q).map(|((&x, &w), &q)| w as f64 * ((x - (scale * q as f32 + bias)) as f64).powi(2)).sum()
}

/// Quantizes one row choosing each group's scale and bias to minimise the importance-weighted
/// squared error `sum_j importance_j (x_j - (scale * q_j + bias))^2` instead of taking the min/max
/// range: MLX's own parameters are the first candidate, then every clipping of the range's ends
/// by [`SHRINK`] fractions, each also refitted by weighted least squares given its codes; the
/// candidate of least error wins (ties: the earlier). The codes of the winner are computed as the
/// plain path computes them, so the output is standard MLX affine data that any MLX reader
/// dequantizes as `scale * q + bias`. With `importance` the mean squared input of each column
/// (an imatrix entry), the error is the expected squared error of the projection's output.
/// `store` rounds a scale or bias to the dtype it is written in (bf16, f16): every candidate is
/// judged as it will be read back, and the returned parameters are already rounded.
#[allow(clippy::too_many_arguments)]
pub fn quantize_row_weighted(
    x: &[f32],
    importance: &[f32],
    bits: u32,
    group_size: usize,
    store: fn(f32) -> f32,
    words: &mut [u32],
    scales: &mut [f32],
    biases: &mut [f32],
) {
    assert!(group_size % 32 == 0 && x.len() % group_size == 0 && importance.len() == x.len());
    assert_eq!(words.len(), x.len() * bits as usize / 32);
    let n = (1i32 << bits) - 1;
    let nf = n as f32;
    let mut q = vec![0u32; group_size];
    let mut best_q = vec![0u32; group_size];
    for (gi, (g, w)) in x.chunks_exact(group_size).zip(importance.chunks_exact(group_size)).enumerate() {
        let (mn, mx) = min_max(g);
        let (s0, b0) = params_from_range(mn, mx, bits);
        codes_of(g, s0, b0, n, &mut best_q);
        // MLX's own: codes from the f32 parameters, read back with the stored ones
        let (s0, b0) = (store(s0), store(b0));
        let (mut best, mut best_err) = ((s0, b0), weighted_error(g, w, &best_q, s0, b0));
        let range = mx - mn;
        if range > 0.0 {
            let mut try_params = |s: f32, b: f32, q: &mut [u32], best_q: &mut [u32]| {
                let (s, b) = (store(s), store(b));
                if !(s.is_finite() && b.is_finite()) || s == 0.0 {
                    return;
                }
                codes_of(g, s, b, n, q);
                let e = weighted_error(g, w, q, s, b);
                if e < best_err {
                    best_err = e;
                    best = (s, b);
                    best_q.copy_from_slice(q);
                }
            };
            for &a in &SHRINK {
                for &c in &SHRINK {
                    if a == 0.0 && c == 0.0 {
                        continue;
                    }
                    let (lo, hi) = (mn + a * range, mx - c * range);
                    let s = (hi - lo) / nf;
                    try_params(s, lo, &mut q, &mut best_q);
                    // refit scale and bias to these codes (weighted least squares, f64)
                    let (mut sw, mut sq, mut sqq, mut sx, mut sqx) = (0f64, 0f64, 0f64, 0f64, 0f64);
                    for ((&x, &w), &qq) in g.iter().zip(w).zip(q.iter()) {
                        let (w, qq, x) = (w as f64, qq as f64, x as f64);
                        sw += w;
                        sq += w * qq;
                        sqq += w * qq * qq;
                        sx += w * x;
                        sqx += w * qq * x;
                    }
                    let det = sqq * sw - sq * sq;
                    if det > 0.0 {
                        let s2 = ((sqx * sw - sq * sx) / det) as f32;
                        let b2 = ((sqq * sx - sq * sqx) / det) as f32;
                        try_params(s2, b2, &mut q, &mut best_q);
                    }
                }
            }
        }
        (scales[gi], biases[gi]) = best;
        let wpg = group_size * bits as usize / 32;
        pack_bits(&best_q, bits, &mut words[gi * wpg..(gi + 1) * wpg]);
    }
}

/// Packs codes of `bits` bits into a little-endian bitstream of u32 words, 32 codes at a time.
fn pack_bits(codes: &[u32], bits: u32, out: &mut [u32]) {
    for (c, w) in codes.chunks_exact(32).zip(out.chunks_exact_mut(bits as usize)) {
        let c: &[u32; 32] = c.try_into().expect("32 codes");
        match bits {
            2 => pack32::<2>(c, w),
            3 => pack32::<3>(c, w),
            4 => pack32::<4>(c, w),
            5 => pack32::<5>(c, w),
            6 => pack32::<6>(c, w),
            8 => pack32::<8>(c, w),
            _ => panic!("MLX affine quantization has no {bits}-bit mode"),
        }
    }
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

    /// The weighted search never does worse than MLX's min/max parameters on the weighted error
    /// (they are its first candidate), does better on most groups with outliers, and its codes
    /// dequantize with the plain reader.
    #[test]
    fn weighted_search_lowers_the_weighted_error() {
        let (cols, gs) = (512usize, 64usize);
        let mut s = 7u64;
        let mut rnd = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        let x: Vec<f32> = (0..cols).map(|i| (rnd() - 0.5) * if i % 37 == 0 { 8.0 } else { 1.0 }).collect();
        let imp: Vec<f32> = (0..cols).map(|_| 0.01 + rnd() * rnd() * 4.0).collect();
        for bits in BITS {
            let wpr = cols * bits as usize / 32;
            let (mut w0, mut w1) = (vec![0u32; wpr], vec![0u32; wpr]);
            let (mut s0, mut b0, mut s1, mut b1) = (vec![0f32; cols / gs], vec![0f32; cols / gs], vec![0f32; cols / gs], vec![0f32; cols / gs]);
            quantize_row_portable(&x, bits, gs, &mut w0, &mut s0, &mut b0);
            quantize_row_weighted(&x, &imp, bits, gs, |v| v, &mut w1, &mut s1, &mut b1);
            let (mut d0, mut d1) = (vec![0f32; cols], vec![0f32; cols]);
            dequantize_row(&w0, &s0, &b0, bits, gs, &mut d0);
            dequantize_row(&w1, &s1, &b1, bits, gs, &mut d1);
            let err = |d: &[f32], g: usize| -> f64 { (g * gs..(g + 1) * gs).map(|j| imp[j] as f64 * ((x[j] - d[j]) as f64).powi(2)).sum() };
            let (mut better, mut e0, mut e1) = (0, 0.0, 0.0);
            for g in 0..cols / gs {
                assert!(err(&d1, g) <= err(&d0, g) * (1.0 + 1e-9), "{bits} bits group {g}");
                better += (err(&d1, g) < err(&d0, g) * 0.999) as usize;
                (e0, e1) = (e0 + err(&d0, g), e1 + err(&d1, g));
            }
            // at 2-4 bits the rounding error dominates and most groups gain; at 6-8 bits little
            // is left to gain, but the total must still fall
            if bits <= 4 {
                assert!(better * 2 > cols / gs, "{bits} bits: only {better} groups improved");
            }
            assert!(e1 < e0 * if bits <= 4 { 0.8 } else { 1.0 }, "{bits} bits: weighted error {e1} not below {e0}");
        }
    }

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
            // a group holding every code 0..=n (the 128 values wrap around) comes back within half a step
            let x: Vec<f32> = (0..128).map(|i| (i as u32 % (n + 1)) as f32).collect();
            let mut words = vec![0u32; 128 * bits as usize / 32];
            let (mut s, mut b) = (vec![0f32; 1], vec![0f32; 1]);
            quantize_row(&x, bits, 128, &mut words, &mut s, &mut b);
            let mut back = vec![0f32; 128];
            dequantize_row(&words, &s, &b, bits, 128, &mut back);
            for (i, (a, r)) in x.iter().zip(&back).enumerate() {
                assert!((a - r).abs() <= s[0].abs() * 0.5 + 1e-5, "bits {bits} i {i}: {a} vs {r}");
                assert_eq!(code_at(&words, bits, i) as f32, ((r - b[0]) / s[0]).round(), "bits {bits} i {i}");
            }
        }
    }

    #[test]
    fn vector_kernel_equals_portable_kernel() {
        let mut s = 12345u64;
        let x: Vec<f32> = (0..4096)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                if i % 97 == 0 { u * 50.0 } else if i % 300 < 64 { -u.abs() } else { u * 0.03 }
            })
            .collect();
        for bits in BITS {
            for gs in GROUP_SIZES {
                let nw = x.len() * bits as usize / 32;
                let ng = x.len() / gs;
                let (mut w1, mut s1, mut b1) = (vec![0u32; nw], vec![0f32; ng], vec![0f32; ng]);
                let (mut w2, mut s2, mut b2) = (vec![0u32; nw], vec![0f32; ng], vec![0f32; ng]);
                quantize_row(&x, bits, gs, &mut w1, &mut s1, &mut b1);
                quantize_row_portable(&x, bits, gs, &mut w2, &mut s2, &mut b2);
                assert_eq!(w1, w2, "bits {bits} gs {gs}");
                assert_eq!(s1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), s2.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
                assert_eq!(b1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b2.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn bf16_rows_equal_widened_rows() {
        let mut s = 99u64;
        let x: Vec<half::bf16> = (0..2048)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                half::bf16::from_f32(if i % 131 == 0 { u * 40.0 } else if i % 500 < 64 { -u.abs() } else { u * 0.02 })
            })
            .collect();
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let wide: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        for bits in BITS {
            for gs in GROUP_SIZES {
                let (nw, ng) = (x.len() * bits as usize / 32, x.len() / gs);
                let (mut w1, mut s1, mut b1) = (vec![0u32; nw], vec![0f32; ng], vec![0f32; ng]);
                let (mut w2, mut s2, mut b2) = (vec![0u32; nw], vec![0f32; ng], vec![0f32; ng]);
                quantize_row_bf16(&bytes, bits, gs, &mut w1, &mut s1, &mut b1).unwrap();
                quantize_row_portable(&wide, bits, gs, &mut w2, &mut s2, &mut b2);
                assert_eq!(w1, w2, "bits {bits} gs {gs}");
                assert_eq!(s1, s2);
                assert_eq!(b1, b2);
            }
        }
        // a NaN and an infinity name their group
        for (pos, bad) in [(700usize, f32::NAN), (1500, f32::NEG_INFINITY)] {
            let mut b = bytes.clone();
            b[2 * pos..2 * pos + 2].copy_from_slice(&half::bf16::from_f32(bad).to_le_bytes());
            let (mut w, mut sc, mut bi) = (vec![0u32; 2048 / 8], vec![0f32; 32], vec![0f32; 32]);
            assert_eq!(quantize_row_bf16(&b, 4, 64, &mut w, &mut sc, &mut bi), Err(pos / 64 * 64));
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
