//! Evaluation of pretrained cell embeddings (issue 5 builds `neurofm-eval` on this crate).
//!
//! `metrics`: classification and clustering scores defined as scikit-learn defines them.

pub mod metrics;
