//! Learned baselines: multivariate models over a machine's feature vectors,
//! fitted with linfa on data judged normal.
//!
//! Univariate baselines cannot see an attacker who keeps each sensor's
//! statistics normal while breaking the physics between sensors; a model of
//! the vectors together can. [`model`] is the model itself (long-run scaling,
//! PCA with Hotelling's T² and Q, max-z, limits learned from training) and
//! its streaming scorer; [`machines`] keeps one per machine in the pipeline;
//! the SKAB evaluation ([`crate::eval::skab`]) runs the model under the
//! published protocol.

pub mod machines;
pub mod model;
