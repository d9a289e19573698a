//! IQ3_XXS and IQ3_S: 256-value super-blocks whose groups of 4 magnitudes are points of a 3-bit
//! lattice grid (`iqgrid`), signs stored apart, one f16 scale per super-block and a 4-bit scale per
//! 32 values. Bit-exact with ggml 0.25.3's `quantize_row_iq3_xxs_impl` and
//! `quantize_row_iq3_s_impl` (the same float operations in the same order; weighted by x^2, or by
//! the importance vector times `sqrt(sigma2 + x^2)`).
//!
//! IQ3_XXS block (98 B): f16 d; 64 grid indices (256-point grid); per 32 values a u32 with four
//! 7-bit sign fields (the 8th sign of each 8 is their parity, so one value per 8 may be flipped to
//! make the count of minus signs even) and the 4-bit scale in bits 28-31.
//! IQ3_S block (110 B): f16 d; 64 low bytes of grid indices (512-point grid); 8 bytes of their
//! 9th bits; 32 bytes of signs (one bit per value); 4 bytes of two 4-bit scales.

use half::f16;

use super::iqgrid::{decode_all, with_avx2, code3, fmax_c, grid3, ksigns, scaled8, sigma2, sign_factors, signs8, sums, Grid, Lookup};
use super::kquants::nearest_int;

const QK: usize = 256;
pub const IQ3_XXS_BYTES: usize = 98;
pub const IQ3_S_BYTES: usize = 110;
const GROUP_MAX_EPS_IQ3_XXS: f32 = 1e-8;
const KMAX: i32 = 8;

/// Per 32 values: `weight` (importance times `sqrt(sigma2 + x^2)`, or `x^2`) and `sqrt(weight)`.
fn weights(xb: &[f32], qw: Option<&[f32]>, sigma2: f32, weight: &mut [f32; 32], waux: &mut [f32; 32]) {
    for i in 0..32 {
        weight[i] = match qw {
            Some(q) => q[i] * (sigma2 + xb[i] * xb[i]).sqrt(),
            None => xb[i] * xb[i],
        };
        waux[i] = weight[i].sqrt();
    }
}

/// The levels of 4 values at `id`, clamped to 0-7, and where their code lands.
fn levels4<'g>(g: &'g Grid<4>, xval: &[f32], id: f32, l: &mut [i8]) -> (usize, Lookup<'g>) {
    for i in 0..4 {
        l[i] = nearest_int(0.5 * (id * xval[i] - 1.0)).clamp(0, KMAX - 1) as i8;
    }
    let u = code3(l);
    (u, g.lookup(u))
}

/// One group of 32 values: the scale search over `trials` (−n..=n) steps of 0.2 around 15 levels,
/// then the off-grid groups re-placed at the best scale (`refit_all`: all 8 groups, IQ3_S; else
/// only those that were off the grid, IQ3_XXS). Returns the scale (0 for a zero group); `l`
/// holds on-grid levels.
#[allow(clippy::too_many_arguments)]
fn search(g: &Grid<4>, weight: &[f32; 32], waux: &[f32; 32], xval: &[f32; 32], max: f32, trials: i32, refit_all: bool, l: &mut [i8; 32]) -> f32 {
    let mut best = 0f32;
    let mut scale = max / (2 * KMAX - 1) as f32;
    // IQ3_XXS starts with every group "on the grid", IQ3_S with none (ggml's initial values: they
    // matter when no trial improves on `best`)
    let mut on_grid = [!refit_all; 8];
    let mut laux = [0i8; 32];
    let mut on_aux = [false; 8];
    for is in -trials..=trials {
        let id = ((2 * KMAX - 1) as f32 + is as f32 * 0.2) / max;
        let this_scale = 1.0 / id;
        for k in 0..8 {
            let (_, at) = levels4(g, &xval[4 * k..4 * k + 4], id, &mut laux[4 * k..4 * k + 4]);
            on_aux[k] = true;
            if let Lookup::Near(near) = at {
                on_aux[k] = false;
                g.best_neighbour(near, &xval[4 * k..4 * k + 4], &waux[4 * k..4 * k + 4], this_scale, &mut laux[4 * k..4 * k + 4]);
            }
        }
        let (sumqx, sumq2) = sums(weight, xval, &laux);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            *l = laux;
            on_grid = on_aux;
        }
    }
    if on_grid.iter().any(|&o| !o) && scale > 0.0 {
        let id = 1.0 / scale;
        for k in 0..8 {
            if on_grid[k] && !refit_all {
                continue;
            }
            let mut lk = [0i8; 4];
            let (_, at) = levels4(g, &xval[4 * k..4 * k + 4], id, &mut lk);
            let p = match at {
                Lookup::Point(p) => p,
                Lookup::Near(near) => g.best_neighbour(near, &xval[4 * k..4 * k + 4], &waux[4 * k..4 * k + 4], scale, &mut l[4 * k..4 * k + 4]),
            };
            for i in 0..4 {
                l[4 * k + i] = (g.points[p][i] - 1) / 2;
            }
        }
        let (sumqx, sumq2) = sums(weight, xval, l);
        if sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    scale
}

/// The grid index of each group of 4 levels (on the grid by construction).
fn indices(g: &Grid<4>, l: &[i8; 32]) -> [usize; 8] {
    std::array::from_fn(|k| match g.lookup(code3(&l[4 * k..4 * k + 4])) {
        Lookup::Point(p) => p,
        Lookup::Near(_) => unreachable!("levels placed on the grid"),
    })
}

/// Appends the IQ3_XXS blocks of `x` (a whole number of 256-value super-blocks).
pub fn quantize_iq3_xxs(x: &[f32], imatrix: Option<&[f32]>, out: &mut Vec<u8>) {
    let g = grid3(256);
    for (ibl, xbl) in x.chunks_exact(QK).enumerate() {
        let qwb = imatrix.map(|q| &q[QK * ibl..QK * (ibl + 1)]);
        let s2 = sigma2(xbl, true);
        let mut q3 = [0u8; 96];
        let mut sas = [0u32; 8];
        let mut scales = [0f32; 8];
        let mut max_scale = 0f32;
        let (mut weight, mut waux, mut xval) = ([0f32; 32], [0f32; 32], [0f32; 32]);
        for ib in 0..8 {
            let xb = &xbl[32 * ib..32 * ib + 32];
            weights(xb, qwb.map(|q| &q[32 * ib..32 * ib + 32]), s2, &mut weight, &mut waux);
            let mut block_signs: [u8; 4] = std::array::from_fn(|k| signs8(&xb[8 * k..8 * k + 8], &weight[8 * k..8 * k + 8], &mut xval[8 * k..8 * k + 8], true));
            let max = fmax_c(&xval);
            let mut l = [0i8; 32];
            if max < GROUP_MAX_EPS_IQ3_XXS {
                scales[ib] = 0.0;
                continue;
            }
            let mut scale = search(g, &weight, &waux, &xval, max, 15, false, &mut l);
            if scale < 0.0 {
                scale = -scale;
                for s in &mut block_signs {
                    *s = !*s & 127;
                }
            }
            for (k, p) in indices(g, &l).into_iter().enumerate() {
                q3[8 * ib + k] = p as u8;
            }
            sas[ib] = block_signs[0] as u32 | (block_signs[1] as u32) << 7 | (block_signs[2] as u32) << 14 | (block_signs[3] as u32) << 21;
            scales[ib] = scale;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        if max_scale == 0.0 {
            out.extend_from_slice(&[0u8; IQ3_XXS_BYTES]);
            continue;
        }
        let d = max_scale / 31.0;
        out.extend_from_slice(&f16::from_f32(d * 1.0125).to_bits().to_le_bytes());
        let id = 1.0 / d;
        for ib in 0..8 {
            let l = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 15);
            sas[ib] |= (l as u32) << 28;
        }
        out.extend_from_slice(&q3[..64]);
        for s in sas {
            out.extend_from_slice(&s.to_le_bytes());
        }
    }
}

/// Appends the IQ3_S blocks of `x` (a whole number of 256-value super-blocks).
pub fn quantize_iq3_s(x: &[f32], imatrix: Option<&[f32]>, out: &mut Vec<u8>) {
    let g = grid3(512);
    for (ibl, xbl) in x.chunks_exact(QK).enumerate() {
        let qwb = imatrix.map(|q| &q[QK * ibl..QK * (ibl + 1)]);
        let s2 = sigma2(xbl, true);
        let (mut qs, mut qh, mut signs, mut sc) = ([0u8; 64], [0u8; 8], [0u8; 32], [0u8; 4]);
        let mut scales = [0f32; 8];
        let mut max_scale = 0f32;
        let (mut weight, mut waux, mut xval) = ([0f32; 32], [0f32; 32], [0f32; 32]);
        // ggml advances its index and sign pointers only past groups it writes: after an all-zero
        // group, the next groups' low index bytes and signs land one group earlier (their 9th
        // bits and scales do not move). Kept, for ggml's bytes.
        let mut written = 0;
        for ib in 0..8 {
            let xb = &xbl[32 * ib..32 * ib + 32];
            weights(xb, qwb.map(|q| &q[32 * ib..32 * ib + 32]), s2, &mut weight, &mut waux);
            let mut block_signs: [u8; 4] = std::array::from_fn(|k| signs8(&xb[8 * k..8 * k + 8], &weight[8 * k..8 * k + 8], &mut xval[8 * k..8 * k + 8], false));
            let max = fmax_c(&xval);
            let mut l = [0i8; 32];
            if max == 0.0 {
                scales[ib] = 0.0;
                continue;
            }
            let mut scale = search(g, &weight, &waux, &xval, max, 9, true, &mut l);
            if scale < 0.0 {
                scale = -scale;
                for s in &mut block_signs {
                    *s = !*s;
                }
            }
            for (k, p) in indices(g, &l).into_iter().enumerate() {
                qs[8 * written + k] = (p & 255) as u8;
                qh[ib] |= ((p >> 8) as u8) << k;
            }
            signs[4 * written..4 * written + 4].copy_from_slice(&block_signs);
            written += 1;
            scales[ib] = scale;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        let d = if max_scale == 0.0 { 0.0 } else { max_scale / 31.0 };
        if max_scale != 0.0 {
            let id = 1.0 / d;
            for ib in (0..8).step_by(2) {
                let l1 = nearest_int(0.5 * (id * scales[ib] - 1.0)).clamp(0, 15);
                let l2 = nearest_int(0.5 * (id * scales[ib + 1] - 1.0)).clamp(0, 15);
                sc[ib / 2] = (l1 | (l2 << 4)) as u8;
            }
        }
        out.extend_from_slice(&f16::from_f32(d * 1.033).to_bits().to_le_bytes());
        out.extend_from_slice(&qs);
        out.extend_from_slice(&qh);
        out.extend_from_slice(&signs);
        out.extend_from_slice(&sc);
    }
}

/// One IQ3_XXS block (98 bytes) to 256 floats, as ggml's `dequantize_row_iq3_xxs`.
pub fn decode_iq3_xxs(b: &[u8], out: &mut [f32]) {
    with_avx2(b, out, decode_iq3_xxs_body)
}

#[inline(always)]
fn decode_iq3_xxs_body(b: &[u8], out: &mut [f32]) {
    let g = grid3(256);
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let (qs, sas) = (&b[2..66], &b[66..98]);
    for ib in 0..8 {
        let aux = u32::from_le_bytes(sas[4 * ib..4 * ib + 4].try_into().unwrap());
        let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
        for l in 0..4 {
            let signs = sign_factors(ksigns(((aux >> (7 * l)) & 127) as usize));
            let (v0, v1) = (&g.values[qs[8 * ib + 2 * l] as usize], &g.values[qs[8 * ib + 2 * l + 1] as usize]);
            let v: [f32; 8] = std::array::from_fn(|j| if j < 4 { v0[j] } else { v1[j - 4] });
            scaled8(&v, signs, db, &mut out[32 * ib + 8 * l..32 * ib + 8 * l + 8]);
        }
    }
}

/// One IQ3_S block (110 bytes) to 256 floats, as ggml's `dequantize_row_iq3_s`.
pub fn decode_iq3_s(b: &[u8], out: &mut [f32]) {
    with_avx2(b, out, decode_iq3_s_body)
}

#[inline(always)]
fn decode_iq3_s_body(b: &[u8], out: &mut [f32]) {
    let g = grid3(512);
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let (qs, qh, signs, sc) = (&b[2..66], &b[66..74], &b[74..106], &b[106..110]);
    for ib in 0..8 {
        let s = if ib % 2 == 0 { sc[ib / 2] & 15 } else { sc[ib / 2] >> 4 };
        let db = d * (1 + 2 * s as i32) as f32;
        for l in 0..4 {
            let p = |k: usize| qs[8 * ib + k] as usize | (((qh[ib] >> k) & 1) as usize) << 8;
            let (v0, v1) = (&g.values[p(2 * l)], &g.values[p(2 * l + 1)]);
            let v: [f32; 8] = std::array::from_fn(|j| if j < 4 { v0[j] } else { v1[j - 4] });
            scaled8(&v, sign_factors(signs[4 * ib + l]), db, &mut out[32 * ib + 8 * l..32 * ib + 8 * l + 8]);
        }
    }
}

/// IQ3_XXS blocks to floats, as ggml's `dequantize_row_iq3_xxs`.
pub fn dequantize_iq3_xxs(bytes: &[u8], out: &mut Vec<f32>) {
    decode_all(bytes, IQ3_XXS_BYTES, out, decode_iq3_xxs)
}

/// IQ3_S blocks to floats, as ggml's `dequantize_row_iq3_s` (`iq3s_grid` holds `2l + 1`).
pub fn dequantize_iq3_s(bytes: &[u8], out: &mut Vec<f32>) {
    decode_all(bytes, IQ3_S_BYTES, out, decode_iq3_s)
}

/// The values of `iq3xxs_grid` (256 points, or `iq3s_grid`: 512) point by point, as the
/// dequantizers read them.
pub fn grid_values(points: usize) -> Vec<f32> {
    grid3(points).values.iter().flatten().copied().collect()
}
