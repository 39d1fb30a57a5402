//! Which cells are evaluated and what class each one is: the label column, the classes chosen
//! on the command line, and the train/test split the probes use.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use dataloader::frame::{Column, Frame};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{EvalError, Result};

/// How label values become classes.
#[derive(Debug, Clone, PartialEq)]
pub enum ClassSpec {
    /// Every distinct non-empty value is a class.
    All,
    /// Only these values, in this order.
    Only(Vec<String>),
    /// Two classes: `negative` (class 0; every other value when empty) and `positive` (class 1),
    /// each possibly pooling several values.
    Binary { positive: Vec<String>, negative: Vec<String> },
}

/// Maps a label value to its class, or `None` for a cell left out.
type ClassOf = Box<dyn Fn(&str) -> Option<usize>>;

/// Evaluated cells and their classes.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    pub column: String,
    /// Class names; class `k` is `classes[k]`.
    pub classes: Vec<String>,
    /// Store rows of the evaluated cells, ascending.
    pub cells: Vec<usize>,
    /// Class of each evaluated cell.
    pub y: Vec<usize>,
    /// Classes dropped by `min_class_cells`, with their sizes.
    pub dropped: Vec<(String, usize)>,
}

impl Labels {
    /// Assigns classes from `obs[column]`; `data` names the file in errors. Classes with fewer
    /// than `min_class_cells` cells are dropped (and reported) instead of refused.
    pub fn from_obs(obs: &Frame, column: &str, spec: &ClassSpec, min_class_cells: usize, data: &Path) -> Result<Labels> {
        let col = obs.column(column).ok_or_else(|| {
            EvalError::input(data, format!("obs has no column `{column}`; --label-col must be one of: {}", obs.column_names().join(", ")))
        })?;
        if let Column::Float(_) = col {
            return Err(EvalError::input(data, format!("obs column `{column}` holds floats, not labels; choose a categorical or string column")));
        }
        let present: HashMap<String, usize> = col.top_values(usize::MAX).into_iter().collect();
        let require = |values: &[String], flag: &str| -> Result<()> {
            let absent: Vec<&str> = values.iter().filter(|v| !present.contains_key(*v)).map(String::as_str).collect();
            if absent.is_empty() {
                return Ok(());
            }
            let top: Vec<String> = col.top_values(12).into_iter().map(|(v, n)| format!("{v} ({n})")).collect();
            Err(EvalError::input(data, format!("{flag} value(s) {} do not occur in obs `{column}`; its values include {}", absent.join(", "), top.join(", "))))
        };
        let (classes, class_of): (Vec<String>, ClassOf) = match spec {
            ClassSpec::All => {
                let mut names: Vec<String> = present.keys().filter(|v| !v.is_empty()).cloned().collect();
                names.sort();
                let index: HashMap<String, usize> = names.iter().cloned().enumerate().map(|(i, n)| (n, i)).collect();
                (names, Box::new(move |v| index.get(v).copied()))
            }
            ClassSpec::Only(values) => {
                require(values, "--classes")?;
                let index: HashMap<String, usize> = values.iter().cloned().enumerate().map(|(i, n)| (n, i)).collect();
                (values.clone(), Box::new(move |v| index.get(v).copied()))
            }
            ClassSpec::Binary { positive, negative } => {
                require(positive, "--positive")?;
                require(negative, "--negative")?;
                if let Some(both) = positive.iter().find(|p| negative.contains(p)) {
                    return Err(EvalError::Usage(format!("`{both}` is given both as --positive and as --negative")));
                }
                let neg_name = if negative.is_empty() { "rest".to_string() } else { negative.join("+") };
                let (pos, neg) = (positive.clone(), negative.clone());
                let f = move |v: &str| {
                    if pos.iter().any(|p| p == v) {
                        Some(1)
                    } else if (neg.is_empty() && !v.is_empty()) || neg.iter().any(|n| n == v) {
                        Some(0)
                    } else {
                        None
                    }
                };
                (vec![neg_name, positive.join("+")], Box::new(f))
            }
        };
        let mut cells = Vec::new();
        let mut y = Vec::new();
        for i in 0..col.len() {
            if let Some(k) = class_of(&col.text(i)) {
                cells.push(i);
                y.push(k);
            }
        }
        let mut labels = Labels { column: column.to_string(), classes, cells, y, dropped: Vec::new() };
        labels.drop_small(min_class_cells);
        if labels.classes.len() < 2 {
            return Err(EvalError::input(
                data,
                format!(
                    "obs `{column}` gives {} class(es) ({}) among the chosen cells; a probe needs at least two",
                    labels.classes.len(),
                    labels.classes.join(", ")
                ),
            ));
        }
        Ok(labels)
    }

    /// Removes classes smaller than `min` cells and renumbers the rest.
    fn drop_small(&mut self, min: usize) {
        let counts = self.counts();
        let keep: Vec<usize> = (0..self.classes.len()).filter(|&k| counts[k] >= min.max(1)).collect();
        for (k, name) in self.classes.iter().enumerate() {
            if !keep.contains(&k) && counts[k] > 0 {
                self.dropped.push((name.clone(), counts[k]));
            }
        }
        let new: HashMap<usize, usize> = keep.iter().enumerate().map(|(j, &k)| (k, j)).collect();
        let (cells, y): (Vec<usize>, Vec<usize>) = self.cells.iter().zip(&self.y).filter_map(|(&c, k)| new.get(k).map(|&j| (c, j))).unzip();
        self.classes = keep.iter().map(|&k| self.classes[k].clone()).collect();
        self.cells = cells;
        self.y = y;
    }

    /// Keeps at most `max` cells, the same share of every class (seeded), so memory and time
    /// stay bounded on an atlas; returns how many cells were left out.
    pub fn subsample(&mut self, max: usize, seed: u64) -> usize {
        let n = self.cells.len();
        if n <= max {
            return 0;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut keep = Vec::with_capacity(max);
        for k in 0..self.classes.len() {
            let mut members: Vec<usize> = (0..n).filter(|&i| self.y[i] == k).collect();
            let take = ((members.len() as f64 * max as f64 / n as f64).round() as usize).max(1).min(members.len());
            members.shuffle(&mut rng);
            keep.extend_from_slice(&members[..take]);
        }
        keep.sort_unstable();
        self.cells = keep.iter().map(|&i| self.cells[i]).collect();
        self.y = keep.iter().map(|&i| self.y[i]).collect();
        n - self.cells.len()
    }

    /// Cells per class.
    pub fn counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.classes.len()];
        for &k in &self.y {
            c[k] += 1;
        }
        c
    }

    pub fn n_classes(&self) -> usize {
        self.classes.len()
    }
}

/// How cells are divided into training and test parts.
#[derive(Debug, Clone, PartialEq)]
pub enum SplitKind {
    /// Per class, `test_frac` of the cells go to the test part.
    Stratified,
    /// Whole groups (values of an obs column, such as a library) go to one part, so the probe
    /// is tested on groups it never saw.
    Group(String),
}

impl std::str::FromStr for SplitKind {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once(':') {
            None if s == "stratified" => Ok(SplitKind::Stratified),
            Some(("group", col)) if !col.is_empty() => Ok(SplitKind::Group(col.to_string())),
            _ => Err(EvalError::Usage(format!("--split `{s}`: expected stratified or group:COLUMN"))),
        }
    }
}

/// Positions (into `Labels::cells`) of the training and test cells.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub train: Vec<usize>,
    pub test: Vec<usize>,
}

/// Fewest training cells a class needs: the regularization is chosen by cross-validation.
pub const MIN_TRAIN_PER_CLASS: usize = 2;

impl Split {
    /// Splits `labels` by `kind`; errors name the class or group that makes the split impossible.
    pub fn new(labels: &Labels, kind: &SplitKind, test_frac: f64, obs: &Frame, seed: u64, data: &Path) -> Result<Split> {
        if !(test_frac > 0.0 && test_frac < 1.0) {
            return Err(EvalError::Usage(format!("--test-frac {test_frac} must be strictly between 0 and 1")));
        }
        match kind {
            SplitKind::Stratified => Self::stratified(labels, test_frac, seed),
            SplitKind::Group(col) => Self::by_group(labels, col, test_frac, obs, seed, data),
        }
    }

    fn stratified(labels: &Labels, test_frac: f64, seed: u64) -> Result<Split> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut train, mut test) = (Vec::new(), Vec::new());
        for (k, name) in labels.classes.iter().enumerate() {
            let mut members: Vec<usize> = (0..labels.y.len()).filter(|&i| labels.y[i] == k).collect();
            let n_test = ((members.len() as f64 * test_frac).round() as usize).max(1);
            if members.len() < n_test + MIN_TRAIN_PER_CLASS {
                return Err(EvalError::Usage(format!(
                    "class `{name}` has {} cell(s); the split needs at least {} per class ({n_test} test, {MIN_TRAIN_PER_CLASS} train). \
                     Drop small classes with --min-class-cells {} or pick classes with --classes",
                    members.len(),
                    n_test + MIN_TRAIN_PER_CLASS,
                    n_test + MIN_TRAIN_PER_CLASS
                )));
            }
            members.shuffle(&mut rng);
            test.extend_from_slice(&members[..n_test]);
            train.extend_from_slice(&members[n_test..]);
        }
        train.sort_unstable();
        test.sort_unstable();
        Ok(Split { train, test })
    }

    /// Groups in random order go to the test part until it holds `test_frac` of the cells; of
    /// 200 such draws, the one closest to `test_frac` that puts every class in both parts wins.
    fn by_group(labels: &Labels, col: &str, test_frac: f64, obs: &Frame, seed: u64, data: &Path) -> Result<Split> {
        let column = obs
            .column(col)
            .ok_or_else(|| EvalError::input(data, format!("--split group:{col}: obs has no column `{col}`; columns: {}", obs.column_names().join(", "))))?;
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, &cell) in labels.cells.iter().enumerate() {
            groups.entry(column.text(cell)).or_default().push(i);
        }
        if groups.len() < 2 {
            return Err(EvalError::input(data, format!("--split group:{col}: the evaluated cells come from {} group(s); a group split needs two or more", groups.len())));
        }
        let groups: Vec<Vec<usize>> = groups.into_values().collect();
        let target = (labels.y.len() as f64 * test_frac).round() as usize;
        let n_classes = labels.n_classes();
        let count = |part: &[usize]| {
            let mut c = vec![0; n_classes];
            for &i in part {
                c[labels.y[i]] += 1;
            }
            c
        };
        let mut best: Option<Split> = None;
        for attempt in 0..200u64 {
            let mut order: Vec<usize> = (0..groups.len()).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed.wrapping_add(attempt)));
            let (mut train, mut test) = (Vec::new(), Vec::new());
            for g in order {
                let part = if test.len() < target { &mut test } else { &mut train };
                part.extend_from_slice(&groups[g]);
            }
            let valid = count(&train).iter().all(|&c| c >= MIN_TRAIN_PER_CLASS) && count(&test).iter().all(|&c| c >= 1);
            let closer = best.as_ref().is_none_or(|b| test.len().abs_diff(target) < b.test.len().abs_diff(target));
            if valid && closer {
                train.sort_unstable();
                test.sort_unstable();
                best = Some(Split { train, test });
            }
        }
        best.ok_or_else(|| {
            EvalError::input(
                data,
                format!("--split group:{col}: found no assignment of {} groups that puts every class in both the training and the test part; use fewer classes or --split stratified", groups.len()),
            )
        })
    }

    /// `k` folds of `part` (positions into `labels`) stratified by class, for cross-validation.
    pub fn folds(labels: &Labels, part: &[usize], k: usize, seed: u64) -> Vec<Vec<usize>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut folds = vec![Vec::new(); k];
        let mut next = 0;
        for c in 0..labels.n_classes() {
            let mut members: Vec<usize> = part.iter().copied().filter(|&i| labels.y[i] == c).collect();
            members.shuffle(&mut rng);
            for m in members {
                folds[next % k].push(m);
                next += 1;
            }
        }
        folds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::exit::ExitStatus;

    fn obs(values: &[&str], groups: &[&str]) -> Frame {
        let text = |v: &[&str]| Column::categorical_from_text(v.iter().map(|s| s.to_string()).collect());
        Frame {
            index: (0..values.len()).map(|i| format!("c{i}")).collect(),
            columns: vec![("label".into(), text(values)), ("lib".into(), text(groups))],
            ..Default::default()
        }
    }

    fn many(n_a: usize, n_b: usize) -> Frame {
        let v: Vec<&str> = std::iter::repeat_n("a", n_a).chain(std::iter::repeat_n("b", n_b)).collect();
        let g: Vec<String> = (0..v.len()).map(|i| format!("lib{}", i % 10)).collect();
        let g: Vec<&str> = g.iter().map(String::as_str).collect();
        obs(&v, &g)
    }

    #[test]
    fn positive_and_negative_values_pool_into_two_classes() {
        let f = obs(&["x", "y", "z", "x", "w"], &["1"; 5]);
        let spec = ClassSpec::Binary { positive: vec!["x".into(), "y".into()], negative: vec!["z".into()] };
        let l = Labels::from_obs(&f, "label", &spec, 0, Path::new("d")).unwrap();
        assert_eq!(l.classes, vec!["z", "x+y"]);
        assert_eq!(l.cells, vec![0, 1, 2, 3]);
        assert_eq!(l.y, vec![1, 1, 0, 1]);
    }

    #[test]
    fn bad_label_requests_are_input_errors() {
        let f = obs(&["x", "x", "y"], &["1"; 3]);
        let p = Path::new("d");
        let missing_col = Labels::from_obs(&f, "nope", &ClassSpec::All, 0, p).unwrap_err();
        assert!(missing_col.to_string().contains("label, lib"), "{missing_col}");
        let absent = Labels::from_obs(&f, "label", &ClassSpec::Binary { positive: vec!["q".into()], negative: vec![] }, 0, p).unwrap_err();
        assert!(absent.to_string().contains("--positive value(s) q"), "{absent}");
        let one = Labels::from_obs(&f, "label", &ClassSpec::Only(vec!["x".into()]), 0, p).unwrap_err();
        assert!(one.to_string().contains("1 class(es)"), "{one}");
        for e in [missing_col, absent, one] {
            assert_eq!(e.exit_code(), 2);
        }
    }

    #[test]
    fn small_classes_are_dropped_only_when_asked() {
        let f = obs(&["a", "a", "a", "b", "c", "c", "c"], &["1"; 7]);
        let l = Labels::from_obs(&f, "label", &ClassSpec::All, 3, Path::new("d")).unwrap();
        assert_eq!(l.classes, vec!["a", "c"]);
        assert_eq!(l.dropped, vec![("b".to_string(), 1)]);
        assert_eq!(l.y, vec![0, 0, 0, 1, 1, 1]);
        let all = Labels::from_obs(&f, "label", &ClassSpec::All, 0, Path::new("d")).unwrap();
        let err = Split::new(&all, &SplitKind::Stratified, 0.2, &f, 0, Path::new("d")).unwrap_err();
        assert!(err.to_string().contains("class `b` has 1 cell(s)"), "{err}");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn subsampling_keeps_class_shares() {
        let f = many(600, 400);
        let mut l = Labels::from_obs(&f, "label", &ClassSpec::All, 0, Path::new("d")).unwrap();
        assert_eq!(l.subsample(100, 1), 900);
        assert_eq!(l.counts(), vec![60, 40]);
        assert!(l.cells.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(l.subsample(1000, 1), 0);
    }

    #[test]
    fn stratified_split_keeps_class_proportions_and_is_disjoint() {
        let f = many(60, 40);
        let l = Labels::from_obs(&f, "label", &ClassSpec::All, 0, Path::new("d")).unwrap();
        let s = Split::new(&l, &SplitKind::Stratified, 0.2, &f, 7, Path::new("d")).unwrap();
        assert_eq!(s.test.iter().filter(|&&i| l.y[i] == 0).count(), 12);
        assert_eq!(s.test.iter().filter(|&&i| l.y[i] == 1).count(), 8);
        let mut all: Vec<usize> = s.train.iter().chain(&s.test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn group_split_never_shares_a_group_between_parts() {
        let f = many(60, 40);
        let l = Labels::from_obs(&f, "label", &ClassSpec::All, 0, Path::new("d")).unwrap();
        let s = Split::new(&l, &SplitKind::Group("lib".into()), 0.2, &f, 3, Path::new("d")).unwrap();
        let lib = f.column("lib").unwrap();
        let test_groups: std::collections::HashSet<String> = s.test.iter().map(|&i| lib.text(l.cells[i])).collect();
        assert!(s.train.iter().all(|&i| !test_groups.contains(&lib.text(l.cells[i]))));
        assert_eq!(s.test.len(), 20);
    }

    #[test]
    fn folds_cover_the_part_once_with_every_class_spread() {
        let f = many(10, 10);
        let l = Labels::from_obs(&f, "label", &ClassSpec::All, 0, Path::new("d")).unwrap();
        let part: Vec<usize> = (0..20).collect();
        let folds = Split::folds(&l, &part, 5, 1);
        let mut all: Vec<usize> = folds.concat();
        all.sort_unstable();
        assert_eq!(all, part);
        assert!(folds.iter().all(|f| f.iter().filter(|&&i| l.y[i] == 0).count() == 2));
    }
}
