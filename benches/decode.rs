//! Prefill and decode speed of the runner beside the memory-bandwidth bound measured in the same
//! run, on a `synth --preset ouro-1.4b` checkpoint (made under target/bench/ if no model is given).
//!
//! cargo bench --bench decode -- [--model DIR] [--gguf A.gguf,B.gguf] [--prompt N] [--decode N] [--thresholds 0.5,0.9]
//!
//! The bound: decode must read every projection once per loop (and the lm_head once per token), so
//! tokens/s <= memcpy bandwidth / those bytes.

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
fn memcpy_bandwidth() -> f64 {
    use rayon::prelude::*;
    let n = 1usize << 30;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let chunk = n / rayon::current_num_threads().max(1);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    2.0 * n as f64 / best
}

fn main() -> anyhow::Result<()> {
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

    let bw = memcpy_bandwidth();
    println!("threads: {} (rayon); memcpy bandwidth (read + write) {:.2} GB/s; read-only {:.2} GB/s", rayon::current_num_threads(), bw / 1e9, common::read_bandwidth() / 1e9);
    let mut sources: Vec<PathBuf> = vec![model_dir];
    if let Some(g) = arg("--gguf") {
        sources.extend(g.split(',').map(PathBuf::from));
    }
    let prompt: Vec<u32> = (0..prompt_len).map(|i| (3 + i * 7919 % 40000) as u32).collect();
    println!("| weights | exit | prefill tok/s | decode tok/s | % of bound | loops/token | GB read per token |");
    println!("|---|---|---|---|---|---|---|");
    for src in sources {
        let t = Instant::now();
        let loaded = ouro_quant::model::source::load(&src, &Device::Cpu)?;
        let model = loaded.model;
        eprintln!("{} loaded in {:.1} s", loaded.description, t.elapsed().as_secs_f64());
        let bytes_per_token = (model.layer_bytes * model.dims.loops as u64 + model.lm_head_bytes) as f64;
        let bound = bw / bytes_per_token;
        let label = if src.is_dir() { "HF bf16".to_string() } else { src.file_name().unwrap().to_string_lossy().into_owned() };
        let run = |q: Option<f32>| -> anyhow::Result<()> {
            let opts = GenerateOptions {
                max_tokens: decode_len + 1,
                sampling: Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 },
                exit_threshold: q,
                kv: KvPolicy::Full,
                kv_fill: ouro_quant::model::SkipFill::Copy,
                kv_dtype: candle_core::DType::F32,
                stop_ids: vec![],
            };
            let g = generate(&model, &prompt, &opts, &mut |_| {})?;
            let s = g.stats;
            println!(
                "| {label} | {} | {:.2} | {:.3} | {:.0}% | {:.2} | {:.2} |",
                q.map_or("all loops".to_string(), |q| format!("q={q}")),
                s.prefill_tokens_per_s,
                s.decode_tokens_per_s,
                100.0 * s.decode_tokens_per_s / bound,
                s.mean_loops_per_token,
                bytes_per_token / 1e9
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
