//! Routing statistics over a generation: how many token slots each expert of each layer
//! received, and the load imbalance max/mean (1.0 = perfectly even).

use serde::Serialize;

use crate::config::{FfnKind, ModelConfig};
use crate::model::Trace;

#[derive(Debug, Clone, Serialize)]
pub struct LayerLoad {
    pub layer: usize,
    /// Token slots routed to each expert (a token counts once per chosen expert).
    pub counts: Vec<u64>,
    /// max(count) / mean(count); 1.0 when perfectly balanced.
    pub imbalance: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RoutingStats {
    /// Tokens that went through the model (prompt + every fed-back generated token).
    pub tokens: u64,
    /// One entry per MoE layer (dense layers are skipped).
    pub layers: Vec<LayerLoad>,
}

impl RoutingStats {
    pub fn new(cfg: &ModelConfig) -> Self {
        let layers = cfg
            .layers
            .iter()
            .enumerate()
            .filter_map(|(i, k)| match k {
                FfnKind::Moe(m) => Some(LayerLoad {
                    layer: i,
                    counts: vec![0; m.num_experts],
                    imbalance: 0.0,
                }),
                FfnKind::Dense { .. } => None,
            })
            .collect();
        RoutingStats { tokens: 0, layers }
    }

    /// Adds the routing of one forward pass.
    pub fn record(&mut self, trace: &Trace) {
        self.tokens += trace.tokens as u64;
        for load in &mut self.layers {
            for &e in trace.router_ids.get(load.layer).into_iter().flatten() {
                if let Some(c) = load.counts.get_mut(e as usize) {
                    *c += 1;
                }
            }
            let total: u64 = load.counts.iter().sum();
            let mean = total as f64 / load.counts.len() as f64;
            let max = load.counts.iter().copied().max().unwrap_or(0) as f64;
            load.imbalance = if mean > 0.0 { max / mean } else { 0.0 };
        }
    }

    /// A plain-text table: one row per MoE layer, one column per expert.
    pub fn table(&self) -> String {
        let Some(first) = self.layers.first() else {
            return "routing: the model has no MoE layers\n".into();
        };
        let width = self
            .layers
            .iter()
            .flat_map(|l| &l.counts)
            .map(|c| c.to_string().len())
            .max()
            .unwrap_or(1)
            .max(3);
        let mut s = format!(
            "routing over {} tokens (token slots per expert; imbalance = max/mean)\n",
            self.tokens
        );
        s.push_str("layer");
        for e in 0..first.counts.len() {
            s.push_str(&format!(" {:>width$}", format!("e{e}")));
        }
        s.push_str("  imbalance\n");
        for l in &self.layers {
            s.push_str(&format!("{:>5}", l.layer));
            for c in &l.counts {
                s.push_str(&format!(" {c:>width$}"));
            }
            s.push_str(&format!("  {:>9.2}\n", l.imbalance));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_imbalance() {
        let cfg = crate::config::ModelConfig::from_json_str(
            r#"{"model_type":"mixtral","vocab_size":10,"hidden_size":8,"intermediate_size":8,
                "num_hidden_layers":2,"num_attention_heads":2,"num_local_experts":4,"num_experts_per_tok":2}"#,
            "c.json".as_ref(),
        )
        .unwrap();
        let mut st = RoutingStats::new(&cfg);
        // 2 tokens, top-2: layer 0 uses experts 0,1 twice; layer 1 spreads evenly.
        st.record(&Trace {
            tokens: 2,
            router_ids: vec![vec![0, 1, 0, 1], vec![0, 1, 2, 3]],
            router_weights: vec![vec![0.5; 4], vec![0.5; 4]],
        });
        assert_eq!(st.tokens, 2);
        assert_eq!(st.layers[0].counts, vec![2, 2, 0, 0]);
        assert_eq!(st.layers[0].imbalance, 2.0);
        assert_eq!(st.layers[1].imbalance, 1.0);
        let table = st.table();
        assert!(
            table.contains("imbalance") && table.contains("2.00"),
            "{table}"
        );
    }
}
