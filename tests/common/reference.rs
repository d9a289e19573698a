//! The spec's forward pass (shared/spec/ouro-model.md section 3) written from its equations in
//! f64, independent of the crate's model: the reference `--loops` and `imatrix` are tested
//! against (tests/loops.rs first checks it against the upstream outputs at depth 4).

use std::path::Path;

use ouro_quant::checkpoint::Checkpoint;

/// What the reference computes for every loop: states after `model.norm`, logits, gate logits,
/// exit pdf; `[t][token][..]`.
pub struct Loops {
    pub hidden: Vec<Vec<Vec<f64>>>,
    pub logits: Vec<Vec<Vec<f64>>>,
    pub gates: Vec<Vec<f64>>,
    pub pdf: Vec<Vec<f64>>,
}

/// The spec's forward pass with `loops` loops, in f64, with no cache: every loop applies the same
/// decoder stack to the previous loop's normed state; the exit distribution over `loops` steps
/// gives the last step the remaining mass.
pub fn reference(dir: &Path, tokens: &[u32], loops: usize) -> Loops {
    reference_observed(dir, tokens, loops, &mut |_, _, _, _| {})
}

/// [`reference`], showing `seen(loop, layer, site, rows)` every projection input: `site` is the
/// HF name of the first weight that multiplies it (`self_attn.q_proj.weight` for q, k and v,
/// `self_attn.o_proj.weight`, `mlp.gate_proj.weight` for gate and up, `mlp.down_proj.weight`).
pub fn reference_observed(dir: &Path, tokens: &[u32], loops: usize, seen: &mut dyn FnMut(usize, usize, &str, &[Vec<f64>])) -> Loops {
    let ck = Checkpoint::open(dir).unwrap();
    let c = ck.config.clone();
    let w = |name: &str| -> Vec<f64> { ck.tensor(name).unwrap().to_f32().into_iter().map(f64::from).collect() };
    let (h, heads, kvh, d, eps) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps);
    let n = tokens.len();
    // x [n, in] times W [out, in] transposed
    let mm = |x: &[Vec<f64>], wt: &[f64]| -> Vec<Vec<f64>> {
        let cols = x[0].len();
        let out = wt.len() / cols;
        x.iter().map(|r| (0..out).map(|o| wt[o * cols..(o + 1) * cols].iter().zip(r).map(|(a, b)| a * b).sum()).collect()).collect()
    };
    let rms = |x: &[Vec<f64>], g: &[f64]| -> Vec<Vec<f64>> {
        x.iter()
            .map(|r| {
                let s = (r.iter().map(|v| v * v).sum::<f64>() / r.len() as f64 + eps).sqrt();
                r.iter().zip(g).map(|(v, g)| g * v / s).collect()
            })
            .collect()
    };
    let add = |a: &mut Vec<Vec<f64>>, b: &[Vec<f64>]| a.iter_mut().zip(b).for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(p, q)| *p += q));
    let rope = |x: &mut [f64], pos: usize| {
        let half = d / 2;
        for j in 0..half {
            let a = pos as f64 * c.rope_theta.powf(-2.0 * j as f64 / d as f64);
            let (x1, x2) = (x[j], x[j + half]);
            x[j] = x1 * a.cos() - x2 * a.sin();
            x[j + half] = x2 * a.cos() + x1 * a.sin();
        }
    };
    let emb = w("model.embed_tokens.weight");
    let mut state: Vec<Vec<f64>> = tokens.iter().map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec()).collect();
    let lm = w(if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" });
    let (gw, gb, norm) = (w("model.early_exit_gate.weight"), w("model.early_exit_gate.bias")[0], w("model.norm.weight"));
    let mut out = Loops { hidden: vec![], logits: vec![], gates: vec![], pdf: vec![] };
    for lp in 0..loops {
        for i in 0..c.num_hidden_layers {
            let p = |s: &str| w(&format!("model.layers.{i}.{s}"));
            let x = rms(&state, &p("input_layernorm.weight"));
            seen(lp, i, "self_attn.q_proj.weight", &x);
            let (mut q, mut k, v) = (mm(&x, &p("self_attn.q_proj.weight")), mm(&x, &p("self_attn.k_proj.weight")), mm(&x, &p("self_attn.v_proj.weight")));
            for pos in 0..n {
                (0..heads).for_each(|hh| rope(&mut q[pos][hh * d..(hh + 1) * d], pos));
                (0..kvh).for_each(|hh| rope(&mut k[pos][hh * d..(hh + 1) * d], pos));
            }
            let mut att = vec![vec![0.0; heads * d]; n];
            for (pos, row) in att.iter_mut().enumerate() {
                for hh in 0..heads {
                    let g = hh / (heads / kvh);
                    let qv = &q[pos][hh * d..(hh + 1) * d];
                    let s: Vec<f64> = (0..=pos).map(|j| qv.iter().zip(&k[j][g * d..(g + 1) * d]).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt()).collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for (j, ej) in e.iter().enumerate() {
                        for u in 0..d {
                            row[hh * d + u] += ej / z * v[j][g * d + u];
                        }
                    }
                }
            }
            seen(lp, i, "self_attn.o_proj.weight", &att);
            let o = mm(&att, &p("self_attn.o_proj.weight"));
            add(&mut state, &rms(&o, &p("input_layernorm_2.weight")));
            let x = rms(&state, &p("post_attention_layernorm.weight"));
            seen(lp, i, "mlp.gate_proj.weight", &x);
            let (g, u) = (mm(&x, &p("mlp.gate_proj.weight")), mm(&x, &p("mlp.up_proj.weight")));
            let act: Vec<Vec<f64>> = g.iter().zip(&u).map(|(g, u)| g.iter().zip(u).map(|(a, b)| a / (1.0 + (-a).exp()) * b).collect()).collect();
            seen(lp, i, "mlp.down_proj.weight", &act);
            let m = mm(&act, &p("mlp.down_proj.weight"));
            add(&mut state, &rms(&m, &p("post_attention_layernorm_2.weight")));
        }
        state = rms(&state, &norm);
        out.gates.push(state.iter().map(|r| r.iter().zip(&gw).map(|(a, b)| a * b).sum::<f64>() + gb).collect());
        out.logits.push(mm(&state, &lm));
        out.hidden.push(state.clone());
    }
    let mut survive = vec![1.0; n];
    for t in 0..loops {
        let p: Vec<f64> = (0..n)
            .map(|j| {
                if t + 1 < loops {
                    let lam = 1.0 / (1.0 + (-out.gates[t][j]).exp());
                    let p = lam * survive[j];
                    survive[j] *= 1.0 - lam;
                    p
                } else {
                    survive[j]
                }
            })
            .collect();
        out.pdf.push(p);
    }
    out
}

