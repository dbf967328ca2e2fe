//! The study's heatmaps: a φ grid drawn by `plotters` into an RGB buffer (cells, labelled
//! axes, a title and a colour bar over [0, 1]), encoded as PNG by the `png` crate. Text is
//! rasterised by `ab_glyph` from the DejaVu Sans subset committed under `assets/fonts/`
//! (its licence beside it), so no system font library is needed.

use super::Heat;
use crate::{Error, Result};
use plotters::prelude::*;
use std::sync::Once;

/// DejaVu Sans, subset to ASCII and the plots' symbols (assets/fonts/LICENSE-DejaVu.txt).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-subset.ttf");

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut ok = true;
    ONCE.call_once(|| {
        ok = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok();
    });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("the heatmaps' font does not parse"))
    }
}

/// Viridis at `t ∈ [0, 1]` (linear between nine of matplotlib's stops).
pub(crate) fn viridis(t: f64) -> RGBColor {
    const STOPS: [(u8, u8, u8); 9] = [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (STOPS.len() - 1) as f64;
    let k = (x.floor() as usize).min(STOPS.len() - 2);
    let f = x - k as f64;
    let lerp = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    let (a, b) = (STOPS[k], STOPS[k + 1]);
    RGBColor(lerp(a.0, b.0), lerp(a.1, b.1), lerp(a.2, b.2))
}

fn draw_err(e: impl std::fmt::Display) -> Error {
    Error::invalid(format!("drawing a heatmap: {e}"))
}

/// The heatmap of `h` as PNG bytes.
pub fn heatmap_png(h: &Heat) -> Result<Vec<u8>> {
    register_font()?;
    let im = h.values.len();
    let jm = h.values.first().map_or(0, |r| r.len());
    if im == 0 || jm == 0 {
        return Err(Error::invalid(format!("heatmap {}: empty grid", h.name)));
    }
    let (w, ht) = (960u32, if im * 2 >= jm { 820u32 } else { 440u32 });
    let mut buf = vec![255u8; (w * ht * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, ht)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (main, bar) = root.split_horizontally(w - 110);
        let mut chart = ChartBuilder::on(&main)
            .caption(&h.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0.5f64..jm as f64 + 0.5, 0.5f64..im as f64 + 0.5)
            .map_err(draw_err)?;
        let ticks = |n: usize| n.clamp(2, 9);
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc(h.col_label.as_str())
            .y_desc(h.row_label.as_str())
            .x_labels(ticks(jm))
            .y_labels(ticks(im))
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .y_label_formatter(&|y| format!("{}", y.round() as i64))
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .draw()
            .map_err(draw_err)?;
        chart
            .draw_series(h.values.iter().enumerate().flat_map(|(i, row)| {
                row.iter().enumerate().map(move |(j, &v)| {
                    let (x, y) = (j as f64 + 1.0, i as f64 + 1.0);
                    Rectangle::new(
                        [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                        viridis(v).filled(),
                    )
                })
            }))
            .map_err(draw_err)?;
        // Values printed in the cells of small grids.
        if im * jm <= 100 {
            chart
                .draw_series(h.values.iter().enumerate().flat_map(|(i, row)| {
                    row.iter().enumerate().map(move |(j, &v)| {
                        let c = if v > 0.6 { BLACK } else { WHITE };
                        Text::new(
                            format!("{v:.2}"),
                            (j as f64 + 0.75, i as f64 + 1.1),
                            ("sans-serif", 13).into_font().color(&c),
                        )
                    })
                }))
                .map_err(draw_err)?;
        }
        let mut cb = ChartBuilder::on(&bar)
            .margin_top(48)
            .margin_bottom(60)
            .margin_right(12)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1.0, 0f64..1.0)
            .map_err(draw_err)?;
        cb.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(6)
            .y_desc("φ")
            .y_label_formatter(&|y| format!("{y:.1}"))
            .label_style(("sans-serif", 15))
            .axis_desc_style(("sans-serif", 18))
            .draw()
            .map_err(draw_err)?;
        cb.draw_series((0..100).map(|k| {
            let (a, b) = (k as f64 / 100.0, (k + 1) as f64 / 100.0);
            Rectangle::new([(0.0, a), (1.0, b)], viridis((a + b) / 2.0).filled())
        }))
        .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, ht);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(draw_err)?;
        wr.write_image_data(&buf).map_err(draw_err)?;
    }
    Ok(out)
}
