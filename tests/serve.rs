//! `moe-run serve` over real HTTP on 127.0.0.1: the OpenAI endpoints streamed and not, the error
//! bodies and statuses, 16 concurrent greedy requests against the same prompts alone, a full
//! queue, a client that disconnects mid-stream, /metrics, and a clean exit on SIGTERM.
//! (The official `openai` Python client is exercised by tests/openai_client.py from `.ci/run`.)

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

/// A running server; killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moe-run"))
            .args(["serve", "--port", "0", "--threads", "2"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn moe-run serve");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("serve exited before listening")
                .unwrap();
            if let Some(addr) = line.strip_prefix("moe-run serve: listening on http://") {
                break addr.rsplit(':').next().unwrap().parse().unwrap();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server { child, port }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s
    }

    /// Sends one request (Connection: close) and returns (status, headers, body after
    /// de-chunking).
    fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String, String) {
        let mut s = self.connect();
        send(&mut s, method, path, body);
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        parse_response(&raw)
    }

    fn json(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let (status, _, text) = self.request(method, path, Some(&body.to_string()));
        (
            status,
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
        )
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, _, text) = self.request("GET", "/metrics", None);
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not in {text}"))
            .parse()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn send(s: &mut TcpStream, method: &str, path: &str, body: Option<&str>) {
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
}

fn parse_response(raw: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, head.to_string(), body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|l| l.trim().to_string())
        .collect()
}

use common::KJV_PROMPTS as PROMPTS;

fn completion(prompt: &str, max_tokens: u32) -> Value {
    json!({"model": "tiny-kjv", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

/// Polls `cond` every 10 ms for up to 3 s.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    (0..300).any(|_| {
        cond() || {
            std::thread::sleep(Duration::from_millis(10));
            false
        }
    })
}

#[test]
fn endpoints_streaming_and_errors() {
    let srv = Server::start(&["--dtype", "f32", "--weight-dtype", "f32"]);
    let (status, _, body) = srv.request("GET", "/health", None);
    assert_eq!((status, body.contains("ok")), (200, true));
    let (status, models) = srv.json("GET", "/v1/models", &json!(null));
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "tiny-kjv");

    // Completion, whole: greedy text and usage.
    let (status, r) = srv.json("POST", "/v1/completions", &completion("And God said", 12));
    assert_eq!(status, 200, "{r}");
    let text = r["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(!text.is_empty());
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 12);
    assert_eq!(r["object"], "text_completion");

    // The same streamed: the deltas add up to the same text; the stream ends with [DONE].
    let mut body = completion("And God said", 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, head, sse) = srv.request("POST", "/v1/completions", Some(&body.to_string()));
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase().contains("text/event-stream"),
        "{head}"
    );
    let data = sse_data(&sse);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 12);

    // A stop string cuts the text before it, finish_reason "stop".
    let cut = text.chars().skip(3).take(2).collect::<String>();
    let mut body = completion("And God said", 12);
    body["stop"] = json!([cut]);
    let (_, r) = srv.json("POST", "/v1/completions", &body);
    let got = r["choices"][0]["text"].as_str().unwrap();
    assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
    assert_eq!(got, &text[..text.find(&cut).unwrap()]);

    // Chat, whole and streamed, through tiny-kjv's template.
    let chat = json!({"model": "tiny-kjv", "messages": [{"role": "user", "content": "And God said"}],
                      "max_tokens": 8, "temperature": 0});
    let (status, r) = srv.json("POST", "/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant");
    let chat_text = r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let mut body = chat.clone();
    body["stream"] = json!(true);
    let (_, _, sse) = srv.request("POST", "/v1/chat/completions", Some(&body.to_string()));
    let data = sse_data(&sse);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, chat_text);

    // Errors: OpenAI's body, the right status, nothing else disturbed.
    let bad = |path: &str, body: &str, status: u16, needle: &str| {
        let (s, _, text) = srv.request("POST", path, Some(body));
        assert_eq!(s, status, "{body} -> {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
        assert!(v["error"]["type"].is_string());
    };
    bad("/v1/completions", "{not json", 400, "not valid JSON");
    bad("/v1/completions", r#"{"prompt": 7}"#, 400, "does not match");
    bad(
        "/v1/completions",
        r#"{"prompt": "a", "temperature": 9}"#,
        400,
        "temperature",
    );
    bad(
        "/v1/completions",
        r#"{"prompt": "a", "n": 3}"#,
        400,
        "n = 3",
    );
    bad(
        "/v1/completions",
        r#"{"model": "gpt-4", "prompt": "a"}"#,
        404,
        "gpt-4",
    );
    bad(
        "/v1/chat/completions",
        r#"{"messages": []}"#,
        400,
        "messages",
    );
    let long = "And God said ".repeat(300);
    bad(
        "/v1/completions",
        &json!({"prompt": long}).to_string(),
        400,
        "context is 512",
    );
    bad(
        "/v1/completions",
        r#"{"prompt": [99999]}"#,
        400,
        "out of range",
    );
    let (s, _, _) = srv.request("GET", "/v1/nothing", None);
    assert_eq!(s, 404);
    assert!(srv.metric("moe_requests_bad_total") >= 8.0);
}

/// 16 concurrent greedy requests each return exactly what the same prompt returns alone (f32).
#[test]
fn concurrent_requests_equal_the_same_requests_alone() {
    let srv = Server::start(&[
        "--dtype",
        "f32",
        "--weight-dtype",
        "f32",
        "--max-batch",
        "16",
    ]);
    let alone: Vec<String> = PROMPTS
        .iter()
        .map(|p| {
            let (_, r) = srv.json("POST", "/v1/completions", &completion(p, 32));
            r["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect();
    let port = srv.port;
    let handles: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            let body = completion(p, 32).to_string();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                send(&mut s, "POST", "/v1/completions", Some(&body));
                let mut raw = Vec::new();
                s.read_to_end(&mut raw).unwrap();
                let (_, _, text) = parse_response(&raw);
                let v: Value = serde_json::from_str(&text).unwrap();
                v["choices"][0]["text"].as_str().unwrap().to_string()
            })
        })
        .collect();
    for (i, (h, want)) in handles.into_iter().zip(&alone).enumerate() {
        assert_eq!(&h.join().unwrap(), want, "prompt {i}: {:?}", PROMPTS[i]);
    }
    assert!(srv.metric("moe_engine_steps_total") > 0.0);
}

/// `--device emu`: the engine thread runs the model's kernel path on the emulator (it takes the
/// emulator from the thread that starts it), and two requests batched there give the CPU path's
/// greedy text.
#[test]
fn kernel_path_on_the_emulator_serves_the_cpu_paths_text() {
    let f32 = ["--dtype", "f32", "--weight-dtype", "f32"];
    let cpu = Server::start(&[&f32[..], &["--device", "cpu"]].concat());
    let emu = Server::start(&[&f32[..], &["--device", "emu"]].concat());
    let want: Vec<Value> = PROMPTS[..2]
        .iter()
        .map(|p| cpu.json("POST", "/v1/completions", &completion(p, 8)).1)
        .collect();
    let port = emu.port;
    let handles: Vec<_> = PROMPTS[..2]
        .iter()
        .map(|p| {
            let body = completion(p, 8).to_string();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                send(&mut s, "POST", "/v1/completions", Some(&body));
                let mut raw = Vec::new();
                s.read_to_end(&mut raw).unwrap();
                let (_, _, text) = parse_response(&raw);
                serde_json::from_str::<Value>(&text).unwrap()
            })
        })
        .collect();
    for (i, (h, want)) in handles.into_iter().zip(&want).enumerate() {
        let got = h.join().unwrap();
        assert_eq!(
            got["choices"][0]["text"], want["choices"][0]["text"],
            "prompt {i}"
        );
    }
    // The kernels ran on the emulator, and none on the CPU path.
    assert!(emu.metric("moe_kernel_launches_total") > 0.0);
    assert_eq!(cpu.metric("moe_kernel_launches_total"), 0.0);
}

/// A full queue answers 429; a client that disconnects mid-stream has its sequence cancelled and
/// its KV freed; SIGTERM ends the server with status 0.
#[test]
fn full_queue_disconnect_and_shutdown() {
    let mut srv = Server::start(&["--max-batch", "1", "--max-waiting", "1"]);
    // A long stream holds the only slot.
    let mut body = completion("And God said", 400);
    body["stream"] = json!(true);
    body["ignore_eos"] = json!(true);
    let mut holder = srv.connect();
    send(
        &mut holder,
        "POST",
        "/v1/completions",
        Some(&body.to_string()),
    );
    let mut first = [0u8; 64];
    let n = holder.read(&mut first).unwrap();
    assert!(n > 0);
    // The stream's headers can arrive before the engine admits it: wait until it runs, or it
    // would itself be the waiting request below.
    assert!(
        eventually(|| srv.metric("moe_sequences_running") == 1.0),
        "the long stream never ran"
    );
    // One waits...
    let port = srv.port;
    let waiter = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        send(
            &mut s,
            "POST",
            "/v1/completions",
            Some(&completion("Behold,", 4).to_string()),
        );
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        parse_response(&raw).0
    });
    assert!(
        eventually(|| srv.metric("moe_sequences_waiting") >= 1.0),
        "the second request never waited"
    );
    // ...and the next is refused.
    let (s, _, text) = srv.request(
        "POST",
        "/v1/completions",
        Some(&completion("Behold,", 4).to_string()),
    );
    assert_eq!(s, 429, "{text}");
    assert!(text.contains("--max-waiting"), "{text}");
    // The holder goes away: its slot and KV are freed, and the waiter runs.
    drop(holder);
    assert_eq!(waiter.join().unwrap(), 200);
    assert!(
        eventually(|| srv.metric("moe_requests_cancelled_total") == 1.0
            && srv.metric("moe_kv_cache_used_bytes") == 0.0),
        "the disconnected stream was not cancelled"
    );
    // A non-streaming request whose client goes away is cancelled too (hyper drops the
    // handler, which drops the receiver the engine sends to).
    let mut body = completion("And God said", 500);
    body["ignore_eos"] = json!(true);
    let mut quitter = srv.connect();
    send(
        &mut quitter,
        "POST",
        "/v1/completions",
        Some(&body.to_string()),
    );
    std::thread::sleep(Duration::from_millis(30));
    drop(quitter);
    assert!(
        eventually(|| srv.metric("moe_requests_cancelled_total") == 2.0
            && srv.metric("moe_kv_cache_used_bytes") == 0.0),
        "the disconnected non-streaming request was not cancelled"
    );
    assert!(srv.metric("moe_requests_rejected_queue_full_total") >= 1.0);
    let (_, _, m) = srv.request("GET", "/metrics", None);
    assert!(
        m.contains("moe_expert_tokens_total{layer=\"0\",expert=\"0\"}"),
        "{m}"
    );

    let pid = srv.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = srv.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
