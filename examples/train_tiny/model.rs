//! The Ouro architecture for training, on candle's autograd (spec section 3): sandwich norms, the
//! same layers looped T times, `model.norm` after every loop, an exit gate on every loop's state.
//!
//! Only unfused, differentiable candle ops are used: candle-nn's fused `rms_norm` and
//! `softmax_last_dim` silently drop gradients, so RMSNorm, softmax, log-softmax, sigmoid and SiLU
//! are composed from elementary ops here.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::VarMap;
use ouro_quant::corpus::Rng;

#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub vocab: usize,
    pub hidden: usize,
    pub inter: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub loops: usize,
    pub eps: f64,
    pub theta: f64,
}

impl Dims {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

pub struct Layer {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub gate: Tensor,
    pub up: Tensor,
    pub down: Tensor,
    pub n_in: Tensor,
    pub n_in2: Tensor,
    pub n_post: Tensor,
    pub n_post2: Tensor,
}

pub struct Model {
    pub d: Dims,
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    pub gate_w: Tensor,
    pub gate_b: Tensor,
    pub lm_head: Tensor,
}

/// Every parameter with its HF name, in a fixed order.
pub fn named(m: &Model) -> Vec<(String, &Tensor)> {
    let mut v: Vec<(String, &Tensor)> = vec![("model.embed_tokens.weight".into(), &m.embed)];
    for (i, l) in m.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        v.push((format!("{p}.self_attn.q_proj.weight"), &l.q));
        v.push((format!("{p}.self_attn.k_proj.weight"), &l.k));
        v.push((format!("{p}.self_attn.v_proj.weight"), &l.v));
        v.push((format!("{p}.self_attn.o_proj.weight"), &l.o));
        v.push((format!("{p}.mlp.gate_proj.weight"), &l.gate));
        v.push((format!("{p}.mlp.up_proj.weight"), &l.up));
        v.push((format!("{p}.mlp.down_proj.weight"), &l.down));
        v.push((format!("{p}.input_layernorm.weight"), &l.n_in));
        v.push((format!("{p}.input_layernorm_2.weight"), &l.n_in2));
        v.push((format!("{p}.post_attention_layernorm.weight"), &l.n_post));
        v.push((format!("{p}.post_attention_layernorm_2.weight"), &l.n_post2));
    }
    v.push(("model.norm.weight".into(), &m.norm));
    v.push(("model.early_exit_gate.weight".into(), &m.gate_w));
    v.push(("model.early_exit_gate.bias".into(), &m.gate_b));
    v.push(("lm_head.weight".into(), &m.lm_head));
    v
}

/// `n` draws of a normal distribution (Box-Muller on the corpus's seeded generator): candle's CPU
/// random numbers cannot be seeded, and a fixture must come out the same from the same command.
fn normal(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    let unit = |rng: &mut Rng| (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
    (0..n)
        .map(|_| {
            let (u1, u2) = (1.0 - unit(rng), unit(rng));
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
        })
        .collect()
}

impl Model {
    /// Fresh parameters, drawn from `seed`, registered in `vm` under their HF names. The token
    /// embeddings have standard deviation `embed_std`: every branch of a layer ends in an RMSNorm
    /// (weight 1 at first), so with GPT-2's 0.02 the token itself is about 2% of the first loop's
    /// state after one branch; the deep recipe starts it at 1.0, as large as a branch's output.
    pub fn new(d: Dims, vm: &VarMap, seed: u64, embed_std: f64) -> Result<Model> {
        let hd = d.head_dim();
        let mut rng = Rng::new(seed);
        let put = |name: &str, t: Tensor| -> Result<Tensor> {
            let v = Var::from_tensor(&t)?;
            let out = v.as_tensor().clone();
            vm.data().lock().expect("varmap").insert(name.to_string(), v);
            Ok(out)
        };
        let mut w = |name: &str, shape: (usize, usize), std: f64| {
            put(name, Tensor::from_vec(normal(&mut rng, shape.0 * shape.1, std), shape, &Device::Cpu)?)
        };
        let ones = |name: &str| put(name, Tensor::ones(d.hidden, DType::F32, &Device::Cpu)?);
        // GPT-2 style: residual outputs scaled down by the number of residual additions.
        let out_std = 0.02 / ((2 * d.layers * d.loops) as f64).sqrt();
        let embed = w("model.embed_tokens.weight", (d.vocab, d.hidden), embed_std)?;
        let mut layers = vec![];
        for i in 0..d.layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                q: w(&format!("{p}.self_attn.q_proj.weight"), (d.heads * hd, d.hidden), 0.02)?,
                k: w(&format!("{p}.self_attn.k_proj.weight"), (d.kv_heads * hd, d.hidden), 0.02)?,
                v: w(&format!("{p}.self_attn.v_proj.weight"), (d.kv_heads * hd, d.hidden), 0.02)?,
                o: w(&format!("{p}.self_attn.o_proj.weight"), (d.hidden, d.heads * hd), out_std)?,
                gate: w(&format!("{p}.mlp.gate_proj.weight"), (d.inter, d.hidden), 0.02)?,
                up: w(&format!("{p}.mlp.up_proj.weight"), (d.inter, d.hidden), 0.02)?,
                down: w(&format!("{p}.mlp.down_proj.weight"), (d.hidden, d.inter), out_std)?,
                n_in: ones(&format!("{p}.input_layernorm.weight"))?,
                n_in2: ones(&format!("{p}.input_layernorm_2.weight"))?,
                n_post: ones(&format!("{p}.post_attention_layernorm.weight"))?,
                n_post2: ones(&format!("{p}.post_attention_layernorm_2.weight"))?,
            });
        }
        let gate_w = w("model.early_exit_gate.weight", (1, d.hidden), 0.02)?;
        let lm_head = w("lm_head.weight", (d.vocab, d.hidden), 0.02)?;
        Ok(Model {
            d,
            embed,
            layers,
            norm: ones("model.norm.weight")?,
            gate_w,
            gate_b: put("model.early_exit_gate.bias", Tensor::zeros(1, DType::F32, &Device::Cpu)?)?,
            lm_head,
        })
    }
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

fn silu(x: &Tensor) -> Result<Tensor> {
    x.mul(&sigmoid(x)?)
}

/// `x [b, s, in] @ w[out, in]^T`.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.broadcast_matmul(&w.t()?)
}

pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let z = x.broadcast_sub(&m)?;
    z.broadcast_sub(&z.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// Rotary tables `[s, head_dim]` (each half repeated: the rotate-half convention).
pub fn rope_tables(d: &Dims, s: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let hd = d.head_dim();
    let inv: Vec<f32> = (0..hd / 2).map(|j| (d.theta.powf(-(2.0 * j as f64) / hd as f64)) as f32).collect();
    let mut cos = vec![0f32; s * hd];
    let mut sin = vec![0f32; s * hd];
    for p in 0..s {
        for j in 0..hd / 2 {
            let a = p as f32 * inv[j];
            for k in [j, j + hd / 2] {
                cos[p * hd + k] = a.cos();
                sin[p * hd + k] = a.sin();
            }
        }
    }
    Ok((Tensor::from_vec(cos, (s, hd), dev)?, Tensor::from_vec(sin, (s, hd), dev)?))
}

fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

pub struct Aux {
    pub cos: Tensor,
    pub sin: Tensor,
    pub mask: Tensor,
}

pub fn aux(d: &Dims, s: usize, dev: &Device) -> Result<Aux> {
    let (cos, sin) = rope_tables(d, s, dev)?;
    let mask: Vec<f32> = (0..s * s).map(|i| if i % s > i / s { -1e9 } else { 0.0 }).collect();
    Ok(Aux { cos, sin, mask: Tensor::from_vec(mask, (s, s), dev)? })
}

fn attention(l: &Layer, d: &Dims, x: &Tensor, a: &Aux) -> Result<Tensor> {
    let (b, s, _) = x.dims3()?;
    let hd = d.head_dim();
    let q = linear(x, &l.q)?.reshape((b, s, d.heads, hd))?.transpose(1, 2)?.contiguous()?;
    let k = linear(x, &l.k)?.reshape((b, s, d.kv_heads, hd))?.transpose(1, 2)?.contiguous()?;
    let v = linear(x, &l.v)?.reshape((b, s, d.kv_heads, hd))?.transpose(1, 2)?.contiguous()?;
    let q = rope(&q, &a.cos, &a.sin)?;
    let k = rope(&k, &a.cos, &a.sin)?;
    let rep = d.heads / d.kv_heads;
    let (k, v) = if rep > 1 {
        let e = |t: Tensor| -> Result<Tensor> {
            t.unsqueeze(2)?.expand((b, d.kv_heads, rep, s, hd))?.contiguous()?.reshape((b, d.heads, s, hd))
        };
        (e(k)?, e(v)?)
    } else {
        (k, v)
    };
    let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(&a.mask)?;
    let o = softmax(&scores)?.matmul(&v)?;
    let o = o.transpose(1, 2)?.contiguous()?.reshape((b, s, d.heads * hd))?;
    linear(&o, &l.o)
}

impl Model {
    /// Per-loop states `[T] x [b, s, hidden]` and gate logits `[T] x [b, s]`.
    pub fn forward(&self, tokens: &Tensor, a: &Aux) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        self.forward_loops(tokens, a, self.d.loops)
    }

    /// [`Model::forward`] with only the first `loops` loops.
    pub fn forward_loops(&self, tokens: &Tensor, a: &Aux, loops: usize) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
        let (b, s) = tokens.dims2()?;
        let d = &self.d;
        let mut h = self.embed.index_select(&tokens.flatten_all()?, 0)?.reshape((b, s, d.hidden))?;
        let mut states = vec![];
        let mut gates = vec![];
        for _ in 0..loops {
            for l in &self.layers {
                let att = attention(l, d, &rms_norm(&h, &l.n_in, d.eps)?, a)?;
                h = (h + rms_norm(&att, &l.n_in2, d.eps)?)?;
                let x = rms_norm(&h, &l.n_post, d.eps)?;
                let m = linear(&(silu(&linear(&x, &l.gate)?)? * linear(&x, &l.up)?)?, &l.down)?;
                h = (h + rms_norm(&m, &l.n_post2, d.eps)?)?;
            }
            h = rms_norm(&h, &self.norm, d.eps)?;
            states.push(h.clone());
            gates.push(linear(&h, &self.gate_w)?.squeeze(D::Minus1)?.broadcast_add(&self.gate_b)?);
        }
        Ok((states, gates))
    }

    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        linear(h, &self.lm_head)
    }
}

/// Exit distribution `[T] x [b, s]` from gate logits (spec section 3).
pub fn exit_pdf(gates: &[Tensor]) -> Result<Vec<Tensor>> {
    let t = gates.len();
    let mut surv = gates[0].ones_like()?;
    let mut pdf = vec![];
    for g in &gates[..t - 1] {
        let lam = sigmoid(g)?;
        pdf.push(lam.mul(&surv)?);
        surv = surv.mul(&(lam.neg()? + 1.0)?)?;
    }
    pdf.push(surv);
    Ok(pdf)
}

/// Per-token cross-entropy `[b, s]` of `logits [b, s, V]` against `targets [b, s]` (u32).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let lp = log_softmax(logits)?;
    lp.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)?.neg()
}

pub fn to_dtype_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}
