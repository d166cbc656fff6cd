//! The statistics of results over seeds: mean and sample standard deviation, and the 95%
//! interval of a mean by Student's t.

/// The mean and the sample standard deviation (0 for a single value).
pub fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// The two-sided 95% quantile of Student's t with `df` degrees of freedom (the standard
/// table; the normal's 1.960 beyond 30).
pub fn t95(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    TABLE.get(df.wrapping_sub(1)).copied().unwrap_or(1.960)
}

/// The 95% interval of the mean of `values` (at least two).
pub fn ci95(values: &[f64]) -> [f64; 2] {
    let (mean, sd) = mean_sd(values);
    let half = t95(values.len().saturating_sub(1)) * sd / (values.len() as f64).sqrt();
    [mean - half, mean + half]
}
