//! `analyze --plot FILE.svg|png`: total vs active parameters by component (left) and the
//! batch-1 decode ceiling per precision on the chosen GPU(s) (right).
//! Text uses DejaVu Sans compiled into the binary (no system fonts needed).

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use super::claims::fmt_b;
use super::counts::Component;
use super::Report;
use crate::error::{Error, Result};

const W: u32 = 1400;
const H: u32 = 640;
pub const FONT: &str = "sans-serif";

/// Registers DejaVu Sans (compiled in: no system fonts needed) under `FONT`.
pub fn register_fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Both are valid TrueType files shipped by the `dejavu` crate.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
    });
}

fn component_color(c: Component) -> RGBColor {
    match c {
        Component::Embedding => RGBColor(158, 158, 158),
        Component::Attention => RGBColor(31, 119, 180),
        Component::Norms => RGBColor(188, 189, 34),
        Component::Router => RGBColor(214, 39, 40),
        Component::RoutedExperts => RGBColor(255, 127, 14),
        Component::SharedExperts => RGBColor(148, 103, 189),
        Component::DenseFfn => RGBColor(140, 86, 75),
        Component::LmHead => RGBColor(44, 160, 44),
    }
}

const GPU_COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws the report to `path` (.svg or .png).
pub fn plot(r: &Report, path: &Path) -> Result<()> {
    save_chart(r, path, (W, H))
}

impl Chart for Report {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String> {
        draw(self, root)
    }
}

/// A chart that can draw itself on any plotters backend.
pub trait Chart {
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> std::result::Result<(), String>;
}

/// Renders `chart` to `path` (.svg or .png) at `size` pixels, with the embedded font. The
/// image is drawn in memory and written atomically (see [`crate::fsio`]).
pub fn save_chart<C: Chart>(chart: &C, path: &Path, size: (u32, u32)) -> Result<()> {
    register_fonts();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let err = |e: String| Error::io(path, std::io::Error::other(e));
    let bytes = match ext.as_deref() {
        Some("svg") => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
                chart.draw(&root).map_err(err)?;
                root.present().map_err(|e| err(e.to_string()))?;
            }
            svg.into_bytes()
        }
        Some("png") => {
            let mut buf = vec![0u8; (size.0 * size.1 * 3) as usize];
            {
                let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
                chart.draw(&root).map_err(err)?;
                root.present().map_err(|e| err(e.to_string()))?;
            }
            encode_png(&buf, size).map_err(err)?
        }
        _ => {
            return Err(Error::Input(format!(
                "--plot {}: the file name must end in .svg or .png",
                path.display()
            )))
        }
    };
    crate::fsio::write_bytes(path, &bytes)
}

fn encode_png(rgb: &[u8], (w, h): (u32, u32)) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(|e| e.to_string())?;
    w.write_image_data(rgb).map_err(|e| e.to_string())?;
    w.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

fn draw<DB: DrawingBackend>(
    r: &Report,
    root: &DrawingArea<DB, Shift>,
) -> std::result::Result<(), String> {
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let title = format!(
        "{}: {} total, {} active per token; context {}",
        r.model,
        fmt_b(r.total_params as f64),
        fmt_b(r.active_params as f64),
        r.context
    );
    let root = root
        .titled(&title, (FONT, 24).into_font().style(FontStyle::Bold))
        .map_err(e)?;
    let (left, right) = root.split_horizontally(W * 2 / 5);
    params_panel(r, &left).map_err(e)?;
    ceiling_panel(r, &right).map_err(e)?;
    Ok(())
}

type DrawResult<DB> =
    std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// Two stacked bars (total, active per token), one segment per component, in billions.
fn params_panel<DB: DrawingBackend>(r: &Report, area: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
    let ymax = r.total_params as f64 / 1e9 * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption("Parameters by component (total / active)", (FONT, 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..1.5f64, 0f64..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(2)
        .x_label_formatter(&|x| match x.round() as i64 {
            0 if (x - 0.0).abs() < 1e-6 => "total".into(),
            1 if (x - 1.0).abs() < 1e-6 => "active / token".into(),
            _ => String::new(),
        })
        .y_desc("billion parameters")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 15))
        .draw()?;
    let mut base = [0.0f64; 2];
    for c in &r.components {
        if c.total == 0 && c.active == 0 {
            continue;
        }
        let color = component_color(c.component);
        let vals = [c.total as f64 / 1e9, c.active as f64 / 1e9];
        let rects: Vec<Rectangle<(f64, f64)>> = (0..2)
            .map(|i| {
                let (y0, y1) = (base[i], base[i] + vals[i]);
                base[i] = y1;
                let x = i as f64;
                Rectangle::new([(x - 0.3, y0), (x + 0.3, y1)], color.filled())
            })
            .collect();
        let label = format!(
            "{}: {} / {}",
            c.component.label(),
            fmt_b(c.total as f64),
            fmt_b(c.active as f64)
        );
        chart
            .draw_series(rects)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    let top = [r.total_params, r.active_params];
    chart.draw_series((0..2).map(|i| {
        Text::new(
            fmt_b(top[i] as f64),
            (i as f64, top[i] as f64 / 1e9),
            (FONT, 16)
                .into_font()
                .into_text_style(area)
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        )
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    Ok(())
}

/// Batch-1 decode ceiling per precision, one bar per GPU; pale bars do not fit in memory.
fn ceiling_panel<DB: DrawingBackend>(r: &Report, area: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
    let n = r.gpus.len().max(1);
    let ymax = r
        .gpus
        .iter()
        .flat_map(|g| g.ceilings.iter().map(|c| c.decode_tokens_per_s))
        .fold(1.0f64, f64::max)
        * 1.18;
    let caption = match r.gpus.as_slice() {
        [g] => format!(
            "Decode ceiling, batch 1, on {} ({} GB/s, {} GiB)",
            g.gpu.name, g.gpu.bandwidth_gb_s, g.gpu.memory_gib
        ),
        _ => "Decode ceiling, batch 1 (tokens/s = bandwidth / bytes per token)".into(),
    };
    let names: Vec<String> = r.precisions.iter().map(|p| p.precision.name()).collect();
    let np = names.len();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..(np as f64 - 0.5), 0f64..ymax)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(np)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                format!("{} weights", names[i as usize])
            } else {
                String::new()
            }
        })
        .y_desc("tokens / s (upper bound)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE)
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 15))
        .draw()?;
    let width = 0.8 / n as f64;
    for (j, g) in r.gpus.iter().enumerate() {
        let color = GPU_COLORS[j % GPU_COLORS.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = g
            .ceilings
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let x0 = i as f64 - 0.4 + j as f64 * width;
                let style = if c.fits {
                    color.filled()
                } else {
                    color.mix(0.3).filled()
                };
                Rectangle::new(
                    [(x0 + 0.01, 0.0), (x0 + width - 0.01, c.decode_tokens_per_s)],
                    style,
                )
            })
            .collect();
        let label = format!("{} ({} GB/s)", g.gpu.name, g.gpu.bandwidth_gb_s);
        chart
            .draw_series(bars)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        // Values above the bars when they are wide enough to read.
        if n <= 2 {
            chart.draw_series(g.ceilings.iter().enumerate().map(|(i, c)| {
                let x = i as f64 - 0.4 + (j as f64 + 0.5) * width;
                let text = if c.fits {
                    format!("{:.1}", c.decode_tokens_per_s)
                } else {
                    format!("{:.1} (no fit)", c.decode_tokens_per_s)
                };
                Text::new(
                    text,
                    (x, c.decode_tokens_per_s),
                    (FONT, 15)
                        .into_font()
                        .into_text_style(area)
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            }))?;
        }
    }
    // Explain pale bars with a legend entry of their own.
    if r.gpus.iter().any(|g| g.ceilings.iter().any(|c| !c.fits)) {
        let pale = BLACK.mix(0.2);
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
            .label(format!(
                "pale: weights + KV ({} tokens) exceed memory",
                r.context
            ))
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], pale.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    Ok(())
}
