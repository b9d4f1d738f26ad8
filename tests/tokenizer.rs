//! The tokenizer path against Hugging Face's own encodings (`tokenizer_expected.json`, written
//! by tests/make_fixtures.py with the `tokenizers` library): BOS handling, bytes, streaming.

mod common;

use common::fixture;
use moe::config::ModelConfig;
use moe::runtime::tokenizer::{TextStream, TextTokenizer};
use serde::Deserialize;

#[derive(Deserialize)]
struct Sample {
    text: String,
    ids_with_bos: Vec<u32>,
    decoded_skip_special: String,
}

#[derive(Deserialize)]
struct Samples {
    samples: Vec<Sample>,
}

fn tokenizer() -> TextTokenizer {
    let dir = fixture("mixtral-base");
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    TextTokenizer::from_dir(&dir, &cfg).unwrap()
}

#[test]
fn encode_decode_match_hugging_face() {
    let tok = tokenizer();
    assert_eq!(
        (tok.bos, tok.eos.as_slice(), tok.add_bos),
        (Some(1), &[2u32][..], true)
    );
    let text =
        std::fs::read_to_string(fixture("mixtral-base").join("tokenizer_expected.json")).unwrap();
    let samples: Samples = serde_json::from_str(&text).unwrap();
    for s in samples.samples {
        assert_eq!(tok.encode(&s.text).unwrap(), s.ids_with_bos, "{:?}", s.text);
        assert_eq!(
            tok.decode(&s.ids_with_bos).unwrap(),
            s.decoded_skip_special,
            "{:?}",
            s.text
        );
    }
}

#[test]
fn streaming_reassembles_multibyte_text() {
    // Byte-level BPE spells rare characters one byte per token; the stream must never emit
    // half a character and must add up to the full decode.
    let tok = tokenizer();
    let text = "café — naïve über 😀 end";
    let ids = tok.encode(text).unwrap();
    let mut stream = TextStream::default();
    let mut out = String::new();
    for &id in &ids[1..] {
        if let Some(piece) = stream.push(&tok, id).unwrap() {
            assert!(
                !piece.contains('\u{FFFD}'),
                "emitted a partial character: {piece:?}"
            );
            out.push_str(&piece);
        }
    }
    assert_eq!(out, text);
}
