//! Summary statistics of the benchmarks: one median for every figure they report.

/// The median of `v`: the middle value of an odd count, the mean of the two middle values of an
/// even one (the textbook definition, so an even number of rounds does not lean to the slower
/// half); NaN when there is nothing.
///
/// With the benchmarks' default odd round counts (5) it is the middle round's own figure. The
/// discovery benchmark (10 containers) used the upper of the two middle values before there was
/// one median; its figures are now the mean of the two.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn median_of_nothing_is_nan() {
        assert!(median(&[]).is_nan());
    }
}
