//! Evaluation: how well the detectors find what was injected.
//!
//! [`labels`] scores alerts against the labelled incidents of a `simulate`
//! capture (recall, false alerts per machine-hour); [`metrics`] holds the
//! point-wise metrics of the public benchmarks' protocols; [`skab`] reads
//! the SKAB runs and applies its protocol; [`nab`] scores detections as NAB
//! defines it.

pub mod labels;
pub mod metrics;
pub mod nab;
pub mod skab;
