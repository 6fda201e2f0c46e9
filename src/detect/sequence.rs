//! Sequence numbers of one device: gaps (messages that never arrived),
//! duplicates and rewinds (messages sent again), restarts.
//!
//! The tracker keeps the highest sequence number seen and a 64-bit map of
//! which of the 64 numbers below it arrived, like an IPsec anti-replay window:
//! a number inside the map that arrived already is a duplicate, one that did
//! not is a late (reordered) arrival and accepted. A number further back is a
//! rewind, unless it is at or below `seq_reset_max`: a device that reboots
//! starts again from 0 or 1, and that is a restart, not a replay. A device
//! that really restarted from a high number is re-synchronised after
//! [`ADOPT_AFTER`] consecutive numbers on the new track (alerted once).

use serde::{Deserialize, Serialize};

/// Consecutive in-order numbers on a rewound track before it is adopted.
pub const ADOPT_AFTER: u32 = 32;

/// What one sequence number means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqEvent {
    /// The next number, or the first one seen.
    InOrder,
    /// `missed` numbers were skipped.
    Gap { missed: u64 },
    /// A number that arrived already.
    Duplicate,
    /// A number further back than the window, `behind` the newest.
    Rewind { behind: u64 },
    /// A reordered arrival inside the window (accepted).
    Reordered,
    /// A reset to a small number: the device restarted.
    Restart,
}

/// The state of one device's sequence.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeqTracker {
    pub last: Option<u64>,
    seen: u64,
    /// Messages and missed numbers while learning (the device's loss rate).
    pub learned_msgs: u64,
    pub learned_missed: u64,
    pub restarts: u64,
    pub reordered: u64,
    /// A rewound track being followed: its next number and length.
    track: Option<(u64, u32)>,
}

impl SeqTracker {
    /// Judges `seq`; `learn` counts it toward the loss rate.
    pub fn observe(&mut self, seq: u64, reset_max: u64, learn: bool) -> SeqEvent {
        let Some(last) = self.last else {
            self.last = Some(seq);
            return SeqEvent::InOrder;
        };
        if learn {
            self.learned_msgs += 1;
        }
        if seq > last {
            let step = seq - last;
            self.seen = if step > 64 {
                0
            } else {
                (self.seen << (step - 1) << 1) | (1 << (step - 1))
            };
            self.last = Some(seq);
            self.track = None;
            if step == 1 {
                return SeqEvent::InOrder;
            }
            if learn {
                self.learned_missed += step - 1;
            }
            return SeqEvent::Gap { missed: step - 1 };
        }
        if seq == last {
            return SeqEvent::Duplicate;
        }
        let behind = last - seq;
        // Checked before the window: a device rebooting soon after its last
        // reboot would otherwise look like it sent an old number again.
        if seq <= reset_max && last > reset_max {
            self.restart(seq);
            return SeqEvent::Restart;
        }
        if behind <= 64 {
            let bit = 1u64 << (behind - 1);
            if self.seen & bit != 0 {
                return SeqEvent::Duplicate;
            }
            self.seen |= bit;
            self.reordered += 1;
            return SeqEvent::Reordered;
        }
        let run = match self.track {
            Some((next, run)) if next == seq => run + 1,
            _ => 1,
        };
        if run >= ADOPT_AFTER {
            self.restart(seq);
        } else {
            self.track = Some((seq + 1, run));
        }
        SeqEvent::Rewind { behind }
    }

    fn restart(&mut self, seq: u64) {
        self.last = Some(seq);
        self.seen = 0;
        self.track = None;
        self.restarts += 1;
    }

    /// The probability of losing one message: learned, floored.
    pub fn loss_rate(&self, floor: f64) -> f64 {
        let learned =
            self.learned_missed as f64 / (self.learned_msgs + self.learned_missed).max(1) as f64;
        learned.max(floor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SeqEvent::*;

    #[test]
    fn gaps_duplicates_reorders_rewinds_restarts() {
        let mut s = SeqTracker::default();
        let mut see = |n| s.observe(n, 8, false);
        assert_eq!(see(100), InOrder);
        assert_eq!(see(101), InOrder);
        assert_eq!(see(105), Gap { missed: 3 });
        assert_eq!(see(103), Reordered);
        assert_eq!(see(103), Duplicate);
        assert_eq!(see(105), Duplicate);
        assert_eq!(see(101), Duplicate);
        assert_eq!(see(106), InOrder);
        assert_eq!(see(20), Rewind { behind: 86 });
        assert_eq!(see(107), InOrder, "the real track goes on");
        // A reboot starts again from 0 or 1.
        assert_eq!(see(1), Restart);
        assert_eq!(see(2), InOrder);
        for n in 3..30 {
            see(n);
        }
        assert_eq!(see(0), Restart, "a reboot soon after a reboot");
    }

    #[test]
    fn a_new_high_track_is_adopted_after_a_run() {
        let mut s = SeqTracker::default();
        s.observe(5_000, 8, false);
        for i in 0..ADOPT_AFTER as u64 {
            assert!(matches!(s.observe(100 + i, 8, false), Rewind { .. }));
        }
        assert_eq!(s.observe(100 + ADOPT_AFTER as u64, 8, false), InOrder);
        assert_eq!(s.restarts, 1);
    }

    #[test]
    fn loss_rate_is_learned_and_floored() {
        let mut s = SeqTracker::default();
        for i in 0..1000 {
            s.observe(i * 2, 8, true);
        }
        assert!((s.loss_rate(0.01) - 0.5).abs() < 0.01);
        let mut t = SeqTracker::default();
        for i in 0..100 {
            t.observe(i, 8, true);
        }
        assert_eq!(t.loss_rate(0.01), 0.01);
    }
}
