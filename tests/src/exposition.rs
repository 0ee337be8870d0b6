//! Reading Prometheus text exposition, as `/metrics` serves it.

/// The sum of every sample of `name` whose line holds each of `labels` (fragments such as
/// `route="a"`); 0 when there is none.
pub fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(['{', ' '])))
        .filter(|l| labels.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_the_matching_samples_of_one_name() {
        let text =
            "# TYPE x counter\nx_total{a=\"1\",b=\"2\"} 3\nx_total{a=\"1\",b=\"3\"} 4\nx_total_other 9\nx_total 1\n";
        assert_eq!(super::sum(text, "x_total", &["a=\"1\""]), 7.0);
        assert_eq!(super::sum(text, "x_total", &[]), 8.0);
        assert_eq!(super::sum(text, "x_total", &["b=\"3\""]), 4.0);
        assert_eq!(super::sum(text, "y_total", &[]), 0.0);
    }
}
