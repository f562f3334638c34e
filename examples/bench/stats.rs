//! What the benchmark examples `mgs` and `migration` share to judge a figure against its target
//! on a noisy machine.

/// A range that holds the median of the population `sorted` samples with at least about 95%
/// confidence (order statistics: the count of samples below the median is binomial, n and
/// 1/2): in `mgs` a cell's pairs of pairs, in `migration` the joins. Samples whose range
/// straddles a target cannot say on which side of it their median lies, however it falls:
/// with six samples, the range is the smallest to the largest. `None` under six, where even
/// that range holds the median less often (two: half the time).
pub(crate) fn median_range(sorted: &[f64]) -> Option<(f64, f64)> {
    if sorted.len() < 6 {
        return None;
    }
    let n = sorted.len() as f64;
    let half_width = 0.98 * n.sqrt();
    let low = ((n / 2.0 - half_width).floor() as usize).clamp(1, sorted.len());
    let high = ((n / 2.0 + half_width).ceil() as usize).clamp(1, sorted.len());
    Some((sorted[low - 1], sorted[high - 1]))
}
