//! Prefill and decode speed of the runner beside the memory-bandwidth bound measured in the same
//! run, on a `synth --preset ouro-1.4b` checkpoint (made under target/bench/ if no model is given).
//!
//! cargo bench --bench decode -- [--model DIR] [--gguf A.gguf,B.gguf] [--mlx DIR,DIR] [--skip-hf]
//!                                [--prompt N] [--decode N] [--thresholds 0.5,0.9] [--repeat N]
//!
//! The bound: decode must read every projection once per loop (and the lm_head once per token), so
//! tokens/s <= memcpy bandwidth / those bytes. The memory bandwidth of a shared machine drifts
//! (this VM's memcpy moved between 33 and 45 GB/s within an hour), so each run's bound is the
//! memcpy bandwidth measured just before it, and `--repeat N` runs each row N times and reports
//! the median with the range of the percentages.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use ouro_quant::model::generate::{generate, GenerateOptions, Sampling};
use ouro_quant::model::KvPolicy;
use ouro_quant::synth::{synth, Preset, SynthOptions};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

/// Memory traffic per second (bytes read + bytes written) of a 1 GiB memcpy spread over the rayon
/// threads, best of 5.
fn memcpy_bandwidth(src: &[u8], dst: &mut [u8]) -> f64 {
    use rayon::prelude::*;
    let n = src.len();
    let chunk = n / rayon::current_num_threads().max(1);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&*dst);
    }
    2.0 * n as f64 / best
}

fn main() -> anyhow::Result<()> {
    println!("{}", common::cpu_line());
    let model_dir = match arg("--model") {
        Some(p) => PathBuf::from(p),
        None => {
            let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench/ouro-1.4b");
            if !p.exists() {
                std::fs::create_dir_all(p.parent().unwrap())?;
                eprintln!("synthesizing {} ...", p.display());
                let o = SynthOptions { preset: Preset::Ouro1_4b, layers: None, seed: 0, dtype: ouro_quant::stfile::DType::BF16, shards: 1 };
                synth(&o, &p, false, &|_, _| {})?;
            }
            p
        }
    };
    let prompt_len: usize = arg("--prompt").map_or(Ok(64), |s| s.parse())?;
    let decode_len: usize = arg("--decode").map_or(Ok(8), |s| s.parse())?;
    let thresholds: Vec<f32> = arg("--thresholds")
        .unwrap_or_else(|| "0.5".into())
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;

    let repeat: usize = arg("--repeat").map_or(Ok(1), |s| s.parse())?;
    let (src_buf, mut dst_buf) = (vec![1u8; 1 << 30], vec![0u8; 1 << 30]);
    let bw = memcpy_bandwidth(&src_buf, &mut dst_buf);
    println!("threads: {} (rayon); memcpy bandwidth (read + write) {:.2} GB/s; read-only {:.2} GB/s", rayon::current_num_threads(), bw / 1e9, common::read_bandwidth() / 1e9);
    let mut sources: Vec<PathBuf> = vec![];
    if !std::env::args().any(|a| a == "--skip-hf") {
        sources.push(model_dir.clone());
    }
    for list in ["--gguf", "--mlx"] {
        if let Some(g) = arg(list) {
            sources.extend(g.split(',').map(PathBuf::from));
        }
    }
    let prompt: Vec<u32> = (0..prompt_len).map(|i| (3 + i * 7919 % 40000) as u32).collect();
    println!("| weights | exit | prefill tok/s | decode tok/s | % of bound | loops/token | GB read per token | memcpy GB/s |");
    println!("|---|---|---|---|---|---|---|---|");
    for src in sources {
        let t = Instant::now();
        let loaded = ouro_quant::model::source::load(&src, &Device::Cpu)?;
        let model = loaded.model;
        eprintln!("{} loaded in {:.1} s", loaded.description, t.elapsed().as_secs_f64());
        let bytes_per_token = (model.layer_bytes * model.dims.loops as u64 + model.lm_head_bytes) as f64;
        let name = src.file_name().unwrap().to_string_lossy().into_owned();
        let label = match () {
            _ if src.is_file() => name,
            _ if ouro_quant::mlx::read::is_mlx_dir(&src) => format!("MLX {name}"),
            _ if src == model_dir => "HF bf16".to_string(),
            _ => format!("HF {name}"),
        };
        let mut run = |q: Option<f32>| -> anyhow::Result<()> {
            let opts = GenerateOptions {
                max_tokens: decode_len + 1,
                sampling: Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 },
                exit_threshold: q,
                readout: None,
                kv: KvPolicy::Full,
                kv_fill: ouro_quant::model::SkipFill::Copy,
                kv_dtype: candle_core::DType::F32,
                stop_ids: vec![],
            };
            // per run: (prefill, decode, % of the bound measured just before, memcpy, loops)
            let mut runs = vec![];
            for _ in 0..repeat {
                let bw = memcpy_bandwidth(&src_buf, &mut dst_buf);
                let s = generate(&model, &prompt, &opts, &mut |_| {})?.stats;
                let pct = 100.0 * s.decode_tokens_per_s * bytes_per_token / bw;
                runs.push((s.prefill_tokens_per_s, s.decode_tokens_per_s, pct, bw / 1e9, s.mean_loops_per_token));
            }
            // (median, min, max) of one figure over the runs
            let spread = |f: &dyn Fn(&(f64, f64, f64, f64, f64)) -> f64| {
                let mut v: Vec<f64> = runs.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                (v[v.len() / 2], v[0], v[v.len() - 1])
            };
            let (pct, lo, hi) = spread(&|r| r.2);
            let range = if repeat > 1 { format!(" ({lo:.0}-{hi:.0}%)") } else { String::new() };
            println!(
                "| {label} | {} | {:.2} | {:.3} | {:.0}%{range} | {:.2} | {:.2} | {:.1} |",
                q.map_or("all loops".to_string(), |q| format!("q={q}")),
                spread(&|r| r.0).0,
                spread(&|r| r.1).0,
                pct,
                spread(&|r| r.4).0,
                bytes_per_token / 1e9,
                spread(&|r| r.3).0,
            );
            Ok(())
        };
        run(None)?;
        for &q in &thresholds {
            run(Some(q))?;
        }
    }
    Ok(())
}
