//! Mode: telling an operating-mode change from an anomaly.
//!
//! A machine going from idle to full load moves all its coupled sensors at
//! once — speed, current, vibration, pressure — while a faulty or manipulated
//! sensor usually moves alone. So when at least `detect.mode.min_moving` of a
//! machine's sensors leave their prediction by more than `move_z` sigmas in the
//! same message, the machine is *in transition* for `hold` after the last such
//! message: spike and drift alerts pause, and the baselines follow the new
//! values instead of rejecting them. Each sensor then *settles* on its own —
//! when its trend has flattened to under one sigma per trend time constant, or
//! after `settle_max` — and its drift reference is re-anchored on the new level.
//! Range and stuck checks stay on throughout.
//!
//! The price, stated plainly: an attacker who moves two or more sensors in the
//! same message looks like a mode change to these univariate detectors; the
//! out-of-range check and the learned multivariate models are what catch that.

use crate::time::Millis;

/// Transition state of one machine.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ModeTracker {
    /// The machine is in transition until this event time.
    pub transition_until: Millis,
    /// Event time of the last joint move.
    pub last_move: Millis,
    /// Transitions seen.
    pub transitions: u64,
}

impl ModeTracker {
    /// Records how many sensors moved in a message at `ts`; returns whether the
    /// machine is in transition at `ts`.
    pub fn observe(&mut self, ts: Millis, moving: usize, min_moving: usize, hold: Millis) -> bool {
        if moving >= min_moving {
            if ts >= self.transition_until {
                self.transitions += 1;
            }
            self.last_move = ts;
            self.transition_until = self.transition_until.max(ts + hold);
        }
        self.in_transition(ts)
    }

    pub fn in_transition(&self, ts: Millis) -> bool {
        self.transitions > 0 && ts < self.transition_until
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joint_moves_hold_the_transition() {
        let mut m = ModeTracker::default();
        assert!(
            !m.observe(0, 1, 2, 30_000),
            "one sensor alone is not a mode change"
        );
        assert!(m.observe(1_000, 3, 2, 30_000));
        assert!(m.observe(20_000, 0, 2, 30_000));
        assert!(m.observe(25_000, 2, 2, 30_000));
        assert!(
            m.observe(50_000, 0, 2, 30_000),
            "hold counts from the last joint move"
        );
        assert!(!m.observe(56_000, 0, 2, 30_000));
        assert_eq!(m.transitions, 1);
    }
}
