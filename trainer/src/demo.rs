//! The original study's quick demo: for one validation cell, each masked gene's true bin (or,
//! for ranked sequences, the hidden gene) and the model's three most likely answers, as TSV.

use dataloader::mask::IGNORE;
use dataloader::shard::Rank;
use tch::{Device, Kind, Tensor};

use crate::data::RunData;
use crate::error::Result;
use crate::model::Tokens;
use crate::train::Trainer;

pub fn quick_demo(trainer: &Trainer, data: &RunData, rank: Rank) -> Result<String> {
    let ranked = data.tokenizer.is_ranked();
    let mut out = String::from(if ranked { "position\ttrue_gene\ttop1\tp1\ttop2\tp2\ttop3\tp3\n" } else { "gene\ttrue_bin\ttop1\tp1\ttop2\tp2\ttop3\tp3\n" });
    let Some(batch) = data.val_stream(rank).next() else { return Ok(out) };
    let batch = batch?;
    let view = batch.first();
    let cell: Vec<(usize, i64)> = (0..batch.seq_len).filter(|&p| view.targets[p] != IGNORE).map(|p| (p, view.targets[p])).collect();
    let b = trainer.upload(&batch)?;
    let v = &b.views[0];
    let probs = tch::no_grad(|| -> Result<Tensor> {
        let depth = trainer.cfg.model.depth_tokens.then_some(&v.depth);
        let states = trainer.model.forward(&Tokens { genes: &v.genes, bins: &v.bins, padding: v.padding.as_ref(), depth }, false)?;
        // The first cell's masked positions lead `v.masked` (flat positions are ascending).
        let logits = trainer.model.logits_at(&states, &v.masked.f_narrow(0, 0, cell.len() as i64)?)?;
        Ok(logits.f_softmax(-1, Kind::Float)?.f_to_device(Device::Cpu)?)
    })?;
    let (top_p, top_i) = probs.f_topk(3.min(probs.size()[1]), -1, true, true)?;
    let name = |g: i64| data.tokenizer.genes.get(g as usize).cloned().unwrap_or_else(|| format!("#{g}"));
    for (row, &(p, truth)) in cell.iter().enumerate() {
        if ranked {
            out.push_str(&format!("{}\t{}", p - 1, name(truth)));
        } else {
            out.push_str(&format!("{}\t{truth}", name(view.gene_ids[p])));
        }
        for k in 0..top_i.size()[1] {
            let id = top_i.f_int64_value(&[row as i64, k])?;
            let shown = if ranked { name(id) } else { id.to_string() };
            out.push_str(&format!("\t{shown}\t{:.3}", top_p.f_double_value(&[row as i64, k])?));
        }
        out.push('\n');
    }
    Ok(out)
}
