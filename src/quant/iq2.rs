//! IQ2_XXS, IQ2_XS and IQ2_S: 256-value super-blocks whose groups of 8 magnitudes are points of a
//! 2-bit lattice grid of levels 0-2 (`iqgrid`), signs stored apart, one f16 scale per super-block
//! and 4-bit scales per 32 (IQ2_XXS) or 16 values. Bit-exact with ggml 0.25.3's
//! `quantize_row_iq2_xxs_impl`, `quantize_row_iq2_xs_impl` and `quantize_row_iq2_s_impl`. IQ2_XXS
//! and IQ2_XS need an importance vector (ggml asserts one); IQ2_S weighs by `sigma2 / 4 + x^2`
//! without.
//!
//! IQ2_XXS block (66 B): f16 d; per 32 values two u32: four 8-bit grid indices (256 points), then
//! four 7-bit sign fields (8th sign by parity) and the 4-bit scale in bits 28-31.
//! IQ2_XS block (74 B): f16 d; per 8 values a u16: 9-bit grid index (512 points) and 7 sign bits
//! above it; 8 bytes of two 4-bit scales (one per 16 values).
//! IQ2_S block (82 B): f16 d; 32 low bytes of grid indices (1024 points); 32 bytes of signs (one
//! bit per value); 8 bytes of the indices' high 2 bits; 8 bytes of two 4-bit scales.

use half::f16;

use super::iqgrid::{decode_all, with_avx2, code2, fmax_c, grid2, ksigns, scaled8, sigma2, sign_factors, signs8, sums, Grid, Lookup};
use super::kquants::{make_qp_quants, nearest_int};

const QK: usize = 256;
pub const IQ2_XXS_BYTES: usize = 66;
pub const IQ2_XS_BYTES: usize = 74;
pub const IQ2_S_BYTES: usize = 82;
const GROUP_MAX_EPS: f32 = 1e-15;
const GROUP_MAX_EPS_IQ2_S: f32 = 1e-8;
const KMAX: i32 = 3;

/// The levels of 8 values at `id`, clamped to 0-2, and where their code lands.
fn levels8<'g>(g: &'g Grid<8>, xval: &[f32], id: f32, l: &mut [i8]) -> Lookup<'g> {
    for i in 0..8 {
        l[i] = nearest_int(0.5 * (id * xval[i] - 1.0)).clamp(0, KMAX - 1) as i8;
    }
    g.lookup(code2(l))
}

/// Levels of 8 values placed on the grid at `id` (the best neighbour at `1 / id` off it); whether
/// they landed on it.
fn place8(g: &Grid<8>, xval: &[f32], waux: &[f32], id: f32, scale: f32, l: &mut [i8]) -> bool {
    match levels8(g, xval, id, l) {
        Lookup::Point(_) => true,
        Lookup::Near(near) => {
            g.best_neighbour(near, xval, waux, scale, l);
            false
        }
    }
}

/// The grid index of 8 on-grid levels.
fn index8(g: &Grid<8>, l: &[i8]) -> usize {
    match g.lookup(code2(l)) {
        Lookup::Point(p) => p,
        Lookup::Near(_) => unreachable!("levels placed on the grid"),
    }
}

fn weights(xb: &[f32], qw: Option<&[f32]>, sigma2: f32, weight: &mut [f32], waux: &mut [f32]) {
    for i in 0..xb.len() {
        weight[i] = match qw {
            Some(q) => q[i] * (sigma2 + xb[i] * xb[i]).sqrt(),
            // IQ2_S without an importance vector
            None => 0.25 * sigma2 + xb[i] * xb[i],
        };
    }
    for i in 0..xb.len() {
        waux[i] = weight[i].sqrt();
    }
}

/// The 4-bit code of a group scale against the super-block's `id`.
fn scale4(id: f32, s: f32) -> u8 {
    nearest_int(0.5 * (id * s - 1.0)).clamp(0, 15) as u8
}

/// Appends the IQ2_XXS blocks of `x` (whole 256-value super-blocks), weighted by `imatrix`.
pub fn quantize_iq2_xxs(x: &[f32], imatrix: &[f32], out: &mut Vec<u8>) {
    let g = grid2(256);
    for (ibl, xbl) in x.chunks_exact(QK).enumerate() {
        let qwb = &imatrix[QK * ibl..QK * (ibl + 1)];
        let s2 = sigma2(xbl, false);
        let mut q2 = [0u32; 16];
        let mut scales = [0f32; 8];
        let mut max_scale = 0f32;
        let (mut weight, mut waux, mut xval) = ([0f32; 32], [0f32; 32], [0f32; 32]);
        for ib in 0..8 {
            let xb = &xbl[32 * ib..32 * ib + 32];
            weights(xb, Some(&qwb[32 * ib..32 * ib + 32]), s2, &mut weight, &mut waux);
            let mut block_signs: [u8; 4] = std::array::from_fn(|k| signs8(&xb[8 * k..8 * k + 8], &weight[8 * k..8 * k + 8], &mut xval[8 * k..8 * k + 8], true));
            let max = fmax_c(&xval);
            if max < GROUP_MAX_EPS {
                scales[ib] = 0.0;
                continue;
            }
            // ggml keeps make_qp_quants' levels (bytes, 0-3) as the fallback when no trial wins
            let mut lq = [0u8; 32];
            let mut scale = make_qp_quants(&xval, KMAX + 1, &mut lq, &weight);
            let mut l: [i8; 32] = std::array::from_fn(|i| lq[i] as i8);
            let eff_max = scale * KMAX as f32;
            if eff_max <= 0.0 {
                scales[ib] = 0.0;
                continue;
            }
            let mut best = 0f32;
            let mut laux = [0i8; 32];
            for is in -6..=6 {
                let id = ((2 * KMAX - 1) as f32 + is as f32 * 0.1) / eff_max;
                let this_scale = 1.0 / id;
                for k in 0..4 {
                    let r = 8 * k..8 * k + 8;
                    place8(g, &xval[r.clone()], &waux[r.clone()], id, this_scale, &mut laux[r]);
                }
                let (sumqx, sumq2) = sums(&weight, &xval, &laux);
                if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                    scale = sumqx / sumq2;
                    best = scale * sumqx;
                    l = laux;
                }
            }
            if scale > 0.0 {
                let id = 1.0 / scale;
                for k in 0..4 {
                    let r = 8 * k..8 * k + 8;
                    let mut lk = [0i8; 8];
                    place8(g, &xval[r.clone()], &waux[r.clone()], id, scale, &mut lk);
                    l[r].copy_from_slice(&lk);
                }
                let (sumqx, sumq2) = sums(&weight, &xval, &l);
                if sumq2 > 0.0 {
                    scale = sumqx / sumq2;
                }
            }
            if scale < 0.0 {
                scale = -scale;
                for s in &mut block_signs {
                    *s = !*s & 127;
                }
            }
            for k in 0..4 {
                q2[2 * ib] |= (index8(g, &l[8 * k..8 * k + 8]) as u32) << (8 * k);
                q2[2 * ib + 1] |= (block_signs[k] as u32) << (7 * k);
            }
            scales[ib] = scale;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        if max_scale == 0.0 {
            out.extend_from_slice(&[0u8; IQ2_XXS_BYTES]);
            continue;
        }
        let d = max_scale / 31.0;
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        let id = 1.0 / d;
        for ib in 0..8 {
            q2[2 * ib + 1] |= (scale4(id, scales[ib]) as u32) << 28;
        }
        for q in q2 {
            out.extend_from_slice(&q.to_le_bytes());
        }
    }
}

/// IQ2_XS and IQ2_S: per 16 values, the scale search over 19 trials of 0.1 around 5 levels, then
/// the groups that ended off the grid placed again at the best scale. Returns the scale (0 for a
/// zero group) and fills `l` with on-grid levels.
fn search16(g: &Grid<8>, weight: &[f32; 16], waux: &[f32; 16], xval: &[f32; 16], max: f32, l: &mut [i8; 16]) -> f32 {
    let mut best = 0f32;
    let mut scale = max / (2 * KMAX - 1) as f32;
    let mut on_grid = [true; 2];
    let mut laux = [0i8; 16];
    for is in -9..=9 {
        let id = ((2 * KMAX - 1) as f32 + is as f32 * 0.1) / max;
        let this_scale = 1.0 / id;
        let on: [bool; 2] = std::array::from_fn(|k| {
            let r = 8 * k..8 * k + 8;
            place8(g, &xval[r.clone()], &waux[r.clone()], id, this_scale, &mut laux[r])
        });
        let (sumqx, sumq2) = sums(weight, xval, &laux);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            *l = laux;
            on_grid = on;
        }
    }
    if on_grid.iter().any(|&o| !o) && scale > 0.0 {
        let id = 1.0 / scale;
        for k in 0..2 {
            if on_grid[k] {
                continue;
            }
            let r = 8 * k..8 * k + 8;
            place8(g, &xval[r.clone()], &waux[r.clone()], id, scale, &mut l[r]);
        }
        let (sumqx, sumq2) = sums(weight, xval, l);
        if sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    scale
}

/// Appends the IQ2_XS blocks of `x` (whole 256-value super-blocks), weighted by `imatrix`.
pub fn quantize_iq2_xs(x: &[f32], imatrix: &[f32], out: &mut Vec<u8>) {
    let g = grid2(512);
    for (ibl, xbl) in x.chunks_exact(QK).enumerate() {
        let qwb = &imatrix[QK * ibl..QK * (ibl + 1)];
        let s2 = sigma2(xbl, false);
        let mut q2 = [0u16; 32];
        let mut scales = [0f32; 16];
        let mut max_scale = 0f32;
        let (mut weight, mut waux, mut xval) = ([0f32; 16], [0f32; 16], [0f32; 16]);
        for ib in 0..16 {
            let xb = &xbl[16 * ib..16 * ib + 16];
            weights(xb, Some(&qwb[16 * ib..16 * ib + 16]), s2, &mut weight, &mut waux);
            let mut block_signs: [u8; 2] = std::array::from_fn(|k| signs8(&xb[8 * k..8 * k + 8], &weight[8 * k..8 * k + 8], &mut xval[8 * k..8 * k + 8], true));
            let max = fmax_c(&xval);
            if max < GROUP_MAX_EPS {
                scales[ib] = 0.0;
                continue;
            }
            let mut l = [0i8; 16];
            let mut scale = search16(g, &weight, &waux, &xval, max, &mut l);
            if scale < 0.0 {
                scale = -scale;
                for s in &mut block_signs {
                    *s = !*s & 127;
                }
            }
            for k in 0..2 {
                q2[2 * ib + k] = index8(g, &l[8 * k..8 * k + 8]) as u16 | (block_signs[k] as u16) << 9;
            }
            scales[ib] = scale;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        if max_scale == 0.0 {
            out.extend_from_slice(&[0u8; IQ2_XS_BYTES]);
            continue;
        }
        let d = max_scale / 31.0;
        out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
        let id = 1.0 / d;
        for q in q2 {
            out.extend_from_slice(&q.to_le_bytes());
        }
        for ib in (0..16).step_by(2) {
            out.push(scale4(id, scales[ib]) | scale4(id, scales[ib + 1]) << 4);
        }
    }
}

/// Appends the IQ2_S blocks of `x` (whole 256-value super-blocks).
pub fn quantize_iq2_s(x: &[f32], imatrix: Option<&[f32]>, out: &mut Vec<u8>) {
    let g = grid2(1024);
    for (ibl, xbl) in x.chunks_exact(QK).enumerate() {
        let qwb = imatrix.map(|q| &q[QK * ibl..QK * (ibl + 1)]);
        let s2 = sigma2(xbl, true);
        let (mut qs, mut qh, mut sc) = ([0u8; 64], [0u8; 8], [0u8; 8]);
        let mut scales = [0f32; 16];
        let mut max_scale = 0f32;
        let (mut weight, mut waux, mut xval) = ([0f32; 16], [0f32; 16], [0f32; 16]);
        for ib in 0..16 {
            let xb = &xbl[16 * ib..16 * ib + 16];
            weights(xb, qwb.map(|q| &q[16 * ib..16 * ib + 16]), s2, &mut weight, &mut waux);
            let mut block_signs: [u8; 2] = std::array::from_fn(|k| signs8(&xb[8 * k..8 * k + 8], &weight[8 * k..8 * k + 8], &mut xval[8 * k..8 * k + 8], false));
            let max = fmax_c(&xval);
            if max < GROUP_MAX_EPS_IQ2_S {
                scales[ib] = 0.0;
                continue;
            }
            let mut l = [0i8; 16];
            let mut scale = search16(g, &weight, &waux, &xval, max, &mut l);
            if scale < 0.0 {
                scale = -scale;
                for s in &mut block_signs {
                    *s = !*s;
                }
            }
            for k in 0..2 {
                let p = index8(g, &l[8 * k..8 * k + 8]);
                let i8 = 2 * ib + k;
                qs[i8] = (p & 255) as u8;
                qh[i8 / 4] |= ((p >> 8) as u8) << (2 * (i8 % 4));
                qs[32 + i8] = block_signs[k];
            }
            scales[ib] = scale;
            max_scale = if max_scale > scale { max_scale } else { scale };
        }
        let d = if max_scale == 0.0 { 0.0 } else { max_scale / 31.0 };
        if max_scale != 0.0 {
            let id = 1.0 / d;
            for ib in (0..16).step_by(2) {
                sc[ib / 2] = scale4(id, scales[ib]) | scale4(id, scales[ib + 1]) << 4;
            }
        }
        out.extend_from_slice(&f16::from_f32(d * 0.9875).to_bits().to_le_bytes());
        out.extend_from_slice(&qs);
        out.extend_from_slice(&qh);
        out.extend_from_slice(&sc);
    }
}

/// One IQ2_XXS block (66 bytes) to 256 floats, as ggml's `dequantize_row_iq2_xxs`.
pub fn decode_iq2_xxs(b: &[u8], out: &mut [f32]) {
    with_avx2(b, out, decode_iq2_xxs_body)
}

#[inline(always)]
fn decode_iq2_xxs_body(b: &[u8], out: &mut [f32]) {
    let g = grid2(256);
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    for ib in 0..8 {
        let q = &b[2 + 8 * ib..10 + 8 * ib];
        let aux1 = u32::from_le_bytes(q[4..8].try_into().unwrap());
        let db = d * (0.5 + (aux1 >> 28) as f32) * 0.25;
        for l in 0..4 {
            let signs = sign_factors(ksigns(((aux1 >> (7 * l)) & 127) as usize));
            scaled8(&g.values[q[l] as usize], signs, db, &mut out[32 * ib + 8 * l..32 * ib + 8 * l + 8]);
        }
    }
}

/// One IQ2_XS block (74 bytes) to 256 floats, as ggml's `dequantize_row_iq2_xs`.
pub fn decode_iq2_xs(b: &[u8], out: &mut [f32]) {
    with_avx2(b, out, decode_iq2_xs_body)
}

#[inline(always)]
fn decode_iq2_xs_body(b: &[u8], out: &mut [f32]) {
    let g = grid2(512);
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let sc = &b[66..74];
    for ib in 0..8 {
        let db = [d * (0.5 + (sc[ib] & 15) as f32) * 0.25, d * (0.5 + (sc[ib] >> 4) as f32) * 0.25];
        for l in 0..4 {
            let q = u16::from_le_bytes([b[2 + 8 * ib + 2 * l], b[3 + 8 * ib + 2 * l]]);
            scaled8(&g.values[(q & 511) as usize], sign_factors(ksigns((q >> 9) as usize)), db[l / 2], &mut out[32 * ib + 8 * l..32 * ib + 8 * l + 8]);
        }
    }
}

/// One IQ2_S block (82 bytes) to 256 floats, as ggml's `dequantize_row_iq2_s`.
pub fn decode_iq2_s(b: &[u8], out: &mut [f32]) {
    with_avx2(b, out, decode_iq2_s_body)
}

#[inline(always)]
fn decode_iq2_s_body(b: &[u8], out: &mut [f32]) {
    let g = grid2(1024);
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let (qs, signs, qh, sc) = (&b[2..34], &b[34..66], &b[66..74], &b[74..82]);
    for ib in 0..8 {
        let db = [d * (0.5 + (sc[ib] & 15) as f32) * 0.25, d * (0.5 + (sc[ib] >> 4) as f32) * 0.25];
        for l in 0..4 {
            let p = qs[4 * ib + l] as usize | (((qh[ib] >> (2 * l)) & 3) as usize) << 8;
            scaled8(&g.values[p], sign_factors(signs[4 * ib + l]), db[l / 2], &mut out[32 * ib + 8 * l..32 * ib + 8 * l + 8]);
        }
    }
}

/// IQ2_XXS blocks to floats, as ggml's `dequantize_row_iq2_xxs`.
pub fn dequantize_iq2_xxs(bytes: &[u8], out: &mut Vec<f32>) {
    decode_all(bytes, IQ2_XXS_BYTES, out, decode_iq2_xxs)
}

/// IQ2_XS blocks to floats, as ggml's `dequantize_row_iq2_xs`.
pub fn dequantize_iq2_xs(bytes: &[u8], out: &mut Vec<f32>) {
    decode_all(bytes, IQ2_XS_BYTES, out, decode_iq2_xs)
}

/// IQ2_S blocks to floats, as ggml's `dequantize_row_iq2_s`.
pub fn dequantize_iq2_s(bytes: &[u8], out: &mut Vec<f32>) {
    decode_all(bytes, IQ2_S_BYTES, out, decode_iq2_s)
}

/// The values of `iq2xxs_grid` (256 points), `iq2xs_grid` (512) or `iq2s_grid` (1024) point by
/// point, as the dequantizers read them.
pub fn grid_values(points: usize) -> Vec<f32> {
    grid2(points).values.iter().flatten().copied().collect()
}
