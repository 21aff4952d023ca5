//! Training curves as a PNG, drawn from a run's `metrics.jsonl`.
//!
//! [`plot_metrics`] reads the JSON-lines metrics a training run writes and
//! draws a 1200x500 picture: on the left the training loss per step (raw, and
//! smoothed by an exponential moving average) with the validation loss on top;
//! on the right the validation metric (BLEU, else accuracy, else perplexity).
//!
//! Text needs a TrueType font: plotters' `ab_glyph` backend does not look for
//! system fonts itself, so the first readable font among `$ATTN_PLOT_FONT` and
//! a list of usual places is registered once per process. Where there is none
//! (or `ATTN_PLOT_FONT=none`), the curves are drawn without any text and a
//! one-line warning goes to stderr.
//!
//! The picture is rendered in memory, encoded here (a small PNG encoder: the
//! file-backed plotters backend picks the image format from the file name, so
//! it cannot write the `out.png.tmp` temporary), written to `<out>.tmp` and
//! renamed over `<out>`, so a reader never sees half a file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use attn_nn::{Error, Result};
use plotters::prelude::*;
use plotters::style::register_font;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::{Map, Value};

/// Width and height of the picture, in pixels.
const WIDTH: u32 = 1200;
const HEIGHT: u32 = 500;

/// Smoothing factor of the training-loss moving average.
const EMA_ALPHA: f64 = 0.1;

const FONT: &str = "sans-serif";

const RAW_COLOR: RGBColor = RGBColor(166, 196, 232);
const EMA_COLOR: RGBColor = RGBColor(31, 119, 180);
const VALID_COLOR: RGBColor = RGBColor(230, 110, 10);
const METRIC_COLOR: RGBColor = RGBColor(44, 160, 44);
const GRID_COLOR: RGBColor = RGBColor(222, 222, 222);
const LIGHT_GRID_COLOR: RGBColor = RGBColor(244, 244, 244);

/// Usual places of a sans-serif TrueType font, tried in order after
/// `$ATTN_PLOT_FONT`.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/liberation2/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/google-noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/usr/share/fonts/gnu-free/FreeSans.ttf",
    "/usr/local/share/fonts/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Geneva.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
    "C:\\Windows\\Fonts\\segoeui.ttf",
];

/// Reads `metrics_jsonl` and writes a 1200x500 PNG of the training curves to
/// `out_png`.
///
/// Left panel: training loss per step, raw as a thin light line and its
/// exponential moving average (alpha 0.1) as a bold line, plus the validation
/// loss as markers joined by a line. Right panel: the validation metric, BLEU
/// if any evaluation has `"bleu"`, else accuracy if any has `"accuracy"`, else
/// perplexity (`"ppl"`, or `exp(loss)` where an evaluation has no `ppl`).
/// `title` heads the picture; when empty, the name of the directory holding
/// `metrics_jsonl` (the run's name) is used.
///
/// Evaluations on the `valid` split are drawn (when there is none, those of
/// the first split named). Lines of another `kind` and unknown fields are
/// ignored; blank lines are skipped. A line that is not a JSON object, or a
/// train/eval line without a numeric `step` (or, for train, `loss`), is an
/// error naming its line number, as is a file with no train lines at all. A
/// `null` loss (how serde_json writes a NaN) is skipped.
///
/// Without a usable font the curves are still drawn, with no text, and the
/// function returns `Ok` after a one-line warning on stderr. The PNG is
/// written to `<out_png>.tmp` and renamed into place.
pub fn plot_metrics(metrics_jsonl: &Path, out_png: &Path, title: &str) -> Result<()> {
    let text = std::fs::read_to_string(metrics_jsonl).map_err(|e| Error::io(metrics_jsonl, e))?;
    let metrics = parse_metrics(metrics_jsonl, &text)?;
    let title = if title.trim().is_empty() { run_name(metrics_jsonl) } else { title.to_string() };
    let with_text = ensure_font();

    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    render(&metrics, &title, with_text, &mut rgb)
        .map_err(|e| Error::format(out_png, format!("drawing failed: {e}")))?;
    let png = encode_png(&rgb, WIDTH, HEIGHT);

    let mut tmp_name = OsString::from(out_png.as_os_str());
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    if let Err(e) = std::fs::write(&tmp, &png) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    std::fs::rename(&tmp, out_png).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(out_png, e)
    })
}

/// The name of the directory holding the metrics file.
fn run_name(metrics_jsonl: &Path) -> String {
    let dir = match metrics_jsonl.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Canonicalising turns "." and ".." into real names.
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "training run".to_string())
}

// ---------------------------------------------------------------------------
// Reading metrics.jsonl
// ---------------------------------------------------------------------------

/// One evaluation, as far as the plot needs it.
#[derive(Debug, Clone)]
struct EvalPoint {
    step: f64,
    split: String,
    loss: Option<f64>,
    ppl: Option<f64>,
    bleu: Option<f64>,
    accuracy: Option<f64>,
}

#[derive(Debug, Default)]
struct Metrics {
    /// (step, loss) of every train line with a finite loss, in file order.
    train: Vec<(f64, f64)>,
    /// Evaluations of the split that is drawn.
    evals: Vec<EvalPoint>,
    /// The split drawn (`valid` unless there is none).
    split: String,
}

/// Which validation metric the right panel shows.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Metric {
    Bleu,
    Accuracy,
    Perplexity,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::Bleu => "BLEU",
            Metric::Accuracy => "accuracy",
            Metric::Perplexity => "perplexity",
        }
    }

    fn value(self, e: &EvalPoint) -> Option<f64> {
        let v = match self {
            Metric::Bleu => e.bleu,
            Metric::Accuracy => e.accuracy,
            Metric::Perplexity => e.ppl.or_else(|| e.loss.map(f64::exp)),
        };
        v.filter(|v| v.is_finite())
    }
}

fn parse_metrics(path: &Path, text: &str) -> Result<Metrics> {
    let mut train = Vec::new();
    let mut train_lines = 0usize;
    let mut evals: Vec<EvalPoint> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |msg: String| Error::format(path, format!("line {lineno}: {msg}"));
        let value: Value = serde_json::from_str(line).map_err(|e| bad(json_error(&e)))?;
        let Value::Object(obj) = value else {
            return Err(bad("expected a JSON object".to_string()));
        };
        let kind = match obj.get("kind") {
            Some(Value::String(k)) => k.as_str(),
            Some(_) => return Err(bad("`kind` is not a string".to_string())),
            None => return Err(bad("no `kind` field".to_string())),
        };
        match kind {
            "train" => {
                train_lines += 1;
                let step = required_number(&obj, "step").map_err(bad)?;
                match optional_number(&obj, "loss").map_err(bad)? {
                    Some(loss) if loss.is_finite() => train.push((step, loss)),
                    Some(_) => {}
                    None if obj.get("loss").is_some() => {} // null: a NaN loss, skipped
                    None => return Err(bad("train record has no `loss`".to_string())),
                }
            }
            "eval" => {
                let step = required_number(&obj, "step").map_err(bad)?;
                let split = match obj.get("split") {
                    None | Some(Value::Null) => "valid".to_string(),
                    Some(Value::String(s)) => s.clone(),
                    Some(_) => return Err(bad("`split` is not a string".to_string())),
                };
                evals.push(EvalPoint {
                    step,
                    split,
                    loss: optional_number(&obj, "loss").map_err(bad)?,
                    ppl: optional_number(&obj, "ppl").map_err(bad)?,
                    bleu: optional_number(&obj, "bleu").map_err(bad)?,
                    accuracy: optional_number(&obj, "accuracy").map_err(bad)?,
                });
            }
            _ => {} // other kinds of record (checkpoints, notes, ...) are not plotted
        }
    }
    if train_lines == 0 {
        return Err(Error::format(path, "no training records (lines with \"kind\":\"train\"); nothing to plot"));
    }
    let split = ["valid", "validation", "dev"]
        .iter()
        .find(|s| evals.iter().any(|e| e.split == **s))
        .map(|s| s.to_string())
        .or_else(|| evals.first().map(|e| e.split.clone()))
        .unwrap_or_else(|| "valid".to_string());
    evals.retain(|e| e.split == split);
    Ok(Metrics { train, evals, split })
}

/// serde_json's message without its "at line 1 column N" (every record is one
/// line, so only the column means anything).
fn json_error(e: &serde_json::Error) -> String {
    let mut msg = e.to_string();
    if let Some(at) = msg.rfind(" at line ") {
        msg.truncate(at);
    }
    if e.column() > 0 {
        format!("malformed JSON at column {}: {msg}", e.column())
    } else {
        format!("malformed JSON: {msg}")
    }
}

fn required_number(obj: &Map<String, Value>, key: &str) -> std::result::Result<f64, String> {
    match obj.get(key) {
        Some(Value::Number(n)) => n.as_f64().ok_or_else(|| format!("`{key}` is not a number")),
        Some(_) => Err(format!("`{key}` is not a number")),
        None => Err(format!("no `{key}` field")),
    }
}

/// A number, or `None` where the field is absent or `null`.
fn optional_number(obj: &Map<String, Value>, key: &str) -> std::result::Result<Option<f64>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(format!("`{key}` is not a number")),
    }
}

/// Exponential moving average, started at the first value.
fn ema(points: &[(f64, f64)], alpha: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len());
    let mut acc = None;
    for &(x, y) in points {
        let v = match acc {
            None => y,
            Some(prev) => alpha * y + (1.0 - alpha) * prev,
        };
        acc = Some(v);
        out.push((x, v));
    }
    out
}

// ---------------------------------------------------------------------------
// Fonts
// ---------------------------------------------------------------------------

/// Registers a sans-serif font with plotters, once per process. Returns
/// whether text can be drawn.
fn ensure_font() -> bool {
    static FONT_OK: OnceLock<bool> = OnceLock::new();
    *FONT_OK.get_or_init(|| {
        let env = std::env::var_os("ATTN_PLOT_FONT").filter(|v| !v.is_empty());
        if env.as_deref().is_some_and(|v| v.eq_ignore_ascii_case("none")) {
            eprintln!("warning: ATTN_PLOT_FONT=none: drawing training curves without text");
            return false;
        }
        let candidates = env.map(PathBuf::from).into_iter().chain(FONT_CANDIDATES.iter().map(PathBuf::from));
        for path in candidates {
            let Ok(bytes) = std::fs::read(&path) else { continue };
            // plotters keeps the font for the life of the process; this runs
            // once, and stops at the first file that parses.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        eprintln!(
            "warning: no TrueType font found (set ATTN_PLOT_FONT to a .ttf file); drawing training curves without text"
        );
        false
    })
}

// ---------------------------------------------------------------------------
// Drawing
// ---------------------------------------------------------------------------

type DrawError = Box<dyn std::error::Error>;

/// A padded axis range around `values`.
fn axis_range(values: impl Iterator<Item = f64>, pad_fraction: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let half = (lo.abs() * 0.05).max(0.5);
        return (lo - half, hi + half);
    }
    let pad = (hi - lo) * pad_fraction;
    (lo - pad, hi + pad)
}

fn step_label(v: &f64) -> String {
    if v.fract().abs() < 1e-9 {
        format!("{}", *v as i64)
    } else {
        format!("{v}")
    }
}

fn value_label(v: &f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".to_string();
    }
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    let decimals = if a >= 100.0 {
        0
    } else if a >= 10.0 {
        1
    } else if a >= 1.0 {
        2
    } else {
        3
    };
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn render(m: &Metrics, title: &str, with_text: bool, rgb: &mut [u8]) -> std::result::Result<(), DrawError> {
    let root = BitMapBackend::with_buffer(rgb, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let body = if with_text { root.titled(title, (FONT, 24).into_font().color(&BLACK))? } else { root.clone() };
    let (left, right) = body.split_horizontally(WIDTH / 2);
    draw_loss_panel(&left, m, with_text)?;
    draw_metric_panel(&right, m, with_text)?;
    root.present()?;
    Ok(())
}

fn x_range(m: &Metrics) -> (f64, f64) {
    let steps = m.train.iter().map(|p| p.0).chain(m.evals.iter().map(|e| e.step));
    let (lo, hi) = axis_range(steps, 0.0);
    (lo.min(0.0), hi)
}

fn draw_loss_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    m: &Metrics,
    with_text: bool,
) -> std::result::Result<(), DrawError>
where
    DB::ErrorType: 'static,
{
    let valid: Vec<(f64, f64)> =
        m.evals.iter().filter_map(|e| e.loss.filter(|l| l.is_finite()).map(|l| (e.step, l))).collect();
    let (x0, x1) = x_range(m);
    let (y0, y1) = axis_range(m.train.iter().map(|p| p.1).chain(valid.iter().map(|p| p.1)), 0.05);

    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if with_text {
        builder.caption("Loss", (FONT, 18)).x_label_area_size(42).y_label_area_size(60);
    } else {
        builder.x_label_area_size(2).y_label_area_size(2);
    }
    let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1)?;

    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(LIGHT_GRID_COLOR).bold_line_style(GRID_COLOR);
    if with_text {
        mesh.x_desc("step")
            .y_desc("loss")
            .x_label_formatter(&step_label)
            .y_label_formatter(&value_label)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;

    let raw = chart.draw_series(LineSeries::new(m.train.iter().copied(), RAW_COLOR.stroke_width(1)))?;
    if with_text {
        raw.label("train loss (raw)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RAW_COLOR.stroke_width(2)));
    }
    let smooth = chart.draw_series(LineSeries::new(ema(&m.train, EMA_ALPHA), EMA_COLOR.stroke_width(3)))?;
    if with_text {
        smooth
            .label(format!("train loss (EMA, alpha {EMA_ALPHA})"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], EMA_COLOR.stroke_width(3)));
    }
    if !valid.is_empty() {
        let line = chart.draw_series(LineSeries::new(valid.iter().copied(), VALID_COLOR.stroke_width(2)))?;
        if with_text {
            line.label(format!("{} loss", m.split)).legend(|(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new([(0, 0), (20, 0)], VALID_COLOR.stroke_width(2))
                    + Circle::new((10, 0), 4, VALID_COLOR.filled())
            });
        }
        chart.draw_series(valid.iter().map(|&p| Circle::new(p, 4, VALID_COLOR.filled())))?;
    }
    if with_text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font((FONT, 13))
            .draw()?;
    }
    Ok(())
}

fn draw_metric_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    m: &Metrics,
    with_text: bool,
) -> std::result::Result<(), DrawError>
where
    DB::ErrorType: 'static,
{
    let metric = if m.evals.iter().any(|e| e.bleu.is_some()) {
        Metric::Bleu
    } else if m.evals.iter().any(|e| e.accuracy.is_some()) {
        Metric::Accuracy
    } else {
        Metric::Perplexity
    };
    let points: Vec<(f64, f64)> = m.evals.iter().filter_map(|e| metric.value(e).map(|v| (e.step, v))).collect();
    let (x0, x1) = x_range(m);
    let (y0, y1) = axis_range(points.iter().map(|p| p.1), 0.08);

    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if with_text {
        let caption = if m.evals.is_empty() {
            "Validation".to_string()
        } else {
            format!("Validation {} ({})", metric.name(), m.split)
        };
        builder.caption(caption, (FONT, 18)).x_label_area_size(42).y_label_area_size(60);
    } else {
        builder.x_label_area_size(2).y_label_area_size(2);
    }
    let mut chart = builder.build_cartesian_2d(x0..x1, y0..y1)?;

    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(LIGHT_GRID_COLOR).bold_line_style(GRID_COLOR);
    if with_text && !points.is_empty() {
        mesh.x_desc("step")
            .y_desc(metric.name())
            .x_label_formatter(&step_label)
            .y_label_formatter(&value_label)
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 15));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;

    if points.is_empty() {
        if with_text {
            let msg = if m.evals.is_empty() { "no evaluations yet" } else { "no validation metric recorded" };
            let grey = BLACK.mix(0.55);
            let style = (FONT, 20).into_font().color(&grey).pos(Pos::new(HPos::Center, VPos::Center));
            chart.plotting_area().draw(&Text::new(msg, ((x0 + x1) / 2.0, (y0 + y1) / 2.0), style))?;
        }
        return Ok(());
    }
    chart.draw_series(LineSeries::new(points.iter().copied(), METRIC_COLOR.stroke_width(2)))?;
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, METRIC_COLOR.filled())))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// PNG encoding
// ---------------------------------------------------------------------------

/// Encodes 8-bit RGB pixels as a PNG: every row "Up"-filtered, one zlib
/// stream compressed with deflate's fixed Huffman codes and matches at a few
/// distances (the previous byte, the previous pixel, the previous row), which
/// is what flat backgrounds, grid lines and curves repeat.
fn encode_png(rgb: &[u8], width: u32, height: u32) -> Vec<u8> {
    let stride = width as usize * 3;
    debug_assert_eq!(rgb.len(), stride * height as usize);
    let mut filtered = Vec::with_capacity((stride + 1) * height as usize);
    for y in 0..height as usize {
        let row = &rgb[y * stride..(y + 1) * stride];
        filtered.push(2u8); // filter type Up
        if y == 0 {
            filtered.extend_from_slice(row);
        } else {
            let prev = &rgb[(y - 1) * stride..y * stride];
            filtered.extend(row.iter().zip(prev).map(|(a, b)| a.wrapping_sub(*b)));
        }
    }

    let mut zlib = vec![0x78, 0x01];
    deflate_fixed(&filtered, &[1, 3, stride + 1], &mut zlib);
    zlib.extend_from_slice(&adler32(&filtered).to_be_bytes());

    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, adaptive filtering, no interlace
    png_chunk(&mut png, b"IHDR", &ihdr);
    png_chunk(&mut png, b"IDAT", &zlib);
    png_chunk(&mut png, b"IEND", &[]);
    png
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(data: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (n, slot) in t.iter_mut().enumerate() {
            let mut c = n as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *slot = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8))
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += x as u32;
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

/// Writes bits least-significant first, as deflate wants.
struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter<'_> {
    fn bits(&mut self, value: u32, count: u32) {
        self.acc |= (value as u64) << self.n;
        self.n += count;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    /// A Huffman code, which deflate stores most-significant bit first.
    fn code(&mut self, code: u32, len: u32) {
        self.bits(code.reverse_bits() >> (32 - len), len);
    }

    fn finish(mut self) {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.acc = 0;
        self.n = 0;
    }
}

const LEN_BASE: [u16; 29] =
    [3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258];
const LEN_EXTRA: [u8; 29] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145,
    8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] =
    [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13];

/// Literal/length symbol in deflate's fixed Huffman code.
fn fixed_litlen(w: &mut BitWriter<'_>, sym: u32) {
    match sym {
        0..=143 => w.code(0x30 + sym, 8),
        144..=255 => w.code(0x190 + sym - 144, 9),
        256..=279 => w.code(sym - 256, 7),
        _ => w.code(0xC0 + sym - 280, 8),
    }
}

/// One final deflate block with fixed Huffman codes; matches are looked for
/// only at the given distances (those beyond deflate's 32 KiB window are
/// ignored).
fn deflate_fixed(data: &[u8], distances: &[usize], out: &mut Vec<u8>) {
    let mut w = BitWriter { out, acc: 0, n: 0 };
    w.bits(1, 1); // BFINAL
    w.bits(1, 2); // BTYPE = 01, fixed Huffman
    let mut i = 0;
    while i < data.len() {
        let max = (data.len() - i).min(258);
        let (mut best_len, mut best_dist) = (0, 0);
        for &d in distances.iter().filter(|&&d| d >= 1 && d <= 32768 && d <= i) {
            let len = (0..max).take_while(|&k| data[i + k] == data[i + k - d]).count();
            if len > best_len {
                best_len = len;
                best_dist = d;
            }
        }
        if best_len >= 3 {
            let li = LEN_BASE.iter().rposition(|&b| b as usize <= best_len).unwrap();
            fixed_litlen(&mut w, 257 + li as u32);
            w.bits((best_len - LEN_BASE[li] as usize) as u32, LEN_EXTRA[li] as u32);
            let di = DIST_BASE.iter().rposition(|&b| b as usize <= best_dist).unwrap();
            w.code(di as u32, 5);
            w.bits((best_dist - DIST_BASE[di] as usize) as u32, DIST_EXTRA[di] as u32);
            i += best_len;
        } else {
            fixed_litlen(&mut w, data[i] as u32);
            i += 1;
        }
    }
    fixed_litlen(&mut w, 256); // end of block
    w.finish();
}
