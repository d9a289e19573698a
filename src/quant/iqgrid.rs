//! The search structures of the lattice-grid i-quants, built at first use exactly as ggml's
//! `iq2xs_init_impl` / `iq3xs_init_impl` build theirs: every grid point as its odd coordinates
//! `2l + 1`, a map from a vector of levels (its code, `l_i` in bits `B*i..`) to the point there,
//! and for every code that is not a grid point, the grid points nearest to it (all points at the
//! `nwant` smallest squared distances, by distance, then index: ggml's qsort order). A quantizer
//! rounds a group of values to levels and looks the code up; off the grid it picks the best of
//! those neighbours.

use std::sync::OnceLock;

use super::iq_grids;

/// A grid of `D`-dimensional points.
pub(crate) struct Grid<const D: usize> {
    /// Each point's coordinates `2l + 1`.
    pub points: Vec<[i8; D]>,
    /// Each point's values as the format's byte grid holds them (`iq3xxs_grid`, ...), as floats:
    /// what the dequantizers multiply.
    pub values: Vec<[f32; D]>,
    /// By code: the point's index (>= 0), or `-(start + 1)` where `neighbours[start]` counts the
    /// neighbour indices that follow it.
    map: Vec<i32>,
    neighbours: Vec<u16>,
}

/// Where the code of a level vector lands.
pub(crate) enum Lookup<'a> {
    /// On the grid: the point's index.
    Point(usize),
    /// Off the grid: the nearest points' indices.
    Near(&'a [u16]),
}

impl<const D: usize> Grid<D> {
    /// `kgrid`: the points as codes of `bits`-bit levels; `map_len`: the codes looked up (every
    /// code of levels the quantizers produce); `nwant`: how many distinct distances of neighbours.
    fn build(kgrid: &[u16], bits: u32, map_len: usize, nwant: usize, value: fn(i8) -> f32) -> Self {
        let mask = (1u32 << bits) - 1;
        let coords = |code: u32| -> [i8; D] { std::array::from_fn(|i| (2 * ((code >> (bits * i as u32)) & mask) + 1) as i8) };
        let points: Vec<[i8; D]> = kgrid.iter().map(|&g| coords(g as u32)).collect();
        let mut map = vec![-1i32; map_len];
        for (i, &g) in kgrid.iter().enumerate() {
            map[g as usize] = i as i32;
        }
        // each off-grid code's list on its own, then laid out in code order as ggml does. In
        // parallel (ggml's init takes most of a second single-threaded for the 2048-point grid),
        // but on plain scoped threads, never rayon: this runs inside a `OnceLock` initialiser
        // called from rayon jobs, and a rayon worker waiting here for rayon work may run another
        // job meanwhile that asks for the same grid, and wait for itself forever
        // (tests/grid_init.rs).
        let near_of = |code: usize| -> Option<Vec<u16>> {
            if map[code] >= 0 {
                return None;
            }
            let pos = coords(code as u32);
            let d2: Vec<i32> = points.iter().map(|p| p.iter().zip(&pos).map(|(&a, &b)| (a as i32 - b as i32).pow(2)).sum()).collect();
            // the `nwant` smallest distinct distances (ggml sorts all points by (distance,
            // index) and takes them in order until a distance beyond the nwant-th appears)
            let mut smallest: Vec<i32> = Vec::with_capacity(nwant + 1);
            for &d in &d2 {
                if smallest.contains(&d) {
                    continue;
                }
                if smallest.len() < nwant {
                    smallest.push(d);
                    smallest.sort_unstable();
                } else if d < smallest[nwant - 1] {
                    smallest[nwant - 1] = d;
                    smallest.sort_unstable();
                }
            }
            let limit = *smallest.last().expect("a grid has points");
            let mut near: Vec<(i32, u16)> = d2.iter().enumerate().filter(|(_, &d)| d <= limit).map(|(j, &d)| (d, j as u16)).collect();
            near.sort_unstable();
            Some(near.into_iter().map(|(_, j)| j).collect())
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 16);
        let per = map_len.div_ceil(threads);
        let lists: Vec<Option<Vec<u16>>> = std::thread::scope(|s| {
            let parts: Vec<_> = (0..map_len)
                .step_by(per)
                .map(|start| {
                    let near_of = &near_of;
                    s.spawn(move || (start..(start + per).min(map_len)).map(near_of).collect::<Vec<_>>())
                })
                .collect();
            // a part's thread can only fail by panicking, which the scope passes on
            parts.into_iter().flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
        });
        let mut neighbours = Vec::new();
        for (code, list) in lists.into_iter().enumerate() {
            if let Some(list) = list {
                map[code] = -(neighbours.len() as i32 + 1);
                neighbours.push(list.len() as u16);
                neighbours.extend(list);
            }
        }
        let values = points.iter().map(|p| p.map(value)).collect();
        Grid { points, values, map, neighbours }
    }

    /// Where the levels' code lands.
    pub fn lookup(&self, code: usize) -> Lookup<'_> {
        let m = self.map[code];
        if m >= 0 {
            Lookup::Point(m as usize)
        } else {
            let start = (-m - 1) as usize;
            let n = self.neighbours[start] as usize;
            Lookup::Near(&self.neighbours[start + 1..start + 1 + n])
        }
    }

    /// The neighbour nearest to `scale * point` in the `weight`ed squared distance, as ggml's
    /// `iq*_find_best_neighbour` (the first of equals; the first neighbour if every distance is
    /// NaN, where ggml would abort). Writes its levels into `l`.
    pub fn best_neighbour(&self, near: &[u16], xval: &[f32], weight: &[f32], scale: f32, l: &mut [i8]) -> usize {
        #[cfg(target_arch = "x86_64")]
        let best = if super::avx2() {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { self.nearest_avx2(near, xval, weight, scale) }
        } else {
            self.nearest(near, xval, weight, scale)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let best = self.nearest(near, xval, weight, scale);
        for (l, &c) in l.iter_mut().zip(&self.points[best]) {
            *l = (c - 1) / 2;
        }
        best
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn nearest_avx2(&self, near: &[u16], xval: &[f32], weight: &[f32], scale: f32) -> usize {
        self.nearest(near, xval, weight, scale)
    }

    /// The first neighbour of least distance, 8 at a time: lane `j` computes neighbour `j`'s
    /// distance with ggml's operations in ggml's order (so it vectorizes without changing a bit),
    /// and the lanes are then compared in order.
    #[inline(always)]
    fn nearest(&self, near: &[u16], xval: &[f32], weight: &[f32], scale: f32) -> usize {
        const LANES: usize = 8;
        let mut best_d2 = f32::MAX;
        let mut best = near[0] as usize;
        if near.len() < LANES {
            // short lists (the 3-bit grids' usually are): one neighbour at a time
            for &n in near {
                let p = &self.points[n as usize];
                let mut d2 = 0f32;
                for i in 0..D {
                    let diff = scale * p[i] as f32 - xval[i];
                    d2 += weight[i] * diff * diff;
                }
                if d2 < best_d2 {
                    best_d2 = d2;
                    best = n as usize;
                }
            }
            return best;
        }
        for chunk in near.chunks(LANES) {
            let mut cols = [[0f32; LANES]; D];
            for (j, &n) in chunk.iter().enumerate() {
                let p = &self.points[n as usize];
                for i in 0..D {
                    cols[i][j] = p[i] as f32;
                }
            }
            let mut d2 = [0f32; LANES];
            for i in 0..D {
                let (x, w) = (xval[i], weight[i]);
                for j in 0..LANES {
                    let diff = scale * cols[i][j] - x;
                    d2[j] += w * diff * diff;
                }
            }
            for (j, &n) in chunk.iter().enumerate() {
                if d2[j] < best_d2 {
                    best_d2 = d2[j];
                    best = n as usize;
                }
            }
        }
        best
    }
}

/// The 3-bit grids of IQ3_XXS (256 points, neighbours at the 2 nearest distances) and IQ3_S (512,
/// 3), 4 coordinates of levels 0-7.
pub(crate) fn grid3(points: usize) -> &'static Grid<4> {
    static G256: OnceLock<Grid<4>> = OnceLock::new();
    static G512: OnceLock<Grid<4>> = OnceLock::new();
    match points {
        // iq3xxs_grid: 4 (2l + 1), except 62 for level 7; iq3s_grid: 2l + 1
        256 => G256.get_or_init(|| Grid::build(&iq_grids::KGRID_3BIT_256, 3, 4096, 2, |c| if c == 15 { 62.0 } else { 4.0 * c as f32 })),
        512 => G512.get_or_init(|| Grid::build(&iq_grids::KGRID_3BIT_512, 3, 4096, 3, |c| c as f32)),
        _ => unreachable!("no 3-bit grid of {points} points"),
    }
}

/// The 2-bit grids of 8 coordinates of levels 0-2: IQ2_XXS (256 points, neighbours at the 2 nearest
/// distances), IQ2_XS (512, 2), IQ2_S (1024, 1); and the 1-bit grid of IQ1_S and IQ1_M (2048, 3).
pub(crate) fn grid2(points: usize) -> &'static Grid<8> {
    static G256: OnceLock<Grid<8>> = OnceLock::new();
    static G512: OnceLock<Grid<8>> = OnceLock::new();
    static G1024: OnceLock<Grid<8>> = OnceLock::new();
    static G2048: OnceLock<Grid<8>> = OnceLock::new();
    // codes of levels 0-2 only (at most 0xAAAA): ggml's map has 43692 entries
    const MAP: usize = 43692;
    match points {
        256 => G256.get_or_init(|| Grid::build(&iq_grids::KGRID_2BIT_256, 2, MAP, 2, value2)),
        512 => G512.get_or_init(|| Grid::build(&iq_grids::KGRID_2BIT_512, 2, MAP, 2, value2)),
        1024 => G1024.get_or_init(|| Grid::build(&iq_grids::KGRID_2BIT_1024, 2, MAP, 1, value2)),
        // iq1s_grid: l - 1
        2048 => G2048.get_or_init(|| Grid::build(&iq_grids::KGRID_1BIT_2048, 2, MAP, 3, |c| ((c - 1) / 2 - 1) as f32)),
        _ => unreachable!("no 8-coordinate grid of {points} points"),
    }
}

/// The value of level `l` (coordinate `2l + 1`) in the 2-bit byte grids of ggml-common.h: 8, 25, 43.
fn value2(c: i8) -> f32 {
    match c {
        1 => 8.0,
        3 => 25.0,
        _ => 43.0,
    }
}

/// The factors of 8 sign bits: `-1.0` where bit `j` is set, else `1.0` (multiplying by them is
/// ggml's `(signs & kmask[j] ? -1.f : 1.f)`).
#[inline(always)]
pub(crate) fn sign_factors(bits: u8) -> &'static [f32; 8] {
    static T: OnceLock<Vec<[f32; 8]>> = OnceLock::new();
    &T.get_or_init(|| (0..256u32).map(|b| std::array::from_fn(|j| if b & (1 << j) != 0 { -1.0 } else { 1.0 })).collect())[bits as usize]
}

/// 8 values of a group: `db * values[j] * signs[j]`, in ggml's order of operations.
#[inline(always)]
pub(crate) fn scaled8(values: &[f32], signs: &[f32; 8], db: f32, out: &mut [f32]) {
    for j in 0..8 {
        out[j] = db * values[j] * signs[j];
    }
}

/// Runs a block decoder's body compiled for AVX2 where the CPU has it (the same operations, so
/// the same floats; `portable_and_avx2_builds_agree` compares them).
#[inline(always)]
pub(crate) fn with_avx2<F: Fn(&[u8], &mut [f32])>(b: &[u8], out: &mut [f32], body: F) {
    #[cfg(target_arch = "x86_64")]
    if super::avx2() {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { avx2_call(b, out, body) };
    }
    body(b, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2_call<F: Fn(&[u8], &mut [f32])>(b: &[u8], out: &mut [f32], body: F) {
    body(b, out)
}

/// The whole 256-value blocks of `bytes` decoded by `block`, appended to `out`.
pub(crate) fn decode_all(bytes: &[u8], block_bytes: usize, out: &mut Vec<f32>, block: fn(&[u8], &mut [f32])) {
    let start = out.len();
    out.resize(start + bytes.len() / block_bytes * 256, 0.0);
    for (b, o) in bytes.chunks_exact(block_bytes).zip(out[start..].chunks_exact_mut(256)) {
        block(b, o);
    }
}

/// The code of 8 levels of 2 bits.
pub(crate) fn code2(l: &[i8]) -> usize {
    l.iter().enumerate().fold(0, |u, (i, &l)| u | ((l as usize) << (2 * i)))
}

/// The code of 4 levels of 3 bits.
pub(crate) fn code3(l: &[i8]) -> usize {
    l.iter().enumerate().fold(0, |u, (i, &l)| u | ((l as usize) << (3 * i)))
}

/// `ksigns_iq2xs`: 7 sign bits and, in bit 7, their parity (so that the 8 signs of a group hold an
/// even number of minus signs).
pub(crate) fn ksigns(i: usize) -> u8 {
    (i as u8 & 127) | (((i as u32 & 127).count_ones() as u8 & 1) << 7)
}

/// `2 * sum(x^2) / 256` (`double`) or `sum(x^2) / 256` of a super-block, summed in order.
pub(crate) fn sigma2(xbl: &[f32], double: bool) -> f32 {
    let mut sumx2 = 0f32;
    for &v in xbl {
        sumx2 += v * v;
    }
    if double { 2.0 * sumx2 / xbl.len() as f32 } else { sumx2 / xbl.len() as f32 }
}

/// `sum w x q` and `sum w q^2` with `q = 2l + 1`, in order.
pub(crate) fn sums(weight: &[f32], xval: &[f32], l: &[i8]) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0f32, 0f32);
    for i in 0..l.len() {
        let w = weight[i];
        let q = (2 * l[i] as i32 + 1) as f32;
        sumqx += w * xval[i] * q;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

/// The magnitudes of 8 values into `xval` and their sign bits. With `even`, as the types whose
/// 8th sign is implied by parity: if the minus signs are odd, the value of least `weight * x^2`
/// keeps its sign flipped in `xval` (negative) and its bit toggled; the 7 stored bits come back.
pub(crate) fn signs8(xb: &[f32], weight: &[f32], xval: &mut [f32], even: bool) -> u8 {
    let (mut nflip, mut s) = (0, 0u8);
    for i in 0..8 {
        if xb[i] >= 0.0 {
            xval[i] = xb[i];
        } else {
            xval[i] = -xb[i];
            nflip += 1;
            s |= 1 << i;
        }
    }
    if !even {
        return s;
    }
    if nflip % 2 == 1 {
        let w = |i: usize| weight[i] * xb[i] * xb[i];
        let (mut imin, mut min) = (0, w(0));
        for i in 1..8 {
            if w(i) < min {
                min = w(i);
                imin = i;
            }
        }
        xval[imin] = -xval[imin];
        s ^= 1 << imin;
    }
    s & 127
}

/// The maximum as ggml's `MAX(a, b)` (`a > b ? a : b`) computes it, left to right.
pub(crate) fn fmax_c(v: &[f32]) -> f32 {
    v[1..].iter().fold(v[0], |m, &x| if m > x { m } else { x })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The neighbour lists equal a direct transcription of ggml's: every point sorted by
    /// (distance, index), taken until a distance beyond the `nwant`-th distinct one.
    #[test]
    fn neighbours_follow_ggmls_full_sort() {
        let g = grid3(512);
        for code in (0..4096).step_by(7) {
            let Lookup::Near(near) = g.lookup(code) else { continue };
            let pos: [i32; 4] = std::array::from_fn(|i| 2 * ((code >> (3 * i)) & 7) as i32 + 1);
            let mut all: Vec<(i32, usize)> = g.points.iter().enumerate().map(|(j, p)| (p.iter().zip(&pos).map(|(&a, &b)| (a as i32 - b).pow(2)).sum(), j)).collect();
            all.sort();
            let (mut want, mut d2, mut nhave) = (vec![], all[0].0, 1);
            for &(d, j) in &all {
                if d > d2 {
                    if nhave == 3 {
                        break;
                    }
                    d2 = d;
                    nhave += 1;
                }
                want.push(j as u16);
            }
            assert_eq!(near, &want[..], "code {code}");
        }
    }

    #[test]
    fn ksigns_is_ggmls_table() {
        // the first entries of ggml's ksigns_iq2xs
        assert_eq!((0..8).map(ksigns).collect::<Vec<_>>(), [0, 129, 130, 3, 132, 5, 6, 135]);
        assert!((0..128).all(|i| ksigns(i).count_ones() % 2 == 0));
    }
}
