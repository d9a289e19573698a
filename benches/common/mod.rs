//! Helpers shared by the benchmarks.
#![allow(dead_code)]

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

/// The CPU this ran on and the flags that choose kernels, as every benchmark prints first.
pub fn cpu_line() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("?").trim().to_string();
    let flags: Vec<&str> = info.lines().find(|l| l.starts_with("flags")).and_then(|l| l.split(':').nth(1)).unwrap_or("").split_whitespace().collect();
    let wanted = ["avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vnni", "avx512_vnni"];
    let have: Vec<&str> = wanted.iter().copied().filter(|f| flags.contains(f)).collect();
    let kernels = ouro_quant::model::qkernel::selected().map_or("candle's", |i| i.name());
    format!(
        "CPU: {model}; {} threads; flags: {}; quantized kernels: {kernels}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if have.is_empty() { "none of avx2/fma/f16c/avx512".to_string() } else { have.join(" ") }
    )
}
