//! `ouro-quant batch MANIFEST.toml`: every source x every target of a manifest, converted (and
//! validated where asked) into one output directory, resumably, with `SHA256SUMS` and a summary.
//!
//! ```toml
//! output_dir = "out"                 # relative to the manifest
//! memory = 8000000000                # budget for parallel jobs (bytes; default 8 GB)
//! [validate]                         # used by targets with validate = true
//! text = "valid.txt"
//! ctx = 512
//! chunks = 8
//! [[sources]]
//! name = "Ouro-1.4B"
//! path = "/models/Ouro-1.4B"
//! [[targets]]
//! format = "gguf"
//! type = "Q4_K_M"                    # name: "{name}-{type}.gguf" unless given
//! validate = true
//! [[targets]]
//! format = "mlx"
//! bits = 4
//! group_size = 32                    # name: "{name}-4bit-gs32" unless given
//! [calibration]                      # optional: quantize with importance matrices
//! text = "calibration.txt"           # keep it apart from [validate]'s text
//! ctx = 512
//! chunks = 100                       # default: the whole text
//! ```
//!
//! With a `[calibration]` table, every target whose quantizer uses importance data gets an
//! importance matrix computed once per source and weighting (`.imatrix-<source>-<weighting>.gguf`
//! in the output directory, reused when resuming). The weighting is the one
//! `docs/calibration.md` measured best for the type ([`default_weighting`]); a target may say
//! otherwise with `imatrix = "loops"`, `"exit:0.7"` or `"none"`, and `[calibration]` may set
//! `weighting` for every target.
//!
//! Resuming: `ouro-quant-batch.json` in the output directory records, per output, the source's
//! SHA-256, the options, the tool version and the SHA-256 of every file written. A target whose
//! output exists with a matching record and unchanged files is skipped; an output that exists
//! without one is refused unless `--force`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::imatrix::{ImatrixInput, Weighting};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub output_dir: PathBuf,
    #[serde(default)]
    pub memory: Option<u64>,
    #[serde(default)]
    pub validate: Option<ValidateCfg>,
    #[serde(default)]
    pub sources: Vec<Source>,
    #[serde(default)]
    pub targets: Vec<Target>,
    #[serde(default)]
    pub calibration: Option<CalibrationCfg>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationCfg {
    pub text: PathBuf,
    #[serde(default = "default_ctx")]
    pub ctx: usize,
    pub chunks: Option<usize>,
    /// The weighting of every target that does not name one (default: per type).
    pub weighting: Option<String>,
    /// SHA-256 of the text, read with the manifest (recorded in the options of the jobs it feeds).
    #[serde(skip)]
    pub text_sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub format: String,
    #[serde(rename = "type")]
    pub file_type: Option<String>,
    pub bits: Option<u32>,
    pub group_size: Option<usize>,
    pub recipe: Option<String>,
    pub name: Option<String>,
    #[serde(default)]
    pub validate: bool,
    /// `none`, `loops` or `exit:q`: this target's importance weighting (needs `[calibration]`).
    pub imatrix: Option<String>,
    /// Tensors (GGUF names containing one of these) quantized without the importance matrix, as
    /// `convert --exclude-weights`.
    #[serde(default)]
    pub exclude_weights: Vec<String>,
    /// Only these tensors (GGUF names containing one of these) use the importance matrix, as
    /// `convert --include-weights`.
    #[serde(default)]
    pub include_weights: Vec<String>,
}

impl Target {
    /// The target's `exclude_weights` / `include_weights` as a filter (checked when the manifest
    /// is read: not both).
    fn entry_filter(&self) -> crate::imatrix::EntryFilter {
        use crate::imatrix::EntryFilter;
        match (self.include_weights.is_empty(), self.exclude_weights.is_empty()) {
            (false, _) => EntryFilter::Include(self.include_weights.clone()),
            (true, false) => EntryFilter::Exclude(self.exclude_weights.clone()),
            (true, true) => EntryFilter::All,
        }
    }
}

/// Whether `name` can match an importance matrix entry of an Ouro model (a part of a decoder
/// weight's GGUF name, `blk.N.attn_k.weight` and the like).
fn names_a_weight(name: &str) -> bool {
    const WEIGHTS: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
    !name.is_empty() && (0..256).any(|i| WEIGHTS.iter().any(|w| format!("blk.{i}.{w}.weight").contains(name)))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateCfg {
    pub text: PathBuf,
    #[serde(default = "default_ctx")]
    pub ctx: usize,
    pub chunks: Option<usize>,
}

fn default_ctx() -> usize {
    512
}

/// Reads and checks a manifest; relative paths are resolved against its directory.
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut m: Manifest = toml::from_str(&text).map_err(|e| Error::file(path, format!("not a valid manifest: {e}")))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let abs = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
    m.output_dir = abs(&m.output_dir);
    for s in &mut m.sources {
        s.path = abs(&s.path);
    }
    if let Some(v) = &mut m.validate {
        v.text = abs(&v.text);
    }
    if let Some(c) = &mut m.calibration {
        c.text = abs(&c.text);
        if c.ctx < 16 {
            return Err(Error::config(path, "calibration.ctx", format!("{}: at least 16 tokens", c.ctx)));
        }
        if c.chunks == Some(0) {
            return Err(Error::config(path, "calibration.chunks", "at least one chunk"));
        }
        if let Some(w) = &c.weighting {
            Weighting::parse(w).map_err(|e| Error::config(path, "calibration.weighting", e))?;
        }
        let bytes = std::fs::read(&c.text).map_err(|e| Error::config(path, "calibration.text", format!("{}: {e}", c.text.display())))?;
        if std::str::from_utf8(&bytes).is_err() {
            return Err(Error::config(path, "calibration.text", format!("{}: not UTF-8 text", c.text.display())));
        }
        c.text_sha256 = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    }
    if m.sources.is_empty() || m.targets.is_empty() {
        return Err(Error::file(path, "needs at least one [[sources]] and one [[targets]]"));
    }
    let mut names = std::collections::BTreeSet::new();
    for s in &m.sources {
        if !names.insert(&s.name) {
            return Err(Error::config(path, format!("sources.{}", s.name), "two sources have this name"));
        }
    }
    for (i, t) in m.targets.iter().enumerate() {
        if t.validate && m.validate.is_none() {
            return Err(Error::config(path, format!("targets[{i}].validate"), "needs a [validate] table with the text"));
        }
        // bad options are the manifest's fault: refused before any work starts
        let (kind, _, _) = target_kind(t, "x");
        if let TargetKind::Invalid(why) = &kind {
            return Err(Error::config(path, format!("targets[{i}]"), why.clone()));
        }
        if let Some(w) = &t.imatrix {
            if m.calibration.is_none() {
                return Err(Error::config(path, format!("targets[{i}].imatrix"), "needs a [calibration] table with the text"));
            }
            if w != "none" {
                Weighting::parse(w).map_err(|e| Error::config(path, format!("targets[{i}].imatrix"), e))?;
            }
        }
        for (key, names) in [("exclude_weights", &t.exclude_weights), ("include_weights", &t.include_weights)] {
            if names.is_empty() {
                continue;
            }
            let key = format!("targets[{i}].{key}");
            if !t.exclude_weights.is_empty() && !t.include_weights.is_empty() {
                return Err(Error::config(path, key, "exclude_weights and include_weights cannot be used together (as in llama-quantize)"));
            }
            if weighting_for(&m, t, &kind).is_none() {
                return Err(Error::config(path, key, "this target is quantized without an importance matrix (it needs a [calibration] table, a weighting other than \"none\", and a type whose quantizer uses one)"));
            }
            if let Some(n) = names.iter().find(|n| !names_a_weight(n)) {
                return Err(Error::config(path, key, format!("`{n}` is in no decoder weight's GGUF name (blk.N.attn_q/attn_k/attn_v/attn_output/ffn_gate/ffn_up/ffn_down.weight)")));
            }
        }
        if let TargetKind::Gguf(ft) = kind {
            if ft.needs_importance() && weighting_for(&m, t, &kind).is_none() {
                return Err(Error::config(
                    path,
                    format!("targets[{i}]"),
                    format!("{} is only written with an importance matrix (as llama-quantize): add a [calibration] table with a text", ft.name()),
                ));
            }
        }
    }
    // Every output is a plain name inside output_dir, and no two jobs write the same one.
    let mut outputs = std::collections::BTreeMap::new();
    for j in jobs(&m) {
        let plain = !j.output.is_empty()
            && j.output != "."
            && j.output != ".."
            && !j.output.contains(['/', '\\', '\0'])
            && !Path::new(&j.output).is_absolute();
        if !plain {
            return Err(Error::config(
                path,
                format!("targets (output {:?} of source {})", j.output, j.source),
                "an output name must be a plain file name inside output_dir (no '/', '..' or absolute path)",
            ));
        }
        if let Some(other) = outputs.insert(j.output.clone(), j.source.clone()) {
            return Err(Error::config(
                path,
                format!("targets (output {:?})", j.output),
                format!("two jobs would write this output (sources {other} and {}): give the targets distinct names", j.source),
            ));
        }
    }
    Ok(m)
}

/// One conversion to run.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub source: String,
    pub source_path: PathBuf,
    pub output: String,
    /// Canonical options, as recorded for resuming.
    pub options: String,
    pub validate: bool,
    /// The importance weighting this job quantizes with, if any.
    #[serde(serialize_with = "ser_weighting")]
    pub imatrix: Option<Weighting>,
    /// Which of the matrix's entries this job uses.
    #[serde(skip)]
    pub imatrix_filter: crate::imatrix::EntryFilter,
    #[serde(skip)]
    pub target: TargetKind,
}

fn ser_weighting<S: serde::Serializer>(w: &Option<Weighting>, s: S) -> std::result::Result<S::Ok, S::Error> {
    match w {
        Some(w) => s.serialize_str(&w.name()),
        None => s.serialize_none(),
    }
}

/// The weighting `docs/calibration.md` measured best for a target's type (with a calibration text):
/// `exit:0.5` for the K-quant and legacy GGUF types (lowest KL at every loop for Q4_K_M, Q4_K_S,
/// Q3_K_M, Q2_K), `loops` for IQ4_XS and for MLX at 3 bits or fewer (a mixed recipe: by its low
/// bits); none for IQ4_NL and MLX at 4 bits or more (no lower KL with one) and for the types whose
/// quantizer ignores importance (Q8_0, F16, BF16).
pub fn default_weighting(kind: &TargetKind) -> Option<Weighting> {
    use crate::gguf::mix::FileType;
    if !uses_importance(kind) {
        return None;
    }
    match kind {
        TargetKind::Gguf(FileType::IQ4_NL) => None,
        TargetKind::Gguf(FileType::IQ4_XS) => Some(Weighting::Loops),
        TargetKind::Gguf(_) => Some(Weighting::Exit(0.5)),
        TargetKind::Mlx(o) if o.bits.is_some_and(|b| b <= 3) => Some(Weighting::Loops),
        TargetKind::Mlx(_) | TargetKind::Invalid(_) => None,
    }
}

/// Whether a target's quantizer uses importance data at all (ggml's Q8_0, F16 and BF16 ignore it;
/// unquantized MLX has nothing to quantize).
fn uses_importance(kind: &TargetKind) -> bool {
    use crate::gguf::mix::FileType;
    match kind {
        TargetKind::Gguf(ft) => !matches!(ft, FileType::Q8_0 | FileType::F16 | FileType::BF16 | FileType::F32),
        TargetKind::Mlx(o) => o.bits.is_some(),
        TargetKind::Invalid(_) => false,
    }
}

/// The weighting a target quantizes with: none without `[calibration]`; else the target's own,
/// `[calibration] weighting`, or [`default_weighting`]. Types that ignore importance get none.
fn weighting_for(m: &Manifest, t: &Target, kind: &TargetKind) -> Option<Weighting> {
    let c = m.calibration.as_ref()?;
    if !uses_importance(kind) {
        return None;
    }
    match t.imatrix.as_deref().or(c.weighting.as_deref()) {
        Some("none") => None,
        Some(w) => Weighting::parse(w).ok(),
        None => default_weighting(kind),
    }
}

/// The options of the importance matrix a job uses, as recorded for resuming.
fn imatrix_options(c: &CalibrationCfg, w: Weighting) -> String {
    format!(
        "imatrix --weighting {} --ctx {} --chunks {} (calibration text sha256 {})",
        w.name(),
        c.ctx,
        c.chunks.map(|n| n.to_string()).unwrap_or_else(|| "all".into()),
        c.text_sha256
    )
}

/// Where a source's importance matrix for `w` is kept in the output directory.
fn imatrix_file(source: &str, w: Weighting) -> String {
    format!(".imatrix-{source}-{}.gguf", w.name().replace(':', "_"))
}

#[derive(Debug, Clone)]
pub enum TargetKind {
    Gguf(crate::gguf::mix::FileType),
    Mlx(crate::mlx::MlxOptions),
    Invalid(String),
}

impl Default for TargetKind {
    fn default() -> Self {
        TargetKind::Invalid(String::new())
    }
}

/// Expands sources x targets into jobs (a target with bad options, refused when the manifest is
/// read, would become a job that fails).
pub fn jobs(m: &Manifest) -> Vec<Job> {
    let mut out = vec![];
    for s in &m.sources {
        for t in &m.targets {
            let (kind, mut options, default_name) = target_kind(t, &s.name);
            let imatrix = weighting_for(m, t, &kind);
            if let (Some(w), Some(c)) = (imatrix, &m.calibration) {
                options.push_str(&format!(" --imatrix {}", imatrix_options(c, w)));
                for n in &t.exclude_weights {
                    options.push_str(&format!(" --exclude-weights {n}"));
                }
                for n in &t.include_weights {
                    options.push_str(&format!(" --include-weights {n}"));
                }
            }
            let output = t
                .name
                .clone()
                .map(|n| n.replace("{name}", &s.name).replace("{type}", t.file_type.as_deref().unwrap_or("")))
                .unwrap_or(default_name);
            out.push(Job {
                source: s.name.clone(),
                source_path: s.path.clone(),
                output,
                options,
                validate: t.validate,
                imatrix,
                imatrix_filter: t.entry_filter(),
                target: kind,
            });
        }
    }
    out
}

fn target_kind(t: &Target, name: &str) -> (TargetKind, String, String) {
    use crate::gguf::mix::FileType;
    use crate::mlx::{MlxOptions, Recipe};
    match t.format.as_str() {
        "gguf" => {
            let ty = t.file_type.clone().unwrap_or_else(|| "Q8_0".into());
            match FileType::from_name(&ty) {
                Some(ft) => (TargetKind::Gguf(ft), format!("gguf --type {}", ft.name()), format!("{name}-{}.gguf", ft.name())),
                None => (TargetKind::Invalid(format!("unknown GGUF type `{ty}`")), format!("gguf --type {ty}"), format!("{name}-{ty}.gguf")),
            }
        }
        "mlx" => {
            let bits = t.bits.unwrap_or(4);
            let gs = t.group_size.unwrap_or(64);
            let recipe = match t.recipe.as_deref().map(|r| Recipe::from_name(r).ok_or(r)) {
                Some(Err(r)) => return (TargetKind::Invalid(format!("unknown recipe `{r}`")), format!("mlx --recipe {r}"), format!("{name}-{r}")),
                Some(Ok(r)) => Some(r),
                None => None,
            };
            let b = if bits == 16 { None } else { Some(bits) };
            match MlxOptions::new(b, gs, recipe, true) {
                Ok(o) => {
                    let opts = format!(
                        "mlx --bits {bits} --group-size {gs}{}",
                        recipe.map(|r| format!(" --recipe {}", r.name())).unwrap_or_default()
                    );
                    let n = format!("{name}-{}", o.suffix("bf16"));
                    (TargetKind::Mlx(o), opts, n)
                }
                Err(e) => (TargetKind::Invalid(e.to_string()), format!("mlx --bits {bits} --group-size {gs}"), format!("{name}-{bits}bit")),
            }
        }
        f => (TargetKind::Invalid(format!("unknown format `{f}` (gguf or mlx)")), f.to_string(), format!("{name}-{f}")),
    }
}

/// What the state file records of one output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub source_sha256: String,
    pub options: String,
    pub tool_version: String,
    /// Relative path (inside the output directory) -> SHA-256.
    pub files: BTreeMap<String, String>,
    #[serde(default)]
    pub result: Option<serde_json::Value>,
}

pub const STATE_FILE: &str = "ouro-quant-batch.json";

/// Outcome of one job.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub source: String,
    pub output: String,
    pub options: String,
    /// converted, skipped, failed
    pub status: String,
    pub error: Option<String>,
    pub bytes: u64,
    pub bits_per_weight: Option<f64>,
    pub seconds: f64,
    pub ppl_ratio: Option<f64>,
    pub kl_mean: Option<f64>,
    pub exit_agreement_pct: Option<f64>,
    pub validation_pass: Option<bool>,
}

impl Outcome {
    fn new(job: &Job, status: &str) -> Outcome {
        Outcome {
            source: job.source.clone(),
            output: job.output.clone(),
            options: job.options.clone(),
            status: status.into(),
            error: None,
            bytes: 0,
            bits_per_weight: None,
            seconds: 0.0,
            ppl_ratio: None,
            kl_mean: None,
            exit_agreement_pct: None,
            validation_pass: None,
        }
    }
}

fn sha256_file(p: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(p, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Every file of an output (a file, or the files of a directory), relative to `root`, with hashes.
fn hash_output(root: &Path, output: &str) -> Result<BTreeMap<String, String>> {
    let p = root.join(output);
    let mut out = BTreeMap::new();
    if p.is_dir() {
        let mut names: Vec<String> = std::fs::read_dir(&p)
            .map_err(|e| Error::io(&p, e))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in names {
            out.insert(format!("{output}/{n}"), sha256_file(&p.join(&n))?);
        }
    } else {
        out.insert(output.to_string(), sha256_file(&p)?);
        // a GGUF output's model card, written when it was validated
        let card = Path::new(output).with_extension("md");
        if root.join(&card).is_file() {
            out.insert(card.display().to_string(), sha256_file(&root.join(&card))?);
        }
    }
    Ok(out)
}

/// Peak memory of a job: the conversion holds a few tensors; validation holds the reference in
/// f32 and the candidate.
fn job_peak(ck_params: u64, validate: bool, imatrix: bool) -> u64 {
    let convert = 256 << 20;
    if validate || imatrix {
        convert + ck_params * 4 + ck_params * 2
    } else {
        convert
    }
}

/// Progress callbacks: `(job index, done, total, what)`.
pub type Progress<'a> = &'a (dyn Fn(usize, u64, u64, &str) + Sync);

/// Runs the manifest. `jobs_n` conversions at a time within the memory budget.
pub fn run(m: &Manifest, jobs_n: usize, force: bool, progress: Progress, started: &(dyn Fn(usize, &Job) + Sync), finished: &(dyn Fn(usize, &Outcome) + Sync)) -> Result<Vec<Outcome>> {
    if jobs_n == 0 {
        return Err(Error::Usage("--jobs must be at least 1".into()));
    }
    // Every output location is checked before any work: none is an input (the manifest, a source,
    // the text), a link, a device or a directory this tool did not write. Whether an existing one
    // is skipped, refused or replaced is decided per job (resume records, --force).
    let dir_exists = m.output_dir.is_dir();
    if !dir_exists && m.output_dir.parent().is_some_and(|p| p.as_os_str().is_empty() || p.is_dir()) {
        crate::output::check_target(&m.output_dir, false, true)?;
    }
    std::fs::create_dir_all(&m.output_dir).map_err(|e| Error::io(&m.output_dir, e))?;
    for j in jobs(m) {
        let is_dir = matches!(j.target, TargetKind::Mlx(_));
        crate::output::check_target(&m.output_dir.join(&j.output), true, is_dir)?;
        if let Some(w) = j.imatrix {
            crate::output::check_target(&m.output_dir.join(imatrix_file(&j.source, w)), true, false)?;
        }
    }
    for name in [STATE_FILE, "SHA256SUMS", "summary.md", "summary.json"] {
        crate::output::check_managed(&m.output_dir.join(name))?;
    }
    let state_path = m.output_dir.join(STATE_FILE);
    let state: BTreeMap<String, Record> = match std::fs::read_to_string(&state_path) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| Error::file(&state_path, format!("corrupt batch state: {e}")))?,
        Err(_) => BTreeMap::new(),
    };
    let state = Mutex::new(state);
    let list = jobs(m);
    let budget = m.memory.unwrap_or(8_000_000_000);
    let in_use = (Mutex::new(0u64), Condvar::new());
    let hashes: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());
    let imatrices: Mutex<BTreeMap<String, ImatrixInput>> = Mutex::new(BTreeMap::new());
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; list.len()]);
    std::thread::scope(|scope| {
        for _ in 0..jobs_n.max(1) {
            scope.spawn(|| loop {
                let i = {
                    let mut n = next.lock().expect("lock");
                    let i = *n;
                    *n += 1;
                    i
                };
                let Some(job) = list.get(i) else { break };
                started(i, job);
                let params = Checkpoint::open(&job.source_path).map(|c| c.config.parameter_count()).unwrap_or(0);
                let peak = job_peak(params, job.validate, job.imatrix.is_some());
                {
                    let (lock, cv) = &in_use;
                    let mut used = lock.lock().expect("lock");
                    while *used > 0 && *used + peak > budget {
                        used = cv.wait(used).expect("lock");
                    }
                    *used += peak;
                }
                let t0 = Instant::now();
                let out = run_job(m, i, job, force, &state, &hashes, &imatrices, progress);
                {
                    let (lock, cv) = &in_use;
                    *lock.lock().expect("lock") -= peak;
                    cv.notify_all();
                }
                let mut o = match out {
                    Ok(o) => o,
                    Err(e) => Outcome {
                        error: Some(format!("{e:#}")),
                        ..Outcome::new(job, "failed")
                    },
                };
                o.seconds = t0.elapsed().as_secs_f64();
                finished(i, &o);
                results.lock().expect("lock")[i] = Some(o);
                // the state after every job, so an interrupted batch resumes from here
                let s = state.lock().expect("lock");
                let _ = write_atomic(&state_path, serde_json::to_string_pretty(&*s).expect("json").as_bytes());
            });
        }
    });
    let outcomes: Vec<Outcome> = results.into_inner().expect("lock").into_iter().map(|o| o.expect("every job ran")).collect();
    write_summaries(m, &outcomes, &state.into_inner().expect("lock"))?;
    Ok(outcomes)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let p = crate::output::PendingOutput::managed_file(path)?;
    std::fs::write(p.path(), bytes).map_err(|e| Error::io(path, e))?;
    p.commit()?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_job(
    m: &Manifest,
    i: usize,
    job: &Job,
    force: bool,
    state: &Mutex<BTreeMap<String, Record>>,
    hashes: &Mutex<BTreeMap<String, String>>,
    imatrices: &Mutex<BTreeMap<String, ImatrixInput>>,
    progress: Progress,
) -> anyhow::Result<Outcome> {
    if let TargetKind::Invalid(why) = &job.target {
        anyhow::bail!("{}: {why}", job.output);
    }
    let ck = Checkpoint::open(&job.source_path)?;
    let source_hash = {
        let cached = hashes.lock().expect("lock").get(&job.source).cloned();
        match cached {
            Some(h) => h,
            None => {
                // in real units: the source's bytes (hashed in one pass, reported at its ends)
                let bytes: u64 = ck.weights.files().iter().map(|f| f.file_len() as u64).sum();
                progress(i, 0, bytes, "hashing the source");
                let h = crate::convert::source_sha256(&ck)?;
                progress(i, bytes, bytes, "hashed the source");
                hashes.lock().expect("lock").insert(job.source.clone(), h.clone());
                h
            }
        }
    };
    let out_path = m.output_dir.join(&job.output);
    let mut outcome = Outcome::new(job, "converted");
    let want = |files: BTreeMap<String, String>, result: Option<serde_json::Value>| Record {
        source_sha256: source_hash.clone(),
        options: job.options.clone(),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        files,
        result,
    };
    if out_path.exists() {
        let rec = state.lock().expect("lock").get(&job.output).cloned();
        let files = hash_output(&m.output_dir, &job.output)?;
        match rec {
            Some(r) if r == want(files.clone(), r.result.clone()) => {
                outcome.status = "skipped".into();
                fill_from_record(&mut outcome, &r, &m.output_dir);
                return Ok(outcome);
            }
            Some(_) if !force => anyhow::bail!(
                "{} exists but was made from another source, with other options, by another version, or has changed since (pass --force to redo it)",
                out_path.display()
            ),
            None if !force => anyhow::bail!("{} exists and was not made by this batch (pass --force to replace it)", out_path.display()),
            _ => {}
        }
    }
    let imatrix = match job.imatrix {
        Some(w) => {
            let mut im = ensure_imatrix(m, i, job, w, &source_hash, state, imatrices, progress)?;
            im.apply(&job.imatrix_filter)?;
            Some(im)
        }
        None => None,
    };
    let cb = |d: u64, t: u64, w: &str| progress(i, d, t, w);
    let (bytes, bpw) = match &job.target {
        TargetKind::Gguf(ft) => {
            // a card left by an earlier validated run describes the old file
            // (only a card this tool wrote: any other file of that name is never removed)
            let card = crate::gguf::card::card_path(&out_path);
            if card.is_file() {
                if !crate::output::is_our_file(&card) {
                    return Err(anyhow::anyhow!(
                        "{}: not a model card ouro-quant wrote, and it would describe this output: refusing to replace it (move it away)",
                        card.display()
                    ));
                }
                std::fs::remove_file(&card).map_err(|e| Error::io(&card, e))?;
            }
            let opts = crate::convert::GgufOptions { file_type: *ft, overrides: vec![], force: true, imatrix };
            let s = crate::convert::convert_gguf(&ck, &opts, &out_path, &cb)?;
            (s.bytes, s.bits_per_weight)
        }
        TargetKind::Mlx(o) => {
            let mut o = o.clone();
            o.force = true;
            o.imatrix = imatrix;
            let s = crate::mlx::write::convert_mlx(&ck, &o, &out_path, &cb)?;
            (s.bytes, s.bits_per_weight)
        }
        TargetKind::Invalid(_) => unreachable!("handled above"),
    };
    outcome.bytes = bytes;
    outcome.bits_per_weight = Some(bpw);
    let mut result = serde_json::json!({"bytes": bytes, "bits_per_weight": bpw});
    if job.validate {
        let v = m.validate.as_ref().expect("checked at read");
        progress(i, 0, 1, "validating");
        let r = validate_job(m, job, v, &out_path)?;
        outcome.ppl_ratio = Some(r.0);
        outcome.kl_mean = Some(r.1);
        outcome.exit_agreement_pct = Some(r.2);
        outcome.validation_pass = Some(r.3);
        result["validation"] = serde_json::json!({"ppl_ratio": r.0, "kl_mean": r.1, "exit_agreement_pct": r.2, "pass": r.3});
        if !r.3 {
            outcome.status = "failed".into();
            outcome.error = Some("validation failed (see the summary's numbers)".into());
        }
    }
    let files = hash_output(&m.output_dir, &job.output)?;
    state.lock().expect("lock").insert(job.output.clone(), want(files, Some(result)));
    Ok(outcome)
}

/// The importance matrix of a job's source for weighting `w`: computed once per batch run, kept in
/// the output directory and reused by a later run when its record (source hash, options, tool
/// version, file hash) still matches.
#[allow(clippy::too_many_arguments)]
fn ensure_imatrix(
    m: &Manifest,
    i: usize,
    job: &Job,
    w: Weighting,
    source_hash: &str,
    state: &Mutex<BTreeMap<String, Record>>,
    imatrices: &Mutex<BTreeMap<String, ImatrixInput>>,
    progress: Progress,
) -> anyhow::Result<ImatrixInput> {
    use crate::imatrix::{collect, Calibration, Format};
    let c = m.calibration.as_ref().expect("a job with an imatrix has a [calibration] table");
    let name = imatrix_file(&job.source, w);
    // one computation at a time: two jobs of one source wait for the same matrix
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().expect("lock");
    if let Some(im) = imatrices.lock().expect("lock").get(&name) {
        return Ok(im.clone());
    }
    let path = m.output_dir.join(&name);
    let want = |files: BTreeMap<String, String>| Record {
        source_sha256: source_hash.to_string(),
        options: imatrix_options(c, w),
        tool_version: env!("CARGO_PKG_VERSION").into(),
        files,
        result: None,
    };
    let recorded = state.lock().expect("lock").get(&name).cloned();
    let reusable = path.is_file() && recorded.is_some_and(|r| hash_output(&m.output_dir, &name).is_ok_and(|f| r == want(f)));
    if !reusable {
        let text = std::fs::read_to_string(&c.text).map_err(|e| Error::io(&c.text, e))?;
        let loaded = crate::model::source::load(&job.source_path, &candle_core::Device::Cpu)?;
        let tok = loaded
            .tokenizer
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("{}: no tokenizer.json to tokenize the calibration text with", job.source_path.display()))?;
        let ids = tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing {}: {e}", c.text.display()))?.get_ids().to_vec();
        let cal = Calibration { tokens: &ids, ctx: c.ctx, chunks: c.chunks, weighting: w, dataset: c.text.display().to_string() };
        let what = format!("importance matrix ({})", w.name());
        let matrix = collect(&loaded.model, &cal, &mut |done, total| progress(i, done as u64, total as u64, &what))
            .map_err(|e| anyhow::anyhow!("{}: calibration: {e:#}", job.source_path.display()))?;
        matrix.write(&path, Format::Gguf, true)?;
        let files = hash_output(&m.output_dir, &name)?;
        state.lock().expect("lock").insert(name.clone(), want(files));
    }
    let im = ImatrixInput::read(&path)?;
    imatrices.lock().expect("lock").insert(name, im.clone());
    Ok(im)
}

fn fill_from_record(o: &mut Outcome, r: &Record, root: &Path) {
    // the size the converting run measured (the output itself, without the card beside a GGUF
    // file), so that a skipped output reports the same size as when it was converted
    o.bytes = r.result.as_ref().and_then(|res| res["bytes"].as_u64()).unwrap_or_else(|| {
        r.files.keys().filter_map(|f| std::fs::metadata(root.join(f)).ok()).map(|m| m.len()).sum()
    });
    if let Some(res) = &r.result {
        o.bits_per_weight = res["bits_per_weight"].as_f64();
        if let Some(v) = res.get("validation") {
            o.ppl_ratio = v["ppl_ratio"].as_f64();
            o.kl_mean = v["kl_mean"].as_f64();
            o.exit_agreement_pct = v["exit_agreement_pct"].as_f64();
            o.validation_pass = v["pass"].as_bool();
        }
    }
}

/// (ppl ratio, mean KL, exit agreement at q = 0.5, pass) of a converted output. The reference side
/// is stored once per source in the output directory and reused for the source's other targets.
fn validate_job(m: &Manifest, job: &Job, v: &ValidateCfg, out: &Path) -> anyhow::Result<(f64, f64, f64, bool)> {
    use crate::eval::validate::{model_hash, validate, ReferenceSource, ValidateOptions};
    use crate::eval::verdict;
    let text = std::fs::read_to_string(&v.text).map_err(|e| anyhow::anyhow!("{}: {e}", v.text.display()))?;
    let tok = crate::model::source::load_tokenizer(&job.source_path)?;
    let tokens = tok.encode(text.as_str(), false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?.get_ids().to_vec();
    let opts = ValidateOptions { ctx: v.ctx, chunks: v.chunks, thresholds: vec![0.5, 0.9, 1.0] };
    let candidate = crate::model::source::load(out, &candle_core::Device::Cpu)?;
    let hash = model_hash(&job.source_path)?;
    let stored = m.output_dir.join(format!(".reference-{}.safetensors", job.source));
    let name = |p: &Path| p.display().to_string();
    let report = {
        // one reference run per source at a time
        static LOCK: Mutex<()> = Mutex::new(());
        let _g = LOCK.lock().expect("lock");
        let usable = stored.is_file() && crate::eval::validate::check_reference_model(&stored, &hash).is_ok();
        let try_stored = if usable {
            validate(ReferenceSource::Stored(stored.clone()), &name(&job.source_path), &candidate.model, &name(out), &tokens, &name(&v.text), &opts, &|_, _| {}).ok()
        } else {
            None
        };
        match try_stored {
            Some(r) => r,
            None => {
                let reference = crate::model::source::load(&job.source_path, &candle_core::Device::Cpu)?;
                let pending = crate::output::PendingOutput::file(&stored, true)?;
                let src = ReferenceSource::Model { model: &reference.model, hash, save: Some(pending.path().to_path_buf()) };
                let r = validate(src, &name(&job.source_path), &candidate.model, &name(out), &tokens, &name(&v.text), &opts, &|_, _| {})?;
                pending.commit()?;
                r
            }
        }
    };
    let family = verdict::family_of(out)?;
    let profile = verdict::profile(family).expect("shipped profile");
    let checks = verdict::verdict(&report, &profile);
    verdict::write_card(out, &verdict::render_markdown(&report, &checks, &profile))?;
    let agree = report.exits.iter().find(|e| (e.q - 0.5).abs() < 1e-6).map(|e| e.exit_agreement_pct).unwrap_or(f64::NAN);
    Ok((report.default_mode.ppl_ratio, report.default_mode.kl_mean, agree, checks.iter().all(|c| c.pass)))
}

/// `SHA256SUMS`, `summary.md` and `summary.json` in the output directory.
fn write_summaries(m: &Manifest, outcomes: &[Outcome], state: &BTreeMap<String, Record>) -> Result<()> {
    let mut sums = String::new();
    let mut all: BTreeMap<&String, &String> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.status != "failed" || o.validation_pass == Some(false)) {
        if let Some(r) = state.get(&o.output) {
            all.extend(r.files.iter());
        }
    }
    // the importance matrices the outputs were quantized with (publishable beside them)
    for j in jobs(m) {
        if let Some(r) = j.imatrix.and_then(|w| state.get(&imatrix_file(&j.source, w))) {
            all.extend(r.files.iter().filter(|(f, _)| m.output_dir.join(f).is_file()));
        }
    }
    for (f, h) in all {
        sums.push_str(&format!("{h}  {f}\n"));
    }
    write_atomic(&m.output_dir.join("SHA256SUMS"), sums.as_bytes())?;
    let mut md = String::from("| output | source | options | status | size | bits/weight | ppl ratio | KL | exit agreement (q=0.5) | time |\n|---|---|---|---|---|---|---|---|---|---|\n");
    let f = |v: Option<f64>, p: usize| v.map(|x| format!("{x:.p$}")).unwrap_or_else(|| "-".into());
    for o in outcomes {
        md.push_str(&format!(
            "| {} | {} | `{}` | {}{} | {} | {} | {} | {} | {} | {:.1} s |\n",
            o.output,
            o.source,
            o.options,
            o.status,
            o.error.as_ref().map(|e| format!(": {}", e.replace('|', "/"))).unwrap_or_default(),
            crate::inspect::human_bytes(o.bytes),
            f(o.bits_per_weight, 2),
            f(o.ppl_ratio, 4),
            f(o.kl_mean, 5),
            o.exit_agreement_pct.map(|x| format!("{x:.2}%")).unwrap_or_else(|| "-".into()),
            o.seconds
        ));
    }
    write_atomic(&m.output_dir.join("summary.md"), md.as_bytes())?;
    write_atomic(&m.output_dir.join("summary.json"), (serde_json::to_string_pretty(outcomes).expect("json") + "\n").as_bytes())?;
    Ok(())
}
