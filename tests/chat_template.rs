//! Chat templates rendered byte for byte as Hugging Face transformers renders them.
//!
//! tests/fixtures/chat/<name>.jinja are real model templates (Mixtral-8x7B-Instruct, Qwen3,
//! DeepSeek-V3, Llama 4, gpt-oss; sources in tests/fixtures/chat/SOURCES.md), <name>.json their
//! bos/eos tokens, and expected.json what `tokenizer.apply_chat_template(messages,
//! tokenize=False, add_generation_prompt=...)` produced for each conversation
//! (tests/make_chat_fixtures.py), or the error message where transformers raised.

use std::path::{Path, PathBuf};

use moe::runtime::chat::{ChatMessage, ChatTemplate};
use moe::Error;
use serde::Deserialize;

#[derive(Deserialize)]
struct Expected {
    fixed_time_unix: i64,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    template: String,
    case: String,
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    vars: serde_json::Map<String, serde_json::Value>,
    expected: Option<String>,
    error: Option<String>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

/// The template with its special tokens, loaded as a model folder's tokenizer_config.json would
/// carry it (the .jinja text as `chat_template`, plus bos_token / eos_token).
fn load(name: &str, fixed_time: i64) -> ChatTemplate {
    let dir = fixtures();
    let source = std::fs::read_to_string(dir.join(format!("{name}.jinja"))).unwrap();
    let special: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    let mut config = special.as_object().unwrap().clone();
    config.insert("chat_template".into(), serde_json::Value::String(source));
    let json = serde_json::Value::Object(config).to_string();
    ChatTemplate::from_tokenizer_config_str(&json, None)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .unwrap_or_else(|| panic!("{name}: no template"))
        .with_fixed_time(fixed_time)
}

#[test]
fn renders_like_transformers() {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    let expected: Expected = serde_json::from_str(&text).unwrap();
    let names = ["mixtral", "qwen3", "deepseek-v3", "llama4", "gpt-oss"];
    let templates: Vec<(&str, ChatTemplate)> = names
        .iter()
        .map(|n| (*n, load(n, expected.fixed_time_unix)))
        .collect();

    let mut failures = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for case in &expected.cases {
        seen.insert(case.template.as_str());
        let template = &templates
            .iter()
            .find(|(n, _)| *n == case.template)
            .unwrap_or_else(|| panic!("unknown template {}", case.template))
            .1;
        let got = template.render_with(&case.messages, case.add_generation_prompt, &case.vars);
        let id = format!("{}/{}", case.template, case.case);
        match (&case.expected, &case.error, got) {
            (Some(want), None, Ok(got)) => {
                if &got != want {
                    failures.push(format!("{id}: rendered\n{got:?}\nexpected\n{want:?}"));
                }
            }
            (None, Some(msg), Err(err)) => {
                if !matches!(err, Error::Input(_)) || !err.to_string().contains(msg.as_str()) {
                    failures.push(format!("{id}: error {err:?} does not carry {msg:?}"));
                }
            }
            (Some(_), None, Err(err)) => failures.push(format!("{id}: unexpected error {err}")),
            (None, Some(msg), Ok(got)) => failures.push(format!(
                "{id}: rendered {got:?}, transformers raised {msg:?}"
            )),
            _ => failures.push(format!("{id}: malformed case")),
        }
    }
    assert_eq!(seen.len(), names.len(), "expected.json covers {seen:?}");
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from transformers:\n\n{}",
        failures.len(),
        expected.cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn model_folder_with_chat_template_jinja() {
    // gpt-oss ships its template as chat_template.jinja beside a tokenizer_config.json that
    // carries only the special tokens.
    let dir = tempfile::tempdir().unwrap();
    let source = std::fs::read_to_string(fixtures().join("gpt-oss.jinja")).unwrap();
    std::fs::write(dir.path().join("chat_template.jinja"), &source).unwrap();
    std::fs::copy(
        fixtures().join("gpt-oss.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let t = ChatTemplate::from_dir(dir.path()).unwrap().unwrap();
    assert_eq!(t.source(), source);
    assert_eq!(t.eos_token(), Some("<|return|>"));
    let text = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
    assert!(text.starts_with("<|start|>system<|message|>"), "{text}");
    assert!(
        text.ends_with("<|start|>user<|message|>Hi<|end|><|start|>assistant"),
        "{text}"
    );
}
