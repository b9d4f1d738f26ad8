//! Aligned text tables for `moe-run analyze` (JSON is serde's rendering of the same structs).

use super::claims::{fmt_b, ClaimRow, FLAG_PCT};
use super::counts::Component;
use super::{GpuCeilings, Report};
use crate::units::human_bytes;

/// `46,702,792,704`.
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A table with a header row. `align` has one letter per column: `l` left, `r` right.
pub fn table(headers: &[&str], rows: &[Vec<String>], align: &str) -> String {
    let right: Vec<bool> = align.chars().map(|c| c == 'r').collect();
    let cols = headers.len();
    let mut w: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::from("  ");
        for (i, c) in cells.iter().enumerate() {
            let pad = w[i] - c.chars().count();
            if i > 0 {
                s.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn tok_s(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// `+7.3%`, or for formulas off by more than 10x the factor, `x24.9`, `x38,195,947`.
fn error_text(pct: f64) -> String {
    let ratio = 1.0 + pct / 100.0;
    if ratio >= 10.0 {
        if ratio >= 100.0 {
            format!("x{}", thousands(ratio.round() as u64))
        } else {
            format!("x{ratio:.1}")
        }
    } else {
        format!("{pct:+.1}%")
    }
}

fn gflop(x: f64) -> String {
    format!("{:.1} GFLOP", x / 1e9)
}

/// The full report. `detailed_gpu`: one GPU was chosen, so show all its ceilings; otherwise a
/// compact decode-ceiling grid over the built-in GPUs.
pub fn report_text(r: &Report, detailed_gpu: bool) -> String {
    let a = &r.architecture;
    let mut s = String::new();
    let attn = if a.attention == "MLA" {
        format!("MLA, {} heads", a.num_heads)
    } else {
        format!(
            "GQA {} q / {} kv heads x {}",
            a.num_heads, a.num_kv_heads, a.head_dim
        )
    };
    s.push_str(&format!(
        "{}: {}, {} layers, hidden {}, {attn}, vocab {}, {} embeddings\n",
        r.model,
        a.model_type,
        a.layers,
        a.hidden_size,
        a.vocab_size,
        if a.tied_embeddings { "tied" } else { "untied" }
    ));
    for f in &a.ffn {
        s.push_str(&format!("  FFN: {f}\n"));
    }

    // Parameters.
    s.push_str("\nParameters (exact; total = transformers' count)\n");
    let mut rows: Vec<Vec<String>> = r
        .components
        .iter()
        .map(|c| {
            let dash = |n: u64| {
                if n == 0 {
                    "-".to_string()
                } else {
                    thousands(n)
                }
            };
            let mut name = c.component.label().to_string();
            if c.component == Component::LmHead && a.tied_embeddings {
                name.push_str(" (tied: the embedding)");
            }
            vec![name, dash(c.total), dash(c.active)]
        })
        .collect();
    rows.push(vec![
        "total".into(),
        thousands(r.total_params),
        thousands(r.active_params),
    ]);
    rows.push(vec![
        "  in billions".into(),
        fmt_b(r.total_params as f64),
        format!(
            "{} ({:.1}%)",
            fmt_b(r.active_params as f64),
            r.active_params as f64 / r.total_params as f64 * 100.0
        ),
    ]);
    rows.push(vec![
        "active excl. input embedding".into(),
        String::new(),
        thousands(r.active_params_excluding_embedding),
    ]);
    rows.push(vec![
        "multiplied per token (matmul)".into(),
        String::new(),
        thousands(r.matmul_params_per_token),
    ]);
    s.push_str(&table(
        &["component", "total", "active / token"],
        &rows,
        "lrr",
    ));

    // Bytes.
    s.push_str(&format!(
        "\nMemory and traffic (context {}; KV {}: {} B/token bf16)\n",
        r.context,
        r.kv_formula,
        thousands(r.kv_bytes_per_token_bf16)
    ));
    let rows: Vec<Vec<String>> = r
        .precisions
        .iter()
        .map(|b| {
            vec![
                b.precision.name().to_string(),
                human_bytes(b.weight_bytes),
                thousands(b.weight_bytes),
                human_bytes(b.decode_weight_bytes),
                human_bytes(b.kv_bytes_per_sequence),
                human_bytes(b.decode_bytes_per_token),
            ]
        })
        .collect();
    s.push_str(&table(
        &[
            "weights at",
            "weights",
            "bytes",
            "read/token",
            "KV/sequence",
            "decode bytes/token",
        ],
        &rows,
        "lrrrrr",
    ));
    s.push_str(
        "  (int8: one 16-bit scale per output row; int4: group 128 along K, 16-bit scale + 16-bit zero;\n   both quantize the linear weights of attention and FFNs, while embeddings, norms, routers and\n   lm_head stay 16-bit; KV and activations bf16 (fp32 under fp32); read/token = active weights +\n   1 embedding row; decode bytes/token = read/token + KV read at the context)\n",
    );
    if r.architecture.experts_mxfp4 {
        s.push_str(
            "  (this checkpoint publishes its routed experts in MXFP4: they are 4.25 bits per weight in every\n   row, loaded and run packed; the row's precision applies to the other tensors)\n",
        );
    }
    s.push_str(&format!(
        "\nFLOPs per token: decode at {} = {} (2 x {} matmul params + attention {}); prefill of {} tokens: {} per token on average\n",
        r.context,
        gflop(r.decode_flops_per_token as f64),
        fmt_b(r.matmul_params_per_token as f64),
        r.attention_flops_formula,
        r.context,
        gflop(r.prefill_flops_per_token),
    ));

    // Ceilings.
    if detailed_gpu {
        for g in &r.gpus {
            s.push_str(&gpu_detail(g, r));
        }
    } else if !r.gpus.is_empty() {
        s.push_str(&format!(
            "\nBatch-1 decode ceiling, tok/s at context {} = bandwidth / decode bytes per token (* = weights + KV do not fit; --gpu NAME for details)\n",
            r.context
        ));
        let rows: Vec<Vec<String>> = r
            .gpus
            .iter()
            .map(|g| {
                let mut row = vec![format!(
                    "{} ({:.0} GB/s, {:.0} GiB)",
                    g.gpu.name, g.gpu.bandwidth_gb_s, g.gpu.memory_gib
                )];
                row.extend(g.ceilings.iter().map(|c| {
                    format!(
                        "{}{}",
                        tok_s(c.decode_tokens_per_s),
                        if c.fits { " " } else { "*" }
                    )
                }));
                row
            })
            .collect();
        let names: Vec<String> = r.precisions.iter().map(|p| p.precision.name()).collect();
        let mut headers = vec!["GPU"];
        headers.extend(names.iter().map(String::as_str));
        s.push_str(&table(&headers, &rows, "lrrrr"));
    }

    // Naive formulas.
    s.push_str("\nSeed-article formulas vs exact (error = (formula - exact) / exact)\n");
    let rows: Vec<Vec<String>> = r
        .naive
        .iter()
        .map(|n| {
            let v = |x: f64| match n.unit {
                "B" => human_bytes(x as u64),
                "params" => fmt_b(x),
                _ => format!("{:.1} GFLOP", x / 1e9),
            };
            vec![
                n.quantity.clone(),
                n.formula.to_string(),
                v(n.naive),
                v(n.exact),
                error_text(n.error_pct),
                n.note.to_string(),
            ]
        })
        .collect();
    s.push_str(&table(
        &[
            "quantity",
            "formula",
            "formula gives",
            "exact",
            "error",
            "why",
        ],
        &rows,
        "llrrrl",
    ));
    s
}

fn gpu_detail(g: &GpuCeilings, r: &Report) -> String {
    let gpu = &g.gpu;
    let peak = |x: Option<f64>, unit: &str| x.map_or("n/a".to_string(), |v| format!("{v} {unit}"));
    let mut s = format!(
        "\nCeilings on {}: {} GB/s, {} GiB; dense bf16 {} (fp32 accumulate), tf32 {}, int8 {}\n",
        gpu.name,
        gpu.bandwidth_gb_s,
        gpu.memory_gib,
        peak(gpu.bf16_tflops, "TFLOPS"),
        peak(gpu.tf32_tflops, "TFLOPS"),
        peak(gpu.int8_tops, "TOPS"),
    );
    let batch = r.batch;
    let rows: Vec<Vec<String>> = g
        .ceilings
        .iter()
        .map(|c| {
            let mut row = vec![
                c.precision.name().to_string(),
                human_bytes(c.memory_needed_bytes),
                if c.fits { "yes" } else { "NO" }.to_string(),
                tok_s(c.decode_tokens_per_s),
                c.prefill_tokens_per_s.map_or("n/a".into(), tok_s),
            ];
            if batch > 1 {
                row.extend([
                    format!("{:.2}", c.batch.experts_touched_per_moe_layer),
                    human_bytes(c.batch.bytes_per_step as u64),
                    tok_s(c.batch.tokens_per_s),
                ]);
            }
            row
        })
        .collect();
    let mem_h = format!("weights + {batch} x KV");
    let mut headers = vec![
        "precision",
        mem_h.as_str(),
        "fits",
        "decode tok/s (b=1)",
        "prefill tok/s",
    ];
    let (e_h, b_h, t_h) = (
        format!("b={batch}: experts/layer"),
        "bytes/step".to_string(),
        format!("b={batch} tok/s"),
    );
    if batch > 1 {
        headers.extend([e_h.as_str(), b_h.as_str(), t_h.as_str()]);
    }
    s.push_str(&table(&headers, &rows, "lrlrrrrr"));
    s.push_str(&format!(
        "  (decode = bandwidth / decode bytes per token; prefill = peak / FLOPs per prompt token at {} tokens,\n   fp32 at the tf32 peak, int8/int4 weight-only at the bf16 peak; fits = nominal memory, with no\n   allowance for the CUDA context and activations",
        r.context
    ));
    if let Some(w8) = g.ceilings.iter().find_map(|c| c.prefill_tokens_per_s_w8a8) {
        s.push_str(&format!("; a W8A8 int8 kernel: {} tok/s", tok_s(w8)));
    }
    s.push_str(")\n");
    if batch > 1 {
        s.push_str(&format!(
            "  (batch {batch}: uniform routing touches E x (1 - (1 - k/E)^B) experts per layer; every other weight is read once per step)\n"
        ));
    }
    s
}

/// The claims table, then each row's notes.
pub fn claims_text(rows: &[ClaimRow]) -> String {
    let pct = |x: Option<f64>| {
        x.map_or("-".to_string(), |d| {
            format!("{d:+.1}%{}", if d.abs() > FLAG_PCT { " !" } else { "" })
        })
    };
    let opt_b = |x: Option<f64>| x.map_or("-".to_string(), fmt_b);
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.model.clone(),
                fmt_b(r.claimed_total_params),
                opt_b(r.claimed_active_params),
                opt_b(r.computed_total_params.map(|x| x as f64)),
                opt_b(r.computed_active_params.map(|x| x as f64)),
                pct(r.total_discrepancy_pct),
                pct(r.active_discrepancy_pct),
                if r.flagged && r.total_discrepancy_pct.is_none() {
                    format!("{} !", r.basis)
                } else {
                    r.basis.clone()
                },
            ]
        })
        .collect();
    let mut s = format!(
        "Published claims vs computed (active includes embedding and lm_head; ! = off by more than {FLAG_PCT}%)\n"
    );
    s.push_str(&table(
        &[
            "claim",
            "total",
            "active",
            "computed total",
            "computed active",
            "total diff",
            "active diff",
            "basis",
        ],
        &table_rows,
        "lrrrrrrl",
    ));
    s.push_str("\nSources and notes\n");
    for r in rows {
        s.push_str(&format!("  {}: {}\n", r.model, r.source));
        for n in &r.notes {
            s.push_str(&format!("      - {n}\n"));
        }
    }
    s
}

/// `analyze`'s placement section: the plan (bytes each side, which experts stay on the host),
/// the prediction, and the host figures it assumed.
pub fn placement_text(p: &super::PlacementReport) -> String {
    use super::placement::Policy;
    let plan = &p.plan;
    let pr = &p.prediction;
    let mut s = format!(
        "Placement on {} at {} (budget {}: {}), {} x {} tokens of context:\n",
        p.gpu,
        plan.precision.name(),
        human_bytes(plan.budget_bytes),
        p.budget_source,
        plan.batch,
        thousands(plan.context),
    );
    s.push_str(&format!(
        "  GPU   {}: weights other than routed experts {}, KV cache {}, workspace {}, routed experts {} ({} of {})\n",
        human_bytes(plan.gpu_bytes()),
        human_bytes(plan.fixed_weight_bytes),
        human_bytes(plan.kv_bytes),
        human_bytes(plan.workspace_bytes),
        human_bytes(plan.gpu_expert_bytes),
        plan.experts_total() - plan.experts_on_cpu(),
        plan.experts_total(),
    ));
    let policy = match plan.policy {
        Policy::Profile => "hottest experts first from the routing profile".to_string(),
        Policy::NCpuMoe(n) => format!("--n-cpu-moe {n}: the first {n} MoE layers' routed experts"),
        Policy::LayersFromLast => "whole MoE layers from the last, as many as fit".to_string(),
    };
    s.push_str(&format!(
        "  host  {}: routed experts {} of {} ({policy})\n",
        human_bytes(plan.host_expert_bytes),
        plan.experts_on_cpu(),
        plan.experts_total(),
    ));
    let per_layer: Vec<String> = plan
        .layers
        .iter()
        .filter(|l| l.cpu_experts() > 0)
        .map(|l| format!("{}:{}", l.layer, l.cpu_experts()))
        .collect();
    if !per_layer.is_empty() {
        s.push_str(&format!(
            "  routed experts on the host per layer (layer:count): {}\n",
            per_layer.join(" ")
        ));
    }
    if let Some((file, q)) = &p.profile {
        s.push_str(&format!(
            "  profile {file}: the hottest 25% of experts serve {:.0}% of routed tokens (25% if uniform)\n",
            100.0 * q
        ));
    }
    s.push_str(&format!(
        "  predicted (not measured) decode {:.1} tok/s at batch 1 ({:.1} if everything fit the GPU); the host serves {:.0}% of routed tokens; per token GPU {:.2} ms, host experts {:.2} ms, round trips {:.2} ms, overlapped per layer\n",
        pr.decode_tokens_per_s,
        pr.decode_tokens_per_s_all_on_gpu,
        100.0 * pr.cpu_token_share,
        pr.decode_gpu_ms,
        pr.decode_cpu_ms,
        pr.decode_link_ms,
    ));
    match pr.prefill_tokens_per_s {
        Some(t) => s.push_str(&format!(
            "  predicted (not measured) prefill {t:.0} tok/s for a {}-token prompt\n",
            pr.prefill_tokens
        )),
        None => s.push_str("  prefill: no prediction without the GPU's matmul peak (--tflops)\n"),
    }
    s.push_str(&format!(
        "  host assumed: {} GB/s memory (--host-bandwidth), {} TFLOPS (--host-tflops), link {} GB/s (--pcie), {} us per round trip\n",
        pr.host.bandwidth_gb_s, pr.host.tflops, pr.host.pcie_gb_s, pr.host.round_trip_us
    ));
    s
}
