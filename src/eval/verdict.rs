//! Pass/fail profiles for `validate`, and the report's renderings: terminal table, Markdown and an
//! SVG plot.

use serde::Serialize;

use super::plot::{Anchor, Rgb, Scene};
use super::validate::ValidateReport;

/// Limits a candidate must meet.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub name: String,
    /// Default-mode perplexity ratio candidate / reference.
    pub max_ppl_ratio: f64,
    /// Exit-loop agreement at q = 0.5, percent.
    pub min_exit_agreement_pct: f64,
    /// Default-mode same-top-token share, percent.
    pub min_same_top_pct: f64,
}

/// The shipped profiles (see README, "Verdict profiles", for where the numbers come from).
pub fn profiles() -> Vec<Profile> {
    let p = |name: &str, r: f64, a: f64, t: f64| Profile {
        name: name.into(),
        max_ppl_ratio: r,
        min_exit_agreement_pct: a,
        min_same_top_pct: t,
    };
    vec![
        p("float", 1.001, 99.5, 99.5),
        p("8bit", 1.005, 98.0, 97.5),
        p("6bit", 1.02, 95.0, 95.0),
        p("4bit", 1.05, 90.0, 90.0),
        p("3bit", 1.15, 80.0, 80.0),
    ]
}

pub fn profile(name: &str) -> Option<Profile> {
    profiles().into_iter().find(|p| p.name == name)
}

/// The profile for a quantization family: a GGUF file type name (`Q8_0`, `Q4_K_M`, ...) or MLX bits.
/// The profile family of a model stored as `q` (`8bit`, `4bit`, ...).
pub fn family(q: &crate::model::source::Quantization) -> &'static str {
    use crate::model::source::Quantization;
    match q {
        Quantization::Float => "float",
        Quantization::Gguf(t) => profile_for_gguf(t),
        Quantization::Mlx(bits) => profile_for_mlx_bits(*bits),
    }
}

/// The profile family of a model at `path` (see [`family`]).
pub fn family_of(path: &std::path::Path) -> anyhow::Result<&'static str> {
    Ok(family(&crate::model::source::quantization(path)?))
}

pub fn profile_for_gguf(file_type: &str) -> &'static str {
    match file_type {
        "F32" | "F16" | "BF16" => "float",
        "Q8_0" => "8bit",
        "Q6_K" | "Q5_K_M" | "Q5_K_S" | "Q5_0" | "Q5_1" => "6bit",
        "Q4_K_M" | "Q4_K_S" | "Q4_0" | "Q4_1" | "IQ4_NL" => "4bit",
        _ => "3bit",
    }
}

pub fn profile_for_mlx_bits(bits: Option<u32>) -> &'static str {
    match bits {
        None => "float",
        Some(8) => "8bit",
        Some(5) | Some(6) => "6bit",
        Some(4) => "4bit",
        _ => "3bit",
    }
}

/// One check of the verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub value: f64,
    pub limit: f64,
    pub pass: bool,
}

/// The verdict of `report` under `profile` (the exit check uses q = 0.5, which `validate` always
/// evaluates).
pub fn verdict(report: &ValidateReport, profile: &Profile) -> Vec<Check> {
    let mut v = vec![
        Check {
            name: "ppl_ratio (default mode)".into(),
            value: report.default_mode.ppl_ratio,
            limit: profile.max_ppl_ratio,
            pass: report.default_mode.ppl_ratio <= profile.max_ppl_ratio,
        },
        Check {
            name: "same_top_token_pct (default mode)".into(),
            value: report.default_mode.same_top_token_pct,
            limit: profile.min_same_top_pct,
            pass: report.default_mode.same_top_token_pct >= profile.min_same_top_pct,
        },
    ];
    if let Some(e) = report.exits.iter().find(|e| (e.q - 0.5).abs() < 1e-6) {
        v.push(Check {
            name: "exit_agreement_pct (q = 0.5)".into(),
            value: e.exit_agreement_pct,
            limit: profile.min_exit_agreement_pct,
            pass: e.exit_agreement_pct >= profile.min_exit_agreement_pct,
        });
    }
    v
}

/// The terminal table.
pub fn render_table(r: &ValidateReport, checks: &[Check], profile: &Profile) -> String {
    let mut s = format!(
        "reference {}\ncandidate {}\ntext {} ({} chunks of {} tokens, {} scored)\n\n",
        r.reference, r.candidate, r.text, r.chunks, r.ctx, r.scored_tokens
    );
    s += "readout     ppl ref    ppl cand   ratio            KL mean   KL p99    KL max    same top  dp rms\n";
    for m in std::iter::once(&r.default_mode).chain(&r.per_loop) {
        let name = if m.loop_index == 0 { format!("default q={}", r.default_threshold) } else { format!("loop {}", m.loop_index) };
        s += &format!(
            "{:<11} {:<10.4} {:<10.4} {:.4} ± {:.4}  {:<9.5} {:<9.5} {:<9.5} {:<8.2}% {:.5}\n",
            name, m.ppl_reference, m.ppl_candidate, m.ppl_ratio, m.ppl_ratio_se, m.kl_mean, m.kl_p99, m.kl_max, m.same_top_token_pct, m.top_token_prob_change_rms
        );
    }
    s += "\nexit q  agree    mean loop ref -> cand   TV      ppl@exit ref -> cand   histogram ref | cand\n";
    for e in &r.exits {
        s += &format!(
            "{:<7} {:<7.2}% {:.3} -> {:.3} ({:+.3})  {:<7.4} {:.4} -> {:.4}       {:?} | {:?}\n",
            e.q,
            e.exit_agreement_pct,
            e.mean_exit_loop_reference,
            e.mean_exit_loop_candidate,
            e.mean_exit_loop_change,
            e.exit_tv_distance,
            e.ppl_at_exit_reference,
            e.ppl_at_exit_candidate,
            e.histogram_reference,
            e.histogram_candidate
        );
    }
    s += &format!("\nverdict ({} profile): ", profile.name);
    let failed: Vec<&Check> = checks.iter().filter(|c| !c.pass).collect();
    if failed.is_empty() {
        s += "PASS\n";
    } else {
        s += "FAIL\n";
    }
    for c in checks {
        s += &format!("  {} {}: {:.4} (limit {})\n", if c.pass { "ok  " } else { "FAIL" }, c.name, c.value, c.limit);
    }
    s
}

/// Markdown for model cards.
pub fn render_markdown(r: &ValidateReport, checks: &[Check], profile: &Profile) -> String {
    let pass = checks.iter().all(|c| c.pass);
    let mut s = format!(
        "**Validation** by ouro-quant {}: {} against the {} profile, on `{}` ({} chunks of {} tokens, {} scored tokens).\n\n",
        env!("CARGO_PKG_VERSION"),
        if pass { "pass" } else { "FAIL" },
        profile.name,
        r.text,
        r.chunks,
        r.ctx,
        r.scored_tokens
    );
    s += "| readout | ppl reference | ppl candidate | ratio | mean KL | same top token |\n|---|---|---|---|---|---|\n";
    for m in std::iter::once(&r.default_mode).chain(&r.per_loop) {
        let name = if m.loop_index == 0 { "default".to_string() } else { format!("loop {}", m.loop_index) };
        s += &format!(
            "| {name} | {:.4} | {:.4} | {:.4} ± {:.4} | {:.5} | {:.2}% |\n",
            m.ppl_reference, m.ppl_candidate, m.ppl_ratio, m.ppl_ratio_se, m.kl_mean, m.same_top_token_pct
        );
    }
    s += "\n| exit q | exit agreement | mean exit loop (ref -> cand) | ppl at exit (ref -> cand) |\n|---|---|---|---|\n";
    for e in &r.exits {
        s += &format!(
            "| {} | {:.2}% | {:.3} -> {:.3} | {:.4} -> {:.4} |\n",
            e.q, e.exit_agreement_pct, e.mean_exit_loop_reference, e.mean_exit_loop_candidate, e.ppl_at_exit_reference, e.ppl_at_exit_candidate
        );
    }
    s
}

/// An SVG picture: per q, exit-loop histograms reference vs candidate; and per-loop perplexity bars.
pub fn render_svg(r: &ValidateReport) -> String {
    plot_scene(r).to_svg()
}

/// The same picture as [`render_svg`], as a PNG at twice its size.
pub fn render_png(r: &ValidateReport) -> Vec<u8> {
    plot_scene(r).to_png(2)
}

const REF_COLOR: Rgb = [0x44, 0x77, 0xaa];
const CAND_COLOR: Rgb = [0xee, 0x66, 0x77];

/// Exit-loop histograms (reference vs candidate) per q, and perplexity per loop and in the
/// default mode, as bar panels side by side.
pub fn plot_scene(r: &ValidateReport) -> Scene {
    let t_max = r.per_loop.len();
    let panels = r.exits.len() + 1;
    let (pw, ph) = (260.0f64, 220.0f64);
    let width = pw * (panels as f64 + 0.5) + 20.0;
    let mut s = Scene::new(width, ph + 60.0);
    s.text(10.0, 16.0, 13.0, Anchor::Start, format!("{} vs {}", r.reference, r.candidate));
    s.rect(width - 190.0, 6.0, 10.0, 10.0, REF_COLOR, None);
    s.text(width - 176.0, 15.0, 11.0, Anchor::Start, "reference");
    s.rect(width - 96.0, 6.0, 10.0, 10.0, CAND_COLOR, None);
    s.text(width - 82.0, 15.0, 11.0, Anchor::Start, "candidate");
    let bars = |s: &mut Scene, x0: f64, pw: f64, title: &str, labels: Vec<String>, a: Vec<f64>, b: Vec<f64>, fmt: &dyn Fn(f64) -> String| {
        let top = 40.0;
        let h = ph - 40.0;
        let max = a.iter().chain(&b).cloned().fold(0.0f64, f64::max).max(1e-12);
        s.text(x0 + 10.0, top - 6.0, 12.0, Anchor::Start, title);
        s.line(x0 + 10.0, top + h, x0 + pw - 10.0, top + h);
        let n = a.len();
        let slot = (pw - 20.0) / n as f64;
        for i in 0..n {
            for (k, (v, color)) in [(a[i], REF_COLOR), (b[i], CAND_COLOR)].iter().enumerate() {
                let bh = v / max * (h - 14.0);
                let x = x0 + 10.0 + slot * i as f64 + 4.0 + k as f64 * (slot - 8.0) / 2.0;
                s.rect(x, top + h - bh, (slot - 8.0) / 2.0 - 1.0, bh, *color, Some(fmt(*v)));
                s.text(x + (slot - 8.0) / 4.0, top + h - bh - 2.0, 8.0, Anchor::Middle, fmt(*v));
            }
            s.text(x0 + 10.0 + slot * (i as f64 + 0.5), top + h + 14.0, 11.0, Anchor::Middle, labels[i].clone());
        }
    };
    for (i, e) in r.exits.iter().enumerate() {
        let n = r.scored_tokens as f64;
        bars(
            &mut s,
            10.0 + pw * i as f64,
            pw,
            &format!("exit loop, q = {}: agree {:.1}%", e.q, e.exit_agreement_pct),
            (1..=t_max).map(|t| format!("loop {t}")).collect(),
            e.histogram_reference.iter().map(|&c| 100.0 * c as f64 / n).collect(),
            e.histogram_candidate.iter().map(|&c| 100.0 * c as f64 / n).collect(),
            &|v| format!("{v:.0}%"),
        );
    }
    let mut labels: Vec<String> = (1..=t_max).map(|t| format!("loop {t}")).collect();
    labels.push("default".into());
    let mut a: Vec<f64> = r.per_loop.iter().map(|m| m.ppl_reference).collect();
    let mut b: Vec<f64> = r.per_loop.iter().map(|m| m.ppl_candidate).collect();
    a.push(r.default_mode.ppl_reference);
    b.push(r.default_mode.ppl_candidate);
    bars(&mut s, 10.0 + pw * r.exits.len() as f64, pw * 1.5, "perplexity per loop", labels, a, b, &|v| format!("{v:.3}"));
    s
}


/// Puts a validation summary (`render_markdown`) in the model card of a conversion: the
/// Validation section of an MLX directory's README.md (replacing what follows its heading), or a
/// new card beside a GGUF file ([`crate::gguf::card`]). Written atomically.
pub fn write_card(out: &std::path::Path, markdown: &str) -> crate::Result<std::path::PathBuf> {
    use crate::error::IoContext;
    let (path, text) = if out.is_dir() {
        let path = out.join("README.md");
        let card = std::fs::read_to_string(&path).at(&path)?;
        let head = card.split("## Validation").next().unwrap_or(&card).to_string();
        (path, format!("{head}## Validation\n\n{markdown}"))
    } else {
        (crate::gguf::card::card_path(out), crate::gguf::card::model_card(out, markdown)?)
    };
    // A card this tool wrote (its front matter says so) is replaced; any other file is refused.
    let p = crate::output::PendingOutput::file(&path, true)?;
    std::fs::write(p.path(), text.as_bytes()).at(&path)?;
    p.commit()?;
    Ok(path)
}
