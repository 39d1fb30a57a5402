//! A `MaskedBatch` on the device, uploaded in one copy.
//!
//! Every integer array of a micro-batch (each view's gene ids, bins, masked positions and
//! targets, the full cell's bins, and the depths as fixed-point) is packed into one host
//! buffer and copied once; the tensors are views into it. Padding is derived on the device
//! from the gene ids, so it costs no copy either.

use dataloader::mask::{MaskedBatch, View, IGNORE};
use tch::{Device, Kind, Tensor};

use crate::error::Result;
use crate::objectives::TermCounts;

/// Depths travel as integers in the packed buffer: log10 depth × this.
const DEPTH_SCALE: f64 = 1e6;

/// One view on the device.
pub struct DeviceView {
    pub genes: Tensor,
    pub bins: Tensor,
    /// `None` when no position is padding (keeps the fused attention kernels).
    pub padding: Option<Tensor>,
    /// Flat positions with a target, and the targets.
    pub masked: Tensor,
    pub targets: Tensor,
    /// `[batch, 2]`: log10 depth of this view's input and of the full cell.
    pub depth: Tensor,
    /// Non-padding length of each sequence.
    pub seq_lens: Vec<usize>,
    pub n_masked: usize,
}

/// A micro-batch on the device.
pub struct DeviceBatch {
    pub views: Vec<DeviceView>,
    /// The full cell's bins `[batch, seq]` (cell-bottleneck targets), when asked for.
    pub full_bins: Option<Tensor>,
    /// `[batch]` log10 depth of the full cell.
    pub depth: Tensor,
    pub n_cells: usize,
    /// Units of each objective in this micro-batch (before the global reduction).
    pub counts: TermCounts,
}

/// Offsets of the pieces of the packed buffer.
struct Packing {
    data: Vec<i64>,
}

impl Packing {
    fn push(&mut self, v: impl IntoIterator<Item = i64>) -> (i64, i64) {
        let start = self.data.len();
        self.data.extend(v);
        (start as i64, (self.data.len() - start) as i64)
    }
}

impl DeviceBatch {
    /// Uploads `b` to `device`; `gene_pad` is the padding gene id; `full_bins`: also the full
    /// cell's bins (only the cell bottleneck needs them).
    pub fn new(b: &MaskedBatch, device: Device, gene_pad: i64, full_bins: bool) -> Result<DeviceBatch> {
        let (n, l) = (b.batch_size as i64, b.seq_len as i64);
        let mut pack = Packing { data: Vec::new() };
        let fixed = |d: &[f32]| d.iter().map(|&x| (x as f64 * DEPTH_SCALE).round() as i64).collect::<Vec<_>>();
        let full_depth = pack.push(fixed(&b.depth));
        let mut spans = Vec::with_capacity(b.views.len());
        let mut counts = TermCounts { cells: b.batch_size as f64, ..TermCounts::default() };
        for v in &b.views {
            let (masked, targets): (Vec<i64>, Vec<i64>) = v.targets.iter().enumerate().filter(|(_, &t)| t != IGNORE).map(|(i, &t)| (i as i64, t)).unzip();
            counts.masked += masked.len() as f64;
            let gene_positions = v.padding.chunks(b.seq_len.max(1)).map(|row| row.iter().skip(1).filter(|&&p| !p).count()).sum::<usize>();
            counts.bottleneck += gene_positions as f64;
            let spans_v = (pack.push(v.gene_ids.iter().copied()), pack.push(v.input_bins.iter().copied()), pack.push(masked), pack.push(targets), pack.push(fixed(&v.depth)));
            spans.push((spans_v, v));
        }
        let full = full_bins.then(|| pack.push(b.full_bins.iter().copied()));
        let all = Tensor::f_from_slice(&pack.data)?.f_to_device(device)?;
        let piece = |(at, len): (i64, i64)| all.f_narrow(0, at, len);
        let depth_of = |span| -> Result<Tensor> { Ok(piece(span)?.f_to_kind(Kind::Float)?.f_div_scalar(DEPTH_SCALE)?) };
        let depth = depth_of(full_depth)?;
        let mut views = Vec::with_capacity(spans.len());
        for ((genes, bins, masked, targets, view_depth), v) in spans {
            let genes = piece(genes)?.f_view([n, l])?;
            let padding = if has_padding(v) { Some(genes.f_eq(gene_pad)?) } else { None };
            views.push(DeviceView {
                padding,
                genes,
                bins: piece(bins)?.f_view([n, l])?,
                n_masked: masked.1 as usize,
                masked: piece(masked)?,
                targets: piece(targets)?,
                depth: Tensor::f_stack(&[depth_of(view_depth)?, depth.shallow_clone()], 1)?,
                seq_lens: v.padding.chunks(b.seq_len.max(1)).map(|row| row.iter().filter(|&&p| !p).count()).collect(),
            });
        }
        let full_bins = match full {
            Some(span) => Some(piece(span)?.f_view([n, l])?),
            None => None,
        };
        Ok(DeviceBatch { views, full_bins, depth, n_cells: b.batch_size, counts })
    }

    /// Non-padding tokens of all views.
    pub fn tokens(&self) -> usize {
        self.views.iter().map(|v| v.seq_lens.iter().sum::<usize>()).sum()
    }
}

fn has_padding(v: &View) -> bool {
    v.padding.iter().any(|&p| p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataloader::mask::View;

    #[test]
    fn one_upload_restores_every_array() {
        let view = View {
            gene_ids: vec![3, 0, 1, 3, 2, 4],
            input_bins: vec![9, 5, 2, 9, 1, 7],
            targets: vec![IGNORE, 1, IGNORE, IGNORE, IGNORE, IGNORE],
            padding: vec![false, false, false, false, false, true],
            depth: vec![3.25, 2.5],
        };
        let b = MaskedBatch { batch_size: 2, seq_len: 3, views: vec![view], full_bins: vec![9, 1, 2, 9, 1, 7], depth: vec![3.5, 2.75], cells: vec![0, 1] };
        let d = DeviceBatch::new(&b, Device::Cpu, 4, true).unwrap();
        let v = &d.views[0];
        assert_eq!(Vec::<i64>::try_from(v.genes.view([-1])).unwrap(), b.views[0].gene_ids);
        assert_eq!(Vec::<i64>::try_from(v.bins.view([-1])).unwrap(), b.views[0].input_bins);
        assert_eq!((Vec::<i64>::try_from(&v.masked).unwrap(), Vec::<i64>::try_from(&v.targets).unwrap()), (vec![1], vec![1]));
        assert_eq!(Vec::<bool>::try_from(v.padding.as_ref().unwrap().view([-1])).unwrap(), b.views[0].padding, "padding from the pad gene id");
        assert_eq!(Vec::<f32>::try_from(v.depth.view([-1])).unwrap(), vec![3.25, 3.5, 2.5, 2.75]);
        assert_eq!(Vec::<i64>::try_from(d.full_bins.unwrap().view([-1])).unwrap(), b.full_bins);
        assert_eq!(v.seq_lens, vec![3, 2]);
        assert_eq!((d.counts.masked, d.counts.bottleneck, d.counts.cells), (1.0, 3.0, 2.0));
    }
}
