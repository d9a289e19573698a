//! The exit distribution over loops and the upstream rules that pick which loop's logits a token
//! gets (spec section 3). Pure arithmetic in f32, in the upstream order of operations.

/// How the logits of a token are chosen among its loops.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum ExitMode {
    /// `exit_at_step = k`: loop k (0-based) for every token.
    Step(usize),
    /// The first loop whose CDF reaches q (the last loop if none).
    Threshold(f32),
    /// `sum_t p_t * logits_t`.
    Weighted,
    /// The last loop.
    Last,
}

/// `sigmoid` as torch computes it in f32.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The exit pdf of one token from its gate logits (one per loop): `p_t = lambda_t * S_t` with
/// survival `S_{t+1} = S_t (1 - lambda_t)`, and the last loop taking the remaining mass.
pub fn exit_pdf(gate_logits: &[f32]) -> Vec<f32> {
    let t_max = gate_logits.len();
    let mut pdf = Vec::with_capacity(t_max);
    let mut survival = 1.0f32;
    for (t, &g) in gate_logits.iter().enumerate() {
        if t + 1 == t_max {
            pdf.push(survival);
        } else {
            let lambda = sigmoid(g);
            pdf.push(lambda * survival);
            survival *= 1.0 - lambda;
        }
    }
    pdf
}

/// Running sum of the pdf.
pub fn exit_cdf(pdf: &[f32]) -> Vec<f32> {
    let mut acc = 0.0f32;
    pdf.iter()
        .map(|p| {
            acc += p;
            acc
        })
        .collect()
}

/// The loop a token exits at under the CDF rule with threshold `q`, given its pdf over `T` loops.
pub fn threshold_exit(pdf: &[f32], q: f32) -> usize {
    exit_cdf(pdf)
        .iter()
        .position(|&c| c >= q)
        .unwrap_or(pdf.len() - 1)
}

/// The CDF rule applied to gate logits seen so far, for deciding during decode whether to stop:
/// true when the token may stop after loop `gates.len() - 1` (of `t_max`).
pub fn may_stop(gates_so_far: &[f32], t_max: usize, q: f32) -> bool {
    let t = gates_so_far.len();
    if t >= t_max {
        return true;
    }
    // CDF_{t-1} over the first t loops: p_i for i < t does not depend on later gates.
    let mut survival = 1.0f32;
    let mut acc = 0.0f32;
    for &g in gates_so_far {
        let lambda = sigmoid(g);
        acc += lambda * survival;
        survival *= 1.0 - lambda;
    }
    acc >= q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdf_sums_to_one_and_last_takes_the_rest() {
        let pdf = exit_pdf(&[0.0, 0.0, 0.0, 123.0]);
        assert_eq!(pdf, vec![0.5, 0.25, 0.125, 0.125]);
        assert_eq!(threshold_exit(&pdf, 0.7), 1);
        assert_eq!(threshold_exit(&pdf, 1.0), 3);
        assert!(may_stop(&[0.0, 0.0], 4, 0.75));
        assert!(!may_stop(&[0.0, 0.0], 4, 0.76));
    }

    #[test]
    fn may_stop_agrees_with_threshold_exit() {
        let gates = [-1.3f32, 0.4, 2.0, -0.5];
        let pdf = exit_pdf(&gates);
        for q in [0.1f32, 0.3, 0.5, 0.7, 0.9, 1.0] {
            let exit = threshold_exit(&pdf, q);
            let first = (1..=4).find(|&t| may_stop(&gates[..t], 4, q)).unwrap() - 1;
            assert_eq!(first, exit, "q={q}");
        }
    }
}
