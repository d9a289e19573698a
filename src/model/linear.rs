//! Projections `y = x W^T`: candle's matmul on any device, or, on the CPU, float weights kept at
//! their stored width (bf16/f16 stay 2 bytes per weight) with a matrix-vector kernel for decoding,
//! or Q8_0/Q4_0/Q4_K/Q5_K/Q6_K/IQ4_NL/IQ4_XS blocks with the kernels of [`super::qkernel`].
//!
//! Why not candle for float weights on the CPU: candle widens bf16/f16 to f32 (twice the memory)
//! or, in its own bf16/f16 matmul, rounds the *activations* to 16 bits (a different model). Its f32
//! matmul for one token reaches about half the memory bandwidth here. The kernel below reads each
//! weight once per token in its stored width, widens it exactly to f32 and accumulates in f32, four
//! rows at a time (four independent memory streams keep the prefetchers busy), so decoding runs at
//! the speed of reading the weights. For more than [`MATVEC_MAX_ROWS`] input rows (prefill,
//! `validate`) blocks of weight rows are widened into a small buffer and multiplied by `gemm`.
//!
//! Every row's dot product is summed in one fixed order (two 8-lane accumulators over 16-element
//! steps, lanes summed in order, then the tail), by the AVX2 kernel and by the portable one alike:
//! results do not depend on the thread count or the CPU.

use candle_core::quantized::QMatMul;
use candle_core::{Device, Module, Tensor};
use rayon::prelude::*;

use super::CResult;

/// Input rows up to which the matrix-vector kernel is used (decode is 1).
pub const MATVEC_MAX_ROWS: usize = 4;

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// Matrices with fewer elements than this are multiplied on the calling thread (candle's pool
/// hands work over in microseconds: from 2^16 elements, the trained fixture's 256 x 256, two
/// threads decode it 1.5x faster than one; with rayon the threshold was 2^20).
pub(super) const SERIAL_BELOW: usize = 1 << 16;

/// Batched products ([`FloatMatrix::matmul`], prefill) with fewer multiply-adds than this are done
/// on the calling thread.
const GEMM_SERIAL_BELOW: usize = 1 << 20;

/// Weight rows widened and multiplied at a time by [`FloatMatrix::matmul`].
const GEMM_BLOCK: usize = 128;

/// A projection `[out, in]`.
pub enum Linear {
    /// candle's matmul: dense f32 or ggml-quantized weights, any device.
    Candle(QMatMul),
    /// Float weights in their stored width, on the CPU.
    Float(FloatMatrix),
    /// Q8_0/Q4_0/Q4_K/Q5_K/Q6_K/IQ4_NL/IQ4_XS blocks multiplied by this crate's kernels (AVX-512 VNNI or AVX2), on
    /// x86-64 CPUs with at least AVX2.
    Quant(super::qkernel::QuantMatrix),
    /// MLX affine-quantized weights at their stored width, on the CPU.
    Affine(super::affine::AffineMatrix),
    /// Lattice i-quant blocks (IQ3_XXS ... IQ1_M), on the CPU: each block decoded as it is
    /// multiplied.
    Blocks(BlockMatrix),
}

impl Linear {
    /// `x [n, in] -> [n, out]`.
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        match self {
            Linear::Candle(m) => m.forward(x),
            Linear::Float(m) => m.forward(x),
            Linear::Quant(m) => m.forward(x),
            Linear::Affine(m) => m.forward(x),
            Linear::Blocks(m) => m.forward(x),
        }
    }

    /// What multiplies this projection (reported by `run`).
    pub fn kernel(&self) -> &'static str {
        match self {
            Linear::Candle(_) => "candle",
            Linear::Float(_) => "float at stored width",
            Linear::Quant(m) => m.isa.label(),
            Linear::Affine(m) if m.takes_int8() => "MLX affine 4-bit, int8 activations (OURO_QUANT_MLX_ACTS=int8)",
            Linear::Affine(_) => "MLX affine at stored width",
            Linear::Blocks(_) => "i-quant blocks decoded per product",
        }
    }
}

/// The element type of a [`FloatMatrix`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatKind {
    F32,
    Bf16,
    F16,
}

/// Float weights `[rows, cols]`, row-major, as stored in the checkpoint.
pub struct FloatMatrix {
    pub rows: usize,
    pub cols: usize,
    data: FloatData,
}

enum FloatData {
    F32(Vec<f32>),
    /// bf16 or f16 bit patterns.
    Half(FloatKind, Vec<u16>),
}

impl FloatMatrix {
    /// From little-endian bytes of `kind` (as in a safetensors or GGUF file).
    pub fn from_le_bytes(kind: FloatKind, bytes: &[u8], rows: usize, cols: usize) -> Self {
        const CHUNK: usize = 1 << 16;
        assert_eq!(bytes.len(), rows * cols * kind.size(), "matrix bytes");
        let data = match kind {
            FloatKind::F32 => {
                let mut v = vec![0f32; rows * cols];
                super::pages::advise(v.as_ptr() as *const u8, v.len() * 4, false);
                v.par_chunks_mut(CHUNK)
                    .zip(bytes.par_chunks(CHUNK * 4))
                    .for_each(|(o, b)| crate::checkpoint::decode_f32(crate::stfile::DType::F32, b, o));
                FloatData::F32(v)
            }
            FloatKind::Bf16 | FloatKind::F16 => {
                let mut v = vec![0u16; rows * cols];
                super::pages::advise(v.as_ptr() as *const u8, v.len() * 2, false);
                v.par_chunks_mut(CHUNK)
                    .zip(bytes.par_chunks(CHUNK * 2))
                    .for_each(|(o, b)| {
                        for (o, b) in o.iter_mut().zip(b.chunks_exact(2)) {
                            *o = u16::from_le_bytes([b[0], b[1]]);
                        }
                    });
                FloatData::Half(kind, v)
            }
        };
        FloatMatrix { rows, cols, data }
    }

    pub fn kind(&self) -> FloatKind {
        match &self.data {
            FloatData::F32(_) => FloatKind::F32,
            FloatData::Half(k, _) => *k,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        (self.rows * self.cols * self.kind().size()) as u64
    }

    /// Row `r` widened to f32.
    pub fn row_f32(&self, r: usize) -> Vec<f32> {
        let c = self.cols;
        match &self.data {
            FloatData::F32(v) => v[r * c..(r + 1) * c].to_vec(),
            FloatData::Half(k, v) => v[r * c..(r + 1) * c]
                .iter()
                .map(|&h| widen(*k, h))
                .collect(),
        }
    }

    /// Row `r` widened into `out` (`cols` values).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match &self.data {
            FloatData::F32(v) => out.copy_from_slice(&v[r * c..(r + 1) * c]),
            FloatData::Half(k, v) => {
                for (o, &h) in out.iter_mut().zip(&v[r * c..(r + 1) * c]) {
                    *o = widen(*k, h);
                }
            }
        }
    }

    /// The whole matrix widened to f32 (a temporary for batched matmuls).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            FloatData::F32(v) => v.clone(),
            FloatData::Half(k, v) => {
                let mut out = vec![0f32; v.len()];
                out.par_chunks_mut(1 << 16)
                    .zip(v.par_chunks(1 << 16))
                    .for_each(|(o, h)| {
                        for (o, &h) in o.iter_mut().zip(h) {
                            *o = widen(*k, h);
                        }
                    });
                out
            }
        }
    }

    /// `x [n, cols] -> [n, rows]` (CPU tensors).
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let n = input_rows(x, self.rows, self.cols)?;
        let mut out = vec![0f32; n * self.rows];
        with_f32(x, |xs| {
            if n > MATVEC_MAX_ROWS {
                self.matmul(xs, n, &mut out);
            } else {
                for (xr, or) in xs.chunks_exact(self.cols).zip(out.chunks_exact_mut(self.rows)) {
                    self.matvec(xr, or);
                }
            }
        })?;
        Tensor::from_vec(out, (n, self.rows), x.device())
    }

    /// `out [n, rows] = x [n, cols] W^T` for many input rows ([`widened_matmul`]).
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        let cols = self.cols;
        widened_matmul(self.rows, cols, x, n, out, &|r0, b, buf| match &self.data {
            FloatData::F32(w) => buf.extend_from_slice(&w[r0 * cols..(r0 + b) * cols]),
            FloatData::Half(kind, w) => buf.extend(w[r0 * cols..(r0 + b) * cols].iter().map(|&h| widen(*kind, h))),
        });
    }

    /// `out[r] = dot(W[r], x)` for every row, in parallel over blocks of [`ROWS_PER_TASK`] rows
    /// ([`parallel`]).
    pub fn matvec(&self, x: &[f32], out: &mut [f32]) {
        // A small matrix is done on this thread: handing it to the pool and waiting costs more
        // than the work (each row is computed the same way either way).
        let on_pool = self.rows * self.cols >= SERIAL_BELOW;
        self.matvec_on(x, out, &|tasks, task| run_tasks(tasks, task, on_pool))
    }

    /// [`Self::matvec`] with the tasks run by `run(number of tasks, task)`.
    fn matvec_on(&self, x: &[f32], out: &mut [f32], run: &Runner<'_>) {
        assert_eq!(x.len(), self.cols);
        assert_eq!(out.len(), self.rows);
        let c = self.cols;
        let k = kernel();
        let dst = &SharedOut::new(out);
        let task = |t: usize| {
            let r0 = t * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(self.rows);
            // task `t` writes only its own rows
            let o = unsafe { dst.slice(r0, r1 - r0) };
            match &self.data {
                FloatData::F32(w) => (k.f32)(&w[r0 * c..r1 * c], x, o),
                FloatData::Half(FloatKind::Bf16, w) => (k.bf16)(&w[r0 * c..r1 * c], x, o),
                FloatData::Half(_, w) => (k.f16)(&w[r0 * c..r1 * c], x, o),
            }
        };
        run(self.rows.div_ceil(ROWS_PER_TASK), &task);
    }
}

/// `out [n, rows] = x [n, cols] W^T` for many input rows: blocks of [`GEMM_BLOCK`] weight rows are
/// widened by `widen_rows(first row, rows, buffer)` (appending `rows * cols` values) into a
/// per-task f32 buffer and multiplied with the `gemm` crate (the kernel candle's CPU matmul uses),
/// one block per parallel task. The blocks are fixed, so the result does not depend on the thread
/// count.
pub(super) fn widened_matmul(
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    widen_rows: &(dyn Fn(usize, usize, &mut Vec<f32>) + Sync),
) {
        assert_eq!(x.len(), n * cols);
        assert_eq!(out.len(), n * rows);
        // each task writes only its own columns `r0..r0 + b` of `out`
        let dst = &SharedOut::new(out);
        let block = |buf: &mut Vec<f32>, blk: usize| {
            let r0 = blk * GEMM_BLOCK;
            let b = GEMM_BLOCK.min(rows - r0);
            buf.clear();
            widen_rows(r0, b, buf);
            // (gemm reads `b * cols` values from it)
            assert_eq!(buf.len(), b * cols);
            // dst [n, b] (row stride `rows`) = x [n, cols] * block^T [cols, b]
            unsafe {
                gemm::gemm(
                    n,
                    b,
                    cols,
                    dst.ptr().add(r0),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    buf.as_ptr(),
                    cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        };
        let blocks = rows.div_ceil(GEMM_BLOCK);
        if rows * cols * n < GEMM_SERIAL_BELOW {
            let mut buf = Vec::new();
            (0..blocks).for_each(|b| block(&mut buf, b));
        } else {
            (0..blocks)
                .into_par_iter()
                .for_each_init(Vec::new, |buf, b| block(buf, b));
        }
    }

/// Runs `task(0..tasks)`: `run(tasks, task)`.
pub(super) type Runner<'a> = dyn Fn(usize, &(dyn Fn(usize) + Sync)) + 'a;

/// Lattice i-quant blocks `[rows, cols]` (whole rows, as a GGUF file holds them): the matrix
/// stays at its quantized size. Decoding (up to [`MATVEC_MAX_ROWS`] input rows) decodes each
/// 256-value block into a stack buffer and multiplies it with every input row in 8 lanes, summed
/// in a fixed order; prefill widens blocks of rows for [`widened_matmul`]. Each row's result
/// depends only on the row and the input, whatever the thread count.
pub struct BlockMatrix {
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
    block_bytes: usize,
    data: Vec<u8>,
    decode: crate::quant::DecodeBlock,
}

impl BlockMatrix {
    pub fn new(data: Vec<u8>, rows: usize, cols: usize, block_bytes: usize, decode: crate::quant::DecodeBlock) -> Self {
        assert!(cols % 256 == 0 && data.len() == rows * cols / 256 * block_bytes, "whole rows of 256-value blocks");
        super::pages::advise(data.as_ptr(), data.len(), true);
        BlockMatrix { rows, cols, row_bytes: cols / 256 * block_bytes, block_bytes, data, decode }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.data.len() as u64
    }

    fn widen(&self, r0: usize, n: usize, buf: &mut Vec<f32>) {
        crate::quant::iqgrid::decode_all(&self.data[r0 * self.row_bytes..(r0 + n) * self.row_bytes], self.block_bytes, buf, self.decode);
    }

    /// [`Self::rows_dot`] with AVX2 where the CPU has it (the same operations: no fused
    /// multiply-adds, so the same bits).
    fn rows_dot_any(&self, r0: usize, r1: usize, xs: &[f32], n: usize, out: &mut dyn FnMut(usize, usize, f32)) {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { self.rows_dot_avx2(r0, r1, xs, n, out) };
        }
        self.rows_dot(r0, r1, xs, n, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn rows_dot_avx2(&self, r0: usize, r1: usize, xs: &[f32], n: usize, out: &mut dyn FnMut(usize, usize, f32)) {
        self.rows_dot(r0, r1, xs, n, out)
    }

    /// `out[i * rows + r]` for weight rows `r0..r1` and every input row `i` of `xs`.
    #[inline(always)]
    fn rows_dot(&self, r0: usize, r1: usize, xs: &[f32], n: usize, out: &mut dyn FnMut(usize, usize, f32)) {
        let mut w = [0f32; 256];
        for r in r0..r1 {
            let mut acc = [[0f32; 8]; MATVEC_MAX_ROWS];
            for (b, blk) in self.data[r * self.row_bytes..(r + 1) * self.row_bytes].chunks_exact(self.block_bytes).enumerate() {
                (self.decode)(blk, &mut w);
                for (i, acc) in acc.iter_mut().enumerate().take(n) {
                    let x = &xs[i * self.cols + 256 * b..i * self.cols + 256 * (b + 1)];
                    for (wc, xc) in w.chunks_exact(8).zip(x.chunks_exact(8)) {
                        for l in 0..8 {
                            acc[l] += wc[l] * xc[l];
                        }
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate().take(n) {
                out(i, r, ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])));
            }
        }
    }

    /// `x [n, cols] -> [n, rows]` (CPU tensors).
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let n = input_rows(x, self.rows, self.cols)?;
        let mut out = vec![0f32; n * self.rows];
        with_f32(x, |xs| {
            if n > MATVEC_MAX_ROWS {
                widened_matmul(self.rows, self.cols, xs, n, &mut out, &|r0, b, buf| self.widen(r0, b, buf));
            } else {
                let on_pool = self.rows * self.cols >= SERIAL_BELOW;
                let dst = &SharedOut::new(&mut out);
                let rows = self.rows;
                let task = |t: usize| {
                    let r0 = t * ROWS_PER_TASK;
                    let r1 = (r0 + ROWS_PER_TASK).min(rows);
                    // task `t` writes only its own rows of each output row
                    self.rows_dot_any(r0, r1, xs, n, &mut |i, r, v| unsafe { dst.slice(i * rows + r, 1)[0] = v });
                };
                run_tasks(rows.div_ceil(ROWS_PER_TASK), &task, on_pool);
            }
        })?;
        Tensor::from_vec(out, (n, self.rows), x.device())
    }
}

impl FloatKind {
    /// The kind of a safetensors float dtype (`None` for other dtypes).
    pub fn of_stored(dtype: crate::stfile::DType) -> Option<Self> {
        match dtype {
            crate::stfile::DType::F32 => Some(FloatKind::F32),
            crate::stfile::DType::BF16 => Some(FloatKind::Bf16),
            crate::stfile::DType::F16 => Some(FloatKind::F16),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            FloatKind::F32 => 4,
            FloatKind::Bf16 | FloatKind::F16 => 2,
        }
    }
}

#[inline(always)]
fn widen(kind: FloatKind, h: u16) -> f32 {
    match kind {
        FloatKind::Bf16 => f32::from_bits((h as u32) << 16),
        _ => half::f16::from_bits(h).to_f32(),
    }
}

/// Kernels `(weights of whole rows, x, out)`, one per element type.
#[derive(Clone, Copy)]
struct Kernels {
    f32: fn(&[f32], &[f32], &mut [f32]),
    bf16: fn(&[u16], &[f32], &mut [f32]),
    f16: fn(&[u16], &[f32], &mut [f32]),
}

fn kernel() -> Kernels {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            let f16 = if std::is_x86_feature_detected!("f16c") {
                avx2::f16 as fn(&[u16], &[f32], &mut [f32])
            } else {
                portable::f16
            };
            return Kernels {
                f32: avx2::f32,
                bf16: avx2::bf16,
                f16,
            };
        }
    }
    PORTABLE
}

const PORTABLE: Kernels = Kernels {
    f32: portable::f32,
    bf16: portable::bf16,
    f16: portable::f16,
};

/// The reference kernel: the same arithmetic, in the same order, as the AVX2 one.
mod portable {
    use super::widen;
    use super::FloatKind;

    /// Dot products of up to four rows with `x`: per row two 8-lane fused multiply-add
    /// accumulators over 16-element steps, lanes summed in order, then the tail.
    #[inline(always)]
    fn rows4<T: Copy>(w: &[T], x: &[f32], out: &mut [f32], get: impl Fn(T) -> f32) {
        let k = x.len();
        let steps = k / 16 * 16;
        for (o4, rows) in out.chunks_mut(4).zip(w.chunks(4 * k)) {
            for (o, row) in o4.iter_mut().zip(rows.chunks_exact(k)) {
                let mut a = [[0f32; 8]; 2];
                for (wc, xc) in row[..steps]
                    .chunks_exact(16)
                    .zip(x[..steps].chunks_exact(16))
                {
                    for h in 0..2 {
                        for l in 0..8 {
                            a[h][l] = get(wc[8 * h + l]).mul_add(xc[8 * h + l], a[h][l]);
                        }
                    }
                }
                let mut s = 0f32;
                for l in 0..8 {
                    s += a[0][l] + a[1][l];
                }
                for j in steps..k {
                    s = get(row[j]).mul_add(x[j], s);
                }
                *o = s;
            }
        }
    }

    pub fn f32(w: &[f32], x: &[f32], out: &mut [f32]) {
        rows4(w, x, out, |v| v)
    }
    pub fn bf16(w: &[u16], x: &[f32], out: &mut [f32]) {
        rows4(w, x, out, |h| widen(FloatKind::Bf16, h))
    }
    pub fn f16(w: &[u16], x: &[f32], out: &mut [f32]) {
        rows4(w, x, out, |h| widen(FloatKind::F16, h))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Widens 8 elements at `p` to f32.
    trait Load8: Copy {
        unsafe fn load8(p: *const Self) -> __m256;
        fn to_f32(self) -> f32;
    }
    impl Load8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        fn to_f32(self) -> f32 {
            self
        }
    }
    #[derive(Clone, Copy)]
    struct Bf16(u16);
    impl Load8 for Bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const Bf16) -> __m256 {
            _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
                16,
            ))
        }
        fn to_f32(self) -> f32 {
            f32::from_bits((self.0 as u32) << 16)
        }
    }
    #[derive(Clone, Copy)]
    struct F16(u16);
    impl Load8 for F16 {
        #[inline(always)]
        unsafe fn load8(p: *const F16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        fn to_f32(self) -> f32 {
            half::f16::from_bits(self.0).to_f32()
        }
    }

    #[inline(always)]
    unsafe fn hsum_in_order(a: __m256, b: __m256) -> f32 {
        let mut t = [0f32; 8];
        let mut u = [0f32; 8];
        _mm256_storeu_ps(t.as_mut_ptr(), a);
        _mm256_storeu_ps(u.as_mut_ptr(), b);
        let mut s = 0f32;
        for l in 0..8 {
            s += t[l] + u[l];
        }
        s
    }

    /// Elements ahead of the current position prefetched in each of the four rows (1 KiB of bf16).
    const PREFETCH: usize = 512;

    /// Safety: the CPU supports AVX2 and FMA (and F16C for `F16`); `w` holds whole rows of
    /// `x.len()` elements, `out.len()` of them.
    #[inline(always)]
    unsafe fn rows<T: Load8>(w: &[T], x: &[f32], out: &mut [f32]) {
        let k = x.len();
        let steps = k / 16 * 16;
        debug_assert!(w.len() >= out.len() * k);
        let xp = x.as_ptr();
        let mut r = 0;
        while r + 4 <= out.len() {
            let p = w.as_ptr().add(r * k);
            let mut a = [_mm256_setzero_ps(); 8];
            let mut i = 0;
            while i < steps {
                let x0 = _mm256_loadu_ps(xp.add(i));
                let x1 = _mm256_loadu_ps(xp.add(i + 8));
                for j in 0..4 {
                    // may point past the row (prefetches do not fault); wrapping_add keeps it well-defined
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(j * k + i + PREFETCH) as *const i8);
                    a[2 * j] = _mm256_fmadd_ps(T::load8(p.add(j * k + i)), x0, a[2 * j]);
                    a[2 * j + 1] =
                        _mm256_fmadd_ps(T::load8(p.add(j * k + i + 8)), x1, a[2 * j + 1]);
                }
                i += 16;
            }
            for j in 0..4 {
                let mut s = hsum_in_order(a[2 * j], a[2 * j + 1]);
                let row = &w[(r + j) * k..(r + j + 1) * k];
                for t in steps..k {
                    s = row[t].to_f32().mul_add(x[t], s);
                }
                out[r + j] = s;
            }
            r += 4;
        }
        while r < out.len() {
            let p = w.as_ptr().add(r * k);
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i < steps {
                a0 = _mm256_fmadd_ps(T::load8(p.add(i)), _mm256_loadu_ps(xp.add(i)), a0);
                a1 = _mm256_fmadd_ps(T::load8(p.add(i + 8)), _mm256_loadu_ps(xp.add(i + 8)), a1);
                i += 16;
            }
            let mut s = hsum_in_order(a0, a1);
            let row = &w[r * k..(r + 1) * k];
            for t in steps..k {
                s = row[t].to_f32().mul_add(x[t], s);
            }
            out[r] = s;
            r += 1;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn f32_impl(w: &[f32], x: &[f32], out: &mut [f32]) {
        rows(w, x, out)
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn bf16_impl(w: &[u16], x: &[f32], out: &mut [f32]) {
        // Bf16 is a transparent wrapper of u16
        rows(
            std::slice::from_raw_parts(w.as_ptr() as *const Bf16, w.len()),
            x,
            out,
        )
    }
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_impl(w: &[u16], x: &[f32], out: &mut [f32]) {
        rows(
            std::slice::from_raw_parts(w.as_ptr() as *const F16, w.len()),
            x,
            out,
        )
    }

    // Only handed out by `kernel()` after the features were detected.
    pub fn f32(w: &[f32], x: &[f32], out: &mut [f32]) {
        unsafe { f32_impl(w, x, out) }
    }
    pub fn bf16(w: &[u16], x: &[f32], out: &mut [f32]) {
        unsafe { bf16_impl(w, x, out) }
    }
    pub fn f16(w: &[u16], x: &[f32], out: &mut [f32]) {
        unsafe { f16_impl(w, x, out) }
    }
}

/// Builds a projection from stored float bytes: the stored-width kernel on the CPU, a dense f32
/// candle tensor elsewhere.
pub fn float_linear(
    kind: FloatKind,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    device: &Device,
) -> CResult<(Linear, u64)> {
    let m = FloatMatrix::from_le_bytes(kind, bytes, rows, cols);
    if device.is_cpu() {
        let b = m.bytes();
        return Ok((Linear::Float(m), b));
    }
    let t = Tensor::from_vec(m.to_f32(), (rows, cols), device)?;
    Ok((Linear::Candle(QMatMul::Tensor(t)), (rows * cols * 4) as u64))
}

/// The rows of a projection's input `x [n, cols]` for a `[rows, cols]` weight, or an error naming
/// both shapes.
pub(super) fn input_rows(x: &Tensor, rows: usize, cols: usize) -> CResult<usize> {
    let (n, k) = x.dims2()?;
    if k != cols {
        candle_core::bail!("linear: input has {k} columns, weight {rows}x{cols}");
    }
    Ok(n)
}

/// Runs `task(0..tasks)` on candle's CPU worker pool (the one its quantized matmuls use): the
/// calling thread takes part, each grab takes one task, and idle workers spin briefly before
/// sleeping, where rayon's hand-off cost about 20% of decode speed on the 1.4B shapes. Which
/// thread runs a task never changes what it computes.
pub(super) fn parallel(tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    // one task per grab: `execute_chunked` hands out n / (8 * threads) at a time, up to 3072
    // rows of the lm_head, and the calling thread waited for the last
    let next = std::sync::atomic::AtomicUsize::new(0);
    candle_core::utils::barrier_pool().execute(|_| loop {
        let t = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if t >= tasks {
            break;
        }
        task(t);
    })
}

/// Runs `task(0..tasks)`: on the pool ([`parallel`]) when `on_pool`, else on the calling thread
/// in order (for work smaller than the hand-off).
pub(super) fn run_tasks(tasks: usize, task: &(dyn Fn(usize) + Sync), on_pool: bool) {
    if on_pool {
        parallel(tasks, task)
    } else {
        (0..tasks).for_each(task)
    }
}

/// An output buffer that parallel tasks write, each to its own part.
pub(super) struct SharedOut(*mut f32);

// Safety: the tasks holding it write disjoint elements (each user says which are whose).
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(super) fn new(out: &mut [f32]) -> Self {
        SharedOut(out.as_mut_ptr())
    }

    /// The buffer's start (for kernels that take a pointer and strides).
    pub(super) fn ptr(&self) -> *mut f32 {
        self.0
    }

    /// `out[start .. start + len]`.
    ///
    /// # Safety
    /// Inside the buffer, and no other task writes those elements while it is held.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn slice(&self, start: usize, len: usize) -> &mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// `f` of a CPU f32 tensor's values: its storage when contiguous (no copy), else a copy.
pub(super) fn with_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> CResult<R> {
    {
        let (storage, layout) = x.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            if let Ok(v) = cpu.as_slice::<f32>() {
                return Ok(f(&v[start..end]));
            }
        }
    }
    Ok(f(&x.flatten_all()?.to_vec1::<f32>()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::test_values as lcg;

    fn matrix(kind: FloatKind, w: &[f32], rows: usize, cols: usize) -> FloatMatrix {
        let bytes: Vec<u8> = match kind {
            FloatKind::F32 => w.iter().flat_map(|v| v.to_le_bytes()).collect(),
            FloatKind::Bf16 => w
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
            FloatKind::F16 => w
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
        };
        FloatMatrix::from_le_bytes(kind, &bytes, rows, cols)
    }

    /// Every kernel against an f64 dot product of the stored (widened) values, over shapes with
    /// tails in both dimensions; the dispatched kernel equals the portable one bit for bit.
    #[test]
    fn kernels_match_f64_and_each_other() {
        for &(rows, cols) in &[
            (1usize, 1usize),
            (3, 15),
            (4, 16),
            (37, 100),
            (70, 2048),
            (5, 33),
        ] {
            let w = lcg(rows as u64 * 131 + cols as u64, rows * cols);
            let x = lcg(7 + cols as u64, cols);
            for kind in [FloatKind::F32, FloatKind::Bf16, FloatKind::F16] {
                let m = matrix(kind, &w, rows, cols);
                let mut fast = vec![0f32; rows];
                m.matvec(&x, &mut fast);
                let mut port = vec![0f32; rows];
                match &m.data {
                    FloatData::F32(v) => (PORTABLE.f32)(v, &x, &mut port),
                    FloatData::Half(FloatKind::Bf16, v) => (PORTABLE.bf16)(v, &x, &mut port),
                    FloatData::Half(_, v) => (PORTABLE.f16)(v, &x, &mut port),
                }
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&fast),
                    bits(&port),
                    "{kind:?} {rows}x{cols}: dispatched kernel differs from the portable one"
                );
                for r in 0..rows {
                    let exact: f64 = m
                        .row_f32(r)
                        .iter()
                        .zip(&x)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    let tol = 1e-5 * (cols as f64).sqrt() * 4.0;
                    assert!(
                        (fast[r] as f64 - exact).abs() <= tol,
                        "{kind:?} {rows}x{cols} row {r}: {} vs {exact}",
                        fast[r]
                    );
                }
            }
        }
    }

    /// The batched path (widen + candle matmul) and the matrix-vector path agree, and both equal
    /// candle's dense matmul of the widened weights.
    #[test]
    fn forward_paths_agree_with_candle() {
        for (rows, cols, kind) in [
            (48, 80, FloatKind::Bf16),
            (GEMM_BLOCK * 2 + 45, 70, FloatKind::F16),
            (130, 33, FloatKind::F32),
        ] {
            let w = lcg(3, rows * cols);
            let m = matrix(kind, &w, rows, cols);
            let dense = Tensor::from_vec(m.to_f32(), (rows, cols), &Device::Cpu).unwrap();
            for n in [1usize, MATVEC_MAX_ROWS, MATVEC_MAX_ROWS + 3, 40] {
                let x = Tensor::from_vec(lcg(n as u64, n * cols), (n, cols), &Device::Cpu).unwrap();
                let got = m.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                let want = x
                    .matmul(&dense.t().unwrap())
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                    assert!(
                        (g - w).abs() < 1e-4,
                        "{kind:?} {rows}x{cols} n={n}: {g} vs {w}"
                    );
                }
            }
            assert_eq!(m.bytes(), (rows * cols * kind.size()) as u64);
        }
    }

    /// The result of a matrix-vector product does not depend on the number of threads.
    #[test]
    fn thread_count_does_not_change_bits() {
        // above SERIAL_BELOW, so the pool splits the work
        let (rows, cols) = (530, 2000);
        assert!(rows * cols >= SERIAL_BELOW);
        let w = lcg(9, rows * cols);
        let m = matrix(FloatKind::Bf16, &w, rows, cols);
        let x = lcg(10, cols);
        // candle's pool (as used: t = 0), and rayon pools of several sizes with one-task grabs
        let run = |t: usize| {
            let mut o = vec![0f32; rows];
            if t == 0 {
                m.matvec(&x, &mut o);
            } else {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
                pool.install(|| {
                    m.matvec_on(&x, &mut o, &|tasks, task| {
                        use rayon::prelude::*;
                        (0..tasks).into_par_iter().with_max_len(1).for_each(task)
                    })
                });
            }
            o.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(run(0), run(1));
        assert_eq!(run(0), run(3));
        let n = 9;
        let xs = lcg(11, n * cols);
        let run_mm = |t: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap();
            let mut o = vec![0f32; n * rows];
            pool.install(|| m.matmul(&xs, n, &mut o));
            o.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert_eq!(run_mm(1), run_mm(3));
        // and the first rows alone (a small matrix, done on the calling thread) give the same bits
        let few = 31;
        assert!(few * cols < SERIAL_BELOW);
        let small = matrix(FloatKind::Bf16, &w[..few * cols], few, cols);
        let mut o = vec![0f32; few];
        small.matvec(&x, &mut o);
        assert_eq!(o.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), run(2)[..few]);
        // (batched, the bits depend on how many rows gemm gets at once: 31 rows alone differ from
        // the first 31 of a block of 128 in the last bits; 101 rows match)
        let few = 101;
        let small = matrix(FloatKind::Bf16, &w[..few * cols], few, cols);
        let mut o = vec![0f32; n * few];
        small.matmul(&xs, n, &mut o);
        let big = run_mm(2);
        for r in 0..n {
            let want: Vec<u32> = big[r * rows..r * rows + few].to_vec();
            assert_eq!(o[r * few..(r + 1) * few].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "row {r}");
        }
    }
}
