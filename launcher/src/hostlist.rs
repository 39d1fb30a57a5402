//! SLURM host lists (`node[01-04,07],gpu5`): the first host is where rank 0 serves the store.

/// The hosts of a SLURM node list, in order. Ranges keep their zero padding (`n[08-10]` gives
/// `n08 n09 n10`); a list may have several bracket groups (`r[1-2]-n[1-2]`).
pub fn expand(list: &str) -> Vec<String> {
    split_top_level(list).into_iter().flat_map(expand_one).collect()
}

/// The first host of a node list, without expanding the rest.
pub fn first_host(list: &str) -> Option<String> {
    let first = split_top_level(list).into_iter().next()?;
    expand_one(first).into_iter().next()
}

/// Splits on commas outside brackets.
fn split_top_level(list: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0usize, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&list[start..]);
    parts.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect()
}

/// Expands one host pattern with any number of bracket groups.
fn expand_one(pattern: &str) -> Vec<String> {
    let Some(open) = pattern.find('[') else { return vec![pattern.to_string()] };
    let Some(close) = pattern[open..].find(']').map(|c| open + c) else { return vec![pattern.to_string()] };
    let (prefix, body, rest) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let tails = expand_one(rest);
    let mut out = Vec::new();
    for item in body.split(',') {
        let values: Vec<String> = match item.split_once('-') {
            Some((a, b)) => match (a.parse::<u64>(), b.parse::<u64>()) {
                (Ok(lo), Ok(hi)) => (lo..=hi).map(|v| format!("{v:0width$}", width = a.len())).collect(),
                _ => vec![item.to_string()],
            },
            None => vec![item.to_string()],
        };
        for v in values {
            for t in &tails {
                out.push(format!("{prefix}{v}{t}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_slurm_node_lists() {
        assert_eq!(expand("node[01-03,07],gpu5"), ["node01", "node02", "node03", "node07", "gpu5"]);
        assert_eq!(expand("n[8-10]"), ["n8", "n9", "n10"]);
        assert_eq!(expand("n[08-10]"), ["n08", "n09", "n10"]);
        assert_eq!(expand("r[1-2]-n[1-2]"), ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]);
        assert_eq!(expand("localhost"), ["localhost"]);
        assert_eq!(first_host("a[3-4],b"), Some("a3".into()));
        assert_eq!(first_host(""), None);
    }
}
