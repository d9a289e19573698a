//! Q8_0, Q4_0, Q4_K, Q5_K, Q6_K and IQ4_NL weights times f32 activations on x86-64 CPUs with AVX2 (and faster
//! with AVX-512 VNNI), straight from the GGUF block bytes that candle's tensor holds (IQ4_NL, which
//! candle lacks, from our own buffer): nothing is copied, widened or repacked, so a model takes its
//! file's size in memory.
//!
//! Four builds, one result: `portable` (plain Rust) is the definition; `avx2`, the same functions
//! with AVX-VNNI's `vpdpbusd` for their sums of byte products (`avxvnni`), and `vnni` (AVX-512)
//! give its bits exactly, and the widest this CPU runs is chosen at run time ([`selected`]). Tests
//! run every build the CPU has against the portable one (`scripts/test.sh` lists the builds that
//! ran).
//!
//! Why not candle's kernels: on this kind of CPU candle 0.11 multiplies Q4_K (always), Q8_0
//! (always) and Q6_K (more than one input row) through a second, repacked copy of the weights that
//! it builds on first use and keeps beside the original (`repacked_qs`): a Q4_K_M 1.4B model held
//! 1.95 GB of anonymous memory instead of 0.95 GB, and Q4_K decode read the repacked tiles (0.75
//! bytes per weight instead of 0.5625). Its repacked Q8_0 path also quantizes the activations per
//! 256 values instead of ggml's 32 (on the trained fixture its logits end further from the f32
//! result than ours: 0.22 against 0.18). Its compact-block kernels for the rest are ports of
//! ggml's AVX2 ones.
//!
//! How: 64 Q4_K weights are one 64-byte load (128 nibbles: two halves of 64), a mask and a shift;
//! `vpmaddubsw` multiplies 64 codes by 64 int8 activations into 32 pair sums and `vpdpwssd`
//! multiplies those by the sub-block scales (one permute spreads a block's scales over the lanes)
//! and accumulates. Q6_K adds its two high bits with one shift and one ternary-logic instruction;
//! Q8_0 goes by quads of blocks (128 weights, two 512-bit registers: the four blocks' first
//! halves, then their second halves, so that each 32-bit lane sums 8 products of one block and
//! one float multiply-add serves 8 weights instead of 4), with `vpdpbusd` on `|w|` and the
//! activations with `w`'s sign for one activation row, and on the activations plus 128 and the
//! weights as they are for eight (prefill; the weights' sums taken off once per quad, [`Acts`]);
//! IQ4_NL and Q4_0 too, after one `vpshufb` has looked their 4-bit indices up in the 16-entry
//! table. Each block's weights are
//! unpacked once for up to four activation rows (prefill), and the next blocks are prefetched
//! 4 KiB ahead (the hardware prefetcher stops at page boundaries; without it a 600 MB Q4_K
//! matrix streamed at 11 GB/s instead of 23).
//!
//! The arithmetic is ggml's: activations quantized to int8 per 256 with a float scale and sums of
//! 16 (`Q8_K`) for the k-quants, per 32 (`Q8_0`) for Q8_0, Q4_0 and IQ4_NL, with candle's rounding;
//! exact integer dot products, one float multiply-add per lane and block. Each row's result depends only on the
//! row and the activations (blocks in order, lanes summed in a fixed order), so it does not depend
//! on the thread count or on how many activation rows come together. Other CPUs, other devices and
//! other types keep candle's kernels ([`available`]). The AVX2 build does the same with 256-bit
//! halves (`vpmaddubsw` + `vpmaddwd` for the VNNI instructions' exact integer sums).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;

use super::linear::{input_rows, run_tasks, with_f32, Runner, SharedOut};
use super::CResult;

/// Weights per block (`QK_K`).
const QK: usize = 256;

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// Activation rows per pass over a task's weight rows (they stay in the L1 cache).
const ACTS_PER_PASS: usize = 8;

/// Matrices with fewer weights than this are multiplied on the calling thread.
const SERIAL_BELOW: usize = 1 << 20;

/// The block formats with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QKind {
    Q8_0,
    /// Per 32 weights an f16 scale and 16 bytes of 4-bit codes, weight = d * (code - 8).
    Q4_0,
    Q4K,
    /// Q4_K's layout with a fifth bit per weight (32 bytes `qh` before the nibbles).
    Q5K,
    Q6K,
    /// ggml's IQ4_NL (which candle cannot hold): per 32 weights an f16 scale and 16 bytes of
    /// 4-bit indices into a fixed table of 16 int8 values.
    IQ4NL,
    /// ggml's IQ4_XS: IQ4_NL's indices in 256-weight blocks with an f16 scale and eight 6-bit
    /// sub-block scales (multiplied by plain Rust in every build: no hand-vectorized kernel yet).
    IQ4XS,
}

impl QKind {
    fn of(dtype: GgmlDType) -> Option<QKind> {
        match dtype {
            GgmlDType::Q8_0 => Some(QKind::Q8_0),
            GgmlDType::Q4_0 => Some(QKind::Q4_0),
            GgmlDType::Q4K => Some(QKind::Q4K),
            GgmlDType::Q5K => Some(QKind::Q5K),
            GgmlDType::Q6K => Some(QKind::Q6K),
            _ => None,
        }
    }

    /// Weights per block.
    pub fn block_len(self) -> usize {
        match self {
            QKind::Q8_0 | QKind::Q4_0 | QKind::IQ4NL => 32,
            QKind::Q4K | QKind::Q5K | QKind::Q6K | QKind::IQ4XS => QK,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            QKind::Q8_0 => 34,
            QKind::IQ4NL | QKind::Q4_0 => 18,
            QKind::Q5K => 176,
            QKind::Q4K => 144,
            QKind::Q6K => 210,
            QKind::IQ4XS => 136,
        }
    }

    /// Row lengths the kernels take (Q8_0, Q4_0 and IQ4_NL blocks go in quads, [`Acts::ql`]).
    fn row_multiple(self) -> usize {
        match self {
            QKind::Q8_0 | QKind::Q4_0 | QKind::IQ4NL => 128,
            QKind::Q4K | QKind::Q5K | QKind::Q6K | QKind::IQ4XS => QK,
        }
    }
}

/// A build of the kernels: the same results bit for bit, for different instruction sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Plain Rust: the definition the others are tested against (see `portable`).
    Portable,
    /// AVX2 + FMA + F16C (x86-64 from 2013 on, AMD from Zen 1).
    Avx2,
    /// The AVX2 build with AVX-VNNI's `vpdpbusd` (VEX) for the sums of 4 byte products of Q8_0,
    /// Q4_0, IQ4_NL and IQ4_XS (Intel client chips from Alder Lake, AMD from Zen 5); the k-quants
    /// scale pairs of products in 16 bits, which `vpdpbusd` cannot, and keep the AVX2 kernels.
    AvxVnni,
    /// AVX-512 F/BW/VNNI + AVX2 + FMA + F16C (Intel from Ice Lake, AMD from Zen 4).
    Avx512Vnni,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Portable, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avxvnni",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }

    /// How `run` names the projections this build multiplies.
    pub fn label(self) -> &'static str {
        match self {
            Isa::Portable => "quantized, portable",
            Isa::Avx2 => "quantized, AVX2",
            Isa::AvxVnni => "quantized, AVX-VNNI",
            Isa::Avx512Vnni => "quantized, AVX-512 VNNI",
        }
    }

    /// The widest build this CPU runs (the portable one where it runs none).
    fn widest() -> Isa {
        Isa::ALL.into_iter().rev().find(|i| i.supported()).unwrap_or(Isa::Portable)
    }

    /// Whether this CPU runs the build.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                Isa::Portable => true,
                Isa::Avx2 => avx2,
                Isa::AvxVnni => avx2 && has!("avxvnni"),
                Isa::Avx512Vnni => avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Portable
        }
    }
}

/// The build the runner uses: the widest this CPU runs, on x86-64 with at least AVX2; `None`
/// elsewhere (candle's kernels, vectorized for NEON, serve better than the portable build), and
/// when the environment sets `OURO_QUANT_KERNELS=candle` (benchmarks compare the two that way,
/// and it is the way out should a kernel ever be suspected). `OURO_QUANT_KERNELS=avxvnni`, `avx2` or
/// `portable` picks a narrower build (for comparisons; refused where the CPU lacks it).
/// Whether our kernels multiply a `cols`-column matrix of the type candle cannot hold (IQ4_NL,
/// IQ4_XS) from its blocks on this CPU; where not, the loader widens it to f32.
pub fn holds_own(t: crate::quant::ggml::GgmlType, cols: usize) -> bool {
    use crate::quant::ggml::GgmlType;
    let kind = match t {
        GgmlType::IQ4_NL => QKind::IQ4NL,
        GgmlType::IQ4_XS => QKind::IQ4XS,
        _ => return false,
    };
    selected().is_some() && cols.is_multiple_of(kind.row_multiple())
}

pub fn selected() -> Option<Isa> {
    static SEL: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *SEL.get_or_init(|| {
        let want = std::env::var("OURO_QUANT_KERNELS").unwrap_or_default();
        if want == "candle" {
            return None;
        }
        if let Some(isa) = Isa::ALL.into_iter().find(|i| i.name() == want) {
            return isa.supported().then_some(isa);
        }
        [Isa::Avx512Vnni, Isa::AvxVnni, Isa::Avx2].into_iter().find(|i| i.supported())
    })
}

/// Whether the runner multiplies Q8_0/Q4_0/Q4_K/Q5_K/Q6_K/IQ4_NL blocks with these kernels ([`selected`]).
pub fn available() -> bool {
    selected().is_some()
}

/// A Q8_0, Q4_K, Q6_K or IQ4_NL projection `[rows, cols]` on the CPU.
pub struct QuantMatrix {
    pub kind: QKind,
    pub rows: usize,
    pub cols: usize,
    /// The build that multiplies it ([`selected`], or another for comparisons).
    pub isa: Isa,
    q: Blocks,
}

/// Where a matrix's blocks live: in candle's tensor, or (for types candle lacks) in our buffer.
enum Blocks {
    Candle(Arc<QTensor>),
    Own(Vec<u8>),
}

impl Blocks {
    fn data(&self) -> CResult<std::borrow::Cow<'_, [u8]>> {
        match self {
            Blocks::Candle(q) => q.data(),
            Blocks::Own(v) => Ok(std::borrow::Cow::Borrowed(v)),
        }
    }
}

impl QuantMatrix {
    /// `None` when the tensor is not a 2-D CPU Q8_0/Q4_0/Q4_K/Q5_K/Q6_K tensor with whole blocks (quads
    /// of blocks for Q8_0 and Q4_0) per row, or no build is [`selected`]: the caller then uses candle.
    pub fn new(q: Arc<QTensor>) -> Option<Self> {
        Self::new_for(q, selected()?)
    }

    /// [`Self::new`] multiplied by the build `isa` (which this CPU must run to multiply).
    pub fn new_for(q: Arc<QTensor>, isa: Isa) -> Option<Self> {
        let kind = QKind::of(q.dtype())?;
        let (rows, cols) = q.shape().dims2().ok()?;
        if !q.device().is_cpu() || cols % kind.row_multiple() != 0 {
            return None;
        }
        // the blocks in huge pages (candle has written them already)
        if let Ok(d) = q.data() {
            super::pages::advise(d.as_ptr(), d.len(), true);
        }
        Some(QuantMatrix { kind, rows, cols, isa, q: Blocks::Candle(q) })
    }

    /// An IQ4_NL matrix from its blocks (rows in order, as a GGUF file holds them). The blocks
    /// come back when a row is not whole quads of blocks or no build is [`selected`]: the caller
    /// then multiplies a widened copy.
    pub fn iq4_nl(blocks: Vec<u8>, rows: usize, cols: usize) -> Result<Self, Vec<u8>> {
        match selected() {
            Some(isa) => Self::iq4_nl_for(blocks, rows, cols, isa),
            None => Err(blocks),
        }
    }

    /// [`Self::iq4_nl`] multiplied by the build `isa`.
    pub fn iq4_nl_for(blocks: Vec<u8>, rows: usize, cols: usize, isa: Isa) -> Result<Self, Vec<u8>> {
        Self::own_for(QKind::IQ4NL, blocks, rows, cols, isa)
    }

    /// An IQ4_XS matrix from its blocks, as [`Self::iq4_nl`].
    pub fn iq4_xs(blocks: Vec<u8>, rows: usize, cols: usize) -> Result<Self, Vec<u8>> {
        match selected() {
            Some(isa) => Self::own_for(QKind::IQ4XS, blocks, rows, cols, isa),
            None => Err(blocks),
        }
    }

    /// A matrix of a type candle lacks (IQ4_NL, IQ4_XS) from its blocks, multiplied by `isa`.
    pub fn own_for(kind: QKind, blocks: Vec<u8>, rows: usize, cols: usize, isa: Isa) -> Result<Self, Vec<u8>> {
        if !cols.is_multiple_of(kind.row_multiple()) || blocks.len() != rows * cols / kind.block_len() * kind.block_bytes() {
            return Err(blocks);
        }
        super::pages::advise(blocks.as_ptr(), blocks.len(), true);
        Ok(QuantMatrix { kind, rows, cols, isa, q: Blocks::Own(blocks) })
    }

    /// The same matrix multiplied by another build (for comparisons and tests).
    ///
    /// # Panics
    /// When this CPU does not run `isa`.
    pub fn with_isa(mut self, isa: Isa) -> Self {
        assert!(isa.supported(), "this CPU does not run the {} kernels", isa.name());
        self.isa = isa;
        self
    }

    /// candle's matmul of the same tensor (for comparisons).
    #[cfg(test)]
    pub fn candle(&self) -> CResult<candle_core::quantized::QMatMul> {
        match &self.q {
            Blocks::Candle(q) => candle_core::quantized::QMatMul::from_arc(q.clone()),
            Blocks::Own(_) => candle_core::bail!("candle has no {:?} tensor", self.kind),
        }
    }

    /// `x [n, cols] -> [n, rows]`.
    pub fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let n = input_rows(x, self.rows, self.cols)?;
        let acts = with_f32(x, |xs| self.quantize_rows(xs))?;
        let data = self.q.data()?;
        let mut out = vec![0f32; n * self.rows];
        self.matmul(&data, &acts, &mut out);
        Tensor::from_vec(out, (n, self.rows), x.device())
    }

    /// Activation rows (`cols` values each) quantized and laid out for this matrix's kernel; with
    /// the offset codes of [`Acts`]'s `qu` only where a pass will use them (the AVX-512 build's
    /// Q8_0 and IQ4_NL kernels, passes of [`ACTS_PER_PASS`] rows), not on every decode step.
    fn quantize_rows(&self, xs: &[f32]) -> Vec<Acts> {
        let offset = self.isa == Isa::Avx512Vnni
            && matches!(self.kind, QKind::Q8_0 | QKind::IQ4NL)
            && xs.len() >= ACTS_PER_PASS * self.cols;
        xs.chunks_exact(self.cols)
            .map(|x| if offset { self.activations(x).with_offset_codes() } else { self.activations(x) })
            .collect()
    }

    /// One activation row quantized and laid out for this matrix's kernel.
    fn activations(&self, x: &[f32]) -> Acts {
        match self.kind {
            QKind::Q8_0 | QKind::Q4_0 | QKind::IQ4NL => Acts::by_build(x, Scheme::Q8_0, self.isa),
            QKind::Q4K | QKind::Q5K => Acts::by_build(x, Scheme::Q8K, self.isa).in_nibble_order(),
            QKind::Q6K | QKind::IQ4XS => Acts::by_build(x, Scheme::Q8K, self.isa),
        }
    }

    /// `out [n, rows]`: every weight row against every quantized activation row, tasks of
    /// [`ROWS_PER_TASK`] weight rows spread over candle's CPU worker pool ([`super::linear::parallel`]).
    fn matmul(&self, data: &[u8], acts: &[Acts], out: &mut [f32]) {
        let on_pool = self.rows * self.cols * acts.len() >= SERIAL_BELOW;
        self.matmul_on(data, acts, out, &|tasks, task| run_tasks(tasks, task, on_pool))
    }

    /// [`Self::matmul`] with the tasks run by `run(number of tasks, task)`.
    fn matmul_on(&self, data: &[u8], acts: &[Acts], out: &mut [f32], run: &Runner<'_>) {
        let rb = self.cols / self.kind.block_len() * self.kind.block_bytes();
        assert_eq!(data.len(), rb * self.rows, "{:?} tensor bytes", self.kind);
        assert_eq!(out.len(), acts.len() * self.rows);
        let rows = self.rows;
        let dot = kernel(self.kind, self.isa);
        // each task writes only the columns of its own weight rows
        let dst = &SharedOut::new(out);
        let task = |t: usize| {
            let r0 = t * ROWS_PER_TASK;
            let r1 = (r0 + ROWS_PER_TASK).min(rows);
            let w = &data[r0 * rb..r1 * rb];
            let mut o = [0f32; ROWS_PER_TASK * ACTS_PER_PASS];
            for (p, pass) in acts.chunks(ACTS_PER_PASS).enumerate() {
                let o = &mut o[..pass.len() * (r1 - r0)];
                dot(w, pass, o);
                for (i, o) in o.chunks_exact(r1 - r0).enumerate() {
                    let row0 = (p * ACTS_PER_PASS + i) * rows + r0;
                    unsafe { dst.slice(row0, o.len()) }.copy_from_slice(o);
                }
            }
        };
        run(rows.div_ceil(ROWS_PER_TASK), &task);
    }
}

/// One activation row quantized for the kernels, as ggml does for these weight types: `Q8_K` for
/// Q4_K/Q6_K (per block of 256 an int8 code per value, the scale, and the sums of each 16 codes;
/// of each 32 for Q4_K, [`Acts::in_nibble_order`]),
/// `Q8_0` for Q8_0 (per block of 32 the codes and the scale; no sums).
pub struct Acts {
    qs: Vec<i8>,
    d: Vec<f32>,
    bsums: Vec<i16>,
    /// `Q8_0`, vector builds only (else empty): the codes in the lane order of the quad kernels
    /// ([`Acts::with_quad_lanes`]): per quad of blocks (128 codes) the first halves (codes 0-15)
    /// of its four blocks, then their second halves (16-31). A 512-bit register of the first
    /// halves and one of the second, or two 256-bit ones of each, then give every 32-bit lane
    /// the 8 products of one portable lane ([`portable::int8_quads`]).
    ql: Vec<i8>,
    /// `Q8_0`, vector builds only: each block's scale `d` four times (the four lanes of its
    /// block), so that a pair's scales are one 256-bit load in the AVX2 build. (The AVX-512
    /// build spreads four scales with one permute instead: reading 64 bytes per quad and row
    /// from here crowded the L1 cache, 65 against 73 GMAC/s on [2048 x 2048] x 128 rows.)
    dl: Vec<f32>,
    /// `Q8_0`, only for rows that the AVX-512 build's eight-row kernels take
    /// ([`Acts::with_offset_codes`], else empty): [`Self::ql`] plus 128 (`vpdpbusd` multiplies
    /// unsigned bytes by signed ones, so that build multiplies these by the weights as they are
    /// and takes 128 times the weights' sums off: the same integers without flipping signs per
    /// activation row).
    qu: Vec<u8>,
}

/// How activations are quantized: ggml's `Q8_K` (per 256, with sums of 16) or `Q8_0` (per 32).
#[derive(Debug, Clone, Copy)]
enum Scheme {
    Q8K,
    Q8_0,
}

impl Acts {
    /// As candle's `BlockQ8K::from_float`: the block's value of largest magnitude (the first one)
    /// maps to -127, codes rounded half away from zero and clamped to [-128, 127].
    pub fn q8k(x: &[f32]) -> Acts {
        Self::by_build(x, Scheme::Q8K, Isa::widest())
    }

    /// `x` quantized by `scheme` with the given build's quantizer (one this CPU runs): every
    /// build gives the portable definition's codes, sums and scales.
    fn by_build(x: &[f32], scheme: Scheme, isa: Isa) -> Acts {
        assert!(isa.supported(), "{} build on a CPU without its features", isa.name());
        #[cfg(target_arch = "x86_64")]
        // Safety: the build's features were checked above.
        unsafe {
            match (isa, scheme) {
                (Isa::Avx512Vnni, Scheme::Q8K) => return vnni::q8k(x),
                (Isa::Avx512Vnni, Scheme::Q8_0) => return vnni::q8_0_acts(x).with_quad_lanes(),
                (Isa::Avx2 | Isa::AvxVnni, Scheme::Q8K) => return avx2::q8k_acts(x),
                (Isa::Avx2 | Isa::AvxVnni, Scheme::Q8_0) => return avx2::q8_0_acts(x).with_quad_lanes(),
                (Isa::Portable, _) => {}
            }
        }
        match scheme {
            Scheme::Q8K => Self::q8k_portable(x),
            Scheme::Q8_0 => Self::q8_0_portable(x),
        }
    }

    /// An all-zero `Q8_K` row of `len` values (a zero block stays so: scale 0, codes and sums 0).
    fn q8k_zeroed(len: usize) -> Acts {
        Acts { qs: vec![0; len], d: vec![0.0; len / QK], bsums: vec![0; len / 16], ql: vec![], dl: vec![], qu: vec![] }
    }

    /// [`Self::q8k`] in plain Rust: the definition the AVX-512 version is tested against.
    fn q8k_portable(x: &[f32]) -> Acts {
        assert_eq!(x.len() % QK, 0);
        let mut q = Acts::q8k_zeroed(x.len());
        for (b, xb) in x.chunks_exact(QK).enumerate() {
            // the largest magnitude, then the first value that has it (16 lanes, so it vectorizes)
            let lanes = xb.chunks_exact(16).fold([0f32; 16], |mut m, c| {
                for (m, v) in m.iter_mut().zip(c) {
                    *m = m.max(v.abs());
                }
                m
            });
            let amax = lanes.iter().fold(0f32, |m, v| m.max(*v));
            if amax == 0.0 {
                continue;
            }
            let max = *xb.iter().find(|v| v.abs() == amax).expect("amax is one of the values");
            let iscale = -127f32 / max;
            let qs = &mut q.qs[b * QK..(b + 1) * QK];
            for (o, &v) in qs.iter_mut().zip(xb) {
                *o = (iscale * v).round().clamp(-128.0, 127.0) as i8;
            }
            for (s, c) in q.bsums[b * 16..(b + 1) * 16]
                .iter_mut()
                .zip(qs.chunks_exact(16))
            {
                *s = c.iter().map(|&v| v as i16).sum();
            }
            q.d[b] = 1.0 / iscale;
        }
        q
    }

    /// As candle's `BlockQ8_0::from_float`: scale = largest magnitude / 127, rounded to f16 as
    /// ggml stores it; codes = value / unrounded scale, rounded half away from zero.
    pub fn q8_0(x: &[f32]) -> Acts {
        Self::by_build(x, Scheme::Q8_0, Isa::widest())
    }

    /// [`Self::q8_0`] in plain Rust: the definition the AVX-512 version is tested against.
    fn q8_0_portable(x: &[f32]) -> Acts {
        assert_eq!(x.len() % 32, 0);
        let mut q = Acts {
            qs: vec![0; x.len()],
            d: vec![0.0; x.len() / 32],
            bsums: vec![],
            ql: vec![],
            dl: vec![],
            qu: vec![],
        };
        for ((xb, qs), d) in x.chunks_exact(32).zip(q.qs.chunks_exact_mut(32)).zip(&mut q.d) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            for (o, &v) in qs.iter_mut().zip(xb) {
                *o = (v * inv).round() as i8;
            }
            *d = half::f16::from_f32(scale).to_f32();
        }
        q
    }

    /// A `Q8_0` row with its codes and scales in the vector builds' lane order ([`Self::ql`],
    /// [`Self::dl`]); rows of whole quads only (the matrices' [`QKind::row_multiple`]), else
    /// none (the kernels refuse such rows).
    fn with_quad_lanes(mut self) -> Acts {
        if self.qs.len().is_multiple_of(128) {
            self.ql = vec![0; self.qs.len()];
            for (to, from) in self.ql.chunks_exact_mut(128).zip(self.qs.chunks_exact(128)) {
                for (c, to) in to.chunks_exact_mut(16).enumerate() {
                    // chunk c: block c % 4's first half (c < 4) or second half
                    to.copy_from_slice(&from[32 * (c % 4) + 16 * (c / 4)..][..16]);
                }
            }
            self.dl = self.d.iter().flat_map(|&d| [d; 4]).collect();
        }
        self
    }

    /// A `Q8_0` row with its offset codes (`qu`), which the AVX-512 build's eight-row kernels read.
    fn with_offset_codes(mut self) -> Acts {
        self.qu = self.ql.iter().map(|&v| v as u8 ^ 0x80).collect();
        self
    }

    /// The codes reordered for Q4_K's nibble layout: in each 128, values 32..64 and 64..96 swap
    /// places, so the 64 low nibbles of 64 bytes (weights 0..32 and 64..96 of the 128) meet their
    /// activations in one 64-byte load, and the high nibbles theirs in the next.
    ///
    /// The sums become sums of 32 (Q4_K's sub-blocks; at most 32 * 128 in magnitude), so that the
    /// kernel multiplies each min once.
    fn in_nibble_order(mut self) -> Acts {
        for g in self.qs.chunks_exact_mut(128) {
            let (a, b) = g[32..96].split_at_mut(32);
            a.swap_with_slice(b);
        }
        self.bsums = self.bsums.chunks_exact(2).map(|p| p[0] + p[1]).collect();
        self
    }

    /// The values the codes stand for (`d * q`).
    pub fn dequantize(&self) -> Vec<f32> {
        self.qs
            .iter()
            .enumerate()
            .map(|(i, &v)| self.d[i / (self.qs.len() / self.d.len())] * v as f32)
            .collect()
    }
}

/// The dot products of whole weight rows (their block bytes) with quantized activation rows:
/// `out[i * rows + r]` for activation `i` and weight row `r`.
type Dot = fn(&[u8], &[Acts], &mut [f32]);

fn kernel(kind: QKind, isa: Isa) -> Dot {
    assert!(isa.supported(), "the {} kernels on a CPU without them", isa.name());
    #[cfg(target_arch = "x86_64")]
    match isa {
        // (Q4_0 and Q5_K have no AVX-512 kernel of their own: the AVX2 one, which that CPU runs
        // and whose bits are the same)
        Isa::Avx512Vnni => {
            return match kind {
                QKind::Q8_0 => vnni::q8_0,
                QKind::Q4_0 => avx2::q4_0::<false>,
                QKind::Q4K => vnni::q4k,
                QKind::Q5K => avx2::q5k,
                QKind::Q6K => vnni::q6k,
                QKind::IQ4NL => vnni::iq4_nl,
                QKind::IQ4XS => avx2::iq4_xs::<false>,
            }
        }
        Isa::Avx2 => {
            return match kind {
                QKind::Q8_0 => avx2::q8_0::<false>,
                QKind::Q4_0 => avx2::q4_0::<false>,
                QKind::Q4K => avx2::q4k,
                QKind::Q5K => avx2::q5k,
                QKind::Q6K => avx2::q6k,
                QKind::IQ4NL => avx2::iq4_nl::<false>,
                QKind::IQ4XS => avx2::iq4_xs::<false>,
            }
        }
        Isa::AvxVnni => {
            return match kind {
                QKind::Q8_0 => avx2::q8_0::<true>,
                QKind::Q4_0 => avx2::q4_0::<true>,
                QKind::Q4K => avx2::q4k,
                QKind::Q5K => avx2::q5k,
                QKind::Q6K => avx2::q6k,
                QKind::IQ4NL => avx2::iq4_nl::<true>,
                QKind::IQ4XS => avx2::iq4_xs::<true>,
            }
        }
        Isa::Portable => {}
    }
    match kind {
        QKind::Q8_0 => portable::q8_0,
        QKind::Q4_0 => portable::q4_0,
        QKind::Q4K => portable::q4k,
        QKind::Q5K => portable::q5k,
        QKind::Q6K => portable::q6k,
        QKind::IQ4NL => portable::iq4_nl,
        QKind::IQ4XS => portable::iq4_xs,
    }
}

/// Q4_0's codes stand for `code - 8`: IQ4_NL's kernels with this table in place of ggml's.
const Q4_0_VALUES: [i8; 16] = [-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7];

/// Activation rows per kernel call (AVX-512): each block's weights are unpacked once for all
/// of them.
#[cfg(target_arch = "x86_64")]
const ACTS: usize = 4;

/// Runs `kernel` over every weight row and every group of `N` activations, then one by one
/// (every build; the portable one takes them one by one).
#[inline(always)]
fn each<const N: usize>(
    w: &[u8],
    block: usize,
    acts: &[Acts],
    out: &mut [f32],
    one: impl Fn(&[u8], [&Acts; 1]) -> [f32; 1],
    four: impl Fn(&[u8], [&Acts; N]) -> [f32; N],
) {
    // blocks per row and bytes per row; every activation row has the same shape
    let nb = acts.first().map_or(0, |a| a.d.len());
    let rb = nb * block;
    let (k, sums) = acts.first().map_or((0, 0), |a| (a.qs.len(), a.bsums.len()));
    assert!(acts.iter().all(|a| a.d.len() == nb && a.qs.len() == k && a.bsums.len() == sums));
    // the kernels index the activations by block without bounds checks
    assert!(match block {
        34 | 18 => nb.is_multiple_of(4) && k == nb * 32,
        144 | 176 => k == nb * QK && sums == nb * 8,
        _ => k == nb * QK && sums == nb * 16,
    });
    let rows = w.len().checked_div(rb).unwrap_or(0);
    assert_eq!(w.len(), rb * rows);
    assert_eq!(out.len(), rows * acts.len());
    for (r, row) in w.chunks_exact(rb.max(1)).enumerate() {
        let mut i = 0;
        while i + N <= acts.len() {
            let v = four(row, std::array::from_fn(|k| &acts[i + k]));
            for (k, v) in v.into_iter().enumerate() {
                out[(i + k) * rows + r] = v;
            }
            i += N;
        }
        for i in i..acts.len() {
            out[i * rows + r] = one(row, [&acts[i]])[0];
        }
    }
}

/// The quad kernels read [`Acts::ql`] and [`Acts::dl`] without bounds checks.
#[cfg(target_arch = "x86_64")]
fn have_quad_lanes(acts: &[Acts]) {
    assert!(
        acts.iter().all(|a| a.ql.len() == a.qs.len() && a.dl.len() == 4 * a.d.len()),
        "Q8_0 activations without the quad lane order"
    );
}

/// The kernels' definition in plain Rust, which every other build equals bit for bit: per row,
/// 16 float lanes, each the fused multiply-add of its exact integer block sums with the block's
/// scale, block after block; then the lanes summed in one fixed order ([`hsum16`]). For the
/// k-quants lane `j` of a 64-weight step holds weights `4j..4j + 4` (the layout of one 512-bit
/// register, or of two 256-bit ones); for Q8_0, Q4_0 and IQ4_NL see [`int8_quads`]. It also runs where no vector build does (tests; nothing at run time chooses it
/// over candle's kernels, which are vectorized).
mod portable {
    use super::{Acts, QK};
    use half::f16;

    /// The sum of 16 lanes: halves, then quarters, then [`hsum4`].
    pub fn hsum16(a: &[f32; 16]) -> f32 {
        let l: [f32; 8] = std::array::from_fn(|i| a[i] + a[i + 8]);
        hsum4(&std::array::from_fn(|i| l[i] + l[i + 4]))
    }

    /// The sum of 4 lanes as `(0 + 2) + (1 + 3)`.
    pub fn hsum4(m: &[f32; 4]) -> f32 {
        (m[0] + m[2]) + (m[1] + m[3])
    }

    pub(super) fn f16_at(p: &[u8], i: usize) -> f32 {
        f16::from_le_bytes([p[i], p[i + 1]]).to_f32()
    }

    /// Every weight row against every activation row, one by one: `out[i * rows + r]`.
    fn each(w: &[u8], block: usize, acts: &[Acts], out: &mut [f32], row: impl Fn(&[u8], &Acts) -> f32) {
        super::each::<1>(w, block, acts, out, |w, [a]| [row(w, a)], |w, [a]| [row(w, a)])
    }

    /// Quads of 32-weight blocks (each block `block` bytes: `d` (f16) first; `weights(block
    /// bytes)` gives its 32 int8 weights in order). Lane `L` holds block `L / 4` of the quad,
    /// weights `4g..4g + 4` and `16 + 4g..16 + 4g + 4` (`g = L % 4`): their 8 products summed
    /// exactly (at most 8 * 128 * 127 in magnitude: exact in f32), scaled by the block's
    /// `d_w * d_x` and multiply-added into the lane, quad after quad; then [`hsum16`].
    pub(super) fn int8_quads(w: &[u8], a: &Acts, block: usize, weights: impl Fn(&[u8]) -> [i8; 32]) -> f32 {
        let mut acc = [0f32; 16];
        for (q, quad) in w.chunks_exact(4 * block).enumerate() {
            let blocks: [&[u8]; 4] = std::array::from_fn(|i| &quad[block * i..block * (i + 1)]);
            let wv: [[i8; 32]; 4] = blocks.map(&weights);
            for (l, acc) in acc.iter_mut().enumerate() {
                let (i, g) = (l / 4, l % 4);
                let b = 4 * q + i;
                let x = &a.qs[32 * b..32 * b + 32];
                let dot: i32 = (4 * g..4 * g + 4).chain(16 + 4 * g..16 + 4 * g + 4).map(|j| wv[i][j] as i32 * x[j] as i32).sum();
                *acc = (dot as f32).mul_add(f16_at(blocks[i], 0) * a.d[b], *acc);
            }
        }
        hsum16(&acc)
    }

    pub fn q8_0(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        each(w, 34, acts, out, |w, a| int8_quads(w, a, 34, |p| std::array::from_fn(|i| p[2 + i] as i8)))
    }

    pub fn iq4_nl(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        table4(w, acts, out, &crate::quant::iq4nl::KVALUES)
    }

    pub fn iq4_xs(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        each(w, 136, acts, out, iq4_xs_row)
    }

    /// IQ4_XS against `Q8_K` activations (as ggml's `vec_dot_iq4_xs_q8_K`): per 32-weight
    /// sub-block the exact integer dot product times its scale `ls - 32` (at most 2^24 in
    /// magnitude: exact in f32), one lane per sub-block, multiply-added with `d_w * d_x`; the 8
    /// lanes summed as `((0+4) + (2+6)) + ((1+5) + (3+7))`. The vector builds compile this same
    /// function for their instruction set.
    #[inline(always)]
    pub fn iq4_xs_row(w: &[u8], a: &Acts) -> f32 {
        let t = &crate::quant::iq4nl::KVALUES;
        let mut acc = [0f32; 8];
        for (b, blk) in w.chunks_exact(136).enumerate() {
            let s = f16_at(blk, 0) * a.d[b];
            let sh = u16::from_le_bytes([blk[2], blk[3]]);
            let x = &a.qs[QK * b..QK * (b + 1)];
            for (ib, acc) in acc.iter_mut().enumerate() {
                let ls = ((blk[4 + ib / 2] >> (4 * (ib % 2))) & 15) as i32 | ((((sh >> (2 * ib)) & 3) as i32) << 4);
                let qs = &blk[8 + 16 * ib..8 + 16 * (ib + 1)];
                let xs = &x[32 * ib..32 * (ib + 1)];
                let mut sum = 0i32;
                for j in 0..16 {
                    sum += t[(qs[j] & 15) as usize] as i32 * xs[j] as i32 + t[(qs[j] >> 4) as usize] as i32 * xs[j + 16] as i32;
                }
                *acc = ((sum * (ls - 32)) as f32).mul_add(s, *acc);
            }
        }
        ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
    }

    pub fn q4_0(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        table4(w, acts, out, &super::Q4_0_VALUES)
    }

    /// Blocks of `d` (f16) and 16 bytes of 4-bit indices into `values`: byte `j` holds weight `j`
    /// (low nibble) and `16 + j` (high).
    fn table4(w: &[u8], acts: &[Acts], out: &mut [f32], values: &[i8; 16]) {
        each(w, 18, acts, out, |w, a| {
            int8_quads(w, a, 18, |p| {
                std::array::from_fn(|k| {
                    let byte = p[2 + k % 16];
                    values[if k < 16 { byte & 15 } else { byte >> 4 } as usize]
                })
            })
        })
    }

    /// Q4_K's 6-bit scales and mins of its 8 sub-blocks (ggml's `get_scale_min_k4`).
    pub fn q4k_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
        let mut sc = [0u8; 8];
        let mut m = [0u8; 8];
        for j in 0..4 {
            sc[j] = s[j] & 63;
            m[j] = s[j + 4] & 63;
            sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
            m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
        }
        (sc, m)
    }

    /// Q4_K against activations in nibble order: step `c` (64 weights) is the low (`c` even) or
    /// high nibbles of bytes `64 (c / 2)..+64`, sub-blocks `4 (c / 2) + c % 2` (lanes 0-7) and
    /// that + 2 (lanes 8-15). The mins, 4 lanes of pairs of sub-blocks, are subtracted at the end.
    pub fn q4k(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        each(w, 144, acts, out, |w, a| q4k5k_row(w, a, false))
    }

    /// Q5_K: as Q4_K (block `d`, `dmin`, 12 bytes of scales and mins, then 32 bytes `qh`, then the
    /// nibbles), the code's fifth bit being bit `2g + t` of `qh[l]` for the weight at `l` of the
    /// 32-byte group `g` (`t`: 0 low nibble, 1 high).
    pub fn q5k(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        each(w, 176, acts, out, |w, a| q4k5k_row(w, a, true))
    }

    fn q4k5k_row(w: &[u8], a: &Acts, five: bool) -> f32 {
        let bb = if five { 176 } else { 144 };
        let mut acc = [0f32; 16];
        let mut acc_min = [0f32; 4];
        for (b, p) in w.chunks_exact(bb).enumerate() {
            let (sc, m) = q4k_scales_mins(&p[4..16]);
            let dx = f16_at(p, 0) * a.d[b];
            let dmx = f16_at(p, 2) * a.d[b];
            let bs = &a.bsums[8 * b..8 * b + 8];
            for (i, acc) in acc_min.iter_mut().enumerate() {
                let v = m[2 * i] as i32 * bs[2 * i] as i32 + m[2 * i + 1] as i32 * bs[2 * i + 1] as i32;
                *acc = (v as f32).mul_add(dmx, *acc);
            }
            let (qh, q) = if five { (&p[16..48], &p[48..]) } else { (&p[..0], &p[16..]) };
            let x = &a.qs[b * QK..(b + 1) * QK];
            let mut isum = [0i32; 16];
            for c in 0..4 {
                let (h, t) = (c / 2, c % 2);
                for i in 0..64 {
                    let mut code = (q[64 * h + i] >> (4 * t)) & 15;
                    if five {
                        let g = 2 * h + i / 32;
                        code |= ((qh[i % 32] >> (2 * g + t)) & 1) << 4;
                    }
                    let s = sc[4 * h + t + 2 * (i / 32)];
                    isum[i / 4] += code as i32 * x[64 * c + i] as i32 * s as i32;
                }
            }
            for (acc, v) in acc.iter_mut().zip(isum) {
                *acc = (v as f32).mul_add(dx, *acc);
            }
        }
        hsum16(&acc) - hsum4(&acc_min)
    }

    /// Q6_K: step `c` (64 weights, in order), sub-blocks of 16 (`4c + j / 4` for lane `j`); the
    /// -32 offset, `32 * scale * (sum of a sub-block's codes)` for pairs of sub-blocks, comes off
    /// lanes 0-7 of the block's integer sums.
    pub fn q6k(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        each(w, 210, acts, out, |w, a| {
            let mut acc = [0f32; 16];
            for (b, p) in w.chunks_exact(210).enumerate() {
                let sc: [i32; 16] = std::array::from_fn(|i| p[192 + i] as i8 as i32);
                let dx = f16_at(p, 208) * a.d[b];
                let x = &a.qs[b * QK..(b + 1) * QK];
                let mut isum = [0i32; 16];
                for c in 0..4 {
                    let (n, t) = (c / 2, c % 2);
                    for i in 0..64 {
                        let ql = p[64 * n + i];
                        let nib = if t == 0 { ql & 15 } else { ql >> 4 };
                        let s = (64 * t + i) / 32;
                        let hb = (p[128 + 32 * n + i % 32] >> (2 * s)) & 3;
                        let code = (nib | hb << 4) as i32;
                        isum[i / 4] += code * x[64 * c + i] as i32 * sc[4 * c + i / 16];
                    }
                }
                let bs = &a.bsums[16 * b..16 * b + 16];
                for (i, v) in isum.iter_mut().take(8).enumerate() {
                    *v -= 32 * (sc[2 * i] * bs[2 * i] as i32 + sc[2 * i + 1] * bs[2 * i + 1] as i32);
                }
                for (acc, v) in acc.iter_mut().zip(isum) {
                    *acc = (v as f32).mul_add(dx, *acc);
                }
            }
            hsum16(&acc)
        })
    }
}

/// The kernels for CPUs with AVX2, FMA and F16C but no AVX-512 (AMD Zen 1-3, Intel before Ice
/// Lake, Intel client chips): the AVX-512 build's arithmetic in 256-bit halves (lanes 0-7 of a
/// 64-weight step from its first 32 bytes, lanes 8-15 from the second), `vpmaddubsw` +
/// `vpmaddwd` where that build has `vpdpbusd`/`vpdpwssd` (the same exact integer sums), and the
/// same float operations lane for lane, so the bits equal [`portable`]'s.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::x86::{hsum128, prefetch, read_u32};
    use super::{each, have_quad_lanes, Acts, ACTS, QK};
    use std::arch::x86_64::*;

    /// [`Acts::q8_0_portable`] in AVX2, value for value: four 8-lane vectors per block, the
    /// rounding of [`super::vnni::q8k`] (`trunc(v + copysign(0.5 - 2^-25, v))`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_0_acts(x: &[f32]) -> Acts {
        assert_eq!(x.len() % 32, 0);
        let nb = x.len() / 32;
        let mut q = Acts { qs: vec![0; x.len()], d: vec![0.0; nb], bsums: vec![], ql: vec![], dl: vec![], qu: vec![] };
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5 - 1.0 / (1u32 << 25) as f32);
        let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
        // bytes of the two packs' lanes back in value order
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..nb {
            let xb = x.as_ptr().add(32 * b);
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xb.add(8 * i)));
            // NaN lanes leave the maximum as it was, as `f32::max` ignores NaN
            let m = v.iter().fold(_mm256_setzero_ps(), |m, v| _mm256_max_ps(_mm256_andnot_ps(sign, *v), m));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let scale = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m))) / 127.0;
            let inv = _mm256_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
            let codes = v.map(|v| {
                let v = _mm256_mul_ps(v, inv);
                let r = _mm256_add_ps(v, _mm256_or_ps(half, _mm256_and_ps(v, sign)));
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(r);
                // `as i8` saturates, and takes NaN to 0
                let r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
                _mm256_cvttps_epi32(_mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v)))
            });
            let words = (_mm256_packs_epi32(codes[0], codes[1]), _mm256_packs_epi32(codes[2], codes[3]));
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words.0, words.1), order);
            _mm256_storeu_si256(q.qs.as_mut_ptr().add(32 * b) as *mut __m256i, bytes);
            q.d[b] = half::f16::from_f32(scale).to_f32();
        }
        q
    }

    /// [`Acts::q8k_portable`] in AVX2, value for value (the rounding of [`super::vnni::q8k`]).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8k_acts(x: &[f32]) -> Acts {
        assert_eq!(x.len() % QK, 0);
        let mut q = Acts::q8k_zeroed(x.len());
        let sign = _mm256_set1_ps(-0.0);
        let half = _mm256_set1_ps(0.5 - 1.0 / (1u32 << 25) as f32);
        let (lo, hi) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for b in 0..x.len() / QK {
            let xb = x.as_ptr().add(b * QK);
            // NaN lanes leave the maximum as it was, as `f32::max` ignores NaN
            let m = (0..QK / 8).fold(_mm256_setzero_ps(), |m, c| _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xb.add(8 * c))), m));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
            if amax == 0.0 {
                continue;
            }
            let am = _mm256_set1_ps(amax);
            let first = (0..QK / 8)
                .find_map(|c| {
                    let v = _mm256_loadu_ps(xb.add(8 * c));
                    let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign, v), am));
                    (hit != 0).then(|| 8 * c + hit.trailing_zeros() as usize)
                })
                .expect("amax is one of the values");
            let iscale = -127f32 / *xb.add(first);
            let s = _mm256_set1_ps(iscale);
            let qs = q.qs.as_mut_ptr().add(b * QK);
            for c in 0..QK / 16 {
                let codes: [__m256i; 2] = std::array::from_fn(|h| {
                    let v = _mm256_mul_ps(s, _mm256_loadu_ps(xb.add(16 * c + 8 * h)));
                    let r = _mm256_add_ps(v, _mm256_or_ps(half, _mm256_and_ps(v, sign)));
                    let r = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(r);
                    // clamped, and NaN to 0 as `as i8` takes it
                    let r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);
                    _mm256_cvttps_epi32(_mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(v, v)))
                });
                let words = _mm256_packs_epi32(codes[0], codes[1]);
                let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words, words), order);
                _mm_storeu_si128(qs.add(16 * c) as *mut __m128i, _mm256_castsi256_si128(bytes));
                let sum = _mm256_add_epi32(codes[0], codes[1]);
                let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256::<1>(sum));
                let sum = _mm_add_epi32(sum, _mm_unpackhi_epi64(sum, sum));
                let sum = _mm_add_epi32(sum, _mm_shuffle_epi32::<1>(sum));
                q.bsums[b * 16 + c] = _mm_cvtsi128_si32(sum) as i16;
            }
            q.d[b] = 1.0 / iscale;
        }
        q
    }

    /// Lanes 0-7 in `lo`, 8-15 in `hi`, summed as [`super::portable::hsum16`] does.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn hsum16(lo: __m256, hi: __m256) -> f32 {
        let s = _mm256_add_ps(lo, hi);
        hsum128(_mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s)))
    }

    // Safety (all): `Isa::Avx2.supported()` was checked before these were handed out; `each`
    // checks that every activation row has the weight rows' number of blocks.
    // (`V`: the AVX-VNNI build, which only `Isa::AvxVnni` hands out, after detecting it)
    pub fn q8_0<const V: bool>(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        have_quad_lanes(acts);
        each::<ACTS>(w, 34, acts, out, |w, a| unsafe { q8_0_impl::<V, 1>(w, a) }, |w, a| unsafe { q8_0_impl::<V, ACTS>(w, a) })
    }

    pub fn iq4_nl<const V: bool>(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        have_quad_lanes(acts);
        let t = &crate::quant::iq4nl::KVALUES;
        each::<ACTS>(w, 18, acts, out, |w, a| unsafe { table4_impl::<V, 1>(w, a, t) }, |w, a| unsafe { table4_impl::<V, ACTS>(w, a, t) })
    }

    pub fn q4_0<const V: bool>(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        have_quad_lanes(acts);
        let t = &super::Q4_0_VALUES;
        each::<ACTS>(w, 18, acts, out, |w, a| unsafe { table4_impl::<V, 1>(w, a, t) }, |w, a| unsafe { table4_impl::<V, ACTS>(w, a, t) })
    }

    pub fn q4k(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        each::<AVX2_ACTS>(w, 144, acts, out, |w, a| unsafe { q4k_impl::<false, 1>(w, a) }, |w, a| unsafe { q4k_impl::<false, AVX2_ACTS>(w, a) })
    }

    pub fn q5k(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        each::<AVX2_ACTS>(w, 176, acts, out, |w, a| unsafe { q4k_impl::<true, 1>(w, a) }, |w, a| unsafe { q4k_impl::<true, AVX2_ACTS>(w, a) })
    }

    pub fn q6k(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        each::<AVX2_ACTS>(w, 210, acts, out, |w, a| unsafe { q6k_impl(w, a) }, |w, a| unsafe { q6k_impl(w, a) })
    }

    pub fn iq4_xs<const V: bool>(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        each::<AVX2_ACTS>(w, 136, acts, out, |w, a| unsafe { iq4_xs_impl::<V, 1>(w, a) }, |w, a| unsafe { iq4_xs_impl::<V, AVX2_ACTS>(w, a) })
    }

    /// Sums of 4 byte products (`u` unsigned, `s` signed) added to the 32-bit lanes of `acc`:
    /// AVX-VNNI's `vpdpbusd` with `V`, else `vpmaddubsw` (pairs in 16 bits; the callers' operands
    /// never saturate them) and `vpmaddwd` by ones. The same exact integers either way.
    /// Safety: with `V` the CPU must have AVX-VNNI (`Isa::AvxVnni`).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn dot4<const V: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        if V {
            let mut acc = acc;
            // the VEX encoding (AVX-VNNI), not AVX-512 VNNI's EVEX one; written as assembly so that
            // these functions need not be compiled a second time with `avxvnni` enabled
            std::arch::asm!("{{vex}} vpdpbusd {acc}, {u}, {s}", acc = inout(ymm_reg) acc, u = in(ymm_reg) u, s = in(ymm_reg) s,
                options(pure, nomem, nostack, preserves_flags));
            acc
        } else {
            _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
        }
    }

    /// IQ4_XS as [`super::portable::iq4_xs_row`]: each 32-weight sub-block's indices looked up
    /// in the 16-entry table by one byte shuffle (low nibbles are weights 0-15, high 16-31, the
    /// activations' order), unpacked once per block for all `A` activation rows; `|w|` times the
    /// activations with `w`'s sign in 16 bits, then 8 sums of 4 in 32 bits per sub-block, reduced
    /// by horizontal adds to one exact integer sum per sub-block in lane `ib`; times `ls - 32`,
    /// converted and multiply-added with `d_w * d_x` lane by lane, as the portable row does.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn iq4_xs_impl<const V: bool, const A: usize>(w: &[u8], a: [&Acts; A]) -> [f32; A] {
        let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(crate::quant::iq4nl::KVALUES.as_ptr() as *const __m128i));
        let nibble = _mm_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); A];
        let mut wv = [_mm256_setzero_si256(); 8];
        let mut wa = [_mm256_setzero_si256(); 8];
        for (b, blk) in w.chunks_exact(136).enumerate() {
            let p = blk.as_ptr();
            prefetch(p, 136);
            let dw = super::portable::f16_at(blk, 0);
            let sh = u16::from_le_bytes([blk[2], blk[3]]);
            let ls: [i32; 8] = std::array::from_fn(|ib| {
                (((blk[4 + ib / 2] >> (4 * (ib % 2))) & 15) as i32 | ((((sh >> (2 * ib)) & 3) as i32) << 4)) - 32
            });
            let ls = _mm256_loadu_si256(ls.as_ptr() as *const __m256i);
            for ib in 0..8 {
                let raw = _mm_loadu_si128(p.add(8 + 16 * ib) as *const __m128i);
                let idx = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(raw), nibble), _mm_and_si128(raw, nibble));
                wv[ib] = _mm256_shuffle_epi8(table, idx);
                wa[ib] = _mm256_abs_epi8(wv[ib]);
            }
            for k in 0..A {
                let x = a[k].qs.as_ptr().add(QK * b);
                let dot = |ib: usize| {
                    let xs = _mm256_loadu_si256(x.add(32 * ib) as *const __m256i);
                    dot4::<V>(_mm256_setzero_si256(), wa[ib], _mm256_sign_epi8(xs, wv[ib]))
                };
                // lane ib of `sums`: sub-block ib's 8 partial sums added (integers: exact in any order)
                let h01 = _mm256_hadd_epi32(dot(0), dot(1));
                let h23 = _mm256_hadd_epi32(dot(2), dot(3));
                let h45 = _mm256_hadd_epi32(dot(4), dot(5));
                let h67 = _mm256_hadd_epi32(dot(6), dot(7));
                let e = _mm256_hadd_epi32(h01, h23);
                let f = _mm256_hadd_epi32(h45, h67);
                let sums = _mm256_add_epi32(_mm256_permute2x128_si256::<0x20>(e, f), _mm256_permute2x128_si256::<0x31>(e, f));
                let s = _mm256_set1_ps(dw * a[k].d[b]);
                acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_mullo_epi32(sums, ls)), s, acc[k]);
            }
        }
        // ((0+4) + (2+6)) + ((1+5) + (3+7)), as the portable row
        std::array::from_fn(|k| hsum128(_mm_add_ps(_mm256_castps256_ps128(acc[k]), _mm256_extractf128_ps::<1>(acc[k]))))
    }

    /// Quads of 32-weight blocks (`block` bytes each, its f16 scale first), as
    /// [`super::portable::int8_quads`], in two steps of a pair of blocks: `weights(p)` gives the
    /// pair at `p` as two registers, the first halves (weights 0-15) of both blocks, then the
    /// second halves, which meet the activations' [`Acts::ql`] order. `|w|` times the activations
    /// with `w`'s sign, pairs of products in 16 bits (at most 2 * 128 * 127, so `vpmaddubsw`
    /// never saturates), then sums of 4 in 32 bits, the two halves' added: lanes 0-3 the first
    /// block's, 4-7 the second's, the portable lanes 0-7 of the quad (first pair, `lo`) and 8-15
    /// (second pair, `hi`). Per pair and activation row: ten vector operations besides the loads.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn int8_quads<const V: bool, const A: usize>(
        w: &[u8],
        a: [&Acts; A],
        block: usize,
        weights: impl Fn(*const u8) -> (__m256i, __m256i),
    ) -> [f32; A] {
        let zero = _mm256_setzero_si256();
        let mut acc = [[_mm256_setzero_ps(); A]; 2];
        for (q, chunk) in w.chunks_exact(4 * block).enumerate() {
            let p = chunk.as_ptr();
            prefetch(p, 4 * block);
            let dws = quad_scales(p, block);
            for (h, acc) in acc.iter_mut().enumerate() {
                let dw = if h == 0 { dws.0 } else { dws.1 };
                let (w0, w1) = weights(p.add(2 * block * h));
                let (a0, a1) = (_mm256_abs_epi8(w0), _mm256_abs_epi8(w1));
                for k in 0..A {
                    let x = a[k].ql.as_ptr().add(128 * q + 32 * h);
                    let x0 = _mm256_loadu_si256(x as *const __m256i);
                    let x1 = _mm256_loadu_si256(x.add(64) as *const __m256i);
                    let dot = dot4::<V>(dot4::<V>(zero, a0, _mm256_sign_epi8(x0, w0)), a1, _mm256_sign_epi8(x1, w1));
                    let s = _mm256_mul_ps(dw, _mm256_loadu_ps(a[k].dl.as_ptr().add(16 * q + 8 * h)));
                    acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[k]);
                }
            }
        }
        std::array::from_fn(|k| hsum16(acc[0][k], acc[1][k]))
    }

    /// The f16 scales of a quad's blocks (`block` bytes each, scale first), widened and each
    /// spread over its block's four lanes: the first pair's, then the second's.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn quad_scales(p: *const u8, block: usize) -> (__m256, __m256) {
        let h = |i: usize| std::ptr::read_unaligned(p.add(block * i) as *const u16) as i64;
        let d = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_cvtsi64_si128(h(0) | h(1) << 16 | h(2) << 32 | h(3) << 48)));
        (
            _mm256_permutevar8x32_ps(d, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1)),
            _mm256_permutevar8x32_ps(d, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3)),
        )
    }

    /// Block: `d` (f16), 32 int8 weights.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_impl<const V: bool, const A: usize>(w: &[u8], a: [&Acts; A]) -> [f32; A] {
        int8_quads::<V, A>(w, a, 34, |p| {
            let (w0, w1) = (_mm256_loadu_si256(p.add(2) as *const __m256i), _mm256_loadu_si256(p.add(36) as *const __m256i));
            (_mm256_permute2x128_si256::<0x20>(w0, w1), _mm256_permute2x128_si256::<0x31>(w0, w1))
        })
    }

    /// IQ4_NL (and Q4_0): a block's 16 bytes of indices (low nibbles weights 0-15, high 16-31:
    /// a pair's low nibbles are its first halves) looked up in the 16-entry `values` by one byte
    /// shuffle, then as Q8_0.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn table4_impl<const V: bool, const A: usize>(w: &[u8], a: [&Acts; A], values: &[i8; 16]) -> [f32; A] {
        let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(values.as_ptr() as *const __m128i));
        let nibble = _mm256_set1_epi8(0x0F);
        int8_quads::<V, A>(w, a, 18, |p| {
            let raw = _mm256_set_m128i(_mm_loadu_si128(p.add(20) as *const __m128i), _mm_loadu_si128(p.add(2) as *const __m128i));
            let low = _mm256_and_si256(raw, nibble);
            let high = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nibble);
            (_mm256_shuffle_epi8(table, low), _mm256_shuffle_epi8(table, high))
        })
    }

    /// Activation rows per call of the AVX2 k-quant kernels: their integer sums (2 registers
    /// each) and one step's codes and scales fit the 16 registers.
    pub const AVX2_ACTS: usize = 4;

    /// Each byte's bit `k` moved to bit 4 (other bits of the byte: garbage; the caller masks).
    /// 16-bit shifts by at most 4 left or 3 right bring bit 4 only from the same byte.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn bit_to_4(v: __m256i, k: usize) -> __m256i {
        if k <= 4 {
            _mm256_sll_epi16(v, _mm_cvtsi32_si128(4 - k as i32))
        } else {
            _mm256_srl_epi16(v, _mm_cvtsi32_si128(k as i32 - 4))
        }
    }

    /// The shuffle that copies 16-bit lane `i` of a 128-bit half into all 8 of its lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn lane16(i: usize) -> __m256i {
        _mm256_set1_epi16((((2 * i + 1) << 8) | (2 * i)) as i16)
    }

    /// Q4_K, and Q5_K with `FIVE` (see [`super::portable::q4k`] and `q5k` for the lanes).
    /// Step-major: each 32 bytes of nibbles (two steps' halves) are unpacked once and multiplied
    /// by every activation row.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4k_impl<const FIVE: bool, const A: usize>(w: &[u8], a: [&Acts; A]) -> [f32; A] {
        let bb = if FIVE { 176 } else { 144 };
        let nibble = _mm256_set1_epi8(0x0F);
        let bit4 = _mm256_set1_epi8(0x10);
        let mut lo = [_mm256_setzero_ps(); A];
        let mut hi = [_mm256_setzero_ps(); A];
        let mut acc_min = [_mm_setzero_ps(); A];
        // the float sums stay in memory (their address escapes): with four activation rows they
        // would take 12 of the 16 registers the integer work needs (measured: prefill +15%)
        if A > 1 {
            std::hint::black_box((&mut lo, &mut hi, &mut acc_min));
        }
        for (b, blk) in w.chunks_exact(bb).enumerate() {
            let p = blk.as_ptr();
            prefetch(p, bb);
            let dd = _mm_cvtph_ps(_mm_loadu_si32(p));
            let (s0, s1, s2) = (read_u32(p.add(4)), read_u32(p.add(8)), read_u32(p.add(12)));
            let sc_lo = s0 & 0x3f3f3f3f;
            let m_lo = s1 & 0x3f3f3f3f;
            let sc_hi = (s2 & 0x0f0f0f0f) | (((s0 >> 6) & 0x03030303) << 4);
            let m_hi = ((s2 >> 4) & 0x0f0f0f0f) | (((s1 >> 6) & 0x03030303) << 4);
            // Q5_K's fifth bits: bit 2g + t of byte l for group g, nibble t
            let qh = if FIVE { _mm256_loadu_si256(p.add(16) as *const __m256i) } else { _mm256_setzero_si256() };
            // the 8 scales as 16-bit lanes, in both halves
            let scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128((sc_lo as u64 | (sc_hi as u64) << 32) as i64)));
            let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((m_lo as u64 | (m_hi as u64) << 32) as i64));
            let q = p.add(if FIVE { 48 } else { 16 });
            let mut isum = [[_mm256_setzero_si256(); 2]; A];
            for h in 0..2 {
                for e in 0..2 {
                    let raw = _mm256_loadu_si256(q.add(64 * h + 32 * e) as *const __m256i);
                    let mut c0 = _mm256_and_si256(raw, nibble);
                    let mut c1 = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), nibble);
                    if FIVE {
                        let g = 2 * h + e;
                        c0 = _mm256_or_si256(c0, _mm256_and_si256(bit_to_4(qh, 2 * g), bit4));
                        c1 = _mm256_or_si256(c1, _mm256_and_si256(bit_to_4(qh, 2 * g + 1), bit4));
                    }
                    let s0 = _mm256_shuffle_epi8(scales, lane16(4 * h + 2 * e));
                    let s1 = _mm256_shuffle_epi8(scales, lane16(4 * h + 1 + 2 * e));
                    for k in 0..A {
                        let x = a[k].qs.as_ptr().add(b * QK + 128 * h + 32 * e);
                        let x0 = _mm256_loadu_si256(x as *const __m256i);
                        let x1 = _mm256_loadu_si256(x.add(64) as *const __m256i);
                        let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(c0, x0), s0);
                        let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(c1, x1), s1);
                        isum[k][e] = _mm256_add_epi32(isum[k][e], _mm256_add_epi32(p0, p1));
                    }
                }
            }
            for k in 0..A {
                let dx = _mm_mul_ps(dd, _mm_broadcast_ss(a[k].d.get_unchecked(b)));
                let bsums = _mm_loadu_si128(a[k].bsums.as_ptr().add(b * 8) as *const __m128i);
                acc_min[k] = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(mins, bsums)), _mm_shuffle_ps::<0x55>(dx, dx), acc_min[k]);
                let d = _mm256_broadcastss_ps(dx);
                lo[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[k][0]), d, lo[k]);
                hi[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[k][1]), d, hi[k]);
            }
        }
        std::array::from_fn(|k| hsum16(lo[k], hi[k]) - hsum128(acc_min[k]))
    }

    /// Q6_K (see [`super::portable::q6k`] for the lanes), step-major as [`q4k_impl`].
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6k_impl<const A: usize>(w: &[u8], a: [&Acts; A]) -> [f32; A] {
        let nibble = _mm256_set1_epi8(0x0F);
        let high = _mm256_set1_epi8(0x30);
        let mut lo = [_mm256_setzero_ps(); A];
        let mut hi = [_mm256_setzero_ps(); A];
        // in memory, as in `q4k_impl`
        if A > 1 {
            std::hint::black_box((&mut lo, &mut hi));
        }
        for (b, blk) in w.chunks_exact(210).enumerate() {
            let p = blk.as_ptr();
            prefetch(p, 210);
            let d = _mm_cvtph_ps(_mm_loadu_si16(p.add(208)));
            let raw_sc = _mm_loadu_si128(p.add(192) as *const __m128i);
            let sc16 = _mm256_cvtepi8_epi16(raw_sc);
            // scales 0-7 and 8-15 as 16-bit lanes, each in both halves
            let sc_a = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(raw_sc));
            let sc_b = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_srli_si128::<8>(raw_sc)));
            let mut isum = [[_mm256_setzero_si256(); 2]; A];
            for n in 0..2 {
                let qh = _mm256_loadu_si256(p.add(128 + 32 * n) as *const __m256i);
                let hb = |v: __m256i| _mm256_and_si256(v, high);
                let sc = if n == 0 { sc_a } else { sc_b };
                for e in 0..2 {
                    let ql = _mm256_loadu_si256(p.add(64 * n + 32 * e) as *const __m256i);
                    // step 2n (low nibbles) and 2n + 1 (high), half e
                    let (h0, h1) = if e == 0 {
                        (hb(_mm256_slli_epi16::<4>(qh)), hb(qh))
                    } else {
                        (hb(_mm256_slli_epi16::<2>(qh)), hb(_mm256_srli_epi16::<2>(qh)))
                    };
                    let c0 = _mm256_or_si256(_mm256_and_si256(ql, nibble), h0);
                    let c1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql), nibble), h1);
                    // 16-bit lanes 0-7 take sub-block 4c + 2e (c = 2n + t), lanes 8-15 the next:
                    // within this n's 8 scales, 2e (+1) for t = 0 and 4 + 2e (+1) for t = 1
                    let s0 = _mm256_shuffle_epi8(sc, two_lanes(2 * e));
                    let s1 = _mm256_shuffle_epi8(sc, two_lanes(4 + 2 * e));
                    for k in 0..A {
                        let x = a[k].qs.as_ptr().add(b * QK + 128 * n + 32 * e);
                        let x0 = _mm256_loadu_si256(x as *const __m256i);
                        let x1 = _mm256_loadu_si256(x.add(64) as *const __m256i);
                        let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(c0, x0), s0);
                        let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(c1, x1), s1);
                        isum[k][e] = _mm256_add_epi32(isum[k][e], _mm256_add_epi32(p0, p1));
                    }
                }
            }
            for k in 0..A {
                let dx = _mm_mul_ss(d, _mm_load_ss(a[k].d.get_unchecked(b)));
                let bsums = _mm256_loadu_si256(a[k].bsums.as_ptr().add(b * 16) as *const __m256i);
                let off = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, bsums));
                let dv = _mm256_broadcastss_ps(dx);
                lo[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(isum[k][0], off)), dv, lo[k]);
                hi[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[k][1]), dv, hi[k]);
            }
        }
        std::array::from_fn(|k| hsum16(lo[k], hi[k]))
    }

    /// The shuffle that puts 16-bit lane `i` of a 128-bit half into lanes 0-7 of the 256-bit
    /// result and lane `i + 1` into lanes 8-15 (both halves hold the same 8 lanes).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn two_lanes(i: usize) -> __m256i {
        let a = (((2 * i + 1) << 8) | (2 * i)) as i16;
        let b = (((2 * i + 3) << 8) | (2 * i + 2)) as i16;
        _mm256_set_m128i(_mm_set1_epi16(b), _mm_set1_epi16(a))
    }
}

/// Helpers of the x86 builds.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `(s0 + s2) + (s1 + s3)`, as [`super::portable::hsum4`].
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    pub unsafe fn hsum128(s: __m128) -> f32 {
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    #[inline(always)]
    pub unsafe fn read_u32(p: *const u8) -> u32 {
        u32::from_le(std::ptr::read_unaligned(p as *const u32))
    }

    /// Bytes ahead of the current block that are prefetched: rows are contiguous, so this runs
    /// into the following rows (a prefetch past the end of the matrix does not fault).
    const PREFETCH: usize = 4096;

    /// Prefetches the cache lines of the block `PREFETCH` bytes after the one at `p`.
    #[inline(always)]
    pub unsafe fn prefetch(p: *const u8, block: usize) {
        let mut o = 0;
        while o < block {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + o) as *const i8);
            o += 64;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::x86::{hsum128, prefetch, read_u32};
    use super::{each, have_quad_lanes, Acts, ACTS, QK};
    use std::arch::x86_64::*;

    /// The 16 lanes summed as [`super::portable::hsum16`] does (halves, quarters, then pairs).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn hsum16(a: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(a);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
        let s = _mm256_add_ps(lo, hi);
        hsum128(_mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s)))
    }

    /// Lane `i` of 32 16-bit lanes takes scale `base + i / per` (a permute index).
    const fn spread(base: u16, per: u16) -> [u16; 32] {
        let mut a = [0u16; 32];
        let mut i = 0;
        while i < 32 {
            a[i] = base + i as u16 / per;
            i += 1;
        }
        a
    }

    /// Lanes 0..16 take scale `a`, lanes 16..32 scale `b`.
    const fn two(a: u16, b: u16) -> [u16; 32] {
        let mut v = [a; 32];
        let mut i = 16;
        while i < 32 {
            v[i] = b;
            i += 1;
        }
        v
    }

    /// Q4_K: in half `h` (128 weights, 64 bytes), the low nibbles are sub-blocks 4h and 4h + 2,
    /// the high nibbles 4h + 1 and 4h + 3.
    static Q4K_SCALE_IDX: [[u16; 32]; 4] = [two(0, 2), two(1, 3), two(4, 6), two(5, 7)];
    /// Q6_K: half `n`, part `p` (64 weights) is sub-blocks 8n + 4p .. + 4, 16 weights each.
    static Q6K_SCALE_IDX: [[u16; 32]; 4] = [spread(0, 8), spread(4, 8), spread(8, 8), spread(12, 8)];

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn load_idx(t: &[[u16; 32]; 4]) -> [__m512i; 4] {
        t.map(|a| _mm512_loadu_si512(a.as_ptr() as *const _))
    }

    /// `acc + ` pairwise products of 16-bit lanes. LLVM splits the intrinsic into `vpmaddwd` +
    /// `vpaddd` (two instructions); the instruction itself is one.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
        let mut acc = acc;
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
        acc
    }

    /// Per 16-bit lane shift counts: `lo` in the lower half of the register, `hi` in the upper.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn counts(lo: i16, hi: i16) -> __m512i {
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_set1_epi16(lo)), _mm256_set1_epi16(hi))
    }

    // Safety (both): `available()` was checked before these were handed out; `each` checks that
    // every activation row has the weight rows' number of blocks.
    pub fn q4k(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        each::<ACTS>(w, 144, acts, out, |w, a| unsafe { q4k_impl(w, a) }, |w, a| unsafe { q4k_impl(w, a) })
    }

    pub fn q6k(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        each::<ACTS>(w, 210, acts, out, |w, a| unsafe { q6k_impl(w, a) }, |w, a| unsafe { q6k_impl(w, a) })
    }

    /// [`Acts::q8k_portable`] in AVX-512, value for value (the compiler turned the portable
    /// loop's `as i8` into one scalar conversion and insert per value: 3% of decode time).
    /// Rounding half away from zero is `trunc(v + copysign(0.5 - 2^-25, v))`: the sum rounds up
    /// to the next integer exactly when `v`'s fraction is at least one half.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn q8k(x: &[f32]) -> Acts {
        assert_eq!(x.len() % QK, 0);
        let nb = x.len() / QK;
        let mut q = Acts::q8k_zeroed(x.len());
        let sign = _mm512_set1_ps(-0.0);
        let half = _mm512_set1_ps(0.5 - 1.0 / (1u32 << 25) as f32);
        let (lo, hi) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
        for b in 0..nb {
            let xb = x.as_ptr().add(b * QK);
            let mut m = _mm512_setzero_ps();
            for c in 0..16 {
                // NaN lanes leave `m` as it was, as `f32::max` ignores NaN
                m = _mm512_max_ps(_mm512_andnot_ps(sign, _mm512_loadu_ps(xb.add(16 * c))), m);
            }
            let amax = _mm512_reduce_max_ps(m);
            if amax == 0.0 {
                continue;
            }
            let am = _mm512_set1_ps(amax);
            let first = (0..16)
                .find_map(|c| {
                    let v = _mm512_loadu_ps(xb.add(16 * c));
                    let hit = _mm512_cmpeq_ps_mask(_mm512_andnot_ps(sign, v), am);
                    (hit != 0).then(|| 16 * c + hit.trailing_zeros() as usize)
                })
                .expect("amax is one of the values");
            let iscale = -127f32 / *xb.add(first);
            let s = _mm512_set1_ps(iscale);
            let qs = q.qs.as_mut_ptr().add(b * QK);
            for c in 0..16 {
                let v = _mm512_mul_ps(s, _mm512_loadu_ps(xb.add(16 * c)));
                let r = _mm512_add_ps(v, _mm512_or_ps(half, _mm512_and_ps(v, sign)));
                let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(r);
                let r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
                // NaN converts to 0, as `as i8` does
                let i = _mm512_maskz_cvttps_epi32(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v), r);
                _mm_storeu_si128(qs.add(16 * c) as *mut __m128i, _mm512_cvtepi32_epi8(i));
                q.bsums[b * 16 + c] = _mm512_reduce_add_epi32(i) as i16;
            }
            q.d[b] = 1.0 / iscale;
        }
        q
    }

    /// [`Acts::q8_0_portable`] in AVX-512, value for value (the portable loop called `roundf`
    /// once per value: 3.7% of a 128-token Q8_0 prefill of the 1.4B model). Rounding as in
    /// [`q8k`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn q8_0_acts(x: &[f32]) -> Acts {
        assert_eq!(x.len() % 32, 0);
        let nb = x.len() / 32;
        let mut q = Acts { qs: vec![0; x.len()], d: vec![0.0; nb], bsums: vec![], ql: vec![], dl: vec![], qu: vec![] };
        let sign = _mm512_set1_ps(-0.0);
        let half = _mm512_set1_ps(0.5 - 1.0 / (1u32 << 25) as f32);
        let (lo, hi) = (_mm512_set1_ps(-128.0), _mm512_set1_ps(127.0));
        for b in 0..nb {
            let xb = x.as_ptr().add(32 * b);
            let v = [_mm512_loadu_ps(xb), _mm512_loadu_ps(xb.add(16))];
            // NaN lanes leave the maximum as it was, as `f32::max` ignores NaN
            let m = _mm512_max_ps(_mm512_andnot_ps(sign, v[1]), _mm512_max_ps(_mm512_andnot_ps(sign, v[0]), _mm512_setzero_ps()));
            let scale = _mm512_reduce_max_ps(m) / 127.0;
            let inv = _mm512_set1_ps(if scale != 0.0 { 1.0 / scale } else { 0.0 });
            let qs = q.qs.as_mut_ptr().add(32 * b);
            for (c, v) in v.into_iter().enumerate() {
                let v = _mm512_mul_ps(v, inv);
                let r = _mm512_add_ps(v, _mm512_or_ps(half, _mm512_and_ps(v, sign)));
                let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(r);
                // `as i8` saturates, and takes NaN to 0
                let r = _mm512_min_ps(_mm512_max_ps(r, lo), hi);
                let i = _mm512_maskz_cvttps_epi32(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(v, v), r);
                _mm_storeu_si128(qs.add(16 * c) as *mut __m128i, _mm512_cvtepi32_epi8(i));
            }
            q.d[b] = half::f16::from_f32(scale).to_f32();
        }
        q
    }

    /// Activation rows per call of the Q8_0 and IQ4_NL kernels ([`int8_quads_many`]).
    const MANY: usize = 8;

    /// The eight-row kernels read the offset codes without bounds checks.
    fn have_offset_codes(acts: &[Acts]) {
        have_quad_lanes(acts);
        assert!(acts.len() < MANY || acts.iter().all(|a| a.qu.len() == a.qs.len()), "Q8_0 activations without offset codes");
    }

    pub fn q8_0(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        have_offset_codes(acts);
        each::<MANY>(w, 34, acts, out, |w, a| unsafe { q8_0_impl(w, a) }, |w, a| unsafe { q8_0_impl(w, a) })
    }

    /// Quads of 32-weight blocks, as [`super::portable::int8_quads`] (`block` bytes each, its
    /// f16 scale first): `weights(p)` gives the quad at `p` as two registers, the first halves
    /// (weights 0-15) of its four blocks, then the second halves ([`Acts::ql`]'s order), so that
    /// 32-bit lane `L` sums the 8 products of portable lane `L` over two `vpdpbusd`. Two ways to
    /// the same bits: one activation row (decode) flips the activations' signs, several
    /// (prefill) move the flip's work to the weights, once for all rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn int8_quads<const A: usize>(
        w: &[u8],
        a: [&Acts; A],
        block: usize,
        weights: impl Fn(*const u8) -> (__m512i, __m512i),
    ) -> [f32; A] {
        if A == 1 {
            int8_quads_one(w, a, block, weights)
        } else {
            int8_quads_many(w, a, block, weights)
        }
    }

    /// The f16 scales of a quad's blocks (`block` bytes each, scale first), widened and each
    /// spread over its block's four lanes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn quad_scales(p: *const u8, block: usize) -> __m512 {
        let h = |i: usize| std::ptr::read_unaligned(p.add(block * i) as *const u16) as i64;
        spread4(_mm_cvtph_ps(_mm_cvtsi64_si128(h(0) | h(1) << 16 | h(2) << 32 | h(3) << 48)))
    }

    /// Four scales, each over four lanes (a quad's lane order).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn spread4(d: __m128) -> __m512 {
        _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), _mm512_castps128_ps512(d))
    }

    /// [`int8_quads`] for one activation row: `|w|` times the activations with `w`'s sign
    /// (`vpdpbusd` multiplies unsigned by signed bytes). Activation codes lie in [-127, 127], so
    /// the sign flip cannot overflow.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn int8_quads_one<const A: usize>(
        w: &[u8],
        a: [&Acts; A],
        block: usize,
        weights: impl Fn(*const u8) -> (__m512i, __m512i),
    ) -> [f32; A] {
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); A];
        for (q, chunk) in w.chunks_exact(4 * block).enumerate() {
            let p = chunk.as_ptr();
            prefetch(p, 4 * block);
            let dw = quad_scales(p, block);
            let (w0, w1) = weights(p);
            let (a0, a1) = (_mm512_abs_epi8(w0), _mm512_abs_epi8(w1));
            let (n0, n1) = (_mm512_movepi8_mask(w0), _mm512_movepi8_mask(w1));
            for k in 0..A {
                let x = a[k].ql.as_ptr().add(128 * q);
                let x0 = _mm512_loadu_si512(x as *const _);
                let x1 = _mm512_loadu_si512(x.add(64) as *const _);
                let s0 = _mm512_mask_sub_epi8(x0, n0, zero, x0);
                let s1 = _mm512_mask_sub_epi8(x1, n1, zero, x1);
                let dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, a0, s0), a1, s1);
                let s = _mm512_mul_ps(dw, _mm512_loadu_ps(a[k].dl.as_ptr().add(16 * q)));
                acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[k]);
            }
        }
        std::array::from_fn(|k| hsum16(acc[k]))
    }

    /// [`int8_quads`] for several activation rows: the activation codes plus 128 ([`Acts`]'s
    /// `qu`) times the weights as they are, summed onto -128 times the weights' sums (computed
    /// once per quad for all rows), give the same exact integers. Per quad and row: five vector
    /// operations besides the loads (the pair kernel before it took eight for the same work:
    /// the [2048 x 2048] Q8_0 product with 128 rows, one thread, 75 GMAC/s against 53).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    #[inline]
    unsafe fn int8_quads_many<const A: usize>(
        w: &[u8],
        a: [&Acts; A],
        block: usize,
        weights: impl Fn(*const u8) -> (__m512i, __m512i),
    ) -> [f32; A] {
        let c128 = _mm512_set1_epi8(-128);
        let zero = _mm512_setzero_si512();
        let mut acc = [_mm512_setzero_ps(); A];
        for (q, chunk) in w.chunks_exact(4 * block).enumerate() {
            let p = chunk.as_ptr();
            prefetch(p, 4 * block);
            let dw = quad_scales(p, block);
            let (w0, w1) = weights(p);
            // -128 times the sums of 8 weights: (x + 128) w summed from there is x w exactly
            let off = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, c128, w0), c128, w1));
            for k in 0..A {
                let x = a[k].qu.as_ptr().add(128 * q);
                let x0 = _mm512_loadu_si512(x as *const _);
                let x1 = _mm512_loadu_si512(x.add(64) as *const _);
                let dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(off, x0, w0), x1, w1);
                let s = _mm512_mul_ps(dw, spread4(_mm_loadu_ps(a[k].d.as_ptr().add(4 * q))));
                acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[k]);
            }
        }
        std::array::from_fn(|k| hsum16(acc[k]))
    }

    /// Block: `d` (f16), 32 int8 weights ([`int8_quads`], 136 bytes a quad): two blocks' bytes
    /// per 512-bit register, their 128-bit halves regrouped.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn q8_0_impl<const A: usize>(w: &[u8], a: [&Acts; A]) -> [f32; A] {
        int8_quads(w, a, 34, |p| {
            let two = |o: usize| {
                _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(p.add(o + 2) as *const __m256i)),
                    _mm256_loadu_si256(p.add(o + 36) as *const __m256i),
                )
            };
            let (ab, cd) = (two(0), two(68));
            (_mm512_shuffle_i64x2::<0x88>(ab, cd), _mm512_shuffle_i64x2::<0xDD>(ab, cd))
        })
    }

    pub fn iq4_nl(w: &[u8], acts: &[Acts], out: &mut [f32]) {
        have_offset_codes(acts);
        each::<MANY>(w, 18, acts, out, |w, a| unsafe { iq4_nl_impl(w, a) }, |w, a| unsafe { iq4_nl_impl(w, a) })
    }

    /// Block: `d` (f16), 16 bytes of indices into [`KVALUES`](crate::quant::iq4nl::KVALUES):
    /// byte `j` holds weight `j` (low nibble) and `16 + j` (high). A quad (72 bytes): the four
    /// blocks' index bytes in one register, whose low nibbles are the first halves and high
    /// nibbles the second ([`int8_quads`]), each looked up in the table with one byte shuffle.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn iq4_nl_impl<const A: usize>(w: &[u8], a: [&Acts; A]) -> [f32; A] {
        let table = _mm512_broadcast_i32x4(_mm_loadu_si128(crate::quant::iq4nl::KVALUES.as_ptr() as *const __m128i));
        let nibble = _mm512_set1_epi8(0x0F);
        int8_quads(w, a, 18, |p| {
            let two = |o: usize| _mm256_set_m128i(_mm_loadu_si128(p.add(o + 20) as *const __m128i), _mm_loadu_si128(p.add(o + 2) as *const __m128i));
            let raw = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(two(0)), two(36));
            let low = _mm512_and_si512(raw, nibble);
            let high = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), nibble);
            (_mm512_shuffle_epi8(table, low), _mm512_shuffle_epi8(table, high))
        })
    }

    /// Block: `d` (f16), `dmin` (f16), 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32,
    /// 128 bytes of nibbles (byte `32j + l`: weight `64j + l` low, `64j + 32 + l` high).
    /// Weight = d * scale * q - dmin * min.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn q4k_impl<const A: usize>(w: &[u8], a: [&Acts; A]) -> [f32; A] {
        let nibble = _mm512_set1_epi8(0x0F);
        let idx = load_idx(&Q4K_SCALE_IDX);
        let mut acc = [_mm512_setzero_ps(); A];
        let mut acc_min = [_mm_setzero_ps(); A];
        for (b, blk) in w.chunks_exact(144).enumerate() {
            let p = blk.as_ptr();
            prefetch(p, 144);
            // d and dmin (f16) widened straight from memory
            let dd = _mm_cvtph_ps(_mm_loadu_si32(p));
            // 6-bit scales and mins: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and
            // 4-7 (mins); 4-7 from the nibbles of bytes 8-11 and the top 2 bits of bytes 0-7
            let (s0, s1, s2) = (read_u32(p.add(4)), read_u32(p.add(8)), read_u32(p.add(12)));
            let sc_lo = s0 & 0x3f3f3f3f;
            let m_lo = s1 & 0x3f3f3f3f;
            let sc_hi = (s2 & 0x0f0f0f0f) | (((s0 >> 6) & 0x03030303) << 4);
            let m_hi = ((s2 >> 4) & 0x0f0f0f0f) | (((s1 >> 6) & 0x03030303) << 4);
            // one 64-bit move each into a vector register (the 32-bit insert cost two more uops)
            let sc = sc_lo as u64 | (sc_hi as u64) << 32;
            let scales = _mm512_zextsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
            let mins = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((m_lo as u64 | (m_hi as u64) << 32) as i64));
            let q = p.add(16);
            // the block's 256 codes in 4 registers, in nibble order, and each one's scales
            let mut codes = [_mm512_setzero_si512(); 4];
            let mut sc = [_mm512_setzero_si512(); 4];
            for h in 0..2 {
                let raw = _mm512_loadu_si512(q.add(64 * h) as *const _);
                codes[2 * h] = _mm512_and_si512(raw, nibble);
                codes[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), nibble);
                sc[2 * h] = _mm512_permutexvar_epi16(idx[2 * h], scales);
                sc[2 * h + 1] = _mm512_permutexvar_epi16(idx[2 * h + 1], scales);
            }
            for k in 0..A {
                // [d * xd, dmin * xd, ..]
                let dx = _mm_mul_ps(dd, _mm_broadcast_ss(a[k].d.get_unchecked(b)));
                // sum over sub-blocks of min * (sum of its 32 activation codes)
                let bsums = _mm_loadu_si128(a[k].bsums.as_ptr().add(b * 8) as *const __m128i);
                acc_min[k] = _mm_fmadd_ps(
                    _mm_cvtepi32_ps(_mm_madd_epi16(mins, bsums)),
                    _mm_shuffle_ps::<0x55>(dx, dx),
                    acc_min[k],
                );
                // activations in nibble order (`Acts::in_nibble_order`)
                let x = a[k].qs.as_ptr().add(b * QK);
                let mut isum = _mm512_setzero_si512();
                for c in 0..4 {
                    let xs = _mm512_loadu_si512(x.add(64 * c) as *const _);
                    isum = dpwssd(isum, _mm512_maddubs_epi16(codes[c], xs), sc[c]);
                }
                acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_broadcastss_ps(dx), acc[k]);
            }
        }
        std::array::from_fn(|k| hsum16(acc[k]) - hsum128(acc_min[k]))
    }

    /// Block: 128 bytes of low nibbles (`ql`), 64 bytes of 2-bit highs (`qh`), 16 int8 scales
    /// (sub-blocks of 16), `d` (f16). In half `n` (128 weights): weight `l` (l < 64) is the low
    /// nibble of `ql[64n + l]`, weight `64 + l` its high nibble; the high bits of weight `32s + l`
    /// (l < 32) are bits `2s, 2s + 1` of `qh[32n + l]`. Weight = d * scale * (q - 32).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn q6k_impl<const A: usize>(w: &[u8], a: [&Acts; A]) -> [f32; A] {
        let nibble = _mm512_set1_epi8(0x0F);
        let high = _mm512_set1_epi8(0x30);
        // weights 0-31 take qh bits 0-1 (<< 4), 32-63 bits 2-3 (<< 2), 64-95 bits 4-5, 96-127 bits 6-7 (>> 2)
        let left = counts(4, 2);
        let right = counts(0, 2);
        let idx = load_idx(&Q6K_SCALE_IDX);
        let mut acc = [_mm512_setzero_ps(); A];
        for (b, blk) in w.chunks_exact(210).enumerate() {
            let p = blk.as_ptr();
            prefetch(p, 210);
            // d (f16) widened straight from memory, in lane 0
            let d = _mm_cvtph_ps(_mm_loadu_si16(p.add(208)));
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192) as *const __m128i));
            let scales = _mm512_zextsi256_si512(sc16);
            // the block's 256 codes (0..63) in 4 registers, in order, and each one's scales
            let mut codes = [_mm512_setzero_si512(); 4];
            let mut sc = [_mm512_setzero_si512(); 4];
            for n in 0..2 {
                let ql = _mm512_loadu_si512(p.add(64 * n) as *const _);
                let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(128 + 32 * n) as *const __m256i));
                let lo = _mm512_and_si512(ql, nibble);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(ql), nibble);
                // (shifted qh & 0x30) | nibbles
                codes[2 * n] = _mm512_ternarylogic_epi32::<0xEA>(_mm512_sllv_epi16(qh, left), high, lo);
                codes[2 * n + 1] = _mm512_ternarylogic_epi32::<0xEA>(_mm512_srlv_epi16(qh, right), high, hi);
                sc[2 * n] = _mm512_permutexvar_epi16(idx[2 * n], scales);
                sc[2 * n + 1] = _mm512_permutexvar_epi16(idx[2 * n + 1], scales);
            }
            for k in 0..A {
                let dx = _mm_mul_ss(d, _mm_load_ss(a[k].d.get_unchecked(b)));
                // the -32 offset: 32 * sum over sub-blocks of scale * (sum of its 16 codes),
                // taken from the integer sum (both at most 2^28 in magnitude)
                let bsums = _mm256_loadu_si256(a[k].bsums.as_ptr().add(b * 16) as *const __m256i);
                let off = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, bsums));
                let x = a[k].qs.as_ptr().add(b * QK);
                let mut isum = _mm512_setzero_si512();
                for c in 0..4 {
                    let xs = _mm512_loadu_si512(x.add(64 * c) as *const _);
                    isum = dpwssd(isum, _mm512_maddubs_epi16(codes[c], xs), sc[c]);
                }
                let isum = _mm512_sub_epi32(isum, _mm512_zextsi256_si512(off));
                acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_broadcastss_ps(dx), acc[k]);
            }
        }
        std::array::from_fn(|k| hsum16(acc[k]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    use crate::model::test_values as lcg;

    /// Weights with outliers and a zero row, quantized by candle.
    fn weights(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> Arc<QTensor> {
        let mut w = lcg(seed, rows * cols);
        for (i, v) in w.iter_mut().enumerate() {
            if i % 97 == 5 {
                *v *= 20.0;
            }
        }
        w[cols..2 * cols].fill(0.0);
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        Arc::new(QTensor::quantize(&t, dtype).unwrap())
    }

    /// The same weights as [`weights`] in IQ4_NL (our ggml-exact quantizer), and their
    /// dequantized rows.
    fn iq4_nl_weights(rows: usize, cols: usize, seed: u64) -> (QuantMatrix, Vec<Vec<f32>>) {
        let q = weights(GgmlDType::F32, rows, cols, seed);
        let w = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut blocks = vec![];
        crate::quant::iq4nl::quantize_iq4_nl(&w, None, &mut blocks);
        let mut dense = vec![];
        crate::quant::iq4nl::dequantize_iq4_nl(&blocks, &mut dense);
        let m = QuantMatrix::iq4_nl_for(blocks, rows, cols, Isa::Portable).ok().expect("whole pairs of blocks");
        (m, dense.chunks_exact(cols).map(|r| r.to_vec()).collect())
    }

    /// Activations with an all-zero block, an all-negative one and a large outlier.
    fn activations(n: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut x = lcg(seed, n * cols);
        x[..QK.min(cols)].fill(0.0);
        if cols >= 2 * QK {
            for v in &mut x[QK..2 * QK] {
                *v = -v.abs() - 0.1;
            }
        }
        x[cols / 2] = 300.0;
        x
    }

    /// Blocks of random bytes (every code, scale and min pattern, Q8_0's -128 that candle's
    /// quantizer never writes) with finite f16 block scales, as a matrix of `isa`.
    fn random_matrix(kind: QKind, rows: usize, cols: usize, seed: u64, isa: Isa) -> (QuantMatrix, Vec<Vec<f32>>) {
        let bb = kind.block_bytes();
        let mut bytes: Vec<u8> = lcg(seed, rows * cols / kind.block_len() * bb).iter().map(|v| (v.to_bits() >> 7) as u8).collect();
        let scales: &[usize] = match kind {
            QKind::Q8_0 | QKind::Q4_0 | QKind::IQ4NL | QKind::IQ4XS => &[0],
            QKind::Q4K | QKind::Q5K => &[0, 2],
            QKind::Q6K => &[208],
        };
        for (b, blk) in bytes.chunks_exact_mut(bb).enumerate() {
            for (k, &o) in scales.iter().enumerate() {
                let v = half::f16::from_f32(0.001 + 0.02 * ((b * 7 + k * 3) % 11) as f32 * if b % 5 == 0 { -1.0 } else { 1.0 });
                blk[o..o + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
        let dtype = match kind {
            QKind::Q8_0 => GgmlDType::Q8_0,
            QKind::Q4_0 => GgmlDType::Q4_0,
            QKind::Q4K => GgmlDType::Q4K,
            QKind::Q5K => GgmlDType::Q5K,
            QKind::Q6K => GgmlDType::Q6K,
            QKind::IQ4NL | QKind::IQ4XS => {
                let mut dense = vec![];
                if kind == QKind::IQ4NL {
                    crate::quant::iq4nl::dequantize_iq4_nl(&bytes, &mut dense);
                } else {
                    crate::quant::iq4nl::dequantize_iq4_xs(&bytes, &mut dense);
                }
                let m = QuantMatrix::own_for(kind, bytes, rows, cols, isa).ok().expect("whole blocks");
                return (m, dense.chunks_exact(cols).map(|r| r.to_vec()).collect());
            }
        };
        let t = candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &bytes, vec![rows, cols], &Device::Cpu).unwrap();
        let dense = t.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        (QuantMatrix::new_for(Arc::new(t), isa).expect("whole blocks"), dense)
    }

    /// Weights quantized from floats (candle's quantizer; ours for IQ4_NL) or random blocks.
    fn matrix(kind: QKind, random: bool, rows: usize, cols: usize, seed: u64, isa: Isa) -> (QuantMatrix, Vec<Vec<f32>>) {
        if random {
            return random_matrix(kind, rows, cols, seed, isa);
        }
        let dtype = match kind {
            QKind::Q8_0 => GgmlDType::Q8_0,
            QKind::Q4_0 => GgmlDType::Q4_0,
            QKind::Q4K => GgmlDType::Q4K,
            QKind::Q5K => GgmlDType::Q5K,
            QKind::Q6K => GgmlDType::Q6K,
            QKind::IQ4NL => {
                let (m, dense) = iq4_nl_weights(rows, cols, seed);
                return (m.with_isa(isa), dense);
            }
            QKind::IQ4XS => {
                let q = weights(GgmlDType::F32, rows, cols, seed);
                let w = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut blocks = vec![];
                crate::quant::iq4nl::quantize_iq4_xs(&w, None, &mut blocks);
                let mut dense = vec![];
                crate::quant::iq4nl::dequantize_iq4_xs(&blocks, &mut dense);
                let m = QuantMatrix::own_for(kind, blocks, rows, cols, isa).ok().expect("whole blocks");
                return (m, dense.chunks_exact(cols).map(|r| r.to_vec()).collect());
            }
        };
        let q = weights(dtype, rows, cols, seed);
        let dense = q.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        (QuantMatrix::new_for(q, isa).expect("CPU tensor"), dense)
    }

    const KINDS: [QKind; 7] = [QKind::Q8_0, QKind::Q4_0, QKind::Q4K, QKind::Q5K, QKind::Q6K, QKind::IQ4NL, QKind::IQ4XS];

    /// The portable definition against an f64 dot product of the dequantized weights (candle's
    /// dequantizer; ours, ggml's table and layout, for IQ4_NL) with the values the quantized
    /// activations stand for, and close to candle's own quantized matmul. The tolerance is
    /// relative to the sum of the terms' magnitudes: a Q4_K weight is `d*sc*q - dmin*m`, a
    /// difference of two rounded products, and both sides sum in f32 (seen: 3e-6 against the f64
    /// sum, 1.6e-6 against candle). A wrong nibble, scale or min is off by whole weights. Every
    /// other build equals this one bit for bit ([`every_build_equals_the_portable_definition`]).
    #[test]
    fn kernels_match_dequantized_f64_and_candle() {
        for kind in KINDS {
            for random in [false, true] {
                for &(rows, cols, n) in &[(3usize, 256usize, 1usize), (70, 512, 1), (130, 2048, 3), (65, 768, 5)] {
                    let seed = rows as u64 + cols as u64;
                    let (m, dense) = matrix(kind, random, rows, cols, seed, Isa::Portable);
                    let xs = activations(n, cols, 7 + n as u64);
                    let x = Tensor::from_vec(xs.clone(), (n, cols), &Device::Cpu).unwrap();
                    let got = m.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                    let candle = m.candle().ok().map(|c| c.forward(&x).unwrap().to_vec2::<f32>().unwrap());
                    assert_eq!(candle.is_none(), matches!(kind, QKind::IQ4NL | QKind::IQ4XS));
                    for i in 0..n {
                        let xi = &xs[i * cols..(i + 1) * cols];
                        let a = if matches!(m.kind, QKind::Q8_0 | QKind::Q4_0 | QKind::IQ4NL) { Acts::q8_0(xi) } else { Acts::q8k(xi) }.dequantize();
                        for r in 0..rows {
                            let terms = dense[r].iter().zip(&a).map(|(w, x)| *w as f64 * *x as f64);
                            let exact: f64 = terms.clone().sum();
                            let scale: f64 = terms.map(f64::abs).sum::<f64>().max(1e-3);
                            let g = got[i][r] as f64;
                            let what = format!("{kind:?} {} {rows}x{cols} x{i} row {r}", if random { "random" } else { "quantized" });
                            assert!((g - exact).abs() <= 1e-5 * scale, "{what}: {g} vs exact {exact} (scale {scale})");
                            if let Some(candle) = &candle {
                                let c = candle[i][r] as f64;
                                assert!((g - c).abs() <= 1e-5 * scale, "{what}: {g} vs candle {c}");
                            }
                        }
                    }
                    if !random {
                        // the zero weight row gives exactly zero
                        assert!(got.iter().all(|o| o[1] == 0.0));
                    }
                }
            }
        }
    }

    /// Every build this CPU runs gives the portable definition's bits: quantized and random blocks,
    /// one to eleven activation rows (the vector builds take them four at a time, then one by one).
    /// The builds this CPU cannot run are reported as not run (`scripts/test.sh` prints it).
    #[test]
    fn every_build_equals_the_portable_definition() {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for isa in [Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni] {
            if !isa.supported() {
                crate::test_report::note(&format!("NOT RUN here: {} kernels against the portable definition (this CPU lacks the features)", isa.name()));
                continue;
            }
            for kind in KINDS {
                for random in [false, true] {
                    for &(rows, cols, n) in &[(3usize, 256usize, 1usize), (70, 512, 3), (65, 768, 4), (9, 2048, 5), (130, 1024, 11)] {
                        let seed = 3 * rows as u64 + cols as u64 + n as u64;
                        let (m, _) = matrix(kind, random, rows, cols, seed, Isa::Portable);
                        let x = Tensor::from_vec(activations(n, cols, seed), (n, cols), &Device::Cpu).unwrap();
                        let want = m.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        let m = m.with_isa(isa);
                        let got = m.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                        assert_eq!(bits(&got), bits(&want), "{} {kind:?} random={random} {rows}x{cols} n={n}", isa.name());
                    }
                }
            }
            crate::test_report::note(&format!("ran: {} kernels (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS) equal the portable definition bit for bit", isa.name()));
        }
    }

    /// Activation codes: the block's largest magnitude maps to -127, every value is within half a
    /// step, sums of 16 are the codes' sums, and a zero block has scale 0.
    #[test]
    fn q8k_quantization() {
        let x = activations(1, 1024, 3);
        let q = Acts::q8k(&x);
        assert_eq!(q.d[0], 0.0);
        for b in 1..4 {
            let xb = &x[b * QK..(b + 1) * QK];
            let imax = (0..QK).fold(0, |m, i| if xb[i].abs() > xb[m].abs() { i } else { m });
            assert_eq!(q.qs[b * QK + imax], -127, "block {b}");
            for (i, &v) in xb.iter().enumerate() {
                let back = q.d[b] * q.qs[b * QK + i] as f32;
                assert!((back - v).abs() <= q.d[b].abs() * 0.5001, "block {b} value {i}");
            }
        }
        for (j, s) in q.bsums.iter().enumerate() {
            assert_eq!(*s as i32, q.qs[j * 16..(j + 1) * 16].iter().map(|&v| v as i32).sum::<i32>());
        }
    }

    /// Every build's activation quantization (AVX-512, AVX2) gives the portable one's codes,
    /// scales and sums bit for bit: on values whose scaled value ends exactly on .5 or next to it
    /// (rounding half away from zero), on ±127, on zero, NaN and infinite values, and on random
    /// blocks of many magnitudes.
    #[test]
    fn q8k_vector_equals_portable() {
        // a block whose largest magnitude is -127 (scale exactly -1), so the codes are the values:
        // every half-integer in range, and its float neighbours
        let mut edge = vec![-127.0f32];
        for k in -127..127 {
            let h = k as f32 + 0.5;
            edge.extend([h, f32::from_bits(h.to_bits() + 1), f32::from_bits(h.to_bits() - 1)]);
        }
        edge.extend([0.0, -0.0, 126.99999, -127.0, 0.49999997, -0.49999997, 1e-30]);
        edge.resize(edge.len().next_multiple_of(QK), 3.0);
        let mut special = lcg(9, QK);
        special[5] = f32::NAN;
        let mut inf = lcg(10, QK);
        inf[77] = f32::NEG_INFINITY;
        let mut all_nan = vec![f32::NAN; QK];
        all_nan[3] = 0.0;
        let mut x: Vec<f32> = [edge, special, inf, all_nan, vec![0.0; QK]].concat();
        for seed in 0..64 {
            // scales from tiny to huge, ties of the largest magnitude
            let e = (seed as i32 - 32) * 3;
            let mut b: Vec<f32> = lcg(100 + seed, QK).iter().map(|v| v * 2f32.powi(e)).collect();
            if seed % 4 == 0 {
                b[200] = -b.iter().fold(0f32, |m, v| m.max(v.abs()));
                b[201] = -b[200];
            }
            x.extend(b);
        }
        let p = Acts::q8k_portable(&x);
        let bits = |d: &[f32]| d.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let builds: Vec<Isa> = Isa::ALL.into_iter().filter(|i| *i != Isa::Portable && i.supported()).collect();
        if builds.is_empty() {
            crate::test_report::note("NOT RUN here: vector activation quantization (Q8_K) against the portable one (this CPU has no vector build)");
        }
        for isa in builds {
            let v = Acts::by_build(&x, Scheme::Q8K, isa);
            assert_eq!(v.qs, p.qs, "{}", isa.name());
            assert_eq!(v.bsums, p.bsums, "{}", isa.name());
            assert_eq!(bits(&v.d), bits(&p.d), "{}", isa.name());
            crate::test_report::note(&format!("ran: {} activation quantization (Q8_K) equals the portable one", isa.name()));
        }
        // the edge block really holds ties: codes ±k.5 went away from zero
        assert_eq!(&p.qs[1..7], &[-127, -127, -126, -126, -126, -125]);
    }

    /// Every build's Q8_0 activation quantizer this CPU runs equals the portable one.
    #[test]
    fn q8_0_vector_equals_portable() {
        // blocks whose largest magnitude is 127 (scale 1, so the codes are the values rounded):
        // every half-integer in range and its float neighbours
        let mut x = vec![];
        for k in -127..127 {
            let h = k as f32 + 0.5;
            x.extend([h, f32::from_bits(h.to_bits() + 1), f32::from_bits(h.to_bits() - 1)]);
            if x.len() % 32 == 30 {
                x.extend([127.0, -0.0]);
            }
        }
        x.resize(x.len().next_multiple_of(32), 127.0);
        let ties = x.len();
        // NaN, infinities, zeros, tiny (subnormal scale) and huge blocks, random blocks of every size
        let mut special = lcg(9, 128);
        special[5] = f32::NAN;
        special[40] = f32::INFINITY;
        special[70] = f32::NEG_INFINITY;
        special[100..128].fill(f32::NAN);
        x.extend(special);
        x.extend(vec![0.0; 32]);
        x.extend((0..32).map(|i| if i == 3 { 1e-44 } else { 0.0 }));
        x.extend((0..32).map(|i| (i as f32 - 16.0) * 1e-40));
        for seed in 0..64 {
            let e = (seed as i32 - 32) * 4;
            x.extend(lcg(200 + seed, 32).iter().map(|v| v * 2f32.powi(e)));
        }
        let p = Acts::q8_0_portable(&x);
        let bits = |d: &[f32]| d.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let builds: Vec<Isa> = Isa::ALL.into_iter().filter(|i| *i != Isa::Portable && i.supported()).collect();
        if builds.is_empty() {
            crate::test_report::note("NOT RUN here: vector activation quantization (Q8_0) against the portable one (this CPU has no vector build)");
        }
        for isa in builds {
            let v = Acts::by_build(&x, Scheme::Q8_0, isa);
            assert_eq!(v.qs, p.qs, "{}", isa.name());
            assert_eq!(bits(&v.d), bits(&p.d), "{}", isa.name());
            crate::test_report::note(&format!("ran: {} activation quantization (Q8_0) equals the portable one", isa.name()));
        }
        // the first blocks really hold ties: 0.5 steps went away from zero
        assert_eq!(&p.qs[..6], &[-127, -127, -126, -126, -126, -125]);
        assert!(p.qs[..ties].iter().any(|&c| c == 127));
    }

    /// Results do not depend on the thread count, on being run on the calling thread, or on how
    /// many activation rows come together.
    #[test]
    fn bits_do_not_depend_on_threads_or_batch() {
        // the build the runner uses (the portable one where there is none: same bits everywhere)
        let isa = selected().unwrap_or(Isa::Portable);
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::F32] {
            let (rows, cols) = (600, 2048);
            assert!(rows * cols >= SERIAL_BELOW);
            // (F32 stands for IQ4_NL here)
            let m = if dtype == GgmlDType::F32 {
                iq4_nl_weights(rows, cols, 1).0.with_isa(isa)
            } else {
                QuantMatrix::new_for(weights(dtype, rows, cols, 1), isa).unwrap()
            };
            let n = ACTS_PER_PASS + 3;
            let xs = activations(n, cols, 2);
            let x = Tensor::from_vec(xs.clone(), (n, cols), &Device::Cpu).unwrap();
            // candle's pool (as used), and rayon pools of several sizes with one-row tasks
            let run = |t: usize| {
                if t == 0 {
                    return m.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                }
                let acts = m.quantize_rows(&xs);
                let data = m.q.data().unwrap();
                let mut out = vec![0f32; n * rows];
                let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
                pool.install(|| {
                    m.matmul_on(&data, &acts, &mut out, &|tasks, task| {
                        use rayon::prelude::*;
                        (0..tasks).into_par_iter().with_max_len(1).for_each(task)
                    })
                });
                out
            };
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let all = bits(&run(0));
            for t in [1, 2, 5] {
                assert_eq!(all, bits(&run(t)), "{dtype:?} {t} threads");
            }
            for i in [0, n - 1] {
                let one = Tensor::from_vec(xs[i * cols..(i + 1) * cols].to_vec(), (1, cols), &Device::Cpu).unwrap();
                let alone = m.forward(&one).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(bits(&alone), all[i * rows..(i + 1) * rows], "{dtype:?} activation row {i}");
            }
            // a matrix below SERIAL_BELOW (done on the calling thread) gives the same rows
            let few = 100;
            let kind = m.kind;
            let small_data = m.q.data().unwrap()[..few * cols / kind.block_len() * kind.block_bytes()].to_vec();
            let small = if kind == QKind::IQ4NL {
                QuantMatrix::iq4_nl_for(small_data, few, cols, isa).ok().unwrap()
            } else {
                let t = candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &small_data, vec![few, cols], &Device::Cpu).unwrap();
                QuantMatrix::new_for(Arc::new(t), isa).unwrap()
            };
            assert!(few * cols < SERIAL_BELOW);
            let x1 = Tensor::from_vec(xs[..cols].to_vec(), (1, cols), &Device::Cpu).unwrap();
            let o = small.forward(&x1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(bits(&o), all[..few]);
        }
    }

    #[test]
    fn other_types_and_shapes_stay_with_candle() {
        let t = Tensor::from_vec(lcg(1, 4 * 256), (4, 256), &Device::Cpu).unwrap();
        for other in [GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q4_1, GgmlDType::Q3K, GgmlDType::Q2K] {
            let q = Arc::new(QTensor::quantize(&t, other).unwrap());
            assert!(QuantMatrix::new_for(q, Isa::Portable).is_none(), "{other:?}");
        }
        // Q8_0 and Q4_0 rows must hold whole quads of blocks (128 weights)
        for cols in [96, 192] {
            let t = Tensor::from_vec(lcg(1, 4 * cols), (4, cols), &Device::Cpu).unwrap();
            for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0] {
                let q = Arc::new(QTensor::quantize(&t, dtype).unwrap());
                assert!(QuantMatrix::new_for(q, Isa::Portable).is_none(), "{dtype:?} {cols}");
            }
            assert!(QuantMatrix::iq4_nl_for(vec![0; 4 * cols / 32 * 18], 4, cols, Isa::Portable).is_err(), "IQ4_NL {cols}");
        }
        let q4 = Arc::new(QTensor::quantize(&t, GgmlDType::Q4K).unwrap());
        assert_eq!(QuantMatrix::new(q4).is_some(), available());
    }
}
