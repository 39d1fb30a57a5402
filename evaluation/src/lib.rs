//! Evaluation of pretrained cell embeddings: what a model learned, measured against baselines.
//!
//! Read top to bottom: `evaluate` (the whole flow), then its parts: `labels` (classes and the
//! train/test split), `dataset` (cells and genes), `embed` (a run's model → embeddings),
//! `linalg` (standardization, PCA), `knn`, `probe` (logistic regression, few-shot, kNN),
//! `cluster` (Louvain, silhouette), `umap`, `layout` (PCA, t-SNE, UMAP of an embedding),
//! `metrics` (scikit-learn's definitions), `plots`, `figures` (the report's figures), `report`,
//! `outputs` (npy, tsv, h5ad); `atlas` draws an atlas's own coordinates.

pub mod atlas;
pub mod cluster;
pub mod dataset;
pub mod depth;
pub mod embed;
pub mod error;
pub mod evaluate;
pub mod figures;
pub mod knn;
pub mod labels;
pub mod layout;
pub mod linalg;
pub mod logistic;
pub mod metrics;
pub mod outputs;
pub mod plots;
pub mod probe;
pub mod report;
pub mod umap;

pub use error::{EvalError, Result};
