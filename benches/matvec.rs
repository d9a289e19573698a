//! Matrix-vector products of the Ouro-1.4B projection shapes: this crate's kernels (Q8_0, Q4_K,
//! Q6_K) against candle's, same tensors, same process, and the read-only memory bandwidth beside
//! them. The first shape of each type (256 rows, under a MiB) is below the size where ours are
//! spread over threads: it measures one thread's compute speed from its L2 cache (the steadiest
//! figure for work on the kernels themselves; candle's may still use its threads). The last shape
//! (over 500 MB) streams from memory; the others are the model's and stay in the L3 cache.
//!
//! cargo bench --bench matvec [-- --reps N]
//!
//! GB/s is weight bytes read per second (one token through one projection, in a loop).

mod common;

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use ouro_quant::model::qkernel::{self, QuantMatrix};

fn lcg(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

/// Seconds per call, best of `reps` rounds of enough calls to read ~1 GB.
fn time(reps: usize, bytes: usize, f: &dyn Fn()) -> f64 {
    let calls = (1usize << 30).div_ceil(bytes).max(1);
    f();
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        for _ in 0..calls {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / calls as f64);
    }
    best
}

/// A valid random Q8_0, Q4_K or Q6_K tensor built from bytes (quantizing 500 MB would take minutes):
/// random codes and scales, block scales `d`/`dmin` set to small normal f16 values.
fn random_blocks(dtype: GgmlDType, rows: usize, cols: usize) -> anyhow::Result<QTensor> {
    let (bb, d_at): (usize, &[usize]) = match dtype {
        GgmlDType::Q8_0 => (34, &[0]),
        GgmlDType::Q4K => (144, &[0, 2]),
        GgmlDType::Q6K => (210, &[208]),
        _ => anyhow::bail!("{dtype:?}"),
    };
    let n = rows * cols / dtype.block_size() * bb;
    let mut s = 0x9E3779B97F4A7C15u64;
    let mut data: Vec<u8> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect();
    let d = half::f16::from_f32(0.01).to_le_bytes();
    for blk in data.chunks_exact_mut(bb) {
        for &o in d_at {
            blk[o..o + 2].copy_from_slice(&d);
        }
    }
    Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, &data, vec![rows, cols], &Device::Cpu)?)
}

/// Every build of our kernels this CPU runs, narrowest last (the portable one is the reference
/// definition, not a run-time choice).
fn builds() -> Vec<qkernel::Isa> {
    qkernel::Isa::ALL.into_iter().rev().filter(|i| i.supported()).collect()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args.iter().position(|a| a == "--reps").map_or(Ok(3), |i| args[i + 1].parse())?;
    println!("{}", common::cpu_line());
    println!(
        "threads: {} (rayon); read-only memory bandwidth {:.1} GB/s",
        rayon::current_num_threads(),
        common::read_bandwidth() / 1e9
    );
    let builds = builds();
    let names: Vec<&str> = builds.iter().map(|b| b.name()).collect();
    println!("\none token (matrix-vector): GB/s of weights read, and each build's speed over candle's\n");
    println!("| type | rows x cols | weight MB | candle GB/s | {} |", names.iter().map(|n| format!("{n} GB/s | {n} / candle")).collect::<Vec<_>>().join(" | "));
    println!("|---|---|---|---|{}", "---|---|".repeat(builds.len()));
    let mut prefill = vec![];
    for dtype in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        // one thread in L2, the model's shapes (in cache), then one 2048-column matrix larger than
        // the L3 cache
        for (rows, cols) in [(256usize, 2048usize), (2048, 2048), (5632, 2048), (2048, 5632), (1 << 19, 2048)] {
            let q = Arc::new(if rows * cols > 1 << 26 {
                random_blocks(dtype, rows, cols)?
            } else {
                let w = Tensor::from_vec(lcg(rows as u64, rows * cols), (rows, cols), &Device::Cpu)?;
                QTensor::quantize(&w, dtype)?
            });
            let bytes = q.storage_size_in_bytes();
            let x = Tensor::from_vec(lcg(1, cols), (1, cols), &Device::Cpu)?;
            let candle = QMatMul::from_arc(q.clone())?;
            let tc = time(reps, bytes, &|| {
                std::hint::black_box(candle.forward(&x).unwrap());
            });
            let mut cells = vec![];
            for &isa in &builds {
                if isa == qkernel::Isa::Portable && rows * cols > 1 << 26 {
                    cells.push("- | -".to_string());
                    continue;
                }
                let m = QuantMatrix::new_for(q.clone(), isa).expect("whole blocks");
                let t = time(reps, bytes, &|| {
                    std::hint::black_box(m.forward(&x).unwrap());
                });
                cells.push(format!("{:.1} | {:.2}x", bytes as f64 / t / 1e9, tc / t));
            }
            println!("| {dtype:?} | {rows} x {cols} | {:.1} | {:.1} | {} |", bytes as f64 / 1e6, bytes as f64 / tc / 1e9, cells.join(" | "));
            if rows == 5632 || (rows, cols) == (2048, 5632) {
                prefill.push((dtype, q));
            }
        }
    }
    // prefill: 64 tokens at once through the FFN shapes
    let n = 64;
    println!("\n{n} tokens at once (prefill): tokens x weights per second (G), and each build's speed over candle's\n");
    println!("| type | rows x cols | candle G/s | {} |", names.iter().map(|n| format!("{n} G/s | {n} / candle")).collect::<Vec<_>>().join(" | "));
    println!("|---|---|---|{}", "---|---|".repeat(builds.len()));
    for (dtype, q) in prefill {
        let (rows, cols) = q.shape().dims2()?;
        let work = (rows * cols * n) as f64;
        let x = Tensor::from_vec(lcg(2, n * cols), (n, cols), &Device::Cpu)?;
        let candle = QMatMul::from_arc(q.clone())?;
        let tc = time(reps, 1 << 30, &|| {
            std::hint::black_box(candle.forward(&x).unwrap());
        });
        let mut cells = vec![];
        for &isa in &builds {
            let m = QuantMatrix::new_for(q.clone(), isa).expect("whole blocks");
            let t = time(reps, 1 << 30, &|| {
                std::hint::black_box(m.forward(&x).unwrap());
            });
            cells.push(format!("{:.1} | {:.2}x", work / t / 1e9, tc / t));
        }
        println!("| {dtype:?} | {rows} x {cols} | {:.1} | {} |", work / tc / 1e9, cells.join(" | "));
    }
    Ok(())
}
