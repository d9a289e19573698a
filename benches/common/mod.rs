//! Helpers shared by the benchmarks.

use std::time::Instant;

/// Bytes read per second by a parallel sum over 1 GiB of f32 (read-only traffic: decoding only
/// reads weights), best of 5.
pub fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 1usize << 28;
    let src = vec![1f32; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let s: f32 = src
            .par_chunks(1 << 16)
            .map(|c| {
                c.chunks_exact(32)
                    .fold([0f32; 32], |mut a, v| {
                        for (a, v) in a.iter_mut().zip(v) {
                            *a += v;
                        }
                        a
                    })
                    .iter()
                    .sum::<f32>()
            })
            .sum();
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(s);
    }
    4.0 * n as f64 / best
}
