//! Stage-1 checkpoints: the parameters, the optimizer's moments, the step to run next and the batch
//! generator's state, in one f32 safetensors file, so that a run stopped by `--minutes` (or killed)
//! goes on from the last checkpoint with the same numbers as a run that never stopped.
//!
//! The file's metadata holds a fingerprint of everything that decides the numbers (recipe, options,
//! tokenizer); resuming with anything else is refused, naming what differs.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use ouro_quant::stfile::{DType as StDType, SafetensorsFile, TensorSpec, Writer};

pub struct State {
    /// The next stage-1 step to run.
    pub step: usize,
    /// The batch generator's state before that step.
    pub rng: u64,
    /// `key=value` lines that must match to resume.
    pub fingerprint: BTreeMap<String, String>,
}

/// Writes `tensors` and `state` to `path` through the output module (a temporary file beside it,
/// renamed into place: the previous checkpoint stays whole until the new one is; links,
/// directories and devices are refused).
pub fn save(path: &Path, tensors: &[(String, Tensor)], state: &State) -> anyhow::Result<()> {
    let pending = ouro_quant::output::PendingOutput::managed_file(path)?;
    let mut meta: BTreeMap<String, String> = state.fingerprint.iter().map(|(k, v)| (format!("fp.{k}"), v.clone())).collect();
    meta.insert("step".into(), state.step.to_string());
    meta.insert("rng".into(), state.rng.to_string());
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, t)| TensorSpec { name: n.clone(), dtype: StDType::F32, shape: t.dims().to_vec() })
        .collect();
    let mut w = Writer::new(pending.path(), specs, &meta)?;
    for (_, t) in tensors {
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        w.write(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())?;
    }
    w.finish()?;
    pending.commit().map_err(|e| anyhow::anyhow!("writing checkpoint {}: {e}", path.display()))?;
    Ok(())
}

/// Reads a checkpoint: its tensors by name and its state. Refuses one whose fingerprint differs
/// from `expected`.
pub fn load(path: &Path, expected: &BTreeMap<String, String>, dev: &Device) -> anyhow::Result<(BTreeMap<String, Tensor>, State)> {
    let f = SafetensorsFile::open(path)?;
    let meta = &f.header().metadata;
    let field = |k: &str| meta.get(k).ok_or_else(|| anyhow::anyhow!("{}: not a checkpoint of this trainer (no `{k}`)", path.display()));
    for (k, v) in expected {
        let saved = field(&format!("fp.{k}"))?;
        anyhow::ensure!(saved == v, "{}: made with {k} = {saved}, this run has {k} = {v}; resume with the same options", path.display());
    }
    let state = State {
        step: field("step")?.parse()?,
        rng: field("rng")?.parse()?,
        fingerprint: expected.clone(),
    };
    let mut tensors = BTreeMap::new();
    for info in f.tensors() {
        anyhow::ensure!(info.dtype == StDType::F32, "{}: tensor `{}` is not f32", path.display(), info.name);
        let bytes = f.bytes(&info.name).expect("listed");
        let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        tensors.insert(info.name.clone(), Tensor::from_vec(v, info.shape.as_slice(), dev)?);
    }
    Ok((tensors, state))
}
