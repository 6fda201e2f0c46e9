//! Point-wise detection metrics, as the SKAB protocol defines them.
//!
//! Over all test rows summed: F1 = TP / (TP + (FP + FN) / 2),
//! FAR = FP / (FP + TN) × 100, MAR = FN / (FN + TP) × 100.

/// Counts of a point-wise comparison of predictions with labels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Confusion {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
    pub tn: u64,
}

impl Confusion {
    /// Adds one row: what was predicted, what the label says.
    pub fn add(&mut self, predicted: bool, anomalous: bool) {
        match (predicted, anomalous) {
            (true, true) => self.tp += 1,
            (true, false) => self.fp += 1,
            (false, true) => self.fn_ += 1,
            (false, false) => self.tn += 1,
        }
    }

    /// Sums two confusions (the protocol sums rows over all files).
    pub fn merge(&mut self, other: &Confusion) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.fn_ += other.fn_;
        self.tn += other.tn;
    }

    /// TP / (TP + (FP + FN) / 2); 0 when nothing was anomalous or predicted.
    pub fn f1(&self) -> f64 {
        let d = self.tp as f64 + (self.fp + self.fn_) as f64 / 2.0;
        if d == 0.0 { 0.0 } else { self.tp as f64 / d }
    }

    /// False alarm rate in percent: FP / (FP + TN) × 100.
    pub fn far(&self) -> f64 {
        let d = self.fp + self.tn;
        if d == 0 {
            0.0
        } else {
            self.fp as f64 * 100.0 / d as f64
        }
    }

    /// Missed alarm rate in percent: FN / (FN + TP) × 100.
    pub fn mar(&self) -> f64 {
        let d = self.fn_ + self.tp;
        if d == 0 {
            0.0
        } else {
            self.fn_ as f64 * 100.0 / d as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_example() {
        // labels    0 0 0 1 1 1 1 0
        // predicted 0 1 0 0 1 1 1 1
        let labels = [0, 0, 0, 1, 1, 1, 1, 0];
        let predicted = [0, 1, 0, 0, 1, 1, 1, 1];
        let mut c = Confusion::default();
        for (p, l) in predicted.iter().zip(labels) {
            c.add(*p == 1, l == 1);
        }
        assert_eq!(
            c,
            Confusion {
                tp: 3,
                fp: 2,
                fn_: 1,
                tn: 2
            }
        );
        // F1 = 3 / (3 + 3/2) = 2/3; FAR = 2/4 = 50 %; MAR = 1/4 = 25 %.
        assert!((c.f1() - 2.0 / 3.0).abs() < 1e-12);
        assert!((c.far() - 50.0).abs() < 1e-12);
        assert!((c.mar() - 25.0).abs() < 1e-12);
        // Summing files is summing rows.
        let mut total = c;
        total.merge(&c);
        assert!((total.f1() - c.f1()).abs() < 1e-12);
        assert_eq!(Confusion::default().f1(), 0.0);
    }

    #[test]
    fn always_alarm_on_skab_proportions() {
        // 53.7 % anomalous rows, everything predicted anomalous: F1 ~0.70, FAR 100 %.
        let c = Confusion {
            tp: 537,
            fp: 463,
            fn_: 0,
            tn: 0,
        };
        assert!((c.f1() - 0.699).abs() < 0.001, "{}", c.f1());
        assert_eq!(c.far(), 100.0);
        assert_eq!(c.mar(), 0.0);
    }
}
