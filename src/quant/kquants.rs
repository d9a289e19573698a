//! ggml's k-quants (256-value super-blocks), bit-exact with `quantize_row_q{2,3,4,5,6}_K_ref`
//! (the path llama-quantize takes without an importance matrix). The searches for block scales
//! (`make_qx_quants`, `make_q3_quants`, `make_qkx2_quants`) keep ggml's order of f32 operations;
//! rounding is ggml's `nearest_int` (add 1.5 * 2^23: round half to even).
//!
//! Super-block layouts (little-endian):
//! - Q2_K (84 B):  scales[16] (4-bit scale | 4-bit min), qs[64], f16 d, f16 dmin
//! - Q3_K (110 B): hmask[32], qs[64], scales[12] (6-bit, packed), f16 d
//! - Q4_K (144 B): f16 d, f16 dmin, scales[12] (6-bit scales and mins), qs[128]
//! - Q5_K (176 B): f16 d, f16 dmin, scales[12], qh[32], qs[128]
//! - Q6_K (210 B): ql[128], qh[64], scales[16] (i8), f16 d

use half::f16;

const QK_K: usize = 256;
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round half to even through the f32 mantissa.
#[inline]
pub(crate) fn nearest_int(fval: f32) -> i32 {
    let v = fval + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

fn fp16(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

fn from_fp16(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

/// `make_qx_quants` with `rmse_type` 1: weights `qw`, or `x * x` when there are none. Levels are
/// stored offset by `nmax`.
pub(crate) fn make_qx_quants(x: &[f32], nmax: i32, l_out: &mut [i8], qw: Option<&[f32]>) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.iter_mut().for_each(|l| *l = 0);
        return 0.0;
    }
    let mut wbuf = [0f32; 32];
    let wts = &mut wbuf[..x.len()];
    for (i, &v) in x.iter().enumerate() {
        wts[i] = qw.map_or(v * v, |q| q[i]);
    }
    let weight = |i: usize, _v: f32| wts[i];
    let iscale = (-nmax) as f32 / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (i, &v) in x.iter().enumerate() {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        l_out[i] = (l + nmax) as i8;
        let w = weight(i, v);
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    // The 18 candidate scales do not depend on each other: their sums are taken side by side
    // (each lane in ggml's order), then compared in ggml's order.
    #[inline(always)]
    fn sums(x: &[f32], wts: &[f32], nmax: i32, isc: &[f32; 24]) -> ([f32; 24], [f32; 24]) {
        let (mut slx, mut sl2) = ([0f32; 24], [0f32; 24]);
        for (&v, &w) in x.iter().zip(wts) {
            for k in 0..24 {
                let l = nearest_int(isc[k] * v).clamp(-nmax, nmax - 1) as f32;
                slx[k] += w * v * l;
                sl2[k] += w * l * l;
            }
        }
        (slx, sl2)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn sums_avx2(x: &[f32], wts: &[f32], nmax: i32, isc: &[f32; 24]) -> ([f32; 24], [f32; 24]) {
        sums(x, wts, nmax, isc)
    }
    const CANDS: [i32; 18] = [-9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9];
    let mut isc = [0f32; 24];
    for (k, &is) in CANDS.iter().enumerate() {
        isc[k] = -(nmax as f32 + 0.1 * is as f32) / max;
    }
    #[cfg(target_arch = "x86_64")]
    let (slx, sl2) = if super::avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { sums_avx2(x, wts, nmax, &isc) }
    } else {
        sums(x, wts, nmax, &isc)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let (slx, sl2) = sums(x, wts, nmax, &isc);
    let mut chosen = None;
    for k in 0..CANDS.len() {
        if sl2[k] > 0.0 && slx[k] * slx[k] > best * sl2[k] {
            scale = slx[k] / sl2[k];
            best = scale * slx[k];
            chosen = Some(k);
        }
    }
    if let Some(k) = chosen {
        for (o, &v) in l_out.iter_mut().zip(x) {
            *o = (nmax + nearest_int(isc[k] * v).clamp(-nmax, nmax - 1)) as i8;
        }
    }
    scale
}

/// `make_q3_quants` with `do_rmse` (the Q3_K reference path), one sub-block at a time as ggml
/// runs it: the oracle of [`make_q3_quants_x16`]'s test. Levels in `l_out` are offset by nmax.
#[cfg(test)]
fn make_q3_quants(x: &[f32], nmax: i32, l_out: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.iter_mut().for_each(|l| *l = 0);
        return 0.0;
    }
    let iscale = (-nmax) as f32 / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    let mut lv = [0i32; 16];
    for (i, &v) in x.iter().enumerate() {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        lv[i] = l;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for (i, &v) in x.iter().enumerate() {
            let w = v * v;
            let mut slx = sumlx - w * v * lv[i] as f32;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * lv[i] as f32 * lv[i] as f32;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != lv[i] {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        lv[i] = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    for (o, &l) in l_out.iter_mut().zip(&lv[..x.len()]) {
        *o = (l + nmax) as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// [`make_q3_quants`] (nmax 4) of the 16 sub-blocks of a Q3_K super-block at once: lane `j` is
/// sub-block `j` and performs exactly its operations in order (data-dependent steps become
/// selects). ggml stops a sub-block's refinement after a pass that changed nothing; such a pass
/// leaves its state as it was, so running it again (while another lane still changes) changes
/// nothing either, and the result is bit-identical.
fn make_q3_quants_x16(xb: &[f32; QK_K], l_out: &mut [i8; QK_K]) -> [f32; 16] {
    #[cfg(target_arch = "x86_64")]
    if super::avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { q3_x16_avx2(xb, l_out) };
    }
    q3_x16(xb, l_out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn q3_x16_avx2(xb: &[f32; QK_K], l_out: &mut [i8; QK_K]) -> [f32; 16] {
    q3_x16(xb, l_out)
}

#[inline(always)]
fn q3_x16(xb: &[f32; QK_K], l_out: &mut [i8; QK_K]) -> [f32; 16] {
    const NMAX: i32 = 4;
    // xs[i][j]: value i of sub-block j
    let mut xs = [[0f32; 16]; 16];
    for j in 0..16 {
        for i in 0..16 {
            xs[i][j] = xb[16 * j + i];
        }
    }
    let (mut max, mut amax) = ([0f32; 16], [0f32; 16]);
    for row in &xs {
        for j in 0..16 {
            let a = row[j].abs();
            if a > amax[j] {
                amax[j] = a;
                max[j] = row[j];
            }
        }
    }
    let mut iscale = [0f32; 16];
    for j in 0..16 {
        iscale[j] = (-NMAX) as f32 / max[j];
    }
    let mut lv = [[0i32; 16]; 16];
    let (mut sumlx, mut suml2) = ([0f32; 16], [0f32; 16]);
    for i in 0..16 {
        for j in 0..16 {
            let v = xs[i][j];
            let l = nearest_int(iscale[j] * v).clamp(-NMAX, NMAX - 1);
            lv[i][j] = l;
            let w = v * v;
            sumlx[j] += w * v * l as f32;
            suml2[j] += w * l as f32 * l as f32;
        }
    }
    for _ in 0..5 {
        let mut changed = 0u32;
        for i in 0..16 {
            for j in 0..16 {
                let v = xs[i][j];
                let w = v * v;
                let old = lv[i][j];
                let slx0 = sumlx[j] - w * v * old as f32;
                let sl20 = suml2[j] - w * old as f32 * old as f32;
                let new_l = nearest_int(v * sl20 / slx0).clamp(-NMAX, NMAX - 1);
                let slx = slx0 + w * v * new_l as f32;
                let sl2 = sl20 + w * new_l as f32 * new_l as f32;
                let take = slx0 > 0.0 && new_l != old && sl2 > 0.0 && slx * slx * suml2[j] > sumlx[j] * sumlx[j] * sl2;
                if take {
                    lv[i][j] = new_l;
                    sumlx[j] = slx;
                    suml2[j] = sl2;
                }
                changed += take as u32;
            }
        }
        if changed == 0 {
            break;
        }
    }
    let mut scales = [0f32; 16];
    for j in 0..16 {
        if amax[j] < GROUP_MAX_EPS {
            for i in 0..16 {
                l_out[16 * j + i] = 0;
            }
            continue;
        }
        for i in 0..16 {
            l_out[16 * j + i] = (lv[i][j] + NMAX) as i8;
        }
        scales[j] = if suml2[j] > 0.0 { sumlx[j] / suml2[j] } else { 0.0 };
    }
    scales
}

/// Which of ggml's two asymmetric searches: `make_qkx2_quants` (the reference k-quants) or
/// `make_qkx3_quants` (the importance-vector paths), which differ only in their guards.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Search {
    Qkx2,
    Qkx3,
}

/// ggml's `make_qkx2_quants` / `make_qkx3_quants`: scale and (negated) min of an asymmetric block
/// by a weighted search over `nstep + 1` candidate scales.
#[allow(clippy::too_many_arguments)]
pub(crate) fn make_qkx_quants(
    search: Search,
    x: &[f32],
    nmax: i32,
    weights: &[f32],
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    // equal-length views let the compiler drop the bounds checks in the hot loops
    let weights = &weights[..n];
    let l_out = &mut l_out[..n];
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    // qkx2 gives up only on a constant block; qkx3 also on an all-negative one (max < min = 0)
    if max == min || (search == Search::Qkx3 && max < min) {
        l_out.iter_mut().for_each(|l| *l = 0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l_out[i] as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    // ggml's loop updates `min` when a candidate improves, and later candidates use it: evaluate
    // the next LANES candidates side by side with the current `min`, accept the first improvement,
    // and go on from the candidate after it with the new `min` (or after the window if none).
    const LANES: usize = 8;
    let mut start = 0usize;
    let mut chosen = None;
    while start <= nstep as usize {
        let ctx = Candidates { search, x, weights, min, max, nmax, rmin, rdelta, nstep, use_mad, sum_w, sum_x, start };
        let Some((k, this_scale, this_min, err)) = ctx.search::<LANES>(best_error) else {
            start += LANES;
            continue;
        };
        chosen = Some((ctx.iscale(k), min));
        best_error = err;
        scale = this_scale;
        min = this_min;
        start = k + 1;
    }
    if let Some((iscale, at_min)) = chosen {
        // the levels of the last improvement, as evaluated: with the `min` of that moment
        let ctx = Candidates { search, x, weights, min: at_min, max, nmax, rmin, rdelta, nstep, use_mad, sum_w, sum_x, start: 0 };
        for i in 0..n {
            l_out[i] = ctx.level(iscale * (x[i] - at_min));
        }
    }
    (scale, -min)
}

/// The candidate scales of [`make_qkx_quants`], evaluated side by side: lane `k` holds candidate
/// `is = k`, and every lane performs exactly the operations, in exactly the order, of ggml's loop
/// for that candidate (the sums over the block stay sequential within a lane), so the result is
/// bit-identical while the lanes fill the vector registers. The choice among the candidates is then
/// made in ggml's order.
struct Candidates<'a> {
    search: Search,
    x: &'a [f32],
    weights: &'a [f32],
    min: f32,
    max: f32,
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
    sum_w: f32,
    sum_x: f32,
    /// The first candidate evaluated (lane j is candidate `start + j`).
    start: usize,
}

impl Candidates<'_> {
    #[inline(always)]
    fn iscale(&self, k: usize) -> f32 {
        (self.rmin + self.rdelta * k as f32 + self.nmax as f32) / (self.max - self.min)
    }

    #[inline(always)]
    fn level(&self, v: f32) -> u8 {
        match self.search {
            Search::Qkx2 => nearest_int(v).clamp(0, self.nmax) as u8,
            Search::Qkx3 => {
                if v > 0.0 {
                    nearest_int(v.min(self.nmax as f32)) as u8
                } else {
                    0
                }
            }
        }
    }

    /// The first candidate from `start` on (in ggml's order) that improves on `best_error`, as
    /// (k, scale, min, error).
    fn search<const L: usize>(&self, best_error: f32) -> Option<(usize, f32, f32, f32)> {
        #[cfg(target_arch = "x86_64")]
        if super::avx2() {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { self.search_avx2::<L>(best_error) };
        }
        self.search_lanes::<L>(best_error)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn search_avx2<const L: usize>(&self, best_error: f32) -> Option<(usize, f32, f32, f32)> {
        self.search_lanes::<L>(best_error)
    }

    #[inline(always)]
    fn search_lanes<const L: usize>(&self, best_error: f32) -> Option<(usize, f32, f32, f32)> {
        let ns = (self.nstep as usize + 1 - self.start).min(L);
        let mut isc = [0f32; L];
        for (j, v) in isc.iter_mut().enumerate().take(ns) {
            *v = self.iscale(self.start + j);
        }
        let (mut sl, mut sl2, mut sxl) = ([0f32; L], [0f32; L], [0f32; L]);
        for (&xi, &w) in self.x.iter().zip(self.weights) {
            let xm = xi - self.min;
            for k in 0..L {
                let lf = self.level(isc[k] * xm) as f32;
                sl[k] += w * lf;
                sl2[k] += w * lf * lf;
                sxl[k] += w * lf * xi;
            }
        }
        let (mut ts, mut tm, mut valid) = ([0f32; L], [0f32; L], [false; L]);
        for k in 0..ns {
            let d = self.sum_w * sl2[k] - sl[k] * sl[k];
            if d > 0.0 {
                let mut this_scale = (self.sum_w * sxl[k] - self.sum_x * sl[k]) / d;
                let mut this_min = (sl2[k] * self.sum_x - sl[k] * sxl[k]) / d;
                if this_min > 0.0 {
                    this_min = 0.0;
                    this_scale = sxl[k] / sl2[k];
                }
                (ts[k], tm[k], valid[k]) = (this_scale, this_min, true);
            }
        }
        let mut ce = [0f32; L];
        for (&xi, &w) in self.x.iter().zip(self.weights) {
            let xm = xi - self.min;
            for k in 0..L {
                let lf = self.level(isc[k] * xm) as f32;
                let diff = ts[k] * lf + tm[k] - xi;
                ce[k] += w * if self.use_mad { diff.abs() } else { diff * diff };
            }
        }
        (0..ns).find(|&k| valid[k] && ce[k] < best_error).map(|k| (self.start + k, ts[k], tm[k], ce[k]))
    }
}

/// The final pass of Q4_K/Q5_K: each value re-quantized with the stored (rounded) super-block
/// scale and min and its sub-block's 6-bit scale and min; sub-blocks with a zero scale keep `l`.
fn requantize_k4(x: &[f32], d: u16, dmin: u16, packed: &[u8], nmax: i32, l: &mut [u8]) {
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, packed);
        let dd = from_fp16(d) * sc as f32;
        if dd == 0.0 {
            continue;
        }
        let dm = from_fp16(dmin) * m as f32;
        for ii in 0..32 {
            l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dd).clamp(0, nmax) as u8;
        }
    }
}

fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn pack_scales_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xf) | ((lm[j] & 0xf) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// Shared by Q4_K and Q5_K: per-32 scales and mins quantized to 6 bits, then levels recomputed
/// from the f16-rounded super-block scales. Returns (d, dmin, packed scales, levels).
fn k4_scales_and_levels(x: &[f32], nmax: i32, rmin: f32, nstep: i32) -> (u16, u16, [u8; 12], [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    let mut weights = [0f32; 32];
    for j in 0..8 {
        let xb = &x[32 * j..32 * j + 32];
        let av_x = (sum_squares(xb) / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xb) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx_quants(Search::Qkx2, xb, nmax, &weights, &mut l[32 * j..32 * j + 32], rmin, 0.1, nstep, false);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_scales_k4(&ls, &lm);
    let d = fp16(max_scale / 63.0);
    let dmin = fp16(max_min / 63.0);
    requantize_k4(x, d, dmin, &packed, nmax, &mut l);
    (d, dmin, packed, l)
}

fn pack_q4_k(d: u16, dmin: u16, scales: &[u8; 12], l: &[u8; QK_K], out: &mut Vec<u8>) {
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
    out.extend_from_slice(scales);
    for j in (0..QK_K).step_by(64) {
        for i in 0..32 {
            out.push(l[j + i] | (l[j + i + 32] << 4));
        }
    }
}

/// Q4_K; with an importance vector as `quantize_row_q4_K_impl`.
pub fn quantize_q4_k(x: &[f32], imatrix: Option<&[f32]>, out: &mut Vec<u8>) {
    for (bi, xb) in x.chunks_exact(QK_K).enumerate() {
        let (d, dmin, scales, l) = match imatrix {
            None => k4_scales_and_levels(xb, 15, -1.0, 20),
            Some(q) => k4_weighted(xb, &q[QK_K * bi..QK_K * (bi + 1)], 15),
        };
        pack_q4_k(d, dmin, &scales, &l, out);
    }
}

/// Q5_K; with an importance vector as `quantize_row_q5_K_impl`.
pub fn quantize_q5_k(x: &[f32], imatrix: Option<&[f32]>, out: &mut Vec<u8>) {
    for (bi, xb) in x.chunks_exact(QK_K).enumerate() {
        let (d, dmin, scales, l) = match imatrix {
            None => k4_scales_and_levels(xb, 31, -0.5, 15),
            Some(q) => k4_weighted(xb, &q[QK_K * bi..QK_K * (bi + 1)], 31),
        };
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&dmin.to_le_bytes());
        out.extend_from_slice(&scales);
        let mut qh = [0u8; 32];
        let mut ql = [0u8; 128];
        let (mut m1, mut m2) = (1u8, 2u8);
        for (k, n) in (0..QK_K).step_by(64).enumerate() {
            for j in 0..32 {
                let mut l1 = l[n + j];
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                let mut l2 = l[n + j + 32];
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[32 * k + j] = l1 | (l2 << 4);
            }
            m1 <<= 2;
            m2 <<= 2;
        }
        out.extend_from_slice(&qh);
        out.extend_from_slice(&ql);
    }
}

/// Q6_K; with an importance vector (per column of the row) as `quantize_row_q6_K_impl`.
pub fn quantize_q6_k(x: &[f32], imatrix: Option<&[f32]>, out: &mut Vec<u8>) {
    for (bi, xb) in x.chunks_exact(QK_K).enumerate() {
        let mut l = [0i8; QK_K];
        let mut scales = [0f32; 16];
        let (mut max_scale, mut max_abs) = (0f32, 0f32);
        for ib in 0..16 {
            let qw = imatrix.map(|q| &q[QK_K * bi + 16 * ib..QK_K * bi + 16 * ib + 16]);
            let s = make_qx_quants(&xb[16 * ib..16 * ib + 16], 32, &mut l[16 * ib..16 * ib + 16], qw);
            scales[ib] = s;
            if s.abs() > max_abs {
                max_abs = s.abs();
                max_scale = s;
            }
        }
        if max_abs < GROUP_MAX_EPS {
            out.extend(std::iter::repeat_n(0u8, 208));
            out.extend_from_slice(&fp16(0.0).to_le_bytes());
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = fp16(1.0 / iscale);
        let mut sc = [0i8; 16];
        for ib in 0..16 {
            sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        }
        for j in 0..16 {
            let dd = from_fp16(d) * sc[j] as f32;
            if dd == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(xb[16 * j + ii] / dd).clamp(-32, 31);
                l[16 * j + ii] = (q + 32) as i8;
            }
        }
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for (k, j) in (0..QK_K).step_by(128).enumerate() {
            for i in 0..32 {
                let g = |o: usize| l[j + i + o] as u8;
                ql[64 * k + i] = (g(0) & 0xf) | ((g(64) & 0xf) << 4);
                ql[64 * k + i + 32] = (g(32) & 0xf) | ((g(96) & 0xf) << 4);
                qh[32 * k + i] = (g(0) >> 4) | ((g(32) >> 4) << 2) | ((g(64) >> 4) << 4) | ((g(96) >> 4) << 6);
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(sc.iter().map(|&s| s as u8));
        out.extend_from_slice(&d.to_le_bytes());
    }
}

/// Q2_K; with an importance vector as `quantize_row_q2_K_impl`.
pub fn quantize_q2_k(x: &[f32], imatrix: Option<&[f32]>, out: &mut Vec<u8>) {
    for (bi, xb) in x.chunks_exact(QK_K).enumerate() {
        if let Some(q) = imatrix {
            q2_k_weighted(xb, &q[QK_K * bi..QK_K * (bi + 1)], out);
            continue;
        }
        let mut l = [0u8; QK_K];
        let mut scales = [0f32; 16];
        let mut mins = [0f32; 16];
        let (mut max_scale, mut max_min) = (0f32, 0f32);
        let mut weights = [0f32; 16];
        for j in 0..16 {
            let b = &xb[16 * j..16 * j + 16];
            for (w, &v) in weights.iter_mut().zip(b) {
                *w = v.abs();
            }
            let (s, m) = make_qkx_quants(Search::Qkx2, b, 3, &weights, &mut l[16 * j..16 * j + 16], -0.5, 0.1, 15, true);
            scales[j] = s;
            mins[j] = m;
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        let mut sc = [0u8; 16];
        let d;
        if max_scale > 0.0 {
            let iscale = 15.0 / max_scale;
            for j in 0..16 {
                sc[j] = nearest_int(iscale * scales[j]) as u8;
            }
            d = fp16(max_scale / 15.0);
        } else {
            d = fp16(0.0);
        }
        let dmin;
        if max_min > 0.0 {
            let iscale = 15.0 / max_min;
            for j in 0..16 {
                sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
            }
            dmin = fp16(max_min / 15.0);
        } else {
            dmin = fp16(0.0);
        }
        for j in 0..16 {
            let dd = from_fp16(d) * (sc[j] & 0xf) as f32;
            if dd == 0.0 {
                continue;
            }
            let dm = from_fp16(dmin) * (sc[j] >> 4) as f32;
            for ii in 0..16 {
                l[16 * j + ii] = nearest_int((xb[16 * j + ii] + dm) / dd).clamp(0, 3) as u8;
            }
        }
        pack_q2_k(&sc, &l, d, dmin, out);
    }
}

fn pack_q2_k(sc: &[u8; 16], l: &[u8; QK_K], d: u16, dmin: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(sc);
    for j in (0..QK_K).step_by(128) {
        for i in 0..32 {
            out.push(l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6));
        }
    }
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&dmin.to_le_bytes());
}

/// Q3_K; with an importance vector as `quantize_row_q3_K_impl`.
pub fn quantize_q3_k(x: &[f32], imatrix: Option<&[f32]>, out: &mut Vec<u8>) {
    for (bi, xb) in x.chunks_exact(QK_K).enumerate() {
        if let Some(q) = imatrix {
            q3_k_weighted(xb, &q[QK_K * bi..QK_K * (bi + 1)], out);
            continue;
        }
        let mut l = [0i8; QK_K];
        let scales = make_q3_quants_x16(xb.try_into().expect("QK_K values"), &mut l);
        let (mut max_scale, mut amax) = (0f32, 0f32);
        for j in 0..16 {
            let s = scales[j].abs();
            if s > amax {
                amax = s;
                max_scale = scales[j];
            }
        }
        let mut sc = [0u8; 12];
        let d;
        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for j in 0..16 {
                let mut lv = (nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32;
                if j < 8 {
                    sc[j] = (lv & 0xf) as u8;
                } else {
                    sc[j - 8] |= ((lv & 0xf) << 4) as u8;
                }
                lv >>= 4;
                sc[j % 4 + 8] |= (lv << (2 * (j / 4))) as u8;
            }
            d = fp16(1.0 / iscale);
        } else {
            d = fp16(0.0);
        }
        q3_k_finish(xb, &mut l, &sc, d, out);
    }
}

/// Q3_K's last pass (levels from the f16 scales) and packing, shared by both paths.
fn q3_k_finish(xb: &[f32], l: &mut [i8; QK_K], sc: &[u8; 12], d: u16, out: &mut Vec<u8>) {
        for j in 0..16 {
            let s = if j < 8 { sc[j] & 0xf } else { sc[j - 8] >> 4 } as i8;
            let s = (s | ((((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4) as i8)) - 32;
            let dd = from_fp16(d) * s as f32;
            if dd == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(xb[16 * j + ii] / dd).clamp(-4, 3);
                l[16 * j + ii] = (q + 4) as i8;
            }
        }
        let mut hmask = [0u8; 32];
        let (mut m, mut hm) = (0usize, 1u8);
        for v in l.iter_mut() {
            if *v > 3 {
                hmask[m] |= hm;
                *v -= 4;
            }
            m += 1;
            if m == QK_K / 8 {
                m = 0;
                hm = hm.wrapping_shl(1);
            }
        }
        out.extend_from_slice(&hmask);
        for j in (0..QK_K).step_by(128) {
            for i in 0..32 {
                let g = |o: usize| l[j + i + o] as u8;
                out.push(g(0) | (g(32) << 2) | (g(64) << 4) | (g(96) << 6));
            }
        }
        out.extend_from_slice(sc);
        out.extend_from_slice(&d.to_le_bytes());
}

/// `make_qp_quants`: positive values (block scales or mins) to levels 0..=nmax under weights.
/// Like ggml, the levels live in bytes throughout: a negative value (IQ2_XXS hands it one value
/// flipped negative) gives a negative level that wraps to 256 + l, and the refinement reads it
/// back that way.
pub(crate) fn make_qp_quants(x: &[f32], nmax: i32, l_out: &mut [u8], qw: &[f32]) -> f32 {
    let n = x.len();
    let mut max = 0f32;
    for &v in x {
        max = max.max(v);
    }
    if max < GROUP_MAX_EPS {
        l_out.iter_mut().for_each(|l| *l = 0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / max;
    for i in 0..n {
        l_out[i] = nearest_int(iscale * x[i]) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0f32;
    for i in 0..n {
        let diff = x[i] - scale * l_out[i] as f32;
        best_mse += qw[i] * diff * diff;
    }
    for is in -4i32..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmaxf) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0f32;
        for i in 0..n {
            let l = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * l as f32;
            mse += qw[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).min(nmax);
        l_out[i] = l as u8;
        sumlx += qw[i] * x[i] * l as f32;
        suml2 += qw[i] * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for i in 0..n {
            let w = qw[i];
            let li = l_out[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            let mut sl2 = suml2 - w * li * li;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != l_out[i] as i32 {
                    slx += w * x[i] * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l_out[i] = new_l as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Sum of squares in ggml's sequential order.
pub(crate) fn sum_squares(x: &[f32]) -> f32 {
    let mut s = 0f32;
    for &v in x {
        s += v * v;
    }
    s
}

/// The importance weights of one sub-block, `qw * sqrt(sigma2 + x^2)`, as ggml's `*_impl` paths
/// compute them; returns their sum (sequential, as ggml sums them).
pub(crate) fn importance_weights(x: &[f32], qw: &[f32], sigma2: f32, w: &mut [f32]) -> f32 {
    let mut sum = 0f32;
    for ((o, &v), &q) in w.iter_mut().zip(x).zip(qw) {
        *o = q * (sigma2 + v * v).sqrt();
        sum += *o;
    }
    sum
}

/// Q4_K / Q5_K with an importance vector (`quantize_row_q{4,5}_K_impl`).
fn k4_weighted(x: &[f32], qw: &[f32], nmax: i32) -> (u16, u16, [u8; 12], [u8; QK_K]) {
    let mut l = [0u8; QK_K];
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut sw = [0f32; 8];
    let mut weights = [0f32; 32];
    for j in 0..8 {
        sw[j] = importance_weights(&x[32 * j..32 * j + 32], &qw[32 * j..32 * j + 32], sigma2, &mut weights);
        let (s, m) = make_qkx_quants(Search::Qkx3, &x[32 * j..32 * j + 32], nmax, &weights, &mut l[32 * j..32 * j + 32], -0.9, 0.05, 36, false);
        scales[j] = s;
        mins[j] = m;
    }
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    let d_block = make_qp_quants(&scales, 63, &mut ls, &sw);
    let m_block = make_qp_quants(&mins, 63, &mut lm, &sw);
    for j in 0..8 {
        ls[j] = ls[j].min(63);
        lm[j] = lm[j].min(63);
    }
    let packed = pack_scales_k4(&ls, &lm);
    let d = fp16(d_block);
    let dmin = fp16(m_block);
    requantize_k4(x, d, dmin, &packed, nmax, &mut l);
    (d, dmin, packed, l)
}

/// Q2_K with an importance vector (`quantize_row_q2_K_impl`).
fn q2_k_weighted(x: &[f32], qw: &[f32], out: &mut Vec<u8>) {
    let mut l = [0u8; QK_K];
    let sigma2 = sum_squares(x) / QK_K as f32;
    let mut scales = [0f32; 16];
    let mut mins = [0f32; 16];
    let mut sw = [0f32; 16];
    let mut weight = [0f32; 16];
    for j in 0..16 {
        sw[j] = importance_weights(&x[16 * j..16 * j + 16], &qw[16 * j..16 * j + 16], sigma2, &mut weight);
        let (s, m) = make_qkx_quants(Search::Qkx3, &x[16 * j..16 * j + 16], 3, &weight, &mut l[16 * j..16 * j + 16], -0.9, 0.05, 36, false);
        scales[j] = s;
        mins[j] = m;
    }
    let mut ls = [0u8; 16];
    let mut lm = [0u8; 16];
    let dm = make_qp_quants(&scales, 15, &mut ls, &sw);
    let mm = make_qp_quants(&mins, 15, &mut lm, &sw);
    let d = fp16(dm);
    let dmin = fp16(mm);
    let (dm, mm) = (from_fp16(d), from_fp16(dmin));
    let mut sc = [0u8; 16];
    for j in 0..16 {
        sc[j] = ls[j] | (lm[j] << 4);
    }
    for j in 0..16 {
        let dd = dm * (sc[j] & 0xf) as f32;
        if dd == 0.0 {
            continue;
        }
        let m = mm * (sc[j] >> 4) as f32;
        for ii in 0..16 {
            l[16 * j + ii] = nearest_int((x[16 * j + ii] + m) / dd).clamp(0, 3) as u8;
        }
    }
    pack_q2_k(&sc, &l, d, dmin, out);
}

/// Q3_K with an importance vector (`quantize_row_q3_K_impl`).
fn q3_k_weighted(x: &[f32], qw: &[f32], out: &mut Vec<u8>) {
    let mut l = [0i8; QK_K];
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    let mut scales = [0f32; 16];
    let mut sw = [0f32; 16];
    let mut weight = [0f32; 16];
    for j in 0..16 {
        sw[j] = importance_weights(&x[16 * j..16 * j + 16], &qw[16 * j..16 * j + 16], sigma2, &mut weight);
        scales[j] = make_qx_quants(&x[16 * j..16 * j + 16], 4, &mut l[16 * j..16 * j + 16], Some(&weight));
    }
    let mut ls = [0i8; 16];
    let d_block = make_qx_quants(&scales, 32, &mut ls, Some(&sw));
    let mut sc = [0u8; 12];
    for j in 0..16 {
        let mut lv = ls[j] as i32;
        if j < 8 {
            sc[j] = (lv & 0xf) as u8;
        } else {
            sc[j - 8] |= ((lv & 0xf) << 4) as u8;
        }
        lv >>= 4;
        sc[j % 4 + 8] |= (lv << (2 * (j / 4))) as u8;
    }
    q3_k_finish(x, &mut l, &sc, fp16(d_block), out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 16-lane Q3_K search equals ggml's one-sub-block-at-a-time search, bit for bit, on
    /// random super-blocks with zero, constant, tiny and outlier sub-blocks mixed in.
    #[test]
    fn q3_lanes_equal_the_sequential_search() {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for b in 0..400 {
            let mut xb = [0f32; QK_K];
            for v in xb.iter_mut() {
                *v = rnd() * 0.1;
            }
            match b % 5 {
                1 => xb[..16].fill(0.0),
                2 => xb[16..32].fill(0.25),
                3 => xb[32..48].iter_mut().for_each(|v| *v *= 1e-12),
                4 => xb[50] = 7.0,
                _ => {}
            }
            let mut l = [0i8; QK_K];
            let scales = make_q3_quants_x16(&xb, &mut l);
            for j in 0..16 {
                let mut lj = [0i8; 16];
                let sj = make_q3_quants(&xb[16 * j..16 * j + 16], 4, &mut lj);
                assert_eq!(sj.to_bits(), scales[j].to_bits(), "block {b} sub-block {j}");
                assert_eq!(lj, l[16 * j..16 * j + 16], "block {b} sub-block {j}");
            }
        }
    }
}
