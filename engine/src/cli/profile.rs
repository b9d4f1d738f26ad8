//! `moe-run profile`: measures which routed experts a model's tokens choose, per layer, over a text
//! (the embedded KJV chapter by default), and writes the [`RoutingProfile`] the hybrid placement
//! reads (`--profile FILE` on run/logits/analyze), with how concentrated routing is.

use std::path::PathBuf;

use candle_core::Tensor;

use crate::analysis::placement::RoutingProfile;
use crate::error::{Error, Result};
use crate::model::Trace;
use crate::runtime::stats::RoutingStats;
use crate::runtime::tokenizer::TextTokenizer;

/// The text `profile` runs without `--prompts`: a held-out chapter of the KJV (Genesis 3) that
/// tiny-kjv did not train on.
pub const DEFAULT_TEXT: &str = include_str!("../../../tests/fixtures/tiny-kjv/heldout.txt");

/// Tokens per forward pass at most (each chunk is one prefill, so it fits the KV cache).
pub const CHUNK_TOKENS: usize = 2048;

#[derive(clap::Args)]
pub struct ProfileArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// A text file; its tokens are run through the model in chunks of up to 2048 tokens (or the
    /// model's context). Default: a held-out KJV chapter embedded in the binary.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Write the profile (JSON) here instead of stdout (written whole or not at all).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing --out file.
    #[arg(long)]
    pub force: bool,
}

/// The profile of `stats` for a model with `num_layers` decoder layers (dense layers: empty).
pub fn profile_of(model: &str, stats: &RoutingStats, num_layers: usize) -> RoutingProfile {
    let mut layers = vec![Vec::new(); num_layers];
    for l in &stats.layers {
        if let Some(slot) = layers.get_mut(l.layer) {
            slot.clone_from(&l.counts);
        }
    }
    RoutingProfile {
        model: model.to_string(),
        tokens: stats.tokens,
        layers,
    }
}

pub fn run(a: ProfileArgs) -> Result<()> {
    if let Some(out) = &a.out {
        let mut inputs = crate::fsio::Inputs::new();
        for p in a.model.weights.iter().chain(&a.prompts) {
            inputs = inputs.with(p);
        }
        crate::fsio::check_output(out, "--out", &inputs, a.force)?;
    }
    let text = match &a.prompts {
        Some(p) => std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?,
        None => DEFAULT_TEXT.to_string(),
    };
    let _emu = super::emu_scope(&a.model)?;
    let (src, model) = super::load(&a.model)?;
    let Some(tok) = TextTokenizer::of_source(&src, &model.cfg)? else {
        return Err(Error::Input(
            "the model has no tokenizer.json, so the text cannot be encoded".into(),
        ));
    };
    let ids = tok.encode(&text)?;
    if ids.is_empty() {
        return Err(Error::Input("the text has no tokens".into()));
    }
    let chunk = CHUNK_TOKENS.min(model.cfg.max_position_embeddings).max(1);
    let mut stats = RoutingStats::new(&model.cfg);
    for c in ids.chunks(chunk) {
        let mut cache = model.new_cache(1, c.len())?;
        let x = Tensor::new(c, model.device())?.unsqueeze(0)?;
        let mut trace = Trace::default();
        model.forward(&x, &mut cache, false, Some(&mut trace))?;
        stats.record(&trace);
    }
    let name = match &src {
        crate::loader::ModelSource::Dir(d) => d.display().to_string(),
        crate::loader::ModelSource::Embedded(e) => e.name.to_string(),
    };
    let p = profile_of(&name, &stats, model.cfg.num_layers());
    eprintln!(
        "profiled {} tokens of {name}: the hottest 25% of experts serve {:.1}% of routed tokens (mean over MoE layers; 25% if uniform)",
        p.tokens,
        100.0 * p.hottest_quarter_share()
    );
    let json =
        serde_json::to_string(&p).map_err(|e| Error::io("profile", std::io::Error::other(e)))?;
    match &a.out {
        Some(out) => crate::fsio::write_atomic(out, |tmp| {
            std::fs::write(tmp, json + "\n").map_err(|e| Error::io(tmp, e))
        }),
        None => crate::fsio::print(&(json + "\n")),
    }
}
