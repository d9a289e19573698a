//! `inspect`: what a checkpoint holds, what it would weigh in each output format, and whether its
//! values are finite.

use rayon::prelude::*;
use serde::Serialize;

use crate::checkpoint::{decode_f32, Checkpoint, Correction};
use crate::gguf::mix::{tensor_type, FileType};
use crate::stfile::DType;

/// Everything `inspect` reports, as printed with `--json`.
#[derive(Debug, Serialize)]
pub struct Report {
    pub path: String,
    pub architecture: String,
    pub layers: usize,
    pub loops: usize,
    pub kv_slots: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub tokenizer_vocab: Option<usize>,
    pub parameters: u64,
    pub dtype: String,
    pub weight_files: usize,
    pub bytes_on_disk: u64,
    pub early_exit_threshold: Option<f64>,
    pub corrections: Vec<Correction>,
    pub warnings: Vec<String>,
    /// Estimated size of each output format.
    pub output_sizes: Vec<FormatSize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors: Option<Vec<TensorRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scan: Option<Scan>,
}

#[derive(Debug, Serialize)]
pub struct FormatSize {
    pub format: String,
    pub bytes: u64,
    pub bits_per_weight: f64,
}

#[derive(Debug, Serialize)]
pub struct TensorRow {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: usize,
    pub file: String,
}

/// Result of the NaN/Inf scan.
#[derive(Debug, Serialize)]
pub struct Scan {
    pub tensors_scanned: usize,
    pub values_scanned: u64,
    /// Tensors with at least one non-finite value.
    pub bad: Vec<BadTensor>,
}

#[derive(Debug, Serialize)]
pub struct BadTensor {
    pub name: String,
    pub nan: u64,
    pub inf: u64,
    /// Flat index of the first non-finite value.
    pub first_index: u64,
}

/// Builds the report; `tensors` adds the tensor table, `scan` reads every value.
pub fn inspect(ck: &Checkpoint, tensors: bool, scan: bool) -> Report {
    let c = &ck.config;
    let params = c.parameter_count();
    let mut sizes = vec![];
    for ft in [FileType::F16, FileType::Q8_0, FileType::Q4_K_M] {
        let map = crate::gguf::arch::tensor_map(c);
        let tensor_bytes: u64 = map
            .iter()
            .map(|m| {
                let shape = &ck.weights.get(&m.hf_name).expect("checked at open").info.shape;
                let ty = tensor_type(ft, c, &m.gguf_name, shape, &[]);
                let cols = *shape.last().unwrap_or(&1);
                let rows: usize = shape.iter().product::<usize>() / cols.max(1);
                (rows * ty.row_bytes(cols)) as u64
            })
            .sum();
        // exactly what convert writes (header, tokenizer, checksums, padding); if the metadata cannot
        // be built (no tokenizer, say), the tensors and the exit gate kept as f32 metadata
        let opts = crate::convert::GgufOptions { file_type: ft, overrides: vec![], force: false, imatrix: None };
        let bytes = crate::convert::gguf_file_bytes(ck, &opts).unwrap_or(tensor_bytes + 4 * (c.hidden_size as u64 + 1));
        sizes.push(FormatSize {
            format: format!("GGUF {}", ft.name()),
            bytes,
            bits_per_weight: bytes as f64 * 8.0 / params as f64,
        });
    }
    for (bits, gs) in [(8, 64), (4, 64)] {
        let bytes = crate::mlx::output_bytes(c, bits, gs, 2);
        sizes.push(FormatSize {
            format: format!("MLX {bits}-bit gs{gs}"),
            bytes,
            bits_per_weight: bytes as f64 * 8.0 / params as f64,
        });
    }
    let tokenizer_vocab = ck.tokenizer.load().ok().map(|t| t.get_vocab_size(true));
    Report {
        path: ck.dir.display().to_string(),
        architecture: c
            .raw
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .unwrap_or("ouro")
            .to_string(),
        layers: c.num_hidden_layers,
        loops: c.total_ut_steps,
        kv_slots: c.kv_slots(),
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        vocab_size: c.vocab_size,
        tokenizer_vocab,
        parameters: params,
        dtype: ck.dtype().to_string(),
        weight_files: ck.weights.files().len(),
        bytes_on_disk: ck.weights.bytes_on_disk(),
        early_exit_threshold: c.early_exit_threshold,
        corrections: c.corrections.clone(),
        warnings: ck.warnings.clone(),
        output_sizes: sizes,
        tensors: tensors.then(|| {
            ck.weights
                .iter()
                .map(|t| TensorRow {
                    name: t.name().to_string(),
                    dtype: t.dtype().to_string(),
                    shape: t.shape().to_vec(),
                    bytes: t.bytes.len(),
                    file: t
                        .file
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                })
                .collect()
        }),
        scan: scan.then(|| scan_values(ck)),
    }
}

/// Counts NaN and Inf in every float tensor, in parallel, a block of values at a time.
fn scan_values(ck: &Checkpoint) -> Scan {
    let views: Vec<_> = ck.weights.iter().filter(|t| t.dtype().is_weight_float()).collect();
    let results: Vec<(u64, Option<BadTensor>)> = views
        .par_iter()
        .map(|t| {
            let es = t.dtype().size();
            let n = t.bytes.len() / es;
            let mut buf = vec![0f32; 1 << 16];
            let (mut nan, mut inf, mut first) = (0u64, 0u64, None);
            for (ci, chunk) in t.bytes.chunks(buf.len() * es).enumerate() {
                let m = chunk.len() / es;
                decode_f32(t.dtype(), chunk, &mut buf[..m]);
                for (j, v) in buf[..m].iter().enumerate() {
                    if !v.is_finite() {
                        if v.is_nan() {
                            nan += 1
                        } else {
                            inf += 1
                        }
                        first.get_or_insert((ci * buf.len() + j) as u64);
                    }
                }
            }
            let bad = first.map(|first_index| BadTensor {
                name: t.name().to_string(),
                nan,
                inf,
                first_index,
            });
            (n as u64, bad)
        })
        .collect();
    Scan {
        tensors_scanned: views.len(),
        values_scanned: results.iter().map(|r| r.0).sum(),
        bad: results.into_iter().filter_map(|r| r.1).collect(),
    }
}

/// Bytes in a human unit.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u < UNITS.len() - 1 {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.2} {}", UNITS[u])
    }
}

/// Integer with thousands separators.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The report as text for a terminal.
pub fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{}", r.path);
    let _ = writeln!(s, "  architecture   {} (ouro)", r.architecture);
    let _ = writeln!(
        s,
        "  layers         {} physical x {} loops = {} KV slots",
        r.layers, r.loops, r.kv_slots
    );
    let _ = writeln!(
        s,
        "  hidden         {} (intermediate {}), heads {} / kv heads {} x head_dim {}",
        r.hidden_size, r.intermediate_size, r.heads, r.kv_heads, r.head_dim
    );
    let _ = writeln!(
        s,
        "  vocab          {}{}",
        r.vocab_size,
        r.tokenizer_vocab
            .map(|v| format!(" (tokenizer: {v})"))
            .unwrap_or_default()
    );
    let _ = writeln!(s, "  parameters     {}", group_digits(r.parameters));
    let _ = writeln!(
        s,
        "  dtype          {} in {} file(s), {} ({} bytes) on disk",
        r.dtype,
        r.weight_files,
        human_bytes(r.bytes_on_disk),
        group_digits(r.bytes_on_disk)
    );
    if let Some(q) = r.early_exit_threshold {
        let _ = writeln!(s, "  exit threshold {q}");
    }
    let _ = writeln!(s, "  output sizes:");
    for f in &r.output_sizes {
        let _ = writeln!(
            s,
            "    {:<16} {:>12}  {:.2} bits/weight",
            f.format,
            human_bytes(f.bytes),
            f.bits_per_weight
        );
    }
    for w in &r.warnings {
        let _ = writeln!(s, "  warning: {}", crate::error::printable(w));
    }
    if let Some(ts) = &r.tensors {
        let _ = writeln!(s, "  tensors ({}):", ts.len());
        for t in ts {
            let _ = writeln!(
                s,
                "    {:<52} {:<5} {:<14} {:>12}  {}",
                crate::error::printable(&t.name),
                t.dtype,
                format!("{:?}", t.shape),
                human_bytes(t.bytes as u64),
                t.file
            );
        }
    }
    if let Some(sc) = &r.scan {
        if sc.bad.is_empty() {
            let _ = writeln!(
                s,
                "  scan: {} values in {} tensors, all finite",
                group_digits(sc.values_scanned),
                sc.tensors_scanned
            );
        } else {
            let _ = writeln!(s, "  scan: {} tensor(s) hold non-finite values:", sc.bad.len());
            for b in &sc.bad {
                let _ = writeln!(
                    s,
                    "    {}: {} NaN, {} Inf (first at flat index {})",
                    crate::error::printable(&b.name), b.nan, b.inf, b.first_index
                );
            }
        }
    }
    s
}

/// Whether a dtype name given on the command line is a weight dtype.
pub fn parse_weight_dtype(s: &str) -> Option<DType> {
    match s.to_ascii_lowercase().as_str() {
        "bf16" | "bfloat16" => Some(DType::BF16),
        "f16" | "fp16" | "float16" => Some(DType::F16),
        "f32" | "fp32" | "float32" => Some(DType::F32),
        _ => None,
    }
}

/// What `inspect` reports for one of our GGUF files.
#[derive(Debug, Serialize)]
pub struct GgufReport {
    pub path: String,
    pub architecture: String,
    pub name: Option<String>,
    pub file_type: Option<u32>,
    pub layers: Option<u32>,
    pub loops: Option<u32>,
    pub hidden_size: Option<u32>,
    pub tensors: usize,
    /// Parameters in tensors plus the exit gate kept as metadata.
    pub parameters: u64,
    pub bytes_on_disk: u64,
    pub bits_per_weight: f64,
    pub types: Vec<(String, usize)>,
    pub has_exit_gate: bool,
    pub source_sha256: Option<String>,
    pub tool_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensor_table: Option<Vec<TensorRow>>,
}

/// Reads a GGUF file with the strict reader and summarizes it.
pub fn inspect_gguf(path: &std::path::Path, tensors: bool) -> crate::Result<GgufReport> {
    use crate::gguf::file::{GgufFile, Value};
    let f = GgufFile::open(path)?;
    let h = &f.header;
    let s = |k: &str| h.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let u = |k: &str| h.get(k).and_then(|v| v.as_u32());
    let gate = match h.get(crate::gguf::arch::KEY_GATE_WEIGHT) {
        Some(Value::Array(_, a)) => a.len() as u64 + 1,
        _ => 0,
    };
    let mut types: Vec<(String, usize)> = vec![];
    for t in &h.tensors {
        match types.iter_mut().find(|(n, _)| n == t.ggml_type.name()) {
            Some(e) => e.1 += 1,
            None => types.push((t.ggml_type.name().to_string(), 1)),
        }
    }
    let params = h.tensors.iter().map(|t| t.numel() as u64).sum::<u64>() + gate;
    let bytes = f.file_len() as u64;
    Ok(GgufReport {
        path: path.display().to_string(),
        architecture: s("general.architecture").unwrap_or_default(),
        name: s("general.name"),
        file_type: u("general.file_type"),
        layers: u("ouro.block_count"),
        loops: u("ouro.num_loops"),
        hidden_size: u("ouro.embedding_length"),
        tensors: h.tensors.len(),
        parameters: params,
        bytes_on_disk: bytes,
        bits_per_weight: bytes as f64 * 8.0 / params.max(1) as f64,
        types,
        has_exit_gate: gate > 0,
        source_sha256: s("ouro_quant.source.sha256"),
        tool_version: s("ouro_quant.version"),
        tensor_table: tensors.then(|| {
            h.tensors
                .iter()
                .map(|t| TensorRow {
                    name: t.name.clone(),
                    dtype: t.ggml_type.name().to_string(),
                    shape: t.shape.clone(),
                    bytes: t.nbytes(),
                    file: String::new(),
                })
                .collect()
        }),
    })
}

/// What `inspect` says of an MLX directory.
#[derive(Debug, Serialize)]
pub struct MlxReport {
    pub schema: &'static str,
    pub path: String,
    pub layers: usize,
    pub loops: usize,
    pub hidden_size: usize,
    /// The top-level `bits` / `group_size` of config.json's `quantization` (None: unquantized).
    pub bits: Option<u64>,
    pub group_size: Option<u64>,
    /// Modules with an entry of their own (mixed recipes) and modules left unquantized.
    pub modules_with_own_bits: Vec<(String, u64)>,
    pub modules_unquantized: usize,
    pub parameters: u64,
    pub bytes_on_disk: u64,
    pub bits_per_weight: f64,
    pub files: Vec<(String, u64)>,
    /// Whether the index carries ouro-quant's checksum record (`inspect --verify` checks it).
    pub written_by_ouro_quant: bool,
    pub tool_version: Option<String>,
}

/// Describes an MLX directory: quantization, sizes, provenance (its tensors checked by opening it
/// as the runner does).
pub fn inspect_mlx(path: &std::path::Path) -> crate::Result<MlxReport> {
    use crate::error::IoContext;
    let dir = crate::mlx::read::MlxDir::open(path)?;
    let cfg = &dir.config;
    let q = cfg.raw.get("quantization");
    let mut own = vec![];
    let mut unq = 0;
    if let Some(serde_json::Value::Object(m)) = q {
        for (k, v) in m {
            match v {
                serde_json::Value::Bool(false) => unq += 1,
                serde_json::Value::Object(e) => own.push((k.clone(), e.get("bits").and_then(|b| b.as_u64()).unwrap_or(0))),
                _ => {}
            }
        }
    }
    let mut files = vec![];
    for e in std::fs::read_dir(path).at(path)?.flatten() {
        if e.file_type().is_ok_and(|t| t.is_file()) {
            files.push((e.file_name().to_string_lossy().into_owned(), e.metadata().map(|m| m.len()).unwrap_or(0)));
        }
    }
    files.sort();
    let weight_bytes: u64 = files.iter().filter(|(n, _)| n.ends_with(".safetensors")).map(|(_, b)| b).sum();
    let params = cfg.parameter_count();
    let readme = std::fs::read_to_string(path.join("README.md")).unwrap_or_default();
    let tool_version = readme
        .split("using ouro-quant version **")
        .nth(1)
        .and_then(|r| r.split("**").next())
        .map(str::to_string);
    Ok(MlxReport {
        schema: "ouro-quant-inspect-mlx-1",
        path: path.display().to_string(),
        layers: cfg.num_hidden_layers,
        loops: cfg.total_ut_steps,
        hidden_size: cfg.hidden_size,
        bits: q.and_then(|q| q.get("bits")).and_then(|b| b.as_u64()),
        group_size: q.and_then(|q| q.get("group_size")).and_then(|b| b.as_u64()),
        modules_with_own_bits: own,
        modules_unquantized: unq,
        parameters: params,
        bytes_on_disk: files.iter().map(|(_, b)| b).sum(),
        bits_per_weight: weight_bytes as f64 * 8.0 / params.max(1) as f64,
        files,
        written_by_ouro_quant: crate::output::is_our_directory(path),
        tool_version,
    })
}

/// The MLX report as text.
pub fn render_mlx(r: &MlxReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{} (MLX)", r.path);
    let _ = writeln!(s, "  shape          {} layers x {} loops, hidden {}", r.layers, r.loops, r.hidden_size);
    match (r.bits, r.group_size) {
        (Some(b), Some(g)) => {
            let _ = writeln!(s, "  quantization   {b}-bit affine, group size {g}");
        }
        _ => {
            let _ = writeln!(s, "  quantization   none (stored dtype)");
        }
    }
    if !r.modules_with_own_bits.is_empty() {
        let mut by_bits: std::collections::BTreeMap<u64, usize> = Default::default();
        for (_, b) in &r.modules_with_own_bits {
            *by_bits.entry(*b).or_default() += 1;
        }
        let _ = writeln!(
            s,
            "  mixed          {} modules with their own bits ({})",
            r.modules_with_own_bits.len(),
            by_bits.iter().map(|(b, n)| format!("{n} at {b}-bit")).collect::<Vec<_>>().join(", ")
        );
    }
    if r.modules_unquantized > 0 {
        let _ = writeln!(s, "  unquantized    {} modules", r.modules_unquantized);
    }
    let _ = writeln!(s, "  parameters     {}", group_digits(r.parameters));
    let _ = writeln!(s, "  size           {} on disk, {:.2} bits per weight (weights)", human_bytes(r.bytes_on_disk), r.bits_per_weight);
    let _ = writeln!(s, "  files          {}", r.files.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "));
    let _ = writeln!(
        s,
        "  written by     {}",
        if r.written_by_ouro_quant {
            format!("ouro-quant {} (checksums recorded: inspect --verify checks them)", r.tool_version.as_deref().unwrap_or("?"))
        } else {
            "another tool (no ouro-quant record in the index)".into()
        }
    );
    s
}

/// The GGUF report as text.
pub fn render_gguf(r: &GgufReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{} (GGUF)", r.path);
    let _ = writeln!(s, "  architecture   {}{}", r.architecture, r.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default());
    if let (Some(l), Some(t)) = (r.layers, r.loops) {
        let _ = writeln!(s, "  layers         {l} physical x {t} loops, hidden {}", r.hidden_size.unwrap_or(0));
    }
    let _ = writeln!(s, "  parameters     {}", group_digits(r.parameters));
    let _ = writeln!(s, "  size           {} ({:.2} bits/weight)", human_bytes(r.bytes_on_disk), r.bits_per_weight);
    let _ = writeln!(
        s,
        "  tensors        {}: {}",
        r.tensors,
        r.types.iter().map(|(t, n)| format!("{n} {t}")).collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(s, "  exit gate      {}", if r.has_exit_gate { "in metadata" } else { "MISSING (not an ouro-quant file?)" });
    if let Some(h) = &r.source_sha256 {
        let _ = writeln!(s, "  source sha256  {h}");
    }
    if let Some(ts) = &r.tensor_table {
        for t in ts {
            let _ = writeln!(s, "    {:<32} {:<7} {:<16} {:>12}", crate::error::printable(&t.name), t.dtype, format!("{:?}", t.shape), human_bytes(t.bytes as u64));
        }
    }
    s
}
