//! AdamW whose state can be saved and restored, so that a training run can stop and go on later
//! with the same numbers as one that never stopped.
//!
//! The update is candle-nn's `AdamW` step written out with the same tensor operations in the same
//! order (so the tiny fixture's committed run is reproduced bit for bit); candle's keeps its moments
//! private, which is why this one exists.

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, Result, Tensor, Var};

pub struct AdamW {
    /// (name, parameter, first moment, second moment), in name order.
    vars: Vec<(String, Var, Var, Var)>,
    pub step_t: usize,
    pub lr: f64,
    pub weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl AdamW {
    /// Zero moments for every parameter in `vars` (name -> parameter); candle's defaults for
    /// beta1, beta2 and eps.
    pub fn new(vars: &BTreeMap<String, Var>, lr: f64, weight_decay: f64) -> Result<AdamW> {
        let vars = vars
            .iter()
            .map(|(n, v)| {
                let m = Var::zeros(v.shape(), v.dtype(), v.device())?;
                let s = Var::zeros(v.shape(), v.dtype(), v.device())?;
                Ok((n.clone(), v.clone(), m, s))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { vars, step_t: 0, lr, weight_decay, beta1: 0.9, beta2: 0.999, eps: 1e-8 })
    }

    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let (lr, beta1, beta2) = (self.lr, self.beta1, self.beta2);
        let lr_lambda = lr * self.weight_decay;
        let scale_m = 1f64 / (1f64 - beta1.powi(self.step_t as i32));
        let scale_v = 1f64 / (1f64 - beta2.powi(self.step_t as i32));
        for (_, theta, m, v) in &self.vars {
            if let Some(g) = grads.get(theta) {
                let next_m = ((m.as_tensor() * beta1)? + (g * (1.0 - beta1))?)?;
                let next_v = ((v.as_tensor() * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let m_hat = (&next_m * scale_m)?;
                let v_hat = (&next_v * scale_v)?;
                let next_theta = (theta.as_tensor() * (1f64 - lr_lambda))?;
                let adjusted = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
                let next_theta = (next_theta - (adjusted * lr)?)?;
                m.set(&next_m)?;
                v.set(&next_v)?;
                theta.set(&next_theta)?;
            }
        }
        Ok(())
    }

    /// The moments by name (`adam.m.NAME`, `adam.v.NAME`), for a checkpoint.
    pub fn moments(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        for (n, _, m, v) in &self.vars {
            out.push((format!("adam.m.{n}"), m.as_tensor().clone()));
            out.push((format!("adam.v.{n}"), v.as_tensor().clone()));
        }
        out
    }

    /// Restores the moments saved by [`AdamW::moments`]; every one must be there, shaped as its
    /// parameter.
    pub fn restore(&mut self, saved: &BTreeMap<String, Tensor>, step_t: usize) -> anyhow::Result<()> {
        for (n, p, m, v) in &self.vars {
            for (key, var) in [(format!("adam.m.{n}"), m), (format!("adam.v.{n}"), v)] {
                let t = saved.get(&key).ok_or_else(|| anyhow::anyhow!("checkpoint has no {key}"))?;
                anyhow::ensure!(t.dims() == p.dims(), "checkpoint's {key} is {:?}, the parameter {:?}", t.dims(), p.dims());
                var.set(t)?;
            }
        }
        self.step_t = step_t;
        Ok(())
    }
}
