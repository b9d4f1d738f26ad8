//! Text tables and the sweep plot of `moe-run bench`.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::sweep::{SweepKind, SweepReport};
use super::BenchReport;
use crate::analysis::plot::{save_chart, Chart, FONT};
use crate::analysis::render::table;
use crate::error::Result;
use crate::units::human_bytes;

fn tps(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 1.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

fn pct(x: f64) -> String {
    format!("{x:.1}%")
}

fn ratio(m: u64, p: u64) -> String {
    if p == 0 {
        "n/a".into()
    } else {
        format!("{:.3}", m as f64 / p as f64)
    }
}

pub fn bench_text(r: &BenchReport) -> String {
    let m = &r.model;
    let mut s = format!(
        "moe-run bench: {} [{}]\n  ran {} of {} layers: {}; H={}, vocab {}; {:.3}B params ({:.3}B active)\n  device {} ({}, {}) {} | commit {} | {} CPU threads, CPU kernels {} | load {:.2}s\n  batch {} x prompt {} + {} decode steps | {} warm-up, {} timed runs\n  bandwidth {:.1} GB/s ({}) | matmul peak {:.3} TFLOPS ({})\n\n",
        m.name,
        m.weights,
        m.layers_run,
        m.layers_in_config,
        m.layer_kinds,
        m.hidden,
        m.vocab,
        m.total_params as f64 / 1e9,
        m.active_params as f64 / 1e9,
        r.env.device,
        r.env.device_name,
        r.env.driver,
        r.env.dtype,
        r.env.commit,
        r.env.cpu_threads,
        r.env.cpu_kernels,
        r.load_s,
        r.batch,
        r.prompt_len,
        r.gen,
        r.warmup,
        r.runs,
        r.bandwidth_gb_s.value,
        r.bandwidth_gb_s.source,
        r.peak_tflops.value,
        r.peak_tflops.source,
    );
    let row = |name: &str, t: &super::Throughput| {
        vec![
            name.to_string(),
            tps(t.tokens_per_s.median),
            tps(t.tokens_per_s.p10),
            tps(t.tokens_per_s.p90),
            tps(t.ceiling_tokens_per_s),
            t.bound.clone(),
            human_bytes(t.predicted_bytes_per_forward as u64),
            format!("{:.3}", t.predicted_flops_per_forward / 1e9),
            pct(t.pct_of_roofline),
        ]
    };
    s.push_str(&table(
        &[
            "tokens/s",
            "median",
            "p10",
            "p90",
            "ceiling",
            "bound",
            "bytes/fwd",
            "GFLOP/fwd",
            "% of roofline",
        ],
        &match &r.eager {
            Some(e) => vec![
                row("prefill", &r.prefill),
                row("decode (eager)", &e.decode),
                match graphs_ran(r) {
                    true => row("decode (graph)", &r.decode),
                    false => row("decode (graphs off)", &r.decode),
                },
            ],
            None => vec![row("prefill", &r.prefill), row("decode", &r.decode)],
        },
        "lrrrrlrrr",
    ));
    if let (Some(me), Some(pe)) = (r.experts_touched_measured, r.experts_touched_predicted) {
        s.push_str(&format!(
            "  distinct experts per MoE layer per decode step: measured {me:.2}, predicted {pe:.2} (uniform routing)\n"
        ));
    }
    if let Some(n) = r.kernel_launches_per_token {
        s.push_str(&format!(
            "  kernel launches per decoded token: {n:.1} ({:.1} per layer; moe-kernels' own, counted on the executor; candle's ops in the step are not counted)
",
            n / r.model.layers_run.max(1) as f64
        ));
    }
    if let Some(k) = &r.decode_kernels {
        s.push_str(&format!("  decode kernels: {}\n", k.join(", ")));
    }
    if let Some(n) = r.cuda_graph_replays_per_token {
        s.push_str(&format!(
            "  CUDA graph replays per decoded token: {n:.2} (--cuda-graph; each counted as one launch above; on the emulator a stand-in backend re-runs the captured pass)\n"
        ));
    }
    if let Some(e) = &r.eager {
        let launches = match e.kernel_launches_per_token {
            Some(n) => format!(", {n:.1} moe-kernels launches per token eagerly"),
            None => String::new(),
        };
        let what = match graphs_ran(r) {
            true => "graph decode",
            false => "graphs were off (both runs eager):",
        };
        s.push_str(&format!(
            "  --cuda-graph: {what} {:.2}x the eager decode of the same weights and prompts (medians){launches}; the greedy ids of their first timed runs {}\n",
            e.graph_speedup,
            if e.tokens_match { "agree" } else { "DIFFER (a replayed graph computed something else)" }
        ));
    }
    if let Some(c) = r.cuda_graph_nodes {
        s.push_str(&format!(
            "  one decode step captured: {} kernels ({:.1} per layer, candle's and cuBLAS's included), {} copies/sets, {} allocations/frees, {} other nodes\n",
            c.kernels,
            c.kernels as f64 / r.model.layers_run.max(1) as f64,
            c.copies,
            c.allocs,
            c.other
        ));
    }
    if let Some(x) = &r.expert_stream {
        s.push_str(&format!(
            "  expert kernel alone (decode, first MoE layer's top-k experts, {} per call): median {:.1} us = {:.2} GB/s of weights, {:.0}% of the {:.2} GB/s read bandwidth measured now (parallel streaming read, {} threads)\n",
            human_bytes(x.bytes_per_call),
            x.median_s * 1e6,
            x.weight_gb_s,
            x.pct_of_read_bandwidth,
            x.read_bandwidth_gb_s,
            r.env.cpu_threads
        ));
    }
    if let Some(pl) = &r.placement {
        s.push_str(&format!(
            "  hybrid placement: {} of {} routed experts in host memory ({}) on the CPU kernels, {} of routed experts on the device\n",
            pl.experts_on_host,
            pl.experts_total,
            human_bytes(pl.host_expert_bytes),
            human_bytes(pl.device_expert_bytes),
        ));
        match &pl.prediction {
            Some(p) => s.push_str(&format!(
                "  placement predicted (analyze's model; host {:.1} GB/s read measured now): decode {:.1} tok/s (GPU {:.2} ms, host experts {:.2} ms, round trips {:.2} ms per token){}\n",
                p.host.bandwidth_gb_s,
                p.decode_tokens_per_s,
                p.decode_gpu_ms,
                p.decode_cpu_ms,
                p.decode_link_ms,
                p.prefill_tokens_per_s.map_or(String::new(), |t| format!(", prefill {t:.0} tok/s for {} tokens", p.prefill_tokens)),
            )),
            None => s.push_str("  placement: on the CPU both sides run on the CPU (the split path is exercised, no GPU/host prediction applies)\n"),
        }
    }
    if let Some(b) = &r.baseline {
        s.push_str(&format!(
            "  baseline {}: prefill {} tok/s (p10 {}, p90 {}), decode {} tok/s (p10 {}, p90 {})\n  time ratio candle/ours: prefill {:.2}x, decode {:.2}x (> 1: ours is faster)\n",
            b.name,
            tps(b.prefill_tokens_per_s.median),
            tps(b.prefill_tokens_per_s.p10),
            tps(b.prefill_tokens_per_s.p90),
            tps(b.decode_tokens_per_s.median),
            tps(b.decode_tokens_per_s.p10),
            tps(b.decode_tokens_per_s.p90),
            b.prefill_time_ratio_candle_over_ours,
            b.decode_time_ratio_candle_over_ours,
        ));
        s.push_str(&format!(
            "  greedy tokens equal to ours: {}/{}{}\n",
            b.tokens_equal,
            b.tokens_compared,
            if b.tokens_equal == b.tokens_compared {
                ""
            } else {
                " (the engines diverged: the time ratio compares different work)"
            }
        ));
    }
    s.push('\n');
    let mem = &r.memory;
    let mrow = |name: &str, p: &super::MemPair| {
        vec![
            name.to_string(),
            human_bytes(p.measured_bytes),
            human_bytes(p.predicted_bytes),
            ratio(p.measured_bytes, p.predicted_bytes),
        ]
    };
    let mut rows = vec![
        mrow("weights (loaded tensors)", &mem.weights),
        mrow("KV cache (allocated)", &mem.kv_cache),
    ];
    if let Some(p) = &mem.peak_rss {
        rows.push(mrow("peak RSS (vs weights+KV)", p));
    }
    if let Some(g) = &mem.gpu {
        rows.push(mrow("GPU used, growth over load", &g.load));
        if let Some(p) = &g.pool_used_high {
            rows.push(mrow("GPU pool used peak (vs w+KV)", p));
        }
        let plain =
            |name: &str, v: u64| vec![name.to_string(), human_bytes(v), "-".into(), "-".into()];
        if let Some(r) = g.pool_reserved_high_bytes {
            rows.push(plain("GPU pool reserved peak", r));
        }
        if let Some(a) = g.activation_peak_bytes {
            rows.push(plain("activations peak (pool - w - KV)", a));
        }
        rows.push(plain("GPU total", g.total_bytes));
    }
    s.push_str(&table(
        &["memory", "measured", "analyze", "measured/analyze"],
        &rows,
        "lrrr",
    ));
    s
}

pub fn sweep_text(r: &SweepReport) -> String {
    let mut s = format!(
        "moe-run bench --sweep {}: {}\n  device {} {} | commit {} | prompt {} + {} decode steps | {} timed runs\n  bandwidth {:.1} GB/s ({}) | matmul peak {:.3} TFLOPS ({})\n\n",
        r.sweep.name(),
        r.base,
        r.env.device,
        r.env.dtype,
        r.env.commit,
        r.prompt_len,
        r.gen,
        r.runs,
        r.bandwidth_gb_s.value,
        r.bandwidth_gb_s.source,
        r.peak_tflops.value,
        r.peak_tflops.source,
    );
    if r.cuda_graph {
        s.push_str("  --cuda-graph: decode steps replayed as CUDA graphs where they could be\n\n");
    }
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|x| {
            let mut row = vec![
                x.experts.to_string(),
                x.top_k.to_string(),
                x.batch.to_string(),
                tps(x.decode_tokens_per_s.median),
                format!("{:.3}", x.step_s * 1e3),
                format!("{:.3}", x.predicted_step_s * 1e3),
                x.bound.clone(),
                human_bytes(x.predicted_bytes_per_step as u64),
                pct(x.pct_of_roofline),
                x.experts_touched_measured
                    .map_or("n/a".into(), |m| format!("{m:.2}")),
                format!("{:.2}", x.experts_touched_predicted),
                human_bytes(x.weight_bytes_measured),
                human_bytes(x.weight_bytes_predicted),
            ];
            if let Some(g) = x.cuda_graph_replays_per_token {
                row.push(format!("{g:.2}"));
            }
            row
        })
        .collect();
    let mut head = vec![
        "E",
        "k",
        "B",
        "decode tok/s",
        "ms/step",
        "roofline ms",
        "bound",
        "bytes/step",
        "% roofline",
        "experts meas",
        "experts pred",
        "weights meas",
        "weights pred",
    ];
    let mut align = String::from("rrrrrrlrrrrrr");
    if r.cuda_graph {
        head.push("replays/tok");
        align.push('r');
    }
    s.push_str(&table(&head, &rows, &align));
    s
}

const W: u32 = 1400;
const H: u32 = 600;
/// Draws measured vs predicted for a sweep to `path` (.png or .svg).
pub fn plot_sweep(r: &SweepReport, path: &Path) -> Result<()> {
    save_chart(r, path, (W, H))
}

impl Chart for SweepReport {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        draw(self, root).map_err(|e| e.to_string())
    }
}

const MEASURED: RGBColor = RGBColor(214, 39, 40);
const PREDICTED: RGBColor = RGBColor(31, 119, 180);

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

fn draw<DB: DrawingBackend>(
    r: &SweepReport,
    root: &DrawingArea<DB, Shift>,
) -> std::result::Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let title = format!(
        "bench --sweep {} on {} {} ({} + {} tokens): measured vs predicted",
        r.sweep.name(),
        r.env.device,
        r.env.dtype,
        r.prompt_len,
        r.gen
    );
    let root = root
        .titled(&title, (FONT, 24).into_font().style(FontStyle::Bold))
        .map_err(e)?;
    let (left, right) = root.split_horizontally(W / 2);
    let xs: Vec<f64> = r.rows.iter().map(|x| x.value as f64).collect();
    let xlabel = match r.sweep {
        SweepKind::Experts => "experts per layer E",
        SweepKind::Topk => "experts per token k",
        SweepKind::Batch => "batch B (sequences per decode step)",
    };
    let ms_meas: Vec<f64> = r.rows.iter().map(|x| x.step_s * 1e3).collect();
    let ms_pred: Vec<f64> = r.rows.iter().map(|x| x.predicted_step_s * 1e3).collect();
    panel(
        &left,
        "Decode time per step (ms, log scale)",
        xlabel,
        &xs,
        &[
            ("measured (median)", &ms_meas, MEASURED),
            ("roofline ceiling (analyze)", &ms_pred, PREDICTED),
        ],
        true,
    )
    .map_err(e)?;
    let (caption, a, b): (&str, Vec<f64>, Vec<f64>) = match r.sweep {
        SweepKind::Experts => (
            "Weight memory (MiB)",
            r.rows
                .iter()
                .map(|x| x.weight_bytes_measured as f64 / (1 << 20) as f64)
                .collect(),
            r.rows
                .iter()
                .map(|x| x.weight_bytes_predicted as f64 / (1 << 20) as f64)
                .collect(),
        ),
        _ => (
            "Distinct experts per MoE layer per decode step",
            r.rows
                .iter()
                .map(|x| x.experts_touched_measured.unwrap_or(f64::NAN))
                .collect(),
            r.rows.iter().map(|x| x.experts_touched_predicted).collect(),
        ),
    };
    let pred_label = match r.sweep {
        SweepKind::Experts => "predicted (analyze)",
        _ => "predicted E(1-(1-k/E)^B)",
    };
    panel(
        &right,
        caption,
        xlabel,
        &xs,
        &[("measured", &a, MEASURED), (pred_label, &b, PREDICTED)],
        false,
    )
    .map_err(e)?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    caption: &str,
    xlabel: &str,
    xs: &[f64],
    series: &[(&str, &Vec<f64>, RGBColor)],
    log_y: bool,
) -> DrawResult<DB> {
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.1.iter().copied())
            .filter(|v| v.is_finite())
    };
    let ymax = finite().fold(f64::MIN, f64::max).max(1e-9);
    let ymin = finite().fold(f64::MAX, f64::min).max(1e-9);
    let xmin = xs.iter().copied().fold(f64::MAX, f64::min);
    let xmax = xs.iter().copied().fold(f64::MIN, f64::max);
    // Log x when the points span more than a factor 4 (powers of two).
    let xr = (xmin * 0.8).max(0.5)..(xmax * 1.25);
    let log_x = xmax / xmin > 4.0;
    // Integer points: on a short linear axis one tick per integer (default ticks at fractions
    // are all rounded to the same few labels, "1 1 1 2 2").
    let x_ticks = if log_x {
        10
    } else {
        ((xmax - xmin).round() as usize + 1).clamp(2, 10)
    };

    let mut b = ChartBuilder::on(area);
    b.caption(caption, (FONT, 20))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80);
    macro_rules! draw_series {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(xlabel)
                .axis_desc_style((FONT, 18))
                .label_style((FONT, 16))
                .x_labels(x_ticks)
                .x_label_formatter(&|x| format!("{}", x.round() as i64))
                .y_label_formatter(&|y| {
                    if y.abs() >= 10.0 {
                        format!("{y:.0}")
                    } else if y.abs() >= 1.0 {
                        format!("{y:.1}")
                    } else {
                        format!("{y:.2}")
                    }
                })
                .max_light_lines(1)
                .draw()?;
            // Later series are drawn first and wider, so where measured and predicted coincide
            // both stay visible (the measured line on top of a wider predicted one).
            for (i, (name, ys, c)) in series.iter().enumerate().rev() {
                let width = 3 + 4 * i as u32;
                let style = move |c: RGBColor| ShapeStyle::from(&c).stroke_width(width);
                let pts: Vec<(f64, f64)> = xs
                    .iter()
                    .copied()
                    .zip(ys.iter().copied())
                    .filter(|p| p.1.is_finite())
                    .collect();
                let c = *c;
                chart
                    .draw_series(std::iter::once(PathElement::new(pts.clone(), style(c))))?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style(c)));
                chart.draw_series(
                    pts.iter()
                        .map(|&p| Circle::new(p, 5 + 2 * i as u32, c.filled())),
                )?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .label_font((FONT, 16))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }};
    }
    // Log y: headroom of a quarter of the span above the highest point, so the upper-left
    // legend does not hide a first point that is also the highest (decreasing curves).
    let ytop = ymax * 2.0 * (4.0 * ymax / ymin).powf(0.25);
    match (log_x, log_y) {
        // A log x axis is labelled at the swept points themselves (2, 4, 8, 16...).
        (true, true) => draw_series!(b.build_cartesian_2d(
            xr.log_scale().with_key_points(xs.to_vec()),
            (ymin * 0.5..ytop).log_scale()
        )?),
        (true, false) => draw_series!(b.build_cartesian_2d(
            xr.log_scale().with_key_points(xs.to_vec()),
            0f64..ymax * 1.15
        )?),
        (false, true) => {
            draw_series!(b.build_cartesian_2d(xr, (ymin * 0.5..ytop).log_scale())?)
        }
        (false, false) => draw_series!(b.build_cartesian_2d(xr, 0f64..ymax * 1.15)?),
    }
    Ok(())
}

/// Whether any decode step of the report's timed runs replayed a CUDA graph.
fn graphs_ran(r: &BenchReport) -> bool {
    r.cuda_graph_replays_per_token.is_some_and(|n| n > 0.0)
}
