//! MLX affine-quantized projections multiplied at their stored width on the CPU.
//!
//! An MLX directory stores a quantized matrix as packed codes (`bits` per weight; each row one
//! little-endian bitstream in u32 words) and, per group of `group` weights, a scale and a bias in
//! the model's float type: weight = scale * code + bias (`formats/mlx.md`). Widened to f32 at load,
//! a 4-bit model took eight times its file size in memory and every loop read 32 bits per weight.
//! Here the codes stay packed and the scales and biases keep their stored width, so the model takes
//! its files' size; a row's dot product with `x` is, group by group,
//!
//! ```text
//! scale_g * (sum_j code_j * x_j) + bias_g * (sum_j x_j)
//! ```
//!
//! with the group sums of `x` computed once per product. On AVX2 CPUs 4- and 8-bit codes are
//! unpacked in registers (a broadcast, a variable shift and a mask, or a byte widening: eight codes
//! at a time) and multiplied with fused multiply-adds in eight lanes; other widths are read code
//! by code into a buffer first.
//!
//! Every row is summed in one fixed order (two 8-lane accumulators per group, the group's lanes
//! scaled into the row's eight lanes, the lanes summed in order, then the bias terms), by the AVX2
//! kernel and the portable one alike (both fuse each multiply-add), so results depend neither on
//! the CPU nor on the thread count. They differ from products with the widened weights by float
//! rounding only (the tests bound it; the end-to-end tests compare with mlx-lm's logits). For more
//! than [`MATVEC_MAX_ROWS`] input rows (prefill) rows are widened by blocks and multiplied by
//! `gemm` ([`widened_matmul`]). Other devices get the widened f32 matrix (`source::MlxSource`).

use candle_core::Tensor;

use super::linear::{
    input_rows, run_tasks, widened_matmul, with_f32, FloatKind, FloatMatrix, Runner, SharedOut, MATVEC_MAX_ROWS,
    SERIAL_BELOW,
};
use super::CResult;

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// A matrix `[rows, cols]` in MLX's affine layout.
pub struct AffineMatrix {
    pub rows: usize,
    pub cols: usize,
    bits: u32,
    group: usize,
    /// `cols * bits / 32` words per row.
    words: Vec<u32>,
    /// `[rows, cols / group]` each, in their stored width.
    scales: FloatMatrix,
    biases: FloatMatrix,
}

impl AffineMatrix {
    /// From the little-endian bytes of the packed codes and of the scales and biases (of
    /// `params`' type), as an MLX safetensors file holds them.
    pub fn from_le_bytes(
        (rows, cols): (usize, usize),
        bits: u32,
        group: usize,
        words: &[u8],
        (params, scales, biases): (FloatKind, &[u8], &[u8]),
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            crate::mlx::affine::BITS.contains(&bits) && crate::mlx::affine::GROUP_SIZES.contains(&group),
            "{bits} bits with group size {group} is not an MLX affine setting"
        );
        anyhow::ensure!(cols.is_multiple_of(group), "{cols} columns are not whole groups of {group}");
        let wpr = cols * bits as usize / 32;
        anyhow::ensure!(words.len() == rows * wpr * 4, "{} bytes of codes for a {rows} x {cols} matrix at {bits} bits", words.len());
        let groups = cols / group;
        for (what, b) in [("scales", scales), ("biases", biases)] {
            anyhow::ensure!(b.len() == rows * groups * params.size(), "{} bytes of {what} for {rows} x {groups} groups", b.len());
        }
        let mut w = vec![0u32; rows * wpr];
        super::pages::advise(w.as_ptr() as *const u8, w.len() * 4, false);
        for (o, b) in w.iter_mut().zip(words.chunks_exact(4)) {
            *o = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(AffineMatrix {
            rows,
            cols,
            bits,
            group,
            words: w,
            scales: FloatMatrix::from_le_bytes(params, scales, rows, groups),
            biases: FloatMatrix::from_le_bytes(params, biases, rows, groups),
        })
    }

    /// Bytes held (codes, scales and biases: the size of the tensors in the file).
    pub fn bytes(&self) -> u64 {
        self.words.len() as u64 * 4 + self.scales.bytes() + self.biases.bytes()
    }

    fn words_per_row(&self) -> usize {
        self.cols * self.bits as usize / 32
    }

    /// Row `r` widened with MLX's formula (`scale * code + bias`, in f32, as
    /// `mlx::affine::dequantize_row`): what a dequantized copy of the matrix holds (the
    /// embedding's lookups, prefill's blocks), appended to `out`.
    pub fn widen_row(&self, r: usize, out: &mut Vec<f32>) {
        let (wpr, groups) = (self.words_per_row(), self.cols / self.group);
        let (mut sc, mut bi) = (vec![0f32; groups], vec![0f32; groups]);
        self.scales.row_into(r, &mut sc);
        self.biases.row_into(r, &mut bi);
        let start = out.len();
        out.resize(start + self.cols, 0.0);
        let (words, out) = (&self.words[r * wpr..(r + 1) * wpr], &mut out[start..]);
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                // the same operations, vectorised wider
                #[target_feature(enable = "avx2")]
                unsafe fn avx2(bits: u32, group: usize, words: &[u32], sc: &[f32], bi: &[f32], out: &mut [f32]) {
                    widen(bits, group, words, sc, bi, out)
                }
                return unsafe { avx2(self.bits, self.group, words, &sc, &bi, out) };
            }
        }
        widen(self.bits, self.group, words, &sc, &bi, out)
    }

    /// `x [n, cols] -> [n, rows]` (CPU tensors).
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let n = input_rows(x, self.rows, self.cols)?;
        let mut out = vec![0f32; n * self.rows];
        with_f32(x, |xs| {
            if n > MATVEC_MAX_ROWS {
                widened_matmul(self.rows, self.cols, xs, n, &mut out, &|r0, b, buf| {
                    for r in r0..r0 + b {
                        self.widen_row(r, buf);
                    }
                });
            } else {
                let on_pool = self.rows * self.cols >= SERIAL_BELOW;
                self.matvecs(xs, &mut out, &|tasks, task| run_tasks(tasks, task, on_pool), self.takes_int8());
            }
        })?;
        Tensor::from_vec(out, (n, self.rows), x.device())
    }

    /// Whether decode multiplies this matrix on the 4-bit integer path: 4-bit rows of whole 64s,
    /// when [`int8_activations`] asks for it.
    pub fn takes_int8(&self) -> bool {
        self.bits == 4 && self.cols.is_multiple_of(64) && int8_activations()
    }

    /// `out[i * rows + r] = dot(W[r], x_i)` for the activation rows `x_i` of `xs`, the weight rows
    /// in tasks of [`ROWS_PER_TASK`] run by `run`; with `int8`, 4-bit rows of whole 64s take the
    /// integer path.
    fn matvecs(&self, xs: &[f32], out: &mut [f32], run: &Runner<'_>, int8: bool) {
        let (rows, cols, g) = (self.rows, self.cols, self.group);
        let n = xs.len() / cols;
        assert_eq!(xs.len(), n * cols);
        assert_eq!(out.len(), n * rows);
        let acts: Vec<&[f32]> = xs.chunks_exact(cols).collect();
        // the group sums of each activation row, in order
        let sums: Vec<Vec<f32>> = acts.iter().map(|x| x.chunks_exact(g).map(|c| c.iter().sum()).collect()).collect();
        let dot = kernel();
        let int4 = int8 && self.bits == 4 && cols.is_multiple_of(64);
        let quantized: Vec<Option<QActs>> = acts.iter().map(|x| if int4 { QActs::new(x) } else { None }).collect();
        let dot_q4 = kernel_q4();
        let wpr = self.words_per_row();
        let dst = &SharedOut::new(out);
        let task = |t: usize| {
            let r0 = t * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(rows);
            let groups = cols / g;
            let (mut sc, mut bi) = (vec![0f32; groups], vec![0f32; groups]);
            for r in r0..r1 {
                self.scales.row_into(r, &mut sc);
                self.biases.row_into(r, &mut bi);
                let row = Row { words: &self.words[r * wpr..(r + 1) * wpr], scales: &sc, biases: &bi, bits: self.bits, group: g };
                for (i, ((x, s), q)) in acts.iter().zip(&sums).zip(&quantized).enumerate() {
                    let v = match q {
                        Some(q) => dot_q4(&row, q, s),
                        None => dot(&row, x, s),
                    };
                    // task `t` writes only its own rows `r0..r1` of each output row
                    unsafe { dst.slice(i * rows + r, 1)[0] = v };
                }
            }
        };
        run(rows.div_ceil(ROWS_PER_TASK), &task);
    }
}

/// Whether 4-bit MLX matrices multiply int8 activations ([`QActs`]) in decode:
/// `OURO_QUANT_MLX_ACTS=int8`. Off by default: mlx multiplies the activations as they are, and what
/// `validate`, `perplexity` and the comparisons with mlx-lm measure must be what mlx computes; the
/// integer path moves each product by the activation rounding (as ggml's Q8_0 activations move a
/// GGUF 4-bit product) for about twice the decode speed on x86.
pub fn int8_activations() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("OURO_QUANT_MLX_ACTS").is_ok_and(|v| v == "int8"))
}

/// An activation row quantized for the 4-bit integer path: per 32 values a scale
/// `d = max|x| / 127` and codes `round(x / d)` (in -127..=127; all 0 where `d` is 0).
pub struct QActs {
    /// The codes in the row's order.
    q: Vec<i8>,
    /// The codes as the AVX2 kernel reads them: per 64, the 32 at even offsets, then the 32 at odd.
    split: Vec<i8>,
    /// Per 64 values, the eight lanes' scales: `d` of the first 32 four times, then of the second.
    lanes: Vec<f32>,
}

impl QActs {
    /// `None` when `x` is not finite (the float path then carries the NaN or infinity through) or
    /// not whole 64s.
    pub fn new(x: &[f32]) -> Option<QActs> {
        if !x.len().is_multiple_of(64) || !x.iter().all(|v| v.is_finite()) {
            return None;
        }
        let mut q = vec![0i8; x.len()];
        let mut d = vec![0f32; x.len() / 32];
        for ((c, o), d) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).zip(&mut d) {
            let amax = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            *d = amax / 127.0;
            let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (o, &v) in o.iter_mut().zip(c) {
                *o = (v * id).round().clamp(-127.0, 127.0) as i8;
            }
        }
        let mut split = vec![0i8; x.len()];
        for (s, c) in split.chunks_exact_mut(64).zip(q.chunks_exact(64)) {
            for i in 0..32 {
                s[i] = c[2 * i];
                s[32 + i] = c[2 * i + 1];
            }
        }
        let lanes = d.chunks_exact(2).flat_map(|p| [p[0]; 4].into_iter().chain([p[1]; 4])).collect();
        Some(QActs { q, split, lanes })
    }

    /// The activation row the codes stand for (`d * code`), for tests.
    #[cfg(test)]
    fn dequantized(&self) -> Vec<f32> {
        self.q.iter().enumerate().map(|(i, &c)| self.lanes[i / 64 * 8 + (i % 64) / 32 * 4] * c as f32).collect()
    }
}

/// The dot product of a 4-bit row (a multiple of 64 long) with a quantized activation row and the
/// activation row's group sums.
type RowKernelQ4 = fn(&Row<'_>, &QActs, &[f32]) -> f32;

fn kernel_q4() -> RowKernelQ4 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return |row, q, sums| unsafe { avx2::dot_q4(row, q, sums) };
        }
    }
    portable::dot_q4
}

/// One weight row: its codes and its groups' scales and biases (widened).
struct Row<'a> {
    words: &'a [u32],
    scales: &'a [f32],
    biases: &'a [f32],
    bits: u32,
    group: usize,
}

/// The dot product of a row with one activation row `x` and its group sums.
type RowKernel = fn(&Row<'_>, &[f32], &[f32]) -> f32;

fn kernel() -> RowKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return |row, x, sums| unsafe { avx2::dot(row, x, sums) };
        }
    }
    portable::dot
}

/// `scale * code + bias` (a multiply, then an add) of every code of a row.
#[inline(always)]
fn widen(bits: u32, group: usize, words: &[u32], scales: &[f32], biases: &[f32], out: &mut [f32]) {
    let wpg = group * bits as usize / 32;
    for (((words, o), &s), &b) in words.chunks_exact(wpg).zip(out.chunks_exact_mut(group)).zip(scales).zip(biases) {
        unpack(bits, words, o);
        for v in o.iter_mut() {
            *v = s * *v + b;
        }
    }
}

/// The codes of one group (whole words: a group is 32, 64 or 128 weights) as f32: shifts and
/// masks for 2, 4 and 8 bits (which compilers vectorise), code by code for the other widths.
#[inline(always)]
fn unpack(bits: u32, words: &[u32], out: &mut [f32]) {
    #[inline(always)]
    fn fixed<const B: usize>(words: &[u32], out: &mut [f32]) {
        for (o, &w) in out.chunks_exact_mut(32 / B).zip(words) {
            for (j, o) in o.iter_mut().enumerate() {
                *o = ((w >> (B * j)) & ((1u32 << B) - 1)) as f32;
            }
        }
    }
    match bits {
        2 => fixed::<2>(words, out),
        4 => fixed::<4>(words, out),
        8 => fixed::<8>(words, out),
        _ => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = crate::mlx::affine::code_at(words, bits, i) as f32;
            }
        }
    }
}

/// The reference: per group two 8-lane fused multiply-add accumulators over 16-code steps (the
/// first eight codes of a step into one, the next eight into the other), their sum scaled into
/// the row's eight lanes with a fused multiply-add, the bias terms in a scalar; then the lanes in
/// order, plus the bias terms. The AVX2 kernel does exactly this.
mod portable {
    use super::Row;

    pub fn dot(row: &Row<'_>, x: &[f32], sums: &[f32]) -> f32 {
        let g = row.group;
        let wpg = g * row.bits as usize / 32;
        let mut codes = [0f32; 128];
        let mut acc = [0f32; 8];
        let mut acc_b = 0f32;
        for (gi, words) in row.words.chunks_exact(wpg).enumerate() {
            let c = &mut codes[..g];
            super::unpack(row.bits, words, c);
            let xg = &x[gi * g..(gi + 1) * g];
            let (mut d0, mut d1) = ([0f32; 8], [0f32; 8]);
            for (c2, x2) in c.chunks_exact(16).zip(xg.chunks_exact(16)) {
                for l in 0..8 {
                    d0[l] = c2[l].mul_add(x2[l], d0[l]);
                    d1[l] = c2[8 + l].mul_add(x2[8 + l], d1[l]);
                }
            }
            for l in 0..8 {
                acc[l] = (d0[l] + d1[l]).mul_add(row.scales[gi], acc[l]);
            }
            acc_b = row.biases[gi].mul_add(sums[gi], acc_b);
        }
        acc.iter().fold(0f32, |a, &v| a + v) + acc_b
    }

    /// The 4-bit integer path: in 64 weights `u`, lane `l` takes the exact integer sum of codes
    /// `8l..8l+8` times their activation codes and adds it, as f32, times `scale_g * d_b` (g the
    /// weight group, b the activation 32 of the chunk) with a fused multiply-add into accumulator
    /// `u % 2` (two, so that consecutive 64s do not wait on each other); the bias terms go into
    /// eight lanes, group `g` into lane `g % 8`. Then the two accumulators lane by lane, their
    /// lanes in order, plus the bias lanes in order. The AVX2 kernel does exactly this.
    pub fn dot_q4(row: &Row<'_>, a: &super::QActs, sums: &[f32]) -> f32 {
        debug_assert_eq!(row.bits, 4);
        let mut acc = [[0f32; 8]; 2];
        for (u, words) in row.words.chunks_exact(8).enumerate() {
            for (l, &w) in words.iter().enumerate() {
                let j0 = 64 * u + 8 * l;
                let s: i32 = (0..8).map(|k| ((w >> (4 * k)) & 15) as i32 * a.q[j0 + k] as i32).sum();
                let f = row.scales[j0 / row.group] * a.lanes[8 * u + l];
                acc[u % 2][l] = (s as f32).mul_add(f, acc[u % 2][l]);
            }
        }
        let mut acc_b = [0f32; 8];
        for (g, (&bi, &s)) in row.biases.iter().zip(sums).enumerate() {
            acc_b[g % 8] = bi.mul_add(s, acc_b[g % 8]);
        }
        let lanes: Vec<f32> = (0..8).map(|l| acc[0][l] + acc[1][l]).collect();
        lanes.iter().fold(0f32, |a, &v| a + v) + acc_b.iter().fold(0f32, |a, &v| a + v)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Row;
    use std::arch::x86_64::*;

    /// [`super::portable::dot_q4`] with the codes as bytes: per 64 weights the low and high
    /// nibbles of 32 bytes (the codes at even and odd offsets) times the activation codes in the
    /// same split order (`vpmaddubsw`: at most 2 * 15 * 127 per pair, no saturation), the pairs
    /// summed into eight 32-bit lanes, each lane one chunk of eight codes.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4(row: &Row<'_>, a: &super::QActs, sums: &[f32]) -> f32 {
        let units = row.words.len() / 8;
        let groups = row.scales.len();
        // (the loads below are unchecked)
        assert!(row.bits == 4 && a.split.len() == 64 * units && a.lanes.len() == 8 * units);
        assert!(groups * row.group == 64 * units && sums.len() == groups && row.biases.len() == groups);
        assert!(row.group.is_power_of_two());
        let (wp, xp, dp, sp) = (row.words.as_ptr() as *const u8, a.split.as_ptr(), a.lanes.as_ptr(), row.scales.as_ptr());
        let (mask, ones) = (_mm256_set1_epi8(15), _mm256_set1_epi16(1));
        let shift = row.group.trailing_zeros();
        // one 64's lanes of integer sums (as f32) and the lanes' scale products
        let unit = |u: usize| -> (__m256, __m256) {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(PREFETCH + 32 * u) as *const i8);
            let v = _mm256_loadu_si256(wp.add(32 * u) as *const __m256i);
            let lo = _mm256_and_si256(v, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
            let xe = _mm256_loadu_si256(xp.add(64 * u) as *const __m256i);
            let xo = _mm256_loadu_si256(xp.add(64 * u + 32) as *const __m256i);
            let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
            let sc = if row.group >= 64 {
                _mm256_set1_ps(*sp.add((64 * u) >> shift))
            } else {
                _mm256_setr_m128(_mm_set1_ps(*sp.add(2 * u)), _mm_set1_ps(*sp.add(2 * u + 1)))
            };
            (_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones)), _mm256_mul_ps(sc, _mm256_loadu_ps(dp.add(8 * u))))
        };
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut u = 0;
        while u + 1 < units {
            let ((c0, f0), (c1, f1)) = (unit(u), unit(u + 1));
            acc0 = _mm256_fmadd_ps(c0, f0, acc0);
            acc1 = _mm256_fmadd_ps(c1, f1, acc1);
            u += 2;
        }
        if u < units {
            let (c, f) = unit(u);
            acc0 = _mm256_fmadd_ps(c, f, acc0);
        }
        let mut acc_b = _mm256_setzero_ps();
        let mut g = 0;
        while g + 8 <= groups {
            acc_b = _mm256_fmadd_ps(_mm256_loadu_ps(row.biases.as_ptr().add(g)), _mm256_loadu_ps(sums.as_ptr().add(g)), acc_b);
            g += 8;
        }
        let mut bl = [0f32; 8];
        _mm256_storeu_ps(bl.as_mut_ptr(), acc_b);
        while g < groups {
            bl[g % 8] = row.biases.get_unchecked(g).mul_add(*sums.get_unchecked(g), bl[g % 8]);
            g += 1;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc0, acc1));
        lanes.iter().fold(0f32, |a, &v| a + v) + bl.iter().fold(0f32, |a, &v| a + v)
    }

    /// Bytes ahead of the current group whose codes are prefetched (rows are contiguous; the
    /// hardware prefetcher stops at 4 KiB page boundaries). A hint: it never changes a result.
    const PREFETCH: usize = 4096;

    /// Eight codes of `bits` (4 or 8) starting at code `8 * i` of the group at `w`, as f32 lanes.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn codes8(bits: u32, w: *const u32, i: usize) -> __m256 {
        let c = if bits == 4 {
            let v = _mm256_set1_epi32(*w.add(i) as i32);
            _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)), _mm256_set1_epi32(15))
        } else {
            _mm256_cvtepu8_epi32(_mm_loadl_epi64((w as *const u8).add(8 * i) as *const __m128i))
        };
        _mm256_cvtepi32_ps(c)
    }

    /// [`super::portable::dot`] in AVX2 registers; 4- and 8-bit codes are unpacked in registers,
    /// other widths through the portable unpacking.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(row: &Row<'_>, x: &[f32], sums: &[f32]) -> f32 {
        let g = row.group;
        let wpg = g * row.bits as usize / 32;
        let in_registers = row.bits == 4 || row.bits == 8;
        let mut codes = [0f32; 128];
        let mut acc = _mm256_setzero_ps();
        let mut acc_b = 0f32;
        let groups = x.len() / g;
        // (the loads below are unchecked)
        assert!(x.len() == groups * g && row.words.len() == groups * wpg);
        assert!(sums.len() == groups && row.scales.len() == groups && row.biases.len() == groups);
        for (gi, words) in row.words.chunks_exact(wpg).enumerate() {
            let wp = words.as_ptr();
            let mut o = 0;
            while o < wpg * 4 {
                // may point past the matrix: prefetches do not fault
                _mm_prefetch::<_MM_HINT_T0>((wp as *const u8).wrapping_add(PREFETCH + o) as *const i8);
                o += 64;
            }
            if !in_registers {
                super::unpack(row.bits, words, &mut codes[..g]);
            }
            let xp = x.as_ptr().add(gi * g);
            let (mut d0, mut d1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for i in 0..g / 16 {
                let (c0, c1) = if in_registers {
                    (codes8(row.bits, wp, 2 * i), codes8(row.bits, wp, 2 * i + 1))
                } else {
                    (_mm256_loadu_ps(codes.as_ptr().add(16 * i)), _mm256_loadu_ps(codes.as_ptr().add(16 * i + 8)))
                };
                d0 = _mm256_fmadd_ps(c0, _mm256_loadu_ps(xp.add(16 * i)), d0);
                d1 = _mm256_fmadd_ps(c1, _mm256_loadu_ps(xp.add(16 * i + 8)), d1);
            }
            acc = _mm256_fmadd_ps(_mm256_add_ps(d0, d1), _mm256_set1_ps(*row.scales.get_unchecked(gi)), acc);
            acc_b = row.biases.get_unchecked(gi).mul_add(*sums.get_unchecked(gi), acc_b);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        lanes.iter().fold(0f32, |a, &v| a + v) + acc_b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_values as lcg;

    /// A random matrix quantized with our bit-exact MLX quantizer, its parameters stored as `kind`,
    /// and its rows dequantized by `mlx::affine::dequantize_row` (the scales and biases rounded to
    /// `kind` and widened back first).
    fn matrix_and_rows(rows: usize, cols: usize, bits: u32, group: usize, kind: FloatKind, seed: u64) -> (AffineMatrix, Vec<Vec<f32>>) {
        let w = lcg(seed, rows * cols);
        let (wpr, gpr) = (cols * bits as usize / 32, cols / group);
        let (mut words, mut sc, mut bi) = (vec![0u32; rows * wpr], vec![0f32; rows * gpr], vec![0f32; rows * gpr]);
        for r in 0..rows {
            crate::mlx::affine::quantize_row(
                &w[r * cols..(r + 1) * cols],
                bits,
                group,
                &mut words[r * wpr..(r + 1) * wpr],
                &mut sc[r * gpr..(r + 1) * gpr],
                &mut bi[r * gpr..(r + 1) * gpr],
            );
        }
        let round = |f: f32| -> f32 {
            match kind {
                FloatKind::F32 => f,
                FloatKind::Bf16 => half::bf16::from_f32(f).to_f32(),
                FloatKind::F16 => half::f16::from_f32(f).to_f32(),
            }
        };
        let enc = |v: &[f32]| -> Vec<u8> {
            v.iter()
                .flat_map(|&f| match kind {
                    FloatKind::F32 => f.to_le_bytes().to_vec(),
                    FloatKind::Bf16 => half::bf16::from_f32(f).to_le_bytes().to_vec(),
                    FloatKind::F16 => half::f16::from_f32(f).to_le_bytes().to_vec(),
                })
                .collect()
        };
        let wb: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let m = AffineMatrix::from_le_bytes((rows, cols), bits, group, &wb, (kind, &enc(&sc), &enc(&bi))).unwrap();
        let widened = (0..rows)
            .map(|r| {
                let (s, b): (Vec<f32>, Vec<f32>) = (r * gpr..(r + 1) * gpr).map(|i| (round(sc[i]), round(bi[i]))).unzip();
                let mut out = vec![0f32; cols];
                crate::mlx::affine::dequantize_row(&words[r * wpr..(r + 1) * wpr], &s, &b, bits, group, &mut out);
                out
            })
            .collect();
        (m, widened)
    }

    fn matrix(rows: usize, cols: usize, bits: u32, group: usize, kind: FloatKind, seed: u64) -> AffineMatrix {
        matrix_and_rows(rows, cols, bits, group, kind, seed).0
    }

    /// The products on the float path.
    fn products(m: &AffineMatrix, xs: &[f32], run: &Runner<'_>) -> Vec<f32> {
        products_on(m, xs, run, false)
    }

    fn products_on(m: &AffineMatrix, xs: &[f32], run: &Runner<'_>, int8: bool) -> Vec<f32> {
        let mut out = vec![0f32; xs.len() / m.cols * m.rows];
        m.matvecs(xs, &mut out, run, int8);
        out
    }

    /// The activation quantization of the 4-bit path, written from its definition: per 32 values
    /// `d = max|x| / 127`, codes `round(x / d)`, and the values `d * code` they stand for.
    fn reference_q8(x: &[f32]) -> Vec<f32> {
        x.chunks(32)
            .flat_map(|c| {
                let amax = c.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                c.iter().map(move |&v| if amax == 0.0 { 0.0 } else { (v * (127.0 / amax)).round() * d })
            })
            .collect()
    }

    /// The most the activation rounding can move row `r`'s product with `x`: each value moves by
    /// at most half its 32's step `d`, times `|scale * code|` (the bias terms use `x` itself).
    fn rounding_bound(m: &AffineMatrix, r: usize, x: &[f32]) -> f64 {
        let (mut w, b) = (vec![], bi_of(m, r));
        m.widen_row(r, &mut w);
        x.chunks(32)
            .enumerate()
            .map(|(k, c)| {
                let d = c.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 127.0;
                (0..32).map(|j| ((w[32 * k + j] - b[(32 * k + j) / m.group]) as f64).abs() * d / 2.0).sum::<f64>()
            })
            .sum()
    }

    fn sc_of(m: &AffineMatrix, r: usize) -> Vec<f32> {
        let mut v = vec![0f32; m.cols / m.group];
        m.scales.row_into(r, &mut v);
        v
    }

    fn bi_of(m: &AffineMatrix, r: usize) -> Vec<f32> {
        let mut v = vec![0f32; m.cols / m.group];
        m.biases.row_into(r, &mut v);
        v
    }

    /// The quantized activations stand for the reference's values; a row with a NaN or an
    /// infinity is not quantized (the float path carries it through: the product is not finite).
    #[test]
    fn activation_quantization_and_non_finite_rows() {
        let mut x = lcg(21, 256);
        x[40] = 0.0;
        x[64..96].iter_mut().for_each(|v| *v = 0.0); // an all-zero 32
        let q = QActs::new(&x).unwrap();
        assert_eq!(q.dequantized(), reference_q8(&x));
        assert!(q.q.iter().all(|&c| (-127..=127).contains(&c)) && q.q.iter().any(|&c| c.abs() == 127));
        assert!(QActs::new(&x[..96]).is_none(), "not whole 64s");
        let m = matrix(8, 256, 4, 64, FloatKind::Bf16, 3);
        for bad in [f32::NAN, f32::INFINITY] {
            let mut y = x.clone();
            y[100] = bad;
            assert!(QActs::new(&y).is_none());
            assert!(products_on(&m, &y, &serial, true).iter().all(|v| !v.is_finite()), "{bad}");
        }
    }

    fn serial(tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        (0..tasks).for_each(task)
    }

    /// Every bit width and group size, parameters in each float type: widened rows are MLX's
    /// dequantized rows exactly, and the products equal f64 dot products of them to float
    /// rounding (4-bit rows on the integer path: of them and the activations as quantized); on
    /// the pool and in reverse task order they are the same bits; several activation rows at once
    /// give the bits of one at a time.
    #[test]
    fn products_match_the_widened_weights() {
        for (bits, int8) in crate::mlx::affine::BITS.iter().map(|&b| (b, false)).chain([(4, true)]) {
            for &group in &crate::mlx::affine::GROUP_SIZES {
                let kind = [FloatKind::Bf16, FloatKind::F16, FloatKind::F32][(bits as usize + group / 32) % 3];
                let (rows, cols) = (70, 2 * group + 128);
                let (m, widened) = matrix_and_rows(rows, cols, bits, group, kind, bits as u64 * 1000 + group as u64);
                let n = 6;
                let xs = lcg(7 + bits as u64, n * cols);
                let products = |m: &AffineMatrix, xs: &[f32], run: &Runner<'_>| products_on(m, xs, run, int8);
                let got = products(&m, &xs, &serial);
                for r in 0..rows {
                    // the embedding's and prefill's widened rows are MLX's dequantized rows
                    let mut w = vec![];
                    m.widen_row(r, &mut w);
                    assert_eq!(w, widened[r], "bits {bits} group {group} row {r}");
                    for i in 0..n {
                        let x = &xs[i * cols..(i + 1) * cols];
                        // 4-bit rows multiply the activations as quantized per 32 (the integer
                        // path): against those, float rounding only; against the activations
                        // themselves, the activation rounding (bounded loosely here)
                        let q = int8.then(|| reference_q8(x));
                        let xq = q.as_deref().unwrap_or(x);
                        let b = &bi_of(&m, r);
                        // the bias terms use the exact sums of x: w = s * c + b, so dot = sum s c x' + sum b x
                        let exact: f64 = (0..cols)
                            .map(|j| ((w[j] - b[j / group]) as f64) * xq[j] as f64 + b[j / group] as f64 * x[j] as f64)
                            .sum();
                        let mag: f64 = w.iter().zip(x).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                        let err = (got[i * rows + r] as f64 - exact).abs();
                        assert!(err <= 1e-5 * mag + 1e-6, "bits {bits} group {group} row {r} act {i}: {} vs {exact}", got[i * rows + r]);
                        let float: f64 = w.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let bound = if int8 { rounding_bound(&m, r, x) } else { 0.0 };
                        assert!((got[i * rows + r] as f64 - float).abs() <= bound + 1e-5 * mag + 1e-6, "bits {bits} group {group}: {} vs {float}", got[i * rows + r]);
                    }
                }
                let pool = products(&m, &xs, &|tasks, task| crate::model::linear::parallel(tasks, task));
                let reversed = products(&m, &xs, &|tasks, task| (0..tasks).rev().for_each(task));
                assert_eq!(pool, got);
                assert_eq!(reversed, got);
                for i in 0..n {
                    let one = products(&m, &xs[i * cols..(i + 1) * cols], &serial);
                    assert_eq!(one, got[i * rows..(i + 1) * rows], "bits {bits} group {group} act {i}");
                }
            }
        }
    }

    /// The AVX2 build computes the portable one's bits.
    #[test]
    fn builds_agree() {
        #[cfg(target_arch = "x86_64")]
        {
            if !(std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")) {
                crate::test_report::note("NOT RUN here: avx2 MLX affine row kernel against the portable one (this CPU lacks avx2/fma)");
                return;
            }
            crate::test_report::note("ran: avx2 MLX affine row kernel equals the portable one bit for bit");
            for &bits in &[3u32, 4, 8] {
                let m = matrix(9, 256, bits, 64, FloatKind::Bf16, 5);
                let x = lcg(3, 256);
                let (mut sc, mut bi) = (vec![0f32; 4], vec![0f32; 4]);
                m.scales.row_into(4, &mut sc);
                m.biases.row_into(4, &mut bi);
                let wpr = m.words_per_row();
                let row = Row { words: &m.words[4 * wpr..5 * wpr], scales: &sc, biases: &bi, bits, group: 64 };
                let s: Vec<f32> = x.chunks_exact(64).map(|c| c.iter().sum()).collect();
                let a = unsafe { avx2::dot(&row, &x, &s) };
                let b = portable::dot(&row, &x, &s);
                assert_eq!(a.to_bits(), b.to_bits(), "bits {bits}");
            }
            crate::test_report::note("ran: avx2 MLX 4-bit integer row kernel equals the portable one bit for bit");
            // 6 and 7 64s (the odd one goes to the first accumulator), 3 to 14 groups (bias tails)
            for (&group, cols) in crate::mlx::affine::GROUP_SIZES.iter().flat_map(|g| [(g, 384), (g, 448)]) {
                if cols % group != 0 {
                    continue;
                }
                let m = matrix(5, cols, 4, group, FloatKind::F16, 9 + group as u64);
                let x = lcg(4 + group as u64, cols);
                let q = QActs::new(&x).unwrap();
                let s: Vec<f32> = x.chunks_exact(group).map(|c| c.iter().sum()).collect();
                let wpr = m.words_per_row();
                for r in 0..5 {
                    let (sc, bi) = (sc_of(&m, r), bi_of(&m, r));
                    let row = Row { words: &m.words[r * wpr..(r + 1) * wpr], scales: &sc, biases: &bi, bits: 4, group };
                    let a = unsafe { avx2::dot_q4(&row, &q, &s) };
                    let b = portable::dot_q4(&row, &q, &s);
                    assert_eq!(a.to_bits(), b.to_bits(), "group {group} row {r}");
                }
            }
        }
    }

    /// Prefill's widened blocks agree with the matrix-vector products; the matrix holds its file's
    /// bytes (4-bit codes, bf16 parameters per 64: 4.5 bits per weight).
    #[test]
    fn prefill_agrees_and_memory_is_the_file_size() {
        let (rows, cols) = (300, 512);
        let m = matrix(rows, cols, 4, 64, FloatKind::Bf16, 11);
        assert_eq!(m.bytes() as usize, rows * cols / 2 + 2 * 2 * rows * cols / 64);
        let n = 9;
        let xs = lcg(5, n * cols);
        let x = Tensor::from_vec(xs.clone(), (n, cols), &candle_core::Device::Cpu).unwrap();
        let batched = m.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // prefill multiplies the activations as they are, as decode does by default; decode on
        // the integer path multiplies them as quantized per 32: off by the activation rounding
        let single = products(&m, &xs, &serial);
        for (i, (a, b)) in batched.iter().zip(&single).enumerate() {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{i}: {a} vs {b}");
        }
        let single = products_on(&m, &xs, &serial, true);
        for (i, (a, b)) in batched.iter().zip(&single).enumerate() {
            let bound = rounding_bound(&m, i % rows, &xs[i / rows * cols..(i / rows + 1) * cols]) as f32;
            assert!((a - b).abs() <= bound + 1e-4 * (1.0 + b.abs()), "{i}: {a} vs {b} (bound {bound})");
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        let k = FloatKind::Bf16;
        assert!(AffineMatrix::from_le_bytes((2, 64), 7, 64, &[0; 56], (k, &[0; 4], &[0; 4])).is_err());
        assert!(AffineMatrix::from_le_bytes((2, 64), 4, 64, &[0; 60], (k, &[0; 4], &[0; 4])).is_err());
        assert!(AffineMatrix::from_le_bytes((2, 64), 4, 64, &[0; 64], (k, &[0; 2], &[0; 4])).is_err());
        assert!(AffineMatrix::from_le_bytes((2, 64), 4, 64, &[0; 64], (k, &[0; 4], &[0; 4])).is_ok());
    }
}
