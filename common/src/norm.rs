//! CP10k + log1p, the normalization scanpy users know (`normalize_total(target_sum=1e4)` then
//! `log1p`): used by gene selection, the expression baselines and generated data alike.

/// Counts per cell after normalization.
pub const TARGET_SUM: f64 = 1e4;

/// The factor that scales a cell with `total` counts to [`TARGET_SUM`] (0 for an empty cell).
pub fn cp10k_scale(total: f64) -> f64 {
    if total > 0.0 {
        TARGET_SUM / total
    } else {
        0.0
    }
}

/// [`cp10k_scale`] in f32, as the tokenizers compute it (their bin edges are fitted so).
pub fn cp10k_scale_f32(total: f32) -> f32 {
    if total > 0.0 {
        TARGET_SUM as f32 / total
    } else {
        0.0
    }
}

/// log1p(CP10k) of one count in a cell with `total` counts.
pub fn log1p_cp10k(count: f64, total: f64) -> f64 {
    (count * cp10k_scale(total)).ln_1p()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_is_scaled_to_ten_thousand_counts() {
        assert_eq!(cp10k_scale(500.0) * 500.0, TARGET_SUM);
        assert_eq!(cp10k_scale(0.0), 0.0);
        assert!((log1p_cp10k(5.0, 100.0) - 501f64.ln()).abs() < 1e-12);
    }
}
