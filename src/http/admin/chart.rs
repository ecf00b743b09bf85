//! Server-rendered SVG bar charts: no script, no inline style (the CSP forbids both), one
//! `rect.bar` per point with its value in `data-value` and a `<title>` tooltip, so the page
//! reads with JavaScript off and tests can count points.

use maud::{Markup, html};

/// Chart width and height in SVG units (scaled by CSS).
const WIDTH: i64 = 600;
const HEIGHT: i64 = 160;
/// Room for the axis labels.
const LEFT: i64 = 48;
const BOTTOM: i64 = 20;

/// A bar chart of `(label, value)` points (negative values draw as 0).
pub(super) fn bars(id: &str, points: &[(String, i64)]) -> Markup {
    let max = points.iter().map(|(_, v)| *v).max().unwrap_or(0).max(1);
    let n = i64::try_from(points.len()).unwrap_or(1).max(1);
    let plot_w = WIDTH - LEFT;
    let plot_h = HEIGHT - BOTTOM;
    let slot = plot_w / n;
    let bar_w = (slot - 2).max(1);
    let first = points.first().map_or("", |p| p.0.as_str());
    let last = points.last().map_or("", |p| p.0.as_str());
    html! {
        svg.chart id=(id) viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } role="img" aria-label={ (id) ": " (points.len()) " points" } data-points=(points.len()) {
            line.axis x1=(LEFT) y1=(plot_h) x2=(WIDTH) y2=(plot_h) {}
            text.tick x=(LEFT - 4) y="12" text-anchor="end" { (super::credits(max)) }
            text.tick x=(LEFT - 4) y=(plot_h) text-anchor="end" { "0" }
            text.tick x=(LEFT) y=(HEIGHT - 4) { (first) }
            text.tick x=(WIDTH) y=(HEIGHT - 4) text-anchor="end" { (last) }
            @for (i, (label, v)) in points.iter().enumerate() {
                @let h = v.max(&0).saturating_mul(plot_h) / max;
                @let x = LEFT + i64::try_from(i).unwrap_or(0) * slot + 1;
                rect.bar x=(x) y=(plot_h - h) width=(bar_w) height=(h) data-day=(label) data-value=(v) {
                    title { (label) ": " (super::credits(*v)) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_bar_per_point_scaled_to_the_largest() {
        let pts: Vec<(String, i64)> = (0..30).map(|i| (format!("d{i}"), i * 10)).collect();
        let svg = super::bars("t", &pts).into_string();
        assert_eq!(svg.matches("<rect class=\"bar\"").count(), 30);
        assert!(svg.contains("data-value=\"290\""), "{svg}");
        // The largest bar fills the plot height (160 - 20).
        assert!(svg.contains("height=\"140\" data-day=\"d29\""), "{svg}");
    }

    #[test]
    fn labels_are_escaped() {
        let svg = super::bars("t", &[("<script>".into(), 1)]).into_string();
        assert!(!svg.contains("<script>"), "{svg}");
    }
}
