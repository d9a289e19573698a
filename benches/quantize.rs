//! Single-thread throughput of each ggml quantizer, beside ggml's own (`--ggml DRIVER`:
//! scripts/golden/quantize_vectors.c built against ggml 0.25.3 by scripts/golden/ggml-vectors.sh,
//! which times `ggml_quantize_chunk` alone) and gguf-py's numpy quantizers (the types it has), on
//! the same matrix in the same run. The types ggml quantizes only with an importance vector
//! (IQ2_XXS, IQ2_XS, IQ1_S) get the same fixed one on both sides.
//!
//! cargo bench --bench quantize -- [--rows 512] [--cols 5632] [--ggml target/golden-ggml/quantize_vectors]
//! (OURO_QUANT_PYTHON: the oracle venv)

mod common;

use std::time::Instant;

use ouro_quant::quant::ggml::GgmlType;
use ouro_quant::quant::quantize_row;

fn arg(name: &str, default: usize) -> usize {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1)).and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn arg_str(name: &str) -> Option<String> {
    let a: Vec<String> = std::env::args().collect();
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1)).cloned()
}

/// ggml's single-thread seconds for `ty` on the input file (the driver's last stderr line).
fn ggml_seconds(driver: &str, ty: GgmlType, rows: usize, cols: usize, input: &std::path::Path, imatrix: Option<&std::path::Path>) -> Option<f64> {
    let out = std::env::temp_dir().join("ouro-quant-bench-ggml.bin");
    let mut best = f64::MAX;
    for _ in 0..3 {
        let o = std::process::Command::new(driver)
            .args([ty.id().to_string(), rows.to_string(), cols.to_string()])
            .arg(input)
            .arg(imatrix.map_or("-".into(), |p| p.display().to_string()))
            .arg(&out)
            .output()
            .ok()?;
        let err = String::from_utf8_lossy(&o.stderr);
        let secs: f64 = err.lines().last()?.rsplit(" in ").next()?.trim_end_matches(" s").parse().ok()?;
        best = best.min(secs);
    }
    let _ = std::fs::remove_file(out);
    Some(best)
}

fn main() {
    println!("{}", common::cpu_line());
    let (rows, cols) = (arg("--rows", 512), arg("--cols", 5632));
    // N(0, 0.02)-like values from a fixed generator
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let x: Vec<f32> = (0..rows * cols)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            (u - 0.5) * 0.07
        })
        .collect();
    let input_path = std::env::temp_dir().join("ouro-quant-bench-input.f32");
    std::fs::write(&input_path, x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    // a fixed importance vector, U(0.1, 2), for the types that need one
    let imatrix: Vec<f32> = (0..cols)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            0.1 + 1.9 * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect();
    let imatrix_path = std::env::temp_dir().join("ouro-quant-bench-imatrix.f32");
    std::fs::write(&imatrix_path, imatrix.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let mb = (rows * cols * 4) as f64 / 1e6;
    let ggml = arg_str("--ggml");
    println!("matrix {rows} x {cols} f32 ({mb:.1} MB), 1 thread");
    println!("| type | ours MB/s of f32 input | ggml MB/s | ratio | gguf-py (numpy) MB/s | ratio |");
    println!("|---|---|---|---|---|---|");
    let py = std::env::var("OURO_QUANT_PYTHON").ok();
    for ty in GgmlType::ALL {
        if ty == GgmlType::F32 {
            continue;
        }
        let im = ty.requires_importance().then_some(imatrix.as_slice());
        // best of 3: this machine's clock varies between runs
        let mut best = f64::MAX;
        for _ in 0..3 {
            let mut out = Vec::with_capacity(rows * ty.row_bytes(cols));
            let t = Instant::now();
            for r in x.chunks_exact(cols) {
                assert!(quantize_row(ty, r, im, &mut out));
            }
            best = best.min(t.elapsed().as_secs_f64());
            std::hint::black_box(&out);
        }
        let ours = mb / best;
        let g = ggml.as_deref().and_then(|d| ggml_seconds(d, ty, rows, cols, &input_path, im.map(|_| imatrix_path.as_path()))).map(|secs| mb / secs);
        let g = match g {
            Some(g) => format!("{g:.0} | {:.2}x", ours / g),
            None => "- | ".into(),
        };
        let theirs = py.as_ref().and_then(|py| {
            let script = format!(
                "import sys,time,numpy as np\nfrom gguf.quants import quantize\nfrom gguf import GGMLQuantizationType as T\n\
                 x=np.fromfile(r'{}',dtype='<f4').reshape({rows},{cols})\nt=getattr(T,'{}')\n\
                 try:\n  b=9e9\n  for _ in range(3):\n    s=time.perf_counter();quantize(x,t);b=min(b,time.perf_counter()-s)\n  print(b)\nexcept NotImplementedError:\n  print('none')",
                input_path.display(),
                ty.name()
            );
            let o = std::process::Command::new(py).arg("-c").arg(script).output().ok()?;
            String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok().map(|secs| mb / secs)
        });
        match theirs {
            Some(t) => println!("| {} | {ours:.0} | {g} | {t:.0} | {:.1}x |", ty.name(), ours / t),
            None => println!("| {} | {ours:.0} | {g} | (no quantizer) | |", ty.name()),
        }
    }
    let _ = std::fs::remove_file(input_path);
    let _ = std::fs::remove_file(imatrix_path);
}
