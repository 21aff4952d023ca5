//! Comparing numbers: largest absolute difference, closeness assertions,
//! cosine and relative RMS error, and the rounding bound of each quantized
//! number format.

use candle_core::{DType, Tensor};

/// All elements of `t` (any shape, converted to f32) in row-major order.
pub fn to_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Largest `|a[i] - b[i]|`; the lengths must match.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

/// Largest absolute difference over rows (the number of rows must match).
pub fn max_abs_diff_rows(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0f32, f32::max)
}

/// Largest absolute difference of two f32 tensors of one shape.
pub fn tensor_max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Asserts that `got` and `want` have the same length, are finite, and
/// differ by at most `tol` anywhere.
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length {} != {}", got.len(), want.len());
    assert!(got.iter().all(|x| x.is_finite()), "{what}: non-finite output");
    let err = max_abs_diff(got, want);
    assert!(err <= tol, "{what}: max abs error {err} > {tol}");
}

/// [`assert_close`] for a tensor of the given shape.
pub fn assert_tensor_close(got: &Tensor, want: &[f32], shape: &[usize], tol: f32, what: &str) {
    assert_eq!(got.dims(), shape, "{what}: shape");
    assert_close(&to_vec(got), want, tol, what);
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

/// `||a - b|| / ||b||`.
pub fn rel_rms(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// Largest rounding error of one weight, as a fraction of the largest
/// magnitude in its block, by tensor type name; `None` for a type without
/// a derived bound. Q8_0 (symmetric, step amax/127): half a step. Q4_0 and
/// Q5_0 (ggml's reference: step amax/8 resp. amax/16 signed by the extreme
/// value, so the opposite extreme is clamped): one step. Q4_K: (max - min)/15
/// per 32 values with 6-bit scales and mins, bounded by 2 amax/15 (a whole
/// step, for the scale rounding); F16: 2^-11; F32: exact.
pub fn quant_max_error(ty: &str) -> Option<f32> {
    Some(match ty {
        "Q8_0" => 0.5 / 127.0,
        "Q4_0" => 1.0 / 8.0,
        "Q5_0" => 1.0 / 16.0,
        "Q4K" => 2.0 / 15.0,
        "F16" => 1.0 / 2048.0,
        "F32" => 0.0,
        _ => return None,
    })
}
