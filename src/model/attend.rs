//! Scaled dot-product attention of new queries over a KV-cache slot.
//!
//! The slot's keys and values are `[kv_heads, len, head_dim]` views of its buffers (f32 or f16)
//! whose last `n` positions are the new tokens themselves. Query `j` of `n` sees positions
//! `0 ..= len - n + j` (causal), minus the positions its slot marks as skipped
//! ([`super::SkipFill::Mask`]); query head `h` reads key/value head `h / (heads / kv_heads)`.
//!
//! On the CPU [`attend`] computes each (head, query) row in one pass over the slot's storage:
//! scores, softmax, and the weighted sum of values, reading f16 slots in their stored width (a
//! block of positions at a time is widened into a small buffer) and spreading the rows over
//! candle's worker pool when the slot is long. The general path ([`generic`]: candle tensor ops,
//! for other devices and layouts) widened the whole slot to f32 and went through three candle
//! matmul calls per layer and loop, each of which asked the OS for the CPU count (candle reads
//! `/proc/cpuinfo` on every CPU matmul), and ran on the calling thread alone: at a 512-token
//! context reading 0.83 GB of keys and values per decoded token of the 1.4B model.
//!
//! Both compute the same quantities in f32 (the order of the sums differs: they agree to float
//! rounding, tested below); each row's arithmetic does not depend on the thread count.

use candle_core::{DType, Device, Result as CResult, Tensor, D};

/// Positions widened (f16) and scored at a time.
const BLOCK: usize = 64;

/// New queries of one head per task when a stored-width (f16) slot is read by several (prefill):
/// the task widens the head's keys and values once for all of them instead of once per query
/// (which cost as much as the attention itself: 4.5% of a 128-token Q8_0 prefill of the 1.4B
/// model went to widening).
const QUERIES_PER_TASK: usize = 16;

/// Below this many multiply-adds (`heads * n * len * head_dim`) the rows are computed on the
/// calling thread: handing them to the pool costs more than the work.
const SERIAL_BELOW: usize = 1 << 15;

/// `q [heads, n, d]` (f32) attending over `k`, `v` `[kv_heads, len, d]`: returns `[n, heads * d]`
/// (the heads of each query side by side, as the output projection reads them). `masked[p]`
/// excludes position `p` (shorter than `len`: the rest are seen). `causal`: an `[n, len]` additive
/// mask for the general path when `n > 1` (built once per forward pass by the caller).
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, masked: &[bool], causal: Option<&Tensor>) -> CResult<Tensor> {
    if let Some(o) = cpu(q, k, v, masked)? {
        return Ok(o);
    }
    generic(q, k, v, masked, causal)
}

/// Storage of a cache view: `len` rows of `d` values per head, head `i` starting at
/// `start + i * head_stride`.
struct Rows<'a, T> {
    data: &'a [T],
    start: usize,
    head_stride: usize,
}

impl<T> Rows<'_, T> {
    fn head(&self, i: usize, len: usize, d: usize) -> &[T] {
        let s = self.start + i * self.head_stride;
        &self.data[s..s + len * d]
    }
}

/// A value type a slot can be stored in.
trait Elem: Copy + Send + Sync + candle_core::WithDType {
    /// Whether [`Elem::as_f32`] converts (and so costs a pass over the values).
    const WIDENS: bool;
    /// `src` as f32: itself, or widened into `buf`.
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
}

impl Elem for f32 {
    const WIDENS: bool = false;
    fn as_f32<'a>(src: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl Elem for half::f16 {
    const WIDENS: bool = true;
    fn as_f32<'a>(src: &'a [half::f16], buf: &'a mut [f32]) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        let buf = &mut buf[..src.len()];
        src.convert_to_f32_slice(buf);
        buf
    }
}

/// The CPU path, or `None` when a tensor is not on the CPU or not in the layout it reads
/// (f32 queries; f32 or f16 keys and values of one dtype, each head's positions contiguous).
fn cpu(q: &Tensor, k: &Tensor, v: &Tensor, masked: &[bool]) -> CResult<Option<Tensor>> {
    cpu_with(q, k, v, masked, SERIAL_BELOW)
}

/// [`cpu`], spreading rows over the pool from `serial_below` multiply-adds.
fn cpu_with(q: &Tensor, k: &Tensor, v: &Tensor, masked: &[bool], serial_below: usize) -> CResult<Option<Tensor>> {
    if !(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu()) || q.dtype() != DType::F32 || k.dtype() != v.dtype()
    {
        return Ok(None);
    }
    match k.dtype() {
        DType::F32 => cpu_typed::<f32>(q, k, v, masked, serial_below),
        DType::F16 => cpu_typed::<half::f16>(q, k, v, masked, serial_below),
        _ => Ok(None),
    }
}

fn cpu_typed<T: Elem>(q: &Tensor, k: &Tensor, v: &Tensor, masked: &[bool], serial_below: usize) -> CResult<Option<Tensor>> {
    let (heads, n, d) = q.dims3()?;
    let (kv_heads, len, dk) = k.dims3()?;
    if v.dims3()? != (kv_heads, len, d) || dk != d || kv_heads == 0 || heads % kv_heads != 0 || n > len || n == 0 {
        candle_core::bail!(
            "attention: queries {:?}, keys {:?}, values {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (candle_core::Storage::Cpu(qc), candle_core::Storage::Cpu(kc), candle_core::Storage::Cpu(vc)) = (&*qs, &*ks, &*vs)
    else {
        return Ok(None);
    };
    // each head's positions contiguous (a narrowed buffer or a whole tensor)
    let rows = |l: &candle_core::Layout| -> Option<(usize, usize)> {
        let s = l.stride();
        (s[2] == 1 && (len < 2 || s[1] == d)).then_some((l.start_offset(), s[0]))
    };
    let (Some(qo), Some((k0, kstride)), Some((v0, vstride))) = (ql.contiguous_offsets(), rows(kl), rows(vl)) else {
        return Ok(None);
    };
    let qv = &qc.as_slice::<f32>()?[qo.0..qo.1];
    let kr = Rows { data: kc.as_slice::<T>()?, start: k0, head_stride: kstride };
    let vr = Rows { data: vc.as_slice::<T>()?, start: v0, head_stride: vstride };
    let mut out = vec![0f32; n * heads * d];
    // a task (head h, its queries j) writes only `out[j, h*d .. (h+1)*d]` for those j
    let dst = &super::linear::SharedOut::new(&mut out);
    let rep = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    // queries per task: one, or (several new queries over a slot stored narrower than f32) a
    // group of one head's, whose keys and values are widened once for the group; either way each
    // query's row gets the same f32 values in the same order, so the same bits
    let group = if T::WIDENS && n > 1 { QUERIES_PER_TASK } else { 1 };
    let chunks = n.div_ceil(group);
    let task = |t: usize| {
        let (h, c) = (t / chunks, t % chunks);
        let (j0, j1) = (c * group, ((c + 1) * group).min(n));
        let query = |j: usize| &qv[(h * n + j) * d..(h * n + j + 1) * d];
        let out_row = |j: usize| unsafe { dst.slice((j * heads + h) * d, d) };
        if group == 1 {
            let seen = len - n + j0 + 1;
            row(query(j0), kr.head(h / rep, seen, d), vr.head(h / rep, seen, d), masked, scale, out_row(j0));
            return;
        }
        WIDE.with_borrow_mut(|(kw, vw)| {
            let most = len - n + j1;
            for (src, wide) in [(kr.head(h / rep, most, d), &mut *kw), (vr.head(h / rep, most, d), &mut *vw)] {
                wide.resize(most * d, 0.0);
                T::as_f32(src, wide);
            }
            for j in j0..j1 {
                let seen = len - n + j + 1;
                row::<f32>(query(j), &kw[..seen * d], &vw[..seen * d], masked, scale, out_row(j));
            }
        })
    };
    let tasks = heads * chunks;
    super::linear::run_tasks(tasks, &task, heads * n * len * d >= serial_below);
    drop((qs, ks, vs));
    Ok(Some(Tensor::from_vec(out, (n, heads * d), q.device())?))
}

/// One query row: `o = softmax(scale * K q) V` over the `k.len() / d` positions it sees, skipping
/// `masked` ones. Compiled twice: for AVX2 (8 lanes; chosen at run time where the CPU has it) and
/// for the baseline target, which vectorizes 2 values at a time here. Both do the same
/// arithmetic in the same order (no fused multiply-add), so they give the same bits.
fn row<T: Elem>(q: &[f32], k: &[T], v: &[T], masked: &[bool], scale: f32, o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if *AVX2.get_or_init(|| std::is_x86_feature_detected!("avx2")) {
            // Safety: the CPU has AVX2.
            return unsafe { row_avx2(q, k, v, masked, scale, o) };
        }
    }
    row_impl(q, k, v, masked, scale, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_avx2<T: Elem>(q: &[f32], k: &[T], v: &[T], masked: &[bool], scale: f32, o: &mut [f32]) {
    row_impl(q, k, v, masked, scale, o)
}

/// [`row`] for the head sizes of the released models (64 and 128 values: the output row then
/// stays in registers) and any other.
#[inline(always)]
fn row_impl<T: Elem>(q: &[f32], k: &[T], v: &[T], masked: &[bool], scale: f32, o: &mut [f32]) {
    match q.len() {
        64 => row_fixed::<T, 64>(q.try_into().unwrap(), k, v, masked, scale, o),
        128 => row_fixed::<T, 128>(q.try_into().unwrap(), k, v, masked, scale, o),
        _ => row_any(q, k, v, masked, scale, o),
    }
}

thread_local! {
    /// Per thread: one head's keys and values widened for a group of queries (reused across tasks).
    static WIDE: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    /// Per thread: a row's scores and a block of widened positions (reused across rows).
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Scores `scale * dot(q, k_p)` of every position (`-inf` where masked), then turned into
/// softmax weights `exp(s - max) / sum`, in `scores`.
#[inline(always)]
fn weights<T: Elem>(k: &[T], d: usize, dot: impl Fn(&[f32]) -> f32, masked: &[bool], scale: f32, scores: &mut Vec<f32>, buf: &mut Vec<f32>) {
    let seen = k.len() / d;
    scores.clear();
    scores.resize(seen, 0.0);
    buf.resize(BLOCK * d, 0.0);
    for p0 in (0..seen).step_by(BLOCK) {
        let p1 = (p0 + BLOCK).min(seen);
        let kb = T::as_f32(&k[p0 * d..p1 * d], buf);
        for (p, kr) in (p0..p1).zip(kb.chunks_exact(d)) {
            scores[p] = if masked.get(p) == Some(&true) { f32::NEG_INFINITY } else { dot(kr) * scale };
        }
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
    }
}

#[inline(always)]
fn row_fixed<T: Elem, const N: usize>(q: &[f32; N], k: &[T], v: &[T], masked: &[bool], scale: f32, o: &mut [f32]) {
    SCRATCH.with_borrow_mut(|(scores, buf)| {
        weights(k, N, |kr| dot::<N>(q, kr.try_into().unwrap()), masked, scale, scores, buf);
        let mut acc = [0f32; N];
        for p0 in (0..scores.len()).step_by(BLOCK) {
            let p1 = (p0 + BLOCK).min(scores.len());
            let vb = T::as_f32(&v[p0 * N..p1 * N], buf);
            for (&w, vr) in scores[p0..p1].iter().zip(vb.chunks_exact(N)) {
                if w != 0.0 {
                    let vr: &[f32; N] = vr.try_into().unwrap();
                    for i in 0..N {
                        acc[i] += w * vr[i];
                    }
                }
            }
        }
        o.copy_from_slice(&acc);
    })
}

fn row_any<T: Elem>(q: &[f32], k: &[T], v: &[T], masked: &[bool], scale: f32, o: &mut [f32]) {
    let d = q.len();
    SCRATCH.with_borrow_mut(|(scores, buf)| {
        weights(k, d, |kr| dot_any(q, kr), masked, scale, scores, buf);
        o.fill(0.0);
        for p0 in (0..scores.len()).step_by(BLOCK) {
            let p1 = (p0 + BLOCK).min(scores.len());
            let vb = T::as_f32(&v[p0 * d..p1 * d], buf);
            for (&w, vr) in scores[p0..p1].iter().zip(vb.chunks_exact(d)) {
                if w != 0.0 {
                    for (o, x) in o.iter_mut().zip(vr) {
                        *o += w * x;
                    }
                }
            }
        }
    })
}

/// Dot product of `N` values in 16 independent lanes, summed pairwise.
#[inline(always)]
fn dot<const N: usize>(a: &[f32; N], b: &[f32; N]) -> f32 {
    let mut acc = [0f32; 16];
    for c in 0..N / 16 {
        for i in 0..16 {
            acc[i] += a[c * 16 + i] * b[c * 16 + i];
        }
    }
    fold16(acc)
}

/// Dot product of any length: 16 lanes, then the remainder.
#[inline(always)]
fn dot_any(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    fold16(acc) + tail
}

#[inline(always)]
fn fold16(mut acc: [f32; 16]) -> f32 {
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
}

/// Attention in candle tensor operations (any device): keys and values widened to f32, expanded
/// to the query heads, `softmax(q k^T * scale + masks) v`.
pub fn generic(q: &Tensor, k: &Tensor, v: &Tensor, masked: &[bool], causal: Option<&Tensor>) -> CResult<Tensor> {
    let (heads, n, d) = q.dims3()?;
    let (kv_heads, len, _) = k.dims3()?;
    let rep = heads / kv_heads;
    let expand = |y: &Tensor| -> CResult<Tensor> {
        let y = widen(y)?;
        if rep == 1 {
            return Ok(y);
        }
        let (kvh, s, hd) = y.dims3()?;
        y.unsqueeze(1)?.expand((kvh, rep, s, hd))?.reshape((kvh * rep, s, hd))
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let scale = 1.0 / (d as f64).sqrt();
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if n > 1 {
        let m = match causal {
            Some(m) => m.clone(),
            None => causal_mask(len - n, n, q.device())?,
        };
        scores = scores.broadcast_add(&m)?;
    }
    if masked.iter().any(|&m| m) {
        let m: Vec<f32> = (0..len).map(|p| if masked.get(p) == Some(&true) { f32::NEG_INFINITY } else { 0.0 }).collect();
        scores = scores.broadcast_add(&Tensor::from_vec(m, (1, len), q.device())?)?;
    }
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    // a narrowed view multiplies in place where the backend takes its strides
    let o = match probs.matmul(&v) {
        Ok(o) => o,
        Err(_) => probs.matmul(&v.contiguous()?)?,
    };
    o.transpose(0, 1)?.reshape((n, heads * d))
}

/// Additive causal mask `[n, start + n]` for new queries at positions `start..start+n`.
pub fn causal_mask(start: usize, n: usize, device: &Device) -> CResult<Tensor> {
    let s = start + n;
    let m: Vec<f32> = (0..n)
        .flat_map(|j| (0..s).map(move |k| if k <= start + j { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(m, (n, s), device)
}

/// Keys or values `[heads, len, d]` (a view of a slot's buffer) as f32. An f16 view on the CPU is
/// widened per head with the `half` crate's vector conversion: candle's `to_dtype` converts one
/// value at a time in software. Other dtypes and devices: `to_dtype`.
fn widen(t: &Tensor) -> CResult<Tensor> {
    use half::slice::HalfFloatSliceExt;
    if t.dtype() != DType::F16 || !t.device().is_cpu() {
        return t.to_dtype(DType::F32);
    }
    let (h, len, d) = t.dims3()?;
    let mut out = vec![0f32; h * len * d];
    {
        let (storage, layout) = t.storage_and_layout();
        let stride = layout.stride();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            unreachable!("checked to be on the CPU")
        };
        // each head's positions are contiguous in the buffer
        if stride[2] != 1 || (len > 1 && stride[1] != d) {
            drop(storage);
            return t.to_dtype(DType::F32);
        }
        let src = cpu.as_slice::<half::f16>()?;
        for (i, o) in out.chunks_exact_mut((len * d).max(1)).enumerate() {
            let start = layout.start_offset() + i * stride[0];
            src[start..start + len * d].convert_to_f32_slice(o);
        }
    }
    Tensor::from_vec(out, (h, len, d), t.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_values;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// The CPU path against candle's tensor operations on the layouts the cache hands out
    /// (narrowed buffers with room to spare, f32 and f16), with grouped and plain heads, one new
    /// query and several (causal), positions masked, lengths across the widening block; and the
    /// pool gives the calling thread's bits.
    #[test]
    fn cpu_equals_generic() {
        let mut checked = 0;
        for (heads, kv_heads, d) in [(4, 2, 16), (3, 3, 24), (4, 2, 64), (16, 16, 128)] {
            for len in [1, 5, 70, 300] {
                for n in [1, 3, 17, len] {
                    if n > len || (heads == 16 && n > 17) {
                        continue;
                    }
                    for dtype in [DType::F32, DType::F16] {
                        let cap = len + 7;
                        let buf = |seed| {
                            Tensor::from_vec(test_values(seed, kv_heads * cap * d), (kv_heads, cap, d), &Device::Cpu)
                                .unwrap()
                                .to_dtype(dtype)
                                .unwrap()
                                .narrow(1, 0, len)
                                .unwrap()
                        };
                        let (k, v) = (buf(len as u64), buf(len as u64 + 1));
                        let q = Tensor::from_vec(test_values(n as u64 + 2, heads * n * d), (heads, n, d), &Device::Cpu).unwrap();
                        // every third past position masked, as skipped slots are; one past the
                        // queries' positions too (a shorter list than the slot leaves the rest seen)
                        let past = len - n;
                        let masked: Vec<bool> = (0..past).map(|p| p % 3 == 1).collect();
                        let ours = cpu(&q, &k, &v, &masked).unwrap().expect("a layout the CPU path reads");
                        let theirs = generic(&q, &k, &v, &masked, None).unwrap();
                        assert_eq!(ours.dims(), &[n, heads * d]);
                        let (a, b) = (values(&ours), values(&theirs));
                        let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                        assert!(err < 2e-6, "{heads}/{kv_heads} heads d {d} len {len} n {n} {dtype:?}: {err}");
                        let pool = cpu_with(&q, &k, &v, &masked, 0).unwrap().unwrap();
                        let serial = cpu_with(&q, &k, &v, &masked, usize::MAX).unwrap().unwrap();
                        let bits = |t: &Tensor| values(t).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&pool), bits(&serial));
                        assert_eq!(bits(&pool), bits(&ours));
                        if dtype == DType::F16 {
                            // widened once per group of queries (prefill) or block by block per
                            // query (decode): the bits of the same values stored as f32
                            let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
                            let f32_slot = cpu(&q, &wide(&k), &wide(&v), &masked).unwrap().unwrap();
                            assert_eq!(bits(&ours), bits(&f32_slot), "{heads}/{kv_heads} heads d {d} len {len} n {n}");
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 30);
    }

    /// The AVX2 build of a row and the baseline build give the same bits (head sizes 64, 128
    /// and another; f32 and f16; a masked position).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn row_builds_agree() {
        if !std::is_x86_feature_detected!("avx2") {
            crate::test_report::note("NOT RUN here: avx2 attention row against the baseline build (this CPU lacks avx2)");
            return;
        }
        crate::test_report::note("ran: avx2 attention row equals the baseline build bit for bit");
        for d in [64, 128, 40] {
            let len = 150;
            let q = test_values(1, d);
            let k = test_values(2, len * d);
            let v = test_values(3, len * d);
            let masked = [false, true, false];
            let run = |avx2: bool, k: &[f32], v: &[f32]| {
                let mut o = vec![0f32; d];
                if avx2 {
                    unsafe { row_avx2(&q, k, v, &masked, 0.125, &mut o) }
                } else {
                    row_impl(&q, k, v, &masked, 0.125, &mut o)
                }
                o.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            };
            assert_eq!(run(true, &k, &v), run(false, &k, &v), "d {d}");
            let h = |x: &[f32]| x.iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>();
            let (kh, vh) = (h(&k), h(&v));
            let mut a = vec![0f32; d];
            let mut b = vec![0f32; d];
            unsafe { row_avx2(&q, &kh, &vh, &masked, 0.125, &mut a) };
            row_impl(&q, &kh, &vh, &masked, 0.125, &mut b);
            assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
    }

    /// A layout the CPU path does not read (keys transposed) goes to the general path, and the
    /// answer is the same.
    #[test]
    fn other_layouts_fall_back() {
        let (h, len, d) = (2, 6, 8);
        let q = Tensor::from_vec(test_values(1, h * d), (h, 1, d), &Device::Cpu).unwrap();
        let k = Tensor::from_vec(test_values(2, h * len * d), (h, d, len), &Device::Cpu).unwrap().transpose(1, 2).unwrap();
        let v = Tensor::from_vec(test_values(3, h * len * d), (h, len, d), &Device::Cpu).unwrap();
        assert!(cpu(&q, &k, &v, &[]).unwrap().is_none());
        let a = values(&attend(&q, &k, &v, &[], None).unwrap());
        let b = values(&cpu(&q, &k.contiguous().unwrap(), &v, &[]).unwrap().unwrap());
        let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(err < 2e-6, "{err}");
    }

    /// `widen` gives `to_dtype`'s values bit for bit on the views attention reads: a narrowed
    /// f16 buffer (several heads, positions below capacity), a whole one, one position, none,
    /// and a non-f16 tensor.
    #[test]
    fn widen_equals_to_dtype() {
        let (h, cap, d) = (3, 10, 8);
        let buf = Tensor::from_vec(test_values(1, h * cap * d), (h, cap, d), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let bits = |t: &Tensor| {
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        for len in [0, 1, 7, cap] {
            let view = buf.narrow(1, 0, len).unwrap();
            let w = widen(&view).unwrap();
            assert_eq!(w.dims(), &[h, len, d]);
            assert_eq!(w.dtype(), DType::F32);
            assert_eq!(bits(&w), bits(&view.to_dtype(DType::F32).unwrap()), "len {len}");
        }
        // a view not starting at position 0 (attention never makes one) still converts right
        let mid = buf.narrow(1, 2, 5).unwrap();
        assert_eq!(bits(&widen(&mid).unwrap()), bits(&mid.to_dtype(DType::F32).unwrap()));
        let f = buf.to_dtype(DType::F32).unwrap();
        assert_eq!(bits(&widen(&f).unwrap()), bits(&f));
    }
}
