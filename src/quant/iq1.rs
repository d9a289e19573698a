//! IQ1_S and IQ1_M: 256-value super-blocks whose groups of 8 values are points of a ternary grid
//! (levels -1, 0, 1, 2048 points: `iqgrid::grid2(2048)`) shifted by ±1/8 per group, one scale per
//! super-block and 3-bit scales per 32 (IQ1_S) or 16 values (IQ1_M). Bit-exact with ggml 0.25.3's
//! `quantize_row_iq1_s_impl` and `quantize_row_iq1_m_impl`: per group, the exact weighted
//! least-squares split of the sorted values into three levels, then the nearest grid points.
//! IQ1_S needs an importance vector (ggml asserts one); IQ1_M weighs by `x^2` without.
//!
//! IQ1_S block (50 B): f16 d; 32 low bytes of grid indices; per 32 values a u16: the indices'
//! high 3 bits (4 x 3), the 3-bit scale in bits 12-14 and the shift's sign in bit 15.
//! IQ1_M block (56 B): 32 low bytes of grid indices; per 16 values a byte: two indices' high 3
//! bits and a shift-sign bit after each (bits 3 and 7); 8 bytes of 3-bit scales, four per u16,
//! the f16 super-block scale spread over the top nibbles of those four u16.

use half::f16;

use super::iqgrid::{decode_all, with_avx2, code2, grid2, Grid, Lookup};
use super::kquants::nearest_int;

const QK: usize = 256;
pub const IQ1_S_BYTES: usize = 50;
pub const IQ1_M_BYTES: usize = 56;
const DELTA: f32 = 0.125;
const X_P: [f32; 3] = [-1.0 + DELTA, DELTA, 1.0 + DELTA];
const X_M: [f32; 3] = [-1.0 - DELTA, -DELTA, 1.0 - DELTA];
const GROUP_MAX_EPS_IQ1_S: f32 = 1e-12;
const GROUP_MAX_EPS_IQ1_M: f32 = 1e-7;

/// The indices of `xb` in ascending order of value, equal values in their original order (glibc's
/// qsort, a merge sort, as the golden bytes were made; the comparator looks at values only).
fn sorted(xb: &[f32]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..xb.len()).collect();
    for i in 1..idx.len() {
        let mut j = i;
        while j > 0 && xb[idx[j - 1]] > xb[idx[j]] {
            idx.swap(j - 1, j);
            j -= 1;
        }
    }
    idx
}

/// The largest `|x|`, as ggml's `MAX(max, fabsf(x))` left to right.
fn max_abs(xb: &[f32]) -> f32 {
    xb[1..].iter().fold(xb[0].abs(), |m, &x| if m > x.abs() { m } else { x.abs() })
}

/// The grid point nearest to `scale * xx[level]` in the weighted squared distance (ggml's
/// `iq1_find_best_neighbour2`), its levels written into `l`.
fn best_neighbour2(g: &Grid<8>, near: &[u16], xval: &[f32], weight: &[f32], scale: f32, xx: &[f32; 3], l: &mut [i8]) -> usize {
    let mut best_score = f32::MAX;
    // ggml would search the whole grid when every distance is NaN (and read out of bounds doing
    // so); finite inputs never get there: the first neighbour stands in
    let mut best = near[0] as usize;
    for &j in near {
        let p = &g.points[j as usize];
        let mut d2 = 0f32;
        for i in 0..8 {
            let q = xx[((p[i] - 1) / 2) as usize];
            let diff = scale * q - xval[i];
            d2 += weight[i] * diff * diff;
        }
        if d2 < best_score {
            best_score = d2;
            best = j as usize;
        }
    }
    for (l, &c) in l.iter_mut().zip(&g.points[best]) {
        *l = (c - 1) / 2;
    }
    best
}

/// The grid index of 8 levels: on the grid, or the best neighbour (levels rewritten).
fn place(g: &Grid<8>, xb: &[f32], weight: &[f32], scale: f32, xx: &[f32; 3], l: &mut [i8]) -> (usize, bool) {
    match g.lookup(code2(l)) {
        Lookup::Point(p) => (p, true),
        Lookup::Near(near) => (best_neighbour2(g, near, xb, weight, scale, xx, l), false),
    }
}

/// Assigns levels 0 / 1 / 2 to the values below `i1`, between, and from `i2` on in sorted order.
fn split_levels(order: &[usize], i1: usize, i2: usize, l: &mut [i8]) {
    for (j, &i) in order.iter().enumerate() {
        l[i] = if j < i1 {
            0
        } else if j < i2 {
            1
        } else {
            2
        };
    }
}

/// Appends the IQ1_S blocks of `x` (whole 256-value super-blocks), weighted by `imatrix`.
pub fn quantize_iq1_s(x: &[f32], imatrix: &[f32], out: &mut Vec<u8>) {
    const BS: usize = 32;
    let g = grid2(2048);
    for (ibl, xbl) in x.chunks_exact(QK).enumerate() {
        let qwb = &imatrix[QK * ibl..QK * (ibl + 1)];
        let s2 = super::iqgrid::sigma2(xbl, true);
        let (mut qs, mut qh) = ([0u8; 32], [0u16; 8]);
        let mut scales = [0f32; 8];
        let mut shifts = [1i8; 8];
        let mut max_scale = 0f32;
        let mut weight = [0f32; BS];
        for ib in 0..8 {
            let xb = &xbl[BS * ib..BS * (ib + 1)];
            for i in 0..BS {
                weight[i] = qwb[BS * ib + i] * (s2 + xb[i] * xb[i]).sqrt();
            }
            let max = max_abs(xb);
            if max < GROUP_MAX_EPS_IQ1_S {
                scales[ib] = 0.0;
                shifts[ib] = 1;
                continue;
            }
            let order = sorted(xb);
            let (mut sumx, mut sumw) = ([0f32; BS + 1], [0f32; BS + 1]);
            for (j, &i) in order.iter().enumerate() {
                sumx[j + 1] = sumx[j] + weight[i] * xb[i];
                sumw[j + 1] = sumw[j] + weight[i];
            }
            let (mut best_score, mut scale) = (-f32::MAX, max);
            let (mut besti1, mut besti2, mut best_shift) = (usize::MAX, usize::MAX, 0i8);
            for i1 in 0..=BS {
                for i2 in i1..=BS {
                    for (xs, shift) in [(&X_P, 1i8), (&X_M, -1)] {
                        let sumqx = (sumx[i1] - sumx[0]) * xs[0] + (sumx[i2] - sumx[i1]) * xs[1] + (sumx[BS] - sumx[i2]) * xs[2];
                        let sumq2 = (sumw[i1] - sumw[0]) * xs[0] * xs[0] + (sumw[i2] - sumw[i1]) * xs[1] * xs[1] + (sumw[BS] - sumw[i2]) * xs[2] * xs[2];
                        if sumq2 > 0.0 && sumqx * sumqx > best_score * sumq2 {
                            scale = sumqx / sumq2;
                            best_score = scale * sumqx;
                            (besti1, besti2, best_shift) = (i1, i2, shift);
                        }
                    }
                }
            }
            if besti1 == usize::MAX || best_shift == 0 {
                scales[ib] = 0.0;
                shifts[ib] = 1;
                continue;
            }
            let mut l = [0i8; BS];
            split_levels(&order, besti1, besti2, &mut l);
            if scale < 0.0 {
                l.iter_mut().for_each(|v| *v = 2 - *v);
                scale = -scale;
                best_shift = -best_shift;
            }
            let xx = if best_shift == 1 { &X_P } else { &X_M };
            let mut index = [0usize; 4];
            let mut all_on_grid = true;
            for k in 0..4 {
                let r = 8 * k..8 * k + 8;
                let (p, on) = place(g, &xb[r.clone()], &weight[r.clone()], scale, xx, &mut l[r]);
                index[k] = p;
                all_on_grid &= on;
            }
            if !all_on_grid {
                let (mut sumqx, mut sumq2) = (0f32, 0f32);
                for k in 0..4 {
                    for j in 0..8 {
                        let w = weight[8 * k + j];
                        let q = xx[((g.points[index[k]][j] - 1) / 2) as usize];
                        sumqx += w * q * xb[8 * k + j];
                        sumq2 += w * q * q;
                    }
                }
                if sumqx > 0.0 && sumq2 > 0.0 {
                    scale = sumqx / sumq2;
                }
            }
            let mut h = 0u16;
            for k in 0..4 {
                qs[4 * ib + k] = (index[k] & 255) as u8;
                h |= ((index[k] >> 8) as u16) << (3 * k);
            }
            qh[ib] = h;
            scales[ib] = scale;
            shifts[ib] = best_shift;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        let mut d = 0f32;
        if max_scale != 0.0 {
            d = max_scale / 15.0;
            let id = 1.0 / d;
            for ib in 0..8 {
                let mut l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 7);
                if shifts[ib] == -1 {
                    l |= 8;
                }
                qh[ib] |= (l as u16) << 12;
            }
        }
        out.extend_from_slice(&f16::from_f32(d * 1.125).to_bits().to_le_bytes());
        out.extend_from_slice(&qs);
        for h in qh {
            out.extend_from_slice(&h.to_le_bytes());
        }
    }
}

/// Appends the IQ1_M blocks of `x` (whole 256-value super-blocks).
pub fn quantize_iq1_m(x: &[f32], imatrix: Option<&[f32]>, out: &mut Vec<u8>) {
    const BS: usize = 16;
    const MASKS: [u8; 4] = [0x00, 0x80, 0x08, 0x88];
    let g = grid2(2048);
    // the shift of each half of a group, by the group's k: 0 (+, +), 1 (+, -), 2 (-, +), 3 (-, -)
    let xx_of = |k: usize, half: usize| -> &'static [f32; 3] {
        let minus = if half == 0 { k >= 2 } else { k % 2 == 1 };
        if minus { &X_M } else { &X_P }
    };
    let weights = |xb: &[f32], qw: Option<&[f32]>, s2: f32, weight: &mut [f32; BS]| {
        for i in 0..BS {
            weight[i] = match qw {
                Some(q) => q[i] * (s2 + xb[i] * xb[i]).sqrt(),
                None => xb[i] * xb[i],
            };
        }
    };
    for (ibl, xbl) in x.chunks_exact(QK).enumerate() {
        let qwb = imatrix.map(|q| &q[QK * ibl..QK * (ibl + 1)]);
        let s2 = super::iqgrid::sigma2(xbl, true);
        let (mut qs, mut qh, mut sc) = ([0u8; 32], [0u8; 16], [0u16; 4]);
        let mut scales = [0f32; 16];
        let mut shifts = [0usize; 16];
        let mut max_scale = 0f32;
        let mut weight = [0f32; BS];
        for ib in 0..16 {
            let xb = &xbl[BS * ib..BS * (ib + 1)];
            weights(xb, qwb.map(|q| &q[BS * ib..BS * (ib + 1)]), s2, &mut weight);
            let max = max_abs(xb);
            if max < GROUP_MAX_EPS_IQ1_M {
                scales[ib] = 0.0;
                shifts[ib] = 0;
                continue;
            }
            let order = sorted(xb);
            // prefix sums per half of the group (each half takes its own shift)
            let (mut px, mut pw) = ([[0f32; BS + 1]; 2], [[0f32; BS + 1]; 2]);
            for (j, &i) in order.iter().enumerate() {
                let h = usize::from(i >= BS / 2);
                px[h][j + 1] = px[h][j] + weight[i] * xb[i];
                px[1 - h][j + 1] = px[1 - h][j];
                pw[h][j + 1] = pw[h][j] + weight[i];
                pw[1 - h][j + 1] = pw[1 - h][j];
            }
            let txs = [px[0][BS], px[1][BS]];
            let tws = [pw[0][BS], pw[1][BS]];
            let (p2, m2) = (X_P[2], X_M[2]);
            let cp1 = X_P[0] * X_P[0] - X_P[1] * X_P[1];
            let cp2 = X_P[1] * X_P[1] - X_P[2] * X_P[2];
            let cm1 = X_M[0] * X_M[0] - X_M[1] * X_M[1];
            let cm2 = X_M[1] * X_M[1] - X_M[2] * X_M[2];
            let (mut best_score, mut scale) = (-f32::MAX, max);
            let (mut besti1, mut besti2, mut best_k) = (usize::MAX, usize::MAX, usize::MAX);
            for i1 in 0..=BS {
                for i2 in i1..=BS {
                    let (mut qx_p, mut qx_m, mut q2_p, mut q2_m) = ([0f32; 2], [0f32; 2], [0f32; 2], [0f32; 2]);
                    for h in 0..2 {
                        let sx = px[h][i1] + px[h][i2];
                        qx_p[h] = txs[h] * p2 - sx;
                        qx_m[h] = txs[h] * m2 - sx;
                        q2_p[h] = tws[h] * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2;
                        q2_m[h] = tws[h] * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2;
                    }
                    let sumqx = [qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1], qx_m[0] + qx_m[1]];
                    let sumq2 = [q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1], q2_m[0] + q2_m[1]];
                    for k in 0..4 {
                        if sumq2[k] > 0.0 && sumqx[k] * sumqx[k] > best_score * sumq2[k] {
                            scale = sumqx[k] / sumq2[k];
                            best_score = scale * sumqx[k];
                            (besti1, besti2, best_k) = (i1, i2, k);
                        }
                    }
                }
            }
            if besti1 == usize::MAX || best_k == usize::MAX {
                scales[ib] = 0.0;
                shifts[ib] = 0;
                continue;
            }
            let mut l = [0i8; BS];
            split_levels(&order, besti1, besti2, &mut l);
            if scale < 0.0 {
                l.iter_mut().for_each(|v| *v = 2 - *v);
                scale = -scale;
                best_k = 3 - best_k;
            }
            let mut index = [0usize; 2];
            let mut all_on_grid = true;
            for k in 0..2 {
                let r = 8 * k..8 * k + 8;
                let (p, on) = place(g, &xb[r.clone()], &weight[r.clone()], scale, xx_of(best_k, k), &mut l[r]);
                index[k] = p;
                all_on_grid &= on;
            }
            if !all_on_grid {
                let (mut sumqx, mut sumq2) = (0f32, 0f32);
                for k in 0..2 {
                    let xx = xx_of(best_k, k);
                    for j in 0..8 {
                        let w = weight[8 * k + j];
                        let q = xx[((g.points[index[k]][j] - 1) / 2) as usize];
                        sumqx += w * q * xb[8 * k + j];
                        sumq2 += w * q * q;
                    }
                }
                if sumqx > 0.0 && sumq2 > 0.0 {
                    scale = sumqx / sumq2;
                }
            }
            qs[2 * ib] = (index[0] & 255) as u8;
            qs[2 * ib + 1] = (index[1] & 255) as u8;
            qh[ib] = (index[0] >> 8) as u8 | ((index[1] >> 8) as u8) << 4;
            scales[ib] = scale;
            shifts[ib] = best_k;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        if max_scale != 0.0 {
            let mut d = max_scale / 15.0;
            let id = 1.0 / d;
            let (mut sumqx, mut sumq2) = (0f32, 0f32);
            for ib in 0..16 {
                let l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 7);
                sc[ib / 4] |= (l as u16) << (3 * (ib % 4));
                qh[ib] |= MASKS[shifts[ib]];
                // the scale refit over every group (zero groups too, as grid point 0), at the
                // levels and grid points just stored
                let xb = &xbl[BS * ib..BS * (ib + 1)];
                weights(xb, qwb.map(|q| &q[BS * ib..BS * (ib + 1)]), s2, &mut weight);
                for k in 0..2 {
                    let xx = xx_of(shifts[ib], k);
                    let p = qs[2 * ib + k] as usize + (((qh[ib] as usize) << (8 - 4 * k)) & 0x700);
                    for j in 0..8 {
                        let w = weight[8 * k + j];
                        let q = xx[((g.points[p][j] - 1) / 2) as usize] * (2 * l + 1) as f32;
                        sumqx += w * q * xb[8 * k + j];
                        sumq2 += w * q * q;
                    }
                }
            }
            if sumq2 > 0.0 {
                d = sumqx / sumq2;
            }
            let s = f16::from_f32(d * 1.1125).to_bits();
            sc[0] |= (s & 0x000f) << 12;
            sc[1] |= (s & 0x00f0) << 8;
            sc[2] |= (s & 0x0f00) << 4;
            sc[3] |= s & 0xf000;
        }
        out.extend_from_slice(&qs);
        out.extend_from_slice(&qh);
        for s in sc {
            out.extend_from_slice(&s.to_le_bytes());
        }
    }
}

/// One IQ1_S block (50 bytes) to 256 floats, as ggml's `dequantize_row_iq1_s` (`iq1s_grid` holds
/// `l - 1`).
pub fn decode_iq1_s(b: &[u8], out: &mut [f32]) {
    with_avx2(b, out, decode_iq1_s_body)
}

#[inline(always)]
fn decode_iq1_s_body(b: &[u8], out: &mut [f32]) {
    let g = grid2(2048);
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let qs = &b[2..34];
    for ib in 0..8 {
        let qh = u16::from_le_bytes([b[34 + 2 * ib], b[35 + 2 * ib]]);
        let dl = d * (2 * ((qh >> 12) & 7) as i32 + 1) as f32;
        let delta = if qh & 0x8000 != 0 { -DELTA } else { DELTA };
        for l in 0..4 {
            let v = &g.values[qs[4 * ib + l] as usize | (((qh >> (3 * l)) & 7) as usize) << 8];
            let o = &mut out[32 * ib + 8 * l..32 * ib + 8 * l + 8];
            for j in 0..8 {
                o[j] = dl * (v[j] + delta);
            }
        }
    }
}

/// One IQ1_M block (56 bytes) to 256 floats, as ggml's `dequantize_row_iq1_m`.
pub fn decode_iq1_m(b: &[u8], out: &mut [f32]) {
    with_avx2(b, out, decode_iq1_m_body)
}

#[inline(always)]
fn decode_iq1_m_body(b: &[u8], out: &mut [f32]) {
    let g = grid2(2048);
    let (qs, qh) = (&b[0..32], &b[32..48]);
    let sc: [u16; 4] = std::array::from_fn(|i| u16::from_le_bytes([b[48 + 2 * i], b[49 + 2 * i]]));
    let s = (sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000);
    let d = f16::from_bits(s).to_f32();
    for ib in 0..8 {
        let dl = [
            d * (2 * ((sc[ib / 2] >> (6 * (ib % 2))) & 7) as i32 + 1) as f32,
            d * (2 * ((sc[ib / 2] >> (6 * (ib % 2) + 3)) & 7) as i32 + 1) as f32,
        ];
        for l in 0..4 {
            let h = qh[2 * ib + l / 2];
            let v = &g.values[qs[4 * ib + l] as usize | (((h as usize) << (8 - 4 * (l % 2))) & 0x700)];
            let delta = if h & (0x08 << (4 * (l % 2))) != 0 { -DELTA } else { DELTA };
            let o = &mut out[32 * ib + 8 * l..32 * ib + 8 * l + 8];
            for j in 0..8 {
                o[j] = dl[l / 2] * (v[j] + delta);
            }
        }
    }
}

/// IQ1_S blocks to floats, as ggml's `dequantize_row_iq1_s`.
pub fn dequantize_iq1_s(bytes: &[u8], out: &mut Vec<f32>) {
    decode_all(bytes, IQ1_S_BYTES, out, decode_iq1_s)
}

/// IQ1_M blocks to floats, as ggml's `dequantize_row_iq1_m`.
pub fn dequantize_iq1_m(bytes: &[u8], out: &mut Vec<f32>) {
    decode_all(bytes, IQ1_M_BYTES, out, decode_iq1_m)
}

/// The values of `iq1s_grid` (-1, 0, 1) point by point, as the dequantizers read them.
pub fn grid_values() -> Vec<f32> {
    grid2(2048).values.iter().flatten().copied().collect()
}
