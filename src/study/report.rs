//! Writing a study: `report.md` (every table beside the paper's numbers), one CSV per
//! table, `report.json`, `timings.json` and the PNG heatmaps.

use super::plot::heatmap_png;
use super::{ConfigRow, Heat, Stat, StudyReport};
use crate::checkpoint;
use crate::{Error, Result};
use std::fmt::Write as _;
use std::path::Path;

/// The paper's Table 5 (GPT-3 175B, WikiSQL accuracy %), in Table 5's order.
const PAPER_T5: [f64; 7] = [70.4, 70.0, 73.0, 73.2, 71.4, 73.7, 73.7];
/// The paper's Table 6 (WikiSQL %): rows Wq, Wq+Wv, all four; columns r = 1, 2, 4, 8, 64.
const PAPER_T6: [[f64; 5]; 3] = [
    [68.8, 69.6, 70.5, 70.4, 70.0],
    [73.4, 73.3, 73.7, 73.8, 73.5],
    [74.1, 73.7, 74.0, 74.0, 73.9],
];

fn pm(s: &Stat, prec: usize) -> String {
    format!("{:.p$} ± {:.p$}", s.mean, s.std, p = prec)
}

fn metric(r: &StudyReport, s: &Stat) -> String {
    if r.setup.metric == "exact match" {
        format!("{:.1} ± {:.1} %", 100.0 * s.mean, 100.0 * s.std)
    } else {
        pm(s, 2)
    }
}

fn paper_t6(row: &ConfigRow) -> String {
    let t = ["Wq", "Wq+Wv", "Wq,Wk,Wv,Wo"]
        .iter()
        .position(|w| *w == row.weights);
    let c = [1, 2, 4, 8, 64].iter().position(|&r| r == row.r);
    match (t, c) {
        (Some(t), Some(c)) => format!("{:.1}", PAPER_T6[t][c]),
        _ => "–".into(),
    }
}

/// Every table as markdown (what the terminal prints after the runs).
pub fn tables_markdown(r: &StudyReport) -> String {
    let mut m = String::new();
    let s = &r.setup;
    let metric_name = &s.metric;
    let w = &mut m;
    let _ = writeln!(
        w,
        "## 1. Which weights to adapt (Table 5): a budget of one matrix at r = {}\n",
        r.table5.first().map_or(0, |x| x.r)
    );
    let _ = writeln!(
        w,
        "| weights | r | trainable | held-out loss | {metric_name} | paper (GPT-3, WikiSQL %) |\n|---|---|---|---|---|---|"
    );
    for (k, row) in r.table5.iter().enumerate() {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {:.1} |",
            row.weights,
            row.r,
            row.trainable,
            pm(&row.loss, 4),
            metric(r, &row.metric),
            PAPER_T5.get(k).copied().unwrap_or(f64::NAN)
        );
    }
    let f = &r.full_ft;
    let _ = writeln!(
        w,
        "| full fine-tuning | – | {} | {} | {} | – |",
        f.trainable,
        pm(&f.loss, 4),
        metric(r, &f.metric)
    );
    let _ = writeln!(
        w,
        "\nBase model (before adaptation): held-out loss {:.4}, {metric_name} {}.\n",
        s.base_loss,
        if metric_name == "exact match" {
            format!("{:.1} %", 100.0 * s.base_metric)
        } else {
            format!("{:.2}", s.base_metric)
        }
    );

    let _ = writeln!(w, "## 2. Which rank (Table 6)\n");
    let _ = writeln!(
        w,
        "| weights | r | trainable | held-out loss | {metric_name} | paper (WikiSQL %) |\n|---|---|---|---|---|---|"
    );
    for row in &r.table6 {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {} |",
            row.weights,
            row.r,
            row.trainable,
            pm(&row.loss, 4),
            metric(r, &row.metric),
            paper_t6(row)
        );
    }

    let _ = writeln!(w, "\n## 3. Subspace similarity (§7.2, Eq. 4)\n");
    let _ = writeln!(
        w,
        "φ(A1, A2, i, j) = ‖U_A1^i⊤ U_A2^j‖²_F / min(i, j), U_A the right singular vectors of the learned A ([r, d]), layer {} of the Wq+Wv runs. Heatmaps: {}.\n",
        s.layer,
        r.fig3
            .iter()
            .chain(&r.fig4)
            .chain(std::iter::once(&r.random))
            .chain(&r.fig8)
            .map(|h| format!("`{}.png`", h.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        w,
        "Paper's claim (Fig. 3): the top singular direction of A_r=8 and A_r=64 is shared (φ > 0.5), the others barely.\n"
    );
    let _ = writeln!(
        w,
        "| matrix | φ(A_small, A_large, 1, 1) | i-th directions, i ≥ 2: mean \\|⟨u_i, u'_i⟩\\|² | random (1/d) | claim |\n|---|---|---|---|---|"
    );
    for c in &r.claims {
        let _ = writeln!(
            w,
            "| Δ{} | {} | {} | {:.4} | {} |",
            c.matrix,
            pm(&c.top, 3),
            pm(&c.rest, 3),
            c.random,
            if c.holds { "holds" } else { "does not hold" }
        );
    }
    let _ = writeln!(
        w,
        "\nRandom-Gaussian control (two random A's of the large rank): φ beside its expectation max(i, j)/d.\n"
    );
    let _ = writeln!(w, "| i | j | φ | max(i, j)/d |\n|---|---|---|---|");
    for c in &r.random_cells {
        let _ = writeln!(
            w,
            "| {} | {} | {:.4} | {:.4} |",
            c.i, c.j, c.phi, c.expected
        );
    }
    for h in r.fig3.iter().chain(&r.fig4).chain(&r.fig8) {
        let v = &h.values;
        let _ = writeln!(
            w,
            "\n`{}`: {} — φ(1,1) = {:.3}, φ at the last cell = {:.3}",
            h.name,
            h.title,
            v[0][0],
            v[v.len() - 1][v[0].len() - 1]
        );
    }

    let _ = writeln!(w, "\n## 4. ΔW vs W (§7.3, Table 7), layer {}\n", s.layer);
    let _ = writeln!(
        w,
        "‖UᵀWVᵀ‖_F with U, V the top-r left/right singular vectors of ΔW = (α/r)·B·A, of W, or of a random matrix; mean ± std over seeds.\n"
    );
    let _ = writeln!(
        w,
        "| matrix | r | U,V of ΔW | U,V of W | U,V random | ‖W‖_F | ‖ΔW‖_F | amplification ‖ΔW‖/‖UᵀWVᵀ‖ | √(Σ_{{i≤r}}σᵢ²(W)) | ‖W‖_F·r/√(dk) |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for c in &r.table7 {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {} | {} | {:.3} | {} | {} | {:.3} | {:.3} |",
            c.matrix,
            c.r,
            pm(&c.proj_delta, 3),
            pm(&c.proj_w, 3),
            pm(&c.proj_random, 3),
            c.w_norm,
            pm(&c.delta_norm, 3),
            pm(&c.factor, 2),
            c.identity_w,
            c.identity_random
        );
    }
    let _ = writeln!(
        w,
        "| paper Wq (GPT-3) | 4 | 0.32 | 21.67 | 0.02 | 61.95 | 6.91 | 21.5 | | |"
    );
    let _ = writeln!(
        w,
        "| paper Wq (GPT-3) | 64 | 1.90 | 37.71 | 0.33 | 61.95 | 3.57 | 1.9 | | |"
    );

    let _ = writeln!(
        w,
        "\n## 5. Intruder dimensions (Shuttleworth et al. 2024), layer {}\n",
        s.layer
    );
    let _ = writeln!(
        w,
        "Of the top k = {} left singular vectors of the fine-tuned W (W0 + ΔW, or the fully fine-tuned weight), the number whose max |cos| with every left singular vector of W0 is below ε = {} (their Algorithm 1, on U). Paper: LoRA has intruder dimensions, full fine-tuning (nearly) none; fewer at higher rank.\n",
        s.top_k, s.epsilon
    );
    let _ = writeln!(w, "| method | Wq | Wv |\n|---|---|---|");
    let methods: Vec<&str> = r
        .intruders
        .iter()
        .filter(|x| x.matrix == "Wq")
        .map(|x| x.method.as_str())
        .collect();
    for mth in methods {
        let get = |mx: &str| {
            r.intruders
                .iter()
                .find(|x| x.method == mth && x.matrix == mx)
                .map_or("–".into(), |x| pm(&x.count, 2))
        };
        let _ = writeln!(w, "| {mth} | {} | {} |", get("Wq"), get("Wv"));
    }

    let _ = writeln!(w, "\n## 6. Headline claims, measured on lorafuse\n");
    let _ = writeln!(
        w,
        "Trainable fraction, LoRA r = 4 on Wq, Wv (paper: GPT-3 175B trains ~10,000× fewer parameters):\n"
    );
    let _ = writeln!(
        w,
        "| model | parameters | LoRA parameters | fraction | reduction | source |\n|---|---|---|---|---|---|"
    );
    for f in &r.fractions {
        let _ = writeln!(
            w,
            "| {} | {} | {} | {:.4} % | {:.0}× | {} |",
            f.model,
            f.total,
            f.lora,
            100.0 * f.fraction,
            1.0 / f.fraction,
            f.source
        );
    }
    if !r.memory.is_empty() {
        let _ = writeln!(
            w,
            "\nPeak bytes of one real training step (the simulator: every device allocation — model, AdamW state, activations — by `Device::memory_stats`; the CPU: the process's heap, counted by its global allocator, from the model's copy to the end of the step), LoRA r = 4 on Wq, Wv vs full fine-tuning (paper: GPT-3 training VRAM 1.2 TB → 350 GB):\n"
        );
        let _ = writeln!(
            w,
            "| device | batch | LoRA peak bytes | full FT peak bytes | LoRA / full |\n|---|---|---|---|---|"
        );
        for m in &r.memory {
            let _ = writeln!(
                w,
                "| {} | {} | {} | {} | {:.2} |",
                m.device,
                m.batch,
                m.lora_peak,
                m.full_peak,
                m.lora_peak as f64 / m.full_peak as f64
            );
        }
    }
    if let Some(l) = &r.latency {
        let _ = writeln!(
            w,
            "\nInference latency (CPU, forward of {}, median of {}; timings are in `timings.json`, not `report.json`). Paper: merging adds no latency.\n",
            l.shape, l.reps
        );
        let _ = writeln!(
            w,
            "| base | merged | unmerged |\n|---|---|---|\n| {:.2} ms | {:.2} ms | {:.2} ms |",
            l.base_ms, l.merged_ms, l.unmerged_ms
        );
    }
    m
}

fn setup_markdown(r: &StudyReport) -> String {
    let s = &r.setup;
    format!(
        "# Why LoRA works: `lorafuse study`\n\n\
         The analyses of the LoRA paper's §7 (Hu et al. 2021, arXiv 2106.09685) and the intruder \
         dimensions of Shuttleworth et al. 2024 (arXiv 2410.21228), run on lorafuse.\n\n\
         - workload: {}; model: {}\n\
         - {} runs: every configuration with seeds {:?} (a seed sets A's initialisation and the batch order); \
         {} steps of batch {}, LoRA lr {}, full fine-tuning lr {}, α = {} for every rank (scale α/r)\n\
         - analyses at layer {} (d = {}); every number is recomputable from `base/` and `adapters/` \
         (PEFT format) by the formulas below; `report.json` holds them all but the timings\n\
         - the paper's numbers are GPT-3 175B on WikiSQL: a reference for the shape of the result, \
         not a target for a tiny model\n\n",
        s.workload,
        s.model,
        s.runs,
        s.seeds,
        s.steps,
        s.batch,
        s.lr_lora,
        s.lr_full,
        s.alpha,
        s.layer,
        s.d
    )
}

fn csv_stat_header(name: &str) -> String {
    format!("{name}_mean,{name}_std,{name}_per_seed")
}

fn csv_stat(s: &Stat) -> String {
    let vals: Vec<String> = s.values.iter().map(|v| format!("{v}")).collect();
    format!("{},{},{}", s.mean, s.std, vals.join(" "))
}

fn config_csv(rows: &[ConfigRow], full: Option<&ConfigRow>) -> String {
    let mut out = format!(
        "weights,r,trainable,{},{},adapters\n",
        csv_stat_header("loss"),
        csv_stat_header("metric")
    );
    for row in rows.iter().chain(full) {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{}",
            row.weights,
            row.r,
            row.trainable,
            csv_stat(&row.loss),
            csv_stat(&row.metric),
            row.adapters.join(" ")
        );
    }
    out
}

fn heat_csv(h: &Heat) -> String {
    let jm = h.values.first().map_or(0, |r| r.len());
    let mut out = String::from("i\\j");
    for j in 1..=jm {
        let _ = write!(out, ",{j}");
    }
    out.push('\n');
    for (i, row) in h.values.iter().enumerate() {
        let _ = write!(out, "{}", i + 1);
        for v in row {
            let _ = write!(out, ",{v}");
        }
        out.push('\n');
    }
    out
}

/// The CSV files: `(name, text)`.
pub fn csv_files(r: &StudyReport) -> Vec<(String, String)> {
    let mut v = vec![
        (
            "table5_weights.csv".to_string(),
            config_csv(&r.table5, Some(&r.full_ft)),
        ),
        ("table6_rank.csv".to_string(), config_csv(&r.table6, None)),
    ];
    let mut c = format!(
        "matrix,{},{},random_expectation,holds\n",
        csv_stat_header("phi_top"),
        csv_stat_header("rest")
    );
    for x in &r.claims {
        let _ = writeln!(
            c,
            "{},{},{},{},{}",
            x.matrix,
            csv_stat(&x.top),
            csv_stat(&x.rest),
            x.random,
            x.holds
        );
    }
    v.push(("subspace_claims.csv".into(), c));
    let mut c = String::from("i,j,phi,expected\n");
    for x in &r.random_cells {
        let _ = writeln!(c, "{},{},{},{}", x.i, x.j, x.phi, x.expected);
    }
    v.push(("random_control.csv".into(), c));
    let mut c = format!(
        "matrix,r,{},{},{},w_norm,{},{},identity_w,identity_random\n",
        csv_stat_header("proj_delta"),
        csv_stat_header("proj_w"),
        csv_stat_header("proj_random"),
        csv_stat_header("delta_norm"),
        csv_stat_header("factor")
    );
    for x in &r.table7 {
        let _ = writeln!(
            c,
            "{},{},{},{},{},{},{},{},{},{}",
            x.matrix,
            x.r,
            csv_stat(&x.proj_delta),
            csv_stat(&x.proj_w),
            csv_stat(&x.proj_random),
            x.w_norm,
            csv_stat(&x.delta_norm),
            csv_stat(&x.factor),
            x.identity_w,
            x.identity_random
        );
    }
    v.push(("table7_amplification.csv".into(), c));
    let mut c = format!("method,matrix,{}\n", csv_stat_header("intruders"));
    for x in &r.intruders {
        let _ = writeln!(c, "{},{},{}", x.method, x.matrix, csv_stat(&x.count));
    }
    v.push(("intruders.csv".into(), c));
    let mut c = String::from("model,total,lora,fraction,source\n");
    for x in &r.fractions {
        let _ = writeln!(
            c,
            "{},{},{},{},{}",
            x.model.replace(',', ";"),
            x.total,
            x.lora,
            x.fraction,
            x.source
        );
    }
    v.push(("headline_fraction.csv".into(), c));
    if !r.memory.is_empty() {
        let mut c = String::from("device,batch,lora_peak_bytes,full_peak_bytes\n");
        for x in &r.memory {
            let _ = writeln!(
                c,
                "{},{},{},{}",
                x.device, x.batch, x.lora_peak, x.full_peak
            );
        }
        v.push(("headline_memory.csv".into(), c));
    }
    if let Some(l) = &r.latency {
        v.push((
            "headline_latency.csv".into(),
            format!(
                "shape,base_ms,merged_ms,unmerged_ms,reps\n{},{},{},{},{}\n",
                l.shape, l.base_ms, l.merged_ms, l.unmerged_ms, l.reps
            ),
        ));
    }
    for h in r
        .fig3
        .iter()
        .chain(&r.fig4)
        .chain(std::iter::once(&r.random))
        .chain(&r.fig8)
    {
        v.push((format!("{}.csv", h.name), heat_csv(h)));
    }
    v
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, bytes).map_err(|e| checkpoint::io_err(&p, e))
}

/// The report as markdown: the setup, then every table.
pub fn report_markdown(r: &StudyReport) -> String {
    let mut md = setup_markdown(r);
    md.push_str(&tables_markdown(r));
    let _ = writeln!(md, "\nWall time of the study: {:.1} s.", r.wall_s);
    md
}

/// Writes `report.md`, the CSVs, `report.json`, `timings.json` and the heatmaps into
/// `dir` (an existing directory; the CLI writes into a temporary one and renames it).
pub fn write_report(r: &StudyReport, dir: &Path) -> Result<()> {
    write(dir, "report.md", report_markdown(r).as_bytes())?;
    for (name, text) in csv_files(r) {
        write(dir, &name, text.as_bytes())?;
    }
    let json = serde_json::to_vec_pretty(r).map_err(|e| Error::invalid(e.to_string()))?;
    write(dir, "report.json", &json)?;
    let timings = serde_json::json!({ "wall_s": r.wall_s, "latency": r.latency });
    write(
        dir,
        "timings.json",
        serde_json::to_string_pretty(&timings)
            .map_err(|e| Error::invalid(e.to_string()))?
            .as_bytes(),
    )?;
    for h in r
        .fig3
        .iter()
        .chain(&r.fig4)
        .chain(std::iter::once(&r.random))
        .chain(&r.fig8)
    {
        write(dir, &format!("{}.png", h.name), &heatmap_png(h)?)?;
    }
    Ok(())
}
