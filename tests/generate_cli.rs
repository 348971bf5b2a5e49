//! `moe generate` end to end on a tiny exported checkpoint (Qwen3-MoE layout, byte tokenizer):
//! JSON ids equal an in-process greedy decode, streamed text equals the JSON text, stop strings,
//! chat templates, and bad input named.

use std::process::Command;

mod common;
use common::{greedy, tiny_hf_model};
use moe::model::Model;
use moe::runtime::Device;

fn moe(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(
        // MOE_BIN: the binary staged beside the test binaries on the GPU machine.
        std::env::var("MOE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_moe").to_string()),
    )
    .args(args)
    .env("MOE_DISABLE_CUDA", "1")
    .output()
    .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn generate_json_stream_stop_and_chat() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_hf_model(tmp.path(), 48);
    let hf = tmp.path().join("hf");
    let hf_s = hf.to_str().unwrap();
    let base = [
        "generate",
        "--model",
        hf_s,
        "--device",
        "cpu",
        "--ignore-eos",
    ];
    let run = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        moe(&a)
    };

    let (ok, out, err) = run(&["--prompt", "rev:abc=", "--max-new-tokens", "12", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let prompt: Vec<u32> = "rev:abc=".bytes().map(u32::from).collect();
    assert_eq!(ids("prompt_ids"), prompt);
    let model = Model::load_hf(&hf, Device::Cpu, None).unwrap();
    let want = greedy(&model, &prompt, 12);
    assert_eq!(ids("completion_ids"), want);
    let text = v["text"].as_str().unwrap().to_string();
    let bytes: Vec<u8> = want.iter().map(|&b| b as u8).collect();
    assert_eq!(text, String::from_utf8_lossy(&bytes));

    // Streaming prints the same text (and a final newline).
    let (ok, out, err) = run(&["--prompt", "rev:abc=", "--max-new-tokens", "12"]);
    assert!(ok, "{err}");
    assert_eq!(out, format!("{text}\n"));

    // A stop string cuts the text before it.
    let chars: Vec<char> = text.chars().collect();
    if chars.len() >= 6 {
        let stop: String = chars[3..5].iter().collect();
        let (ok, out, err) = run(&[
            "--prompt",
            "rev:abc=",
            "--max-new-tokens",
            "12",
            "--json",
            "--stop",
            &stop,
        ]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let got = v["text"].as_str().unwrap();
        assert_eq!(got, &text[..text.find(&stop).unwrap()], "stop {stop:?}");
    }

    // Batch: one JSON line per prompt, each as if alone.
    let (ok, out, err) = run(&[
        "--prompt",
        "rev:abc=",
        "--prompt",
        "cp:xy=",
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["text"], v_text(&text));
    let p2: Vec<u32> = "cp:xy=".bytes().map(u32::from).collect();
    let want2 = greedy(&model, &p2, 12);
    let got2: Vec<u32> = lines[1]["completion_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(got2, want2);

    // Chat: the template renders the prompt.
    let cfg = serde_json::json!({
        "eos_token": "<|endoftext|>",
        "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    });
    std::fs::write(hf.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let (ok, out, err) = run(&[
        "--prompt",
        "hi",
        "--chat",
        "--system",
        "be brief",
        "--max-new-tokens",
        "2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let p: Vec<u8> = v["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u8)
        .collect();
    assert_eq!(
        String::from_utf8(p).unwrap(),
        "<system>be brief<user>hi<assistant>"
    );
}

fn v_text(t: &str) -> serde_json::Value {
    serde_json::Value::String(t.to_string())
}

#[test]
fn generate_bad_input_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_hf_model(tmp.path(), 48);
    let hf = tmp.path().join("hf");
    let hf_s = hf.to_str().unwrap();
    let long = "x".repeat(60);
    let (ok, _, err) = moe(&[
        "generate", "--model", hf_s, "--device", "cpu", "--prompt", &long,
    ]);
    assert!(
        !ok && err.contains("60 tokens") && err.contains("context is 48"),
        "{err}"
    );
    let (ok, _, err) = moe(&[
        "generate", "--model", hf_s, "--device", "cpu", "--prompt", "a", "--top-p", "0",
    ]);
    assert!(!ok && err.contains("top_p = 0"), "{err}");
    let (ok, _, err) = moe(&["generate", "--model", "/nonexistent/model", "--prompt", "a"]);
    assert!(!ok && err.contains("/nonexistent/model"), "{err}");
    let (ok, _, err) = moe(&[
        "generate", "--model", hf_s, "--device", "cpu", "--prompt", "a", "--chat",
    ]);
    assert!(!ok && err.contains("chat_template"), "{err}");
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    let (ok, _, err) = moe(&[
        "generate", "--model", hf_s, "--device", "cpu", "--prompt", "a",
    ]);
    assert!(!ok && err.contains("tokenizer.json"), "{err}");
}

/// `moe kernels` checks every --arch before compiling anything (no GPU or NVRTC needed for that).
#[test]
fn kernels_bad_arch_is_named() {
    let (ok, _, err) = moe(&["kernels", "--arch", "sm_90a,compute_90"]);
    assert!(
        !ok && err.contains("\"compute_90\"") && err.contains("sm_90a or sm_80"),
        "{err}"
    );
}

/// `moe chat` reads turns from stdin, renders the whole conversation with the template each turn,
/// streams replies, and stops at /exit.
#[test]
fn chat_reads_turns_until_exit() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    tiny_hf_model(tmp.path(), 48);
    let hf = tmp.path().join("hf");
    let cfg = serde_json::json!({
        "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    });
    std::fs::write(hf.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let bin = std::env::var("MOE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_moe").to_string());
    let mut child = Command::new(bin)
        .args([
            "chat",
            "--model",
            hf.to_str().unwrap(),
            "--device",
            "cpu",
            "--max-new-tokens",
            "3",
            "--ignore-eos",
        ])
        .env("MOE_DISABLE_CUDA", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hi\n/reset\nrev:ab=\n/exit\nnever read\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Two replies (the /reset and /exit lines are commands), each of 3 byte tokens + newline.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.matches('\n').count() >= 2, "{text:?}");
    // The second reply equals a fresh single-turn generation (the reset cleared the history).
    let (ok, single, err) = moe(&[
        "generate",
        "--model",
        hf.to_str().unwrap(),
        "--device",
        "cpu",
        "--prompt",
        "rev:ab=",
        "--chat",
        "--max-new-tokens",
        "3",
        "--ignore-eos",
    ]);
    assert!(ok, "{err}");
    assert!(
        text.ends_with(&single),
        "chat output {text:?} does not end with {single:?}"
    );
}
