//! The sweep report's plots as PNG: the SVG of [`strata_sweep::chart`]
//! rasterized by resvg, text in the embedded font.

/// The font the PNGs' text is drawn with.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");

/// `svg` rasterized at twice its size, text in the embedded font.
pub fn png(svg: &str) -> anyhow::Result<Vec<u8>> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options::default();
    opt.fontdb_mut().load_font_data(FONT.to_vec());
    opt.font_family = "DejaVu Sans".into();
    let tree = usvg::Tree::from_str(svg, &opt)?;
    let size = tree
        .size()
        .to_int_size()
        .scale_by(2.0)
        .ok_or_else(|| anyhow::anyhow!("empty plot"))?;
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| anyhow::anyhow!("plot too large"))?;
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(2.0, 2.0),
        &mut pixmap.as_mut(),
    );
    Ok(pixmap.encode_png()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_sweep::chart::{Chart, PALETTE, Series};

    #[test]
    fn a_chart_renders_to_svg_and_png_with_its_text() {
        let chart = Chart {
            title: "loss — η".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_log: true,
            series: vec![
                Series::new(
                    "runs",
                    PALETTE[0],
                    vec![(1.0, 2.0), (10.0, 1.5), (-1.0, 3.0)],
                ),
                Series::fitted("fit", PALETTE[1], vec![(1.0, 2.1), (10.0, 1.4)]),
            ],
            ..Chart::default()
        };
        let svg = chart.svg();
        // The point at x = -1 cannot sit on a log axis: left out.
        assert_eq!(svg.matches("<circle").count(), 2 + 1);
        assert!(svg.contains("loss — η"));
        let png = png(&svg).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // Twice the SVG's size.
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 2320);
    }

    /// Text is drawn (no system font needed): a picture of a word alone
    /// has dark pixels.
    #[test]
    fn text_is_drawn_with_the_embedded_font() {
        use resvg::{tiny_skia, usvg};
        let svg = r#"<svg xmlns="http://www.w3.org/2000/svg" width="120" height="40"><rect width="100%" height="100%" fill="white"/><text x="5" y="28" font-family="DejaVu Sans" font-size="24">Loss</text></svg>"#;
        let mut opt = usvg::Options::default();
        opt.fontdb_mut().load_font_data(FONT.to_vec());
        let tree = usvg::Tree::from_str(svg, &opt).unwrap();
        let mut pixmap = tiny_skia::Pixmap::new(120, 40).unwrap();
        resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
        let dark = pixmap.pixels().iter().filter(|p| p.red() < 128).count();
        assert!(dark > 100, "{dark} dark pixels");
    }
}
