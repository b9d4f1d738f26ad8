use super::*;

fn parse(json: &str) -> Result<ModelConfig> {
    ModelConfig::from_json_str(json, Path::new("test/config.json"))
}

const BASE: &str = r#"{"model_type":"mixtral","vocab_size":100,"hidden_size":64,"intermediate_size":96,
 "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"num_local_experts":8,
 "num_experts_per_tok":2,"rms_norm_eps":1e-6,"bos_token_id":1,"eos_token_id":2"#;

#[test]
fn legacy_and_v5_rope_forms_agree() {
    let legacy = parse(&format!(
        r#"{BASE},"rope_theta":5000.0,"rope_scaling":null}}"#
    ))
    .unwrap();
    let v5 = parse(&format!(
        r#"{BASE},"rope_parameters":{{"rope_type":"default","rope_theta":5000.0}}}}"#
    ))
    .unwrap();
    assert_eq!(legacy, v5);
    assert_eq!(legacy.rope.theta, 5000.0);
    assert_eq!(legacy.rope.scaling, RopeScaling::None);
    // Mixtral's default theta is 1e6 when neither form is given.
    assert_eq!(parse(&format!("{BASE}}}")).unwrap().rope.theta, 1e6);
    let linear = parse(&format!(
        r#"{BASE},"rope_scaling":{{"type":"linear","factor":2.0}}}}"#
    ))
    .unwrap();
    assert_eq!(linear.rope.scaling, RopeScaling::Linear { factor: 2.0 });
}

#[test]
fn mixtral_fields() {
    let c = parse(&format!(
        r#"{BASE},"sliding_window":4,"tie_word_embeddings":true,"head_dim":32}}"#
    ))
    .unwrap();
    assert_eq!(c.head_dim, 32);
    assert_eq!(c.sliding_window, Some(4));
    assert!(c.tie_word_embeddings);
    assert_eq!(c.num_layers(), 2);
    assert_eq!(c.eos_token_ids, vec![2]);
    let FfnKind::Moe(m) = &c.layers[0] else {
        panic!()
    };
    assert_eq!((m.num_experts, m.top_k, m.expert_ffn), (8, 2, 96));
    // head_dim defaults to hidden / heads; num_key_value_heads defaults to heads.
    let d = parse(&format!("{BASE}}}").replace(r#""num_key_value_heads":2,"#, "")).unwrap();
    assert_eq!((d.head_dim, d.num_kv_heads), (16, 4));
}

#[test]
fn eos_list() {
    let c = parse(&format!("{BASE}}}").replace(r#""eos_token_id":2"#, r#""eos_token_id":[2,3]"#))
        .unwrap();
    assert_eq!(c.eos_token_ids, vec![2, 3]);
}

#[test]
fn errors_name_the_problem() {
    let e = parse(r#"{"model_type":"llama"}"#).unwrap_err().to_string();
    assert!(
        e.contains("unknown model_type \"llama\"") && e.contains("mixtral"),
        "{e}"
    );
    let e = parse(&format!("{BASE}}}").replace(r#""hidden_size":64,"#, ""))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("hidden_size") && e.contains("test/config.json"),
        "{e}"
    );
    let e = parse("{not json").unwrap_err().to_string();
    assert!(e.contains("invalid JSON"), "{e}");
    let e = parse("[1,2]").unwrap_err().to_string();
    assert!(e.contains("not a JSON object"), "{e}");
    let e = parse(&format!(r#"{BASE},"num_experts_per_tok":9}}"#))
        .unwrap_err()
        .to_string();
    assert!(e.contains("num_experts_per_tok"), "{e}");
    let e = parse(&format!("{BASE}}}").replace(r#""vocab_size":100"#, r#""vocab_size":"big""#))
        .unwrap_err()
        .to_string();
    assert!(e.contains("vocab_size"), "{e}");
    let e = parse(&format!(
        r#"{BASE},"rope_scaling":{{"type":"longrope","factor":4.0}}}}"#
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("longrope"), "{e}");
}

#[test]
fn one_model_type_table() {
    // The supported list (error messages) is the table's names, aliases after their family.
    assert_eq!(
        supported_model_types(),
        [
            "mixtral",
            "dbrx",
            "qwen3_moe",
            "qwen2_moe",
            "olmoe",
            "hunyuan_v1_moe",
            "hunyuan",
            "deepseek_v2",
            "deepseek_v3",
            "dots1",
            "glm4_moe",
            "gpt_oss",
            "llama4_text",
            "llama4",
        ]
    );
    // Every name selects exactly one family.
    let all = supported_model_types();
    for t in &all {
        assert_eq!(all.iter().filter(|x| *x == t).count(), 1, "{t}");
        assert!(family(t).is_some(), "{t}");
    }
    assert!(family("llama").is_none());
    // A parsed config carries its family's name: an alias reads as the family.
    let known = |n: &str| registry::find(n).unwrap().config_json;
    let h = ModelConfig::from_json_str(known("hunyuan-a13b"), Path::new("h")).unwrap();
    assert_eq!(h.model_type, "hunyuan_v1_moe");
    for (name, want) in [
        ("mixtral-8x7b", "mixtral"),
        ("dbrx", "dbrx"),
        ("qwen3-30b-a3b", "qwen3_moe"),
        ("olmoe-1b-7b", "olmoe"),
        ("deepseek-v2-lite", "deepseek_v2"),
        ("deepseek-v3", "deepseek_v3"),
        ("dots-llm1", "dots1"),
    ] {
        let c = ModelConfig::from_json_str(known(name), Path::new(name)).unwrap();
        assert_eq!(c.model_type, want, "{name}");
    }
    let q2 = parse(
        r#"{"model_type":"qwen2_moe","vocab_size":100,"hidden_size":64,"intermediate_size":96,
        "moe_intermediate_size":32,"shared_expert_intermediate_size":64,"num_hidden_layers":2,
        "num_attention_heads":4,"num_key_value_heads":2,"num_experts":8,"num_experts_per_tok":2}"#,
    )
    .unwrap();
    assert_eq!(q2.model_type, "qwen2_moe");
}

/// GLM-4.5's partial rotary: the fixture's 0.5 of head_dim 24 rotates 12 dims; with no factor at
/// all transformers' glm4_moe default 0.5 applies; a factor giving an odd count is refused.
#[test]
fn glm4_moe_partial_rotary() {
    let text = include_str!("../../../tests/fixtures/glm4-moe/config.json");
    let c = ModelConfig::from_json_str(text, Path::new("glm")).unwrap();
    assert_eq!((c.head_dim, c.rope.rotary_dim), (24, Some(12)));
    assert!(c.attn.qkv_bias && c.attn.qk_norm == QkNorm::PerHeadBeforeRope);
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("partial_rotary_factor");
    o.insert("use_qk_norm".into(), false.into());
    let c = ModelConfig::from_json_str(&v.to_string(), Path::new("glm")).unwrap();
    assert_eq!(c.rope.rotary_dim, Some(12), "transformers' default 0.5");
    assert_eq!(c.attn.qk_norm, QkNorm::None);
    v["partial_rotary_factor"] = 0.25.into(); // 6 of 24: fine
    let c = ModelConfig::from_json_str(&v.to_string(), Path::new("glm")).unwrap();
    assert_eq!(c.rope.rotary_dim, Some(6));
    v["partial_rotary_factor"] = 0.3.into(); // 7.2 -> 7: odd
    let e = ModelConfig::from_json_str(&v.to_string(), Path::new("glm"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("partial_rotary_factor 0.3"), "{e}");
}

/// Per-layer windows as transformers reads them: dots1 from `max_window_layers` on (or as
/// `layer_types` says), Qwen2-MoE the even layers below `max_window_layers` (or `layer_types`);
/// the release's dots1 form (max_window_layers 62) slides nowhere.
#[test]
fn sliding_layers_follow_layer_types_and_max_window_layers() {
    let parse = |v: &serde_json::Value| ModelConfig::from_json_str(&v.to_string(), Path::new("d"));
    let text = include_str!("../../../tests/fixtures/dots1/config.json");
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    v["sliding_window"] = 4096.into(); // max_window_layers 62 >= 3 layers: none slides
    let c = parse(&v).unwrap();
    assert_eq!((c.sliding_window, c.window_layers), (None, None));
    v["max_window_layers"] = 1.into();
    let c = parse(&v).unwrap();
    assert_eq!(c.window_layers, Some(vec![false, true, true]));
    assert_eq!((c.window_of(0), c.window_of(2)), (None, Some(4096)));
    v["layer_types"] = serde_json::json!(["full_attention", "full_attention", "sliding_attention"]);
    assert_eq!(
        parse(&v).unwrap().window_layers,
        Some(vec![false, false, true])
    );
    v["layer_types"] = serde_json::json!(["full_attention", "sliding_attention"]);
    let e = parse(&v).unwrap_err().to_string();
    assert!(e.contains("layer_types has 2 entries for 3 layers"), "{e}");
    v["layer_types"] = serde_json::json!(["full_attention", "chunked", "full_attention"]);
    let e = parse(&v).unwrap_err().to_string();
    assert!(e.contains("layer_types"), "{e}");

    let text = include_str!("../../../tests/fixtures/qwen2-moe-swa/config.json");
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    let c = parse(&v).unwrap();
    assert_eq!(c.window_layers, Some(vec![true, false, true, false]));
    v.as_object_mut().unwrap().remove("layer_types");
    v["max_window_layers"] = 2.into(); // even layers below 2: layer 0 only
    assert_eq!(
        parse(&v).unwrap().window_layers,
        Some(vec![true, false, false, false])
    );
    v["use_sliding_window"] = false.into();
    let c = parse(&v).unwrap();
    assert_eq!((c.sliding_window, c.window_of(0)), (None, None));
}
