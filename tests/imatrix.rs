//! `ouro-quant imatrix`: the sums against the f64 reference of the spec (every loop's product one
//! more matmul, as llama-imatrix counts a looped model; and `exit:q`), the files as llama.cpp's
//! readers see them (gguf-py for GGUF, llama.cpp's legacy layout parsed in Python for `.dat`),
//! determinism across thread counts, and the bad-input rules.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use common::reference::{reference, reference_observed};
use common::{bin, fixtures};
use ouro_quant::imatrix::{collect, Calibration, Weighting};
use ouro_quant::model::source;

fn trained() -> PathBuf {
    fixtures().join("ouro-tiny-trained")
}

fn calibration_tokens(n: usize) -> Vec<u32> {
    let tok = tokenizers::Tokenizer::from_file(trained().join("tokenizer.json")).unwrap();
    let text = std::fs::read_to_string(trained().join("calibration.txt")).unwrap();
    let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    ids[..n].to_vec()
}

/// The GGUF names of the weights that multiply the reference's input `site` of layer `i`.
fn names(i: usize, site: &str) -> Vec<String> {
    let s: &[&str] = match site {
        "self_attn.q_proj.weight" => &["attn_q", "attn_k", "attn_v"],
        "self_attn.o_proj.weight" => &["attn_output"],
        "mlp.gate_proj.weight" => &["ffn_gate", "ffn_up"],
        "mlp.down_proj.weight" => &["ffn_down"],
        _ => panic!("{site}"),
    };
    s.iter().map(|n| format!("blk.{i}.{n}.weight")).collect()
}

/// Squared inputs per column and rows counted, by GGUF weight name, from the f64 reference: each
/// chunk run alone; with `exit_q`, loop t of a token counts only while its exit CDF over the loops
/// before t is below q.
fn reference_sums(tokens: &[u32], ctx: usize, exit_q: Option<f64>) -> BTreeMap<String, (Vec<f64>, u64)> {
    let dir = trained();
    let mut acc: BTreeMap<String, (Vec<f64>, u64)> = BTreeMap::new();
    for chunk in tokens.chunks_exact(ctx) {
        let full = reference(&dir, chunk, 4);
        let keep = |t: usize, j: usize| -> bool {
            let Some(q) = exit_q else { return true };
            let cdf: f64 = full.pdf[..t].iter().map(|p| p[j]).sum();
            t == 0 || cdf < q
        };
        reference_observed(&dir, chunk, 4, &mut |t, i, site, rows| {
            for name in names(i, site) {
                let e = acc.entry(name).or_insert_with(|| (vec![0.0; rows[0].len()], 0));
                for (j, r) in rows.iter().enumerate() {
                    if keep(t, j) {
                        e.1 += 1;
                        e.0.iter_mut().zip(r).for_each(|(a, v)| *a += v * v);
                    }
                }
            }
        });
    }
    acc
}

fn check_against_reference(weighting: Weighting, exit_q: Option<f64>) {
    let (ctx, n) = (32, 64);
    let tokens = calibration_tokens(n);
    let loaded = source::load(&trained(), &Device::Cpu).unwrap();
    let cal = Calibration { tokens: &tokens, ctx, chunks: None, weighting, dataset: "calibration.txt".into() };
    let m = collect(&loaded.model, &cal, &mut |_, _| {}).unwrap();
    let want = reference_sums(&tokens, ctx, exit_q);
    assert_eq!(m.entries.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "one entry per decoder weight (7 per layer)");
    assert_eq!(m.entries.len(), 14);
    let mut worst = 0f64;
    for (name, (sums, rows)) in &want {
        let e = &m.entries[name];
        assert_eq!(e.count, *rows as f64, "{name}: rows counted");
        let scale = sums.iter().cloned().fold(0.0, f64::max);
        for (a, b) in e.sums.iter().zip(sums) {
            worst = worst.max((*a as f64 - b).abs() / scale);
        }
    }
    // measured 3.7e-7 (loops) and 7.6e-7 (exit:0.5): an f32 forward pass against f64
    assert!(worst < 5e-6, "{weighting:?}: worst difference {worst} of the largest sum");
    let rows = m.entries.values().map(|e| e.count as u64).max().unwrap();
    match weighting {
        // every loop's product is one more matmul: 4 loops x 64 tokens
        Weighting::Loops => assert_eq!(rows, 4 * n as u64),
        // the trained fixture's gate sends tokens out early: fewer rows, never fewer than loop 0's
        Weighting::Exit(_) => assert!(rows > n as u64 && rows < 4 * n as u64, "{rows}"),
    }
    assert_eq!(m.chunk_count as u64, rows / ctx as u64, "llama-imatrix's chunk count: rows over the chunk size");
}

#[test]
fn loops_weighting_sums_every_loops_inputs_as_the_reference_does() {
    check_against_reference(Weighting::Loops, None);
}

#[test]
fn exit_weighting_sums_the_loops_adaptive_exit_runs() {
    check_against_reference(Weighting::Exit(0.5), Some(0.5));
}

fn oracle(file: &Path) -> serde_json::Value {
    let py = std::env::var("OURO_QUANT_PYTHON").expect("OURO_QUANT_PYTHON (scripts/test.sh sets it)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oracles/imatrix_read.py");
    let o = std::process::Command::new(py).arg(script).arg(file).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn imatrix(out: &Path, extra: &[&str]) -> assert_cmd::assert::Assert {
    let text = trained().join("calibration.txt");
    bin()
        .arg("imatrix")
        .arg(trained())
        .arg("--text")
        .arg(&text)
        .args(["--ctx", "64", "--chunks", "3", "-o"])
        .arg(out)
        .args(extra)
        .assert()
}

/// The GGUF file as gguf-py reads it (llama.cpp's layout: keys, names, shapes, F32 types), the
/// `.dat` file as llama.cpp's legacy loader reads it, both giving the same importance.
#[test]
fn files_read_as_llama_cpp_reads_them() {
    let d = tempfile::tempdir().unwrap();
    let (g, dat) = (d.path().join("m.gguf"), d.path().join("m.dat"));
    imatrix(&g, &[]).success();
    imatrix(&dat, &["--output-format", "dat"]).success();
    let o = oracle(&g);
    let k = &o["keys"];
    assert_eq!(k["general.type"]["value"], "imatrix");
    assert_eq!(k["imatrix.chunk_count"]["value"], 12, "4 loops x 3 chunks, as llama-imatrix counts a looped model");
    assert_eq!(k["imatrix.chunk_count"]["type"], "UINT32");
    assert_eq!(k["imatrix.chunk_size"]["value"], 64);
    assert_eq!(k["imatrix.chunk_size"]["type"], "UINT32");
    assert_eq!(k["imatrix.datasets"]["value"], serde_json::json!([trained().join("calibration.txt").display().to_string()]));
    let t = o["tensors"].as_array().unwrap();
    assert_eq!(t.len(), 28, "in_sum2 and counts for 7 weights x 2 layers");
    let weights: Vec<&str> = t.iter().step_by(2).map(|x| x["name"].as_str().unwrap().trim_end_matches(".in_sum2")).collect();
    let mut sorted = weights.clone();
    sorted.sort();
    assert_eq!(weights, sorted, "weights in name order, as llama-imatrix writes them");
    let mut gguf_importance = BTreeMap::new();
    for pair in t.chunks(2) {
        let (s, c) = (&pair[0], &pair[1]);
        let base = s["name"].as_str().unwrap().strip_suffix(".in_sum2").expect("in_sum2 first");
        assert_eq!(c["name"].as_str().unwrap(), format!("{base}.counts"));
        assert_eq!((s["type"].as_str(), c["type"].as_str()), (Some("F32"), Some("F32")));
        let cols = if base.contains("ffn_down") { 512 } else { 256 };
        // gguf-py reports ggml's ne order: [n_cols, 1] and [1, 1]
        assert_eq!(s["shape"], serde_json::json!([cols, 1]), "{base}");
        assert_eq!(c["shape"], serde_json::json!([1, 1]));
        assert_eq!(c["values"][0], 4.0 * 3.0 * 64.0, "{base}: rows = loops x tokens");
        let count = c["values"][0].as_f64().unwrap();
        let imp: Vec<f64> = s["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() / count).collect();
        gguf_importance.insert(base.to_string(), imp);
    }
    let o = oracle(&dat);
    assert_eq!(o["format"], "dat");
    assert_eq!(o["chunk_count"], 12);
    let e = o["entries"].as_array().unwrap();
    assert_eq!(e.len(), 14);
    for x in e {
        let name = x["name"].as_str().unwrap();
        // ncall = ceil(rows / chunk size); the values are the means times ncall
        assert_eq!(x["ncall"], 12, "{name}");
        let want = &gguf_importance[name];
        for (v, w) in x["values"].as_array().unwrap().iter().zip(want) {
            let v = v.as_f64().unwrap() / 12.0;
            assert!((v - w).abs() <= 1e-6 * w.abs().max(1e-30), "{name}: {v} vs {w}");
        }
    }
}

/// Same bytes with one thread as with all of them.
#[test]
fn output_does_not_depend_on_the_thread_count() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.gguf"), d.path().join("b.gguf"));
    imatrix(&a, &["--weighting", "exit:0.7"]).success();
    let text = trained().join("calibration.txt");
    bin()
        .env("RAYON_NUM_THREADS", "1")
        .arg("imatrix")
        .arg(trained())
        .arg("--text")
        .arg(&text)
        .args(["--ctx", "64", "--chunks", "3", "--weighting", "exit:0.7", "-o"])
        .arg(&b)
        .assert()
        .success();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn bad_inputs_are_refused_before_work_with_status_2() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("m.gguf");
    let err = |a: assert_cmd::assert::Assert| String::from_utf8(a.code(2).get_output().stderr.clone()).unwrap();
    let e = err(imatrix(&out, &["--weighting", "exit:1.5"]));
    assert!(e.contains("exit:1.5"), "{e}");
    // a text too short for one chunk
    let short = d.path().join("short.txt");
    std::fs::write(&short, "Q: Where was").unwrap();
    let e = err(bin().arg("imatrix").arg(trained()).arg("--text").arg(&short).arg("-o").arg(&out).assert());
    assert!(e.contains("fewer than one chunk"), "{e}");
    assert!(!out.exists());
    // an existing file that ouro-quant did not write
    std::fs::write(&out, "precious").unwrap();
    let e = err(imatrix(&out, &[]));
    assert!(e.contains("m.gguf"), "{e}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious");
    // the text itself as the output
    let text = d.path().join("cal.txt");
    std::fs::copy(trained().join("calibration.txt"), &text).unwrap();
    err(bin().arg("imatrix").arg(trained()).arg("--text").arg(&text).arg("-o").arg(&text).arg("--force").assert());
    assert_eq!(std::fs::read(&text).unwrap(), std::fs::read(trained().join("calibration.txt")).unwrap());
    let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 3, "nothing left behind: {left:?}");
}

/// `convert --imatrix` with the GGUF and the `.dat` layout of the same matrix writes the same
/// file; the output records what llama-quantize records; every quantized tensor's blocks are
/// ggml's quantizer run with that tensor's importance vector (the quantizers themselves are
/// bit-exact with ggml's on the golden vectors: tests/ggml_golden.rs), rows in the file's order.
#[test]
fn convert_uses_the_importance_of_each_tensor_in_either_layout() {
    use ouro_quant::gguf::file::GgufFile;
    use ouro_quant::quant::{ggml::GgmlType, quantize_row};
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    imatrix(&a.join("imatrix"), &[]).success();
    imatrix(&b.join("imatrix"), &["--output-format", "dat"]).success();
    for dir in [&a, &b] {
        bin().current_dir(dir).arg("convert").arg(trained()).args(["--type", "Q4_K_M", "--imatrix", "imatrix", "-o", "m.gguf"]).assert().success();
    }
    let file = std::fs::read(a.join("m.gguf")).unwrap();
    assert!(file == std::fs::read(b.join("m.gguf")).unwrap(), "the same matrix in either layout gives the same file");
    let o = oracle(&a.join("m.gguf"));
    let k = &o["keys"];
    assert_eq!(k["quantize.imatrix.file"]["value"], "imatrix");
    assert_eq!(k["quantize.imatrix.dataset"]["value"], trained().join("calibration.txt").display().to_string());
    assert_eq!((k["quantize.imatrix.entries_count"]["value"].as_u64(), k["quantize.imatrix.entries_count"]["type"].as_str()), (Some(14), Some("UINT32")));
    assert_eq!((k["quantize.imatrix.chunks_count"]["value"].as_u64(), k["quantize.imatrix.chunks_count"]["type"].as_str()), (Some(12), Some("UINT32")));

    let im = ouro_quant::imatrix::Imatrix::read(&a.join("imatrix")).unwrap();
    let ck = ouro_quant::checkpoint::Checkpoint::open(trained()).unwrap();
    let g = GgufFile::open(a.join("m.gguf")).unwrap();
    let plain = d.path().join("plain.gguf");
    bin().arg("convert").arg(trained()).args(["--type", "Q4_K_M", "-o"]).arg(&plain).assert().success();
    let plain = GgufFile::open(&plain).unwrap();
    let mut checked = 0;
    for m in ouro_quant::gguf::arch::tensor_map(&ck.config) {
        let t = g.header.tensor(&m.gguf_name).unwrap();
        let Some(w) = im.weights(&m.gguf_name) else { continue };
        if matches!(t.ggml_type, GgmlType::F32 | GgmlType::Q8_0) {
            continue;
        }
        let vals = ck.tensor(&m.hf_name).unwrap().to_f32();
        let cols = *t.shape.last().unwrap();
        let rows = vals.len() / cols;
        let mut want = vec![];
        for r in 0..rows {
            let s = m.row_order.source_row(r, rows);
            quantize_row(t.ggml_type, &vals[s * cols..(s + 1) * cols], Some(&w), &mut want);
        }
        assert!(g.tensor_bytes(t) == want.as_slice(), "{}: not the blocks of its importance vector", m.gguf_name);
        assert!(plain.tensor_bytes(plain.header.tensor(&m.gguf_name).unwrap()) != want.as_slice(), "{}: the importance changed nothing", m.gguf_name);
        checked += 1;
    }
    assert_eq!(checked, 14, "every decoder weight was quantized with its importance");
}

/// llama-quantize's rules around importance data: the mixes that change with one, the type that
/// needs one, a matrix of another model, and entries a matrix lacks.
#[test]
fn convert_follows_llama_quantize_rules_for_importance_data() {
    use ouro_quant::gguf::file::GgufFile;
    use ouro_quant::quant::ggml::GgmlType;
    let d = tempfile::tempdir().unwrap();
    let im = d.path().join("m.gguf");
    imatrix(&im, &[]).success();
    let ty_of = |f: &Path, name: &str| GgufFile::open(f).unwrap().header.tensor(name).unwrap().ggml_type;
    let conv = |ty: &str, imatrix: Option<&Path>, out: &str| {
        let mut c = bin();
        c.arg("convert").arg(trained()).args(["--type", ty, "-o"]).arg(d.path().join(out));
        if let Some(i) = imatrix {
            c.arg("--imatrix").arg(i);
        }
        c.assert()
    };
    // with importance data, the first n/8 ffn_down of the unrolled depth (2 layers x 4 loops: layer
    // 0) get Q4_1 in Q4_0 and keep IQ4_NL in IQ4_NL (Q5_K without)
    conv("Q4_0", Some(&im), "q40.gguf").success();
    conv("IQ4_NL", Some(&im), "iq.gguf").success();
    conv("IQ4_NL", None, "iq-plain.gguf").success();
    assert_eq!(ty_of(&d.path().join("q40.gguf"), "blk.0.ffn_down.weight"), GgmlType::Q4_1);
    assert_eq!(ty_of(&d.path().join("q40.gguf"), "blk.1.ffn_down.weight"), GgmlType::Q4_0);
    assert_eq!(ty_of(&d.path().join("iq.gguf"), "blk.0.ffn_down.weight"), GgmlType::IQ4_NL);
    assert_eq!(ty_of(&d.path().join("iq-plain.gguf"), "blk.0.ffn_down.weight"), GgmlType::Q5_K);
    let err = |a: assert_cmd::assert::Assert| String::from_utf8(a.code(2).get_output().stderr.clone()).unwrap();
    // Q2_K_S needs one
    let e = err(conv("Q2_K_S", None, "s.gguf"));
    assert!(e.contains("Q2_K_S") && e.contains("importance matrix") && e.contains("ouro-quant imatrix"), "{e}");
    conv("Q2_K_S", Some(&im), "s.gguf").success();
    // a matrix of another model (tiny-random: FFN 256, the fixture's 512)
    let other = d.path().join("other.gguf");
    bin()
        .arg("imatrix")
        .arg(fixtures().join("tiny-random"))
        .arg("--text")
        .arg(trained().join("calibration.txt"))
        .args(["--ctx", "32", "--chunks", "1", "-o"])
        .arg(&other)
        .assert()
        .success();
    let e = err(conv("Q4_K_M", Some(&other), "o.gguf"));
    assert!(e.contains("other.gguf") && e.contains("blk.0.ffn_down.weight") && e.contains("another model"), "{e}");
    assert!(!d.path().join("o.gguf").exists());
    // a matrix without some entries: those tensors are quantized without (llama-quantize's
    // "did not find weights"), except where the type needs one
    let mut m = ouro_quant::imatrix::Imatrix::read(&im).unwrap();
    m.entries.remove("blk.1.attn_q.weight");
    let partial = d.path().join("partial.gguf");
    m.write(&partial, ouro_quant::imatrix::Format::Gguf, false).unwrap();
    conv("Q4_K_M", Some(&partial), "p.gguf").success();
    let e = err(conv("Q2_K_S", Some(&partial), "p2.gguf"));
    assert!(e.contains("partial.gguf") && e.contains("blk.1.attn_q.weight") && e.contains("missing"), "{e}");
    // not an importance matrix at all
    let e = err(conv("Q4_K_M", Some(&trained().join("validation.txt")), "x.gguf"));
    assert!(e.contains("validation.txt"), "{e}");
}

/// llama-quantize's `--exclude-weights` / `--include-weights`: the tensors a name leaves out are
/// quantized exactly as without the matrix, the others exactly as with all of it; the output
/// records the options and the entries used; a name that matches nothing, both flags together,
/// or either without `--imatrix` is refused with status 2 before anything is written.
#[test]
fn exclude_and_include_weights_choose_which_tensors_use_the_matrix() {
    use ouro_quant::gguf::file::GgufFile;
    let d = tempfile::tempdir().unwrap();
    let im = d.path().join("m.gguf");
    imatrix(&im, &[]).success();
    let conv = |out: &str, extra: &[&str]| {
        let mut c = bin();
        c.arg("convert").arg(trained()).args(["--type", "Q3_K_M", "-o"]).arg(d.path().join(out)).args(extra);
        c.assert()
    };
    let imf = im.to_str().unwrap();
    conv("none.gguf", &[]).success();
    conv("all.gguf", &["--imatrix", imf]).success();
    conv("ex.gguf", &["--imatrix", imf, "--exclude-weights", "attn_k", "--exclude-weights", "blk.1.ffn_up"]).success();
    conv("in.gguf", &["--imatrix", imf, "--include-weights", "attn_k"]).success();
    let open = |f: &str| GgufFile::open(d.path().join(f)).unwrap();
    let (none, all, ex, inc) = (open("none.gguf"), open("all.gguf"), open("ex.gguf"), open("in.gguf"));
    let bytes = |g: &GgufFile, name: &str| g.tensor_bytes(g.header.tensor(name).unwrap()).to_vec();
    let mut left_out = 0;
    for t in &all.header.tensors {
        let name = t.name.as_str();
        if !name.starts_with("blk.") || t.shape.len() < 2 {
            continue;
        }
        let excluded = name.contains("attn_k") || name.starts_with("blk.1.ffn_up");
        assert!(bytes(&none, name) != bytes(&all, name), "{name}: the matrix changed nothing, so the test could not tell");
        let want = if excluded { bytes(&none, name) } else { bytes(&all, name) };
        assert!(bytes(&ex, name) == want, "{name}: --exclude-weights");
        let want = if name.contains("attn_k") { bytes(&all, name) } else { bytes(&none, name) };
        assert!(bytes(&inc, name) == want, "{name}: --include-weights");
        left_out += usize::from(excluded);
    }
    assert_eq!(left_out, 3, "blk.0/1.attn_k and blk.1.ffn_up");
    let count = |g: &GgufFile| g.header.get("quantize.imatrix.entries_count").and_then(|v| v.as_u32());
    assert_eq!((count(&all), count(&ex), count(&inc)), (Some(14), Some(11), Some(2)));
    let opts = ex.header.get("ouro_quant.options").and_then(|v| v.as_str()).unwrap().to_string();
    assert!(opts.ends_with(&format!("--imatrix {imf} --exclude-weights attn_k --exclude-weights blk.1.ffn_up")), "{opts}");

    // MLX: the same entries left out (GGUF names; the weights are HF-named there)
    let mlx = |out: &str, extra: &[&str]| {
        let p = d.path().join(out);
        bin().arg("convert").arg(trained()).args(["--format", "mlx", "--bits", "3", "-o"]).arg(&p).args(extra).assert().success();
        ouro_quant::stfile::SafetensorsFile::open(&p.join("model.safetensors")).unwrap()
    };
    let (mn, ma, me) = (mlx("mn", &[]), mlx("ma", &["--imatrix", imf]), mlx("me", &["--imatrix", imf, "--exclude-weights", "attn_k"]));
    for t in mn.tensors() {
        let name = t.name.as_str();
        if !name.contains(".layers.") || name.contains("norm") {
            continue;
        }
        let b = |f: &ouro_quant::stfile::SafetensorsFile| f.bytes(name).unwrap().to_vec();
        let want = if name.contains("k_proj") { b(&mn) } else { b(&ma) };
        assert!(b(&me) == want, "MLX {name}: --exclude-weights attn_k");
    }

    let err = |a: assert_cmd::assert::Assert| String::from_utf8(a.code(2).get_output().stderr.clone()).unwrap();
    let e = err(conv("x1.gguf", &["--imatrix", imf, "--exclude-weights", "attn_kk"]));
    assert!(e.contains("--exclude-weights `attn_kk`") && e.contains("m.gguf") && e.contains("no entry"), "{e}");
    let e = err(conv("x2.gguf", &["--imatrix", imf, "--exclude-weights", "attn_k", "--include-weights", "ffn"]));
    assert!(e.contains("--include-weights") && e.contains("--exclude-weights"), "{e}");
    let e = err(conv("x3.gguf", &["--exclude-weights", "attn_k"]));
    assert!(e.contains("--imatrix"), "{e}");
    for x in ["x1.gguf", "x2.gguf", "x3.gguf"] {
        assert!(!d.path().join(x).exists(), "{x}");
    }
}
