//! Models known by name (`--model mixtral-8x7b`): their Hugging Face repository and their real
//! published config.json, compiled in from `configs/`.

pub struct KnownModel {
    pub name: &'static str,
    /// Hugging Face repository id, `ORG/NAME`.
    pub repo: &'static str,
    pub config_json: &'static str,
}

pub static KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "mixtral-8x7b",
        repo: "mistralai/Mixtral-8x7B-v0.1",
        config_json: include_str!("../../../configs/mixtral-8x7b.json"),
    },
    KnownModel {
        name: "mixtral-8x22b",
        repo: "mistralai/Mixtral-8x22B-v0.1",
        config_json: include_str!("../../../configs/mixtral-8x22b.json"),
    },
];

pub fn find(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS
        .iter()
        .find(|m| m.name.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn every_known_config_parses() {
        for m in KNOWN_MODELS {
            let cfg = ModelConfig::from_json_str(m.config_json, m.name.as_ref()).unwrap();
            assert!(cfg.num_layers() > 0, "{}", m.name);
        }
        let cfg =
            ModelConfig::from_json_str(find("mixtral-8x7b").unwrap().config_json, "x".as_ref())
                .unwrap();
        assert_eq!(
            (
                cfg.hidden_size,
                cfg.num_layers(),
                cfg.num_kv_heads,
                cfg.head_dim
            ),
            (4096, 32, 8, 128)
        );
        assert_eq!(cfg.rope.theta, 1e6);
    }
}
