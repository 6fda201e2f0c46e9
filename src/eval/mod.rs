//! Evaluation: how well the detectors find what was injected.
//!
//! [`labels`] scores alerts against the labelled incidents of a `simulate`
//! capture (recall, false alerts per machine-hour).

pub mod labels;
