//! What a soak's samples say: per resource its first, reference, last and
//! largest value, the slope of a least-squares line over the second half of
//! the cycles, and whether the resource stayed within its limit.

/// How a resource is judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    /// The fitted growth over the second half stays below `floor` or below
    /// `percent`% of the reference value, whichever is larger.
    Growth { percent: f64, floor: f64 },
    /// The last value equals the reference (the first after the warm-up).
    Reference,
    /// The last value is zero.
    Zero,
    /// Reported, not judged.
    None,
}

/// One resource of one daemon over a soak.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub first: f64,
    /// The value at the end of the warm-up.
    pub reference: f64,
    pub last: f64,
    pub max: f64,
    /// Of the least-squares line over the second half, per 1000 cycles.
    pub slope_per_1000: f64,
    /// That line's rise over the second half.
    pub growth: f64,
    /// What `rule` allowed, where it sets a bound (`Growth`: the growth;
    /// `Reference` and `Zero`: the last value).
    pub limit: Option<f64>,
    /// `None` where the rule judges nothing.
    pub pass: Option<bool>,
}

/// Summarizes `points` (cycle, value), in cycle order with the first at
/// cycle 0 and the last at the soak's end; `warmup` is the cycle of the
/// reference. `None` with fewer than two points in the second half.
pub fn summarize(points: &[(f64, f64)], warmup: f64, rule: Rule) -> Option<Summary> {
    let &(_, first) = points.first()?;
    let &(end, last) = points.last()?;
    let half: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|&(cycle, _)| cycle >= end / 2.0)
        .collect();
    let slope = least_squares_slope(&half)?;
    let reference = points
        .iter()
        .find(|&&(cycle, _)| cycle >= warmup)
        .map_or(first, |&(_, v)| v);
    let max = points.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let growth = slope * (end - half[0].0);
    let limit = match rule {
        Rule::Growth { percent, floor } => Some(floor.max(reference * percent / 100.0)),
        Rule::Reference => Some(reference),
        Rule::Zero => Some(0.0),
        Rule::None => None,
    };
    let pass = match (rule, limit) {
        (Rule::Growth { .. }, Some(limit)) => Some(growth < limit),
        (Rule::Reference | Rule::Zero, Some(limit)) => Some(last == limit),
        _ => None,
    };
    Some(Summary {
        first,
        reference,
        last,
        max,
        slope_per_1000: slope * 1000.0,
        growth,
        limit,
        pass,
    })
}

/// The slope of the least-squares line through `points`; `None` for fewer
/// than two distinct x.
fn least_squares_slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_noise_around_it() {
        let line: Vec<(f64, f64)> = (0..5)
            .map(|i| (f64::from(i), 3.0 + 2.0 * f64::from(i)))
            .collect();
        assert_eq!(least_squares_slope(&line), Some(2.0));
        let noisy = [(0.0, 1.0), (1.0, -1.0), (2.0, 1.0), (3.0, -1.0)];
        assert!(least_squares_slope(&noisy).unwrap().abs() < 1.0);
        assert_eq!(least_squares_slope(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }

    #[test]
    fn growth_over_the_second_half_is_judged() {
        // Warm-up growth in the first half is not held against the resource.
        let flat = [
            (0.0, 10.0),
            (25.0, 40.0),
            (50.0, 41.0),
            (75.0, 40.0),
            (100.0, 41.0),
        ];
        let rule = Rule::Growth {
            percent: 10.0,
            floor: 2.0,
        };
        let s = summarize(&flat, 25.0, rule).unwrap();
        assert_eq!(
            (s.first, s.reference, s.last, s.max),
            (10.0, 40.0, 41.0, 41.0)
        );
        assert_eq!(s.limit, Some(4.0));
        assert_eq!(s.pass, Some(true));
        let leaking = [
            (0.0, 10.0),
            (25.0, 40.0),
            (50.0, 45.0),
            (75.0, 50.0),
            (100.0, 55.0),
        ];
        let s = summarize(&leaking, 25.0, rule).unwrap();
        assert!((s.slope_per_1000 - 200.0).abs() < 1e-9, "{s:?}");
        assert!((s.growth - 10.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.pass, Some(false));
    }

    #[test]
    fn counts_must_come_back() {
        let fds = [(0.0, 20.0), (10.0, 24.0), (20.0, 25.0), (30.0, 24.0)];
        assert_eq!(
            summarize(&fds, 10.0, Rule::Reference).unwrap().pass,
            Some(true)
        );
        let fds = [(0.0, 20.0), (10.0, 24.0), (20.0, 25.0), (30.0, 25.0)];
        assert_eq!(
            summarize(&fds, 10.0, Rule::Reference).unwrap().pass,
            Some(false)
        );
        let slots = [(0.0, 0.0), (10.0, 2.0), (20.0, 0.0)];
        assert_eq!(
            summarize(&slots, 10.0, Rule::Zero).unwrap().pass,
            Some(true)
        );
        assert_eq!(summarize(&slots, 10.0, Rule::None).unwrap().pass, None);
        assert_eq!(summarize(&[(0.0, 1.0)], 0.0, Rule::Zero), None);
    }
}
