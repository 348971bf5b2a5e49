//! `moe data prepare` end to end: a HF tokenizer.json applied as the Python `tokenizers` package
//! applies it (ids from scripts/oracle/train_fixtures.py), shards readable by the trainer's
//! dataset, and bad input named.

use std::path::Path;
use std::process::Command;

use moe::train::data::ShardDataset;

fn moe() -> Command {
    Command::new(
        // MOE_BIN: the binary staged beside the test binaries on the GPU machine.
        std::env::var("MOE_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_moe").to_string()),
    )
}

fn fixture(name: &str) -> std::path::PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/train");
    let root = if built.exists() {
        built
    } else {
        "tests/fixtures/train".into()
    };
    root.join(name)
}

#[test]
fn prepare_with_tokenizer_json_matches_python_ids() {
    let sample: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("tokenizer_sample.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("doc.txt"), sample["text"].as_str().unwrap()).unwrap();
    let out = dir.path().join("shards");
    let o = moe()
        .args(["data", "prepare"])
        .arg(dir.path().join("doc.txt"))
        .arg("--out")
        .arg(&out)
        .arg("--tokenizer")
        .arg(fixture("tokenizer.json"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("1 documents") && stdout.contains("vocab 300"),
        "{stdout}"
    );
    let mut want: Vec<i32> = sample["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap() as i32)
        .collect();
    want.push(sample["eos_id"].as_i64().unwrap() as i32);
    // One window covering the whole document + end-of-document id.
    let mut d = ShardDataset::open(&out, want.len() - 1, 0, 300).unwrap();
    assert_eq!(d.windows(), 1);
    let (tokens, targets) = d.sequence(0);
    assert_eq!(tokens, want[..want.len() - 1]);
    assert_eq!(targets, want[1..]);

    // The tokenizer is kept with the shards, and a run trained on them exports it with the model.
    let kept = std::fs::read(out.join("tokenizer.json")).unwrap();
    assert_eq!(kept, std::fs::read(fixture("tokenizer.json")).unwrap());
    let mut cfg = moe::train::config::TrainConfig::parse(&format!(
        r#"
[model]
vocab_size = 300
d_model = 32
n_layers = 1
n_heads = 4
n_kv_heads = 2
max_seq_len = 64
ffn_dim = 64
[model.moe]
experts = [4]
top_k = 2
ffn_dim = 32
[train]
steps = 1
batch_size = 1
seq_len = {}
device = "cpu"
eval_per_task = 0
[data]
source = "shards"
dir = {:?}
[checkpoint]
export_hf = true
"#,
        want.len() - 1,
        out.display().to_string()
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    cfg.train.seed = 1;
    let run = dir.path().join("run");
    let mut t = moe::train::trainer::Trainer::new(cfg, &run).unwrap();
    t.verbose = false;
    t.run().unwrap();
    assert_eq!(std::fs::read(run.join("hf/tokenizer.json")).unwrap(), kept);
}

#[test]
fn prepare_reports_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let o = moe()
        .args(["data", "prepare", "/nonexistent/corpus.txt", "--out"])
        .arg(dir.path().join("o"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("/nonexistent/corpus.txt: no such file"),
        "{err}"
    );
    std::fs::write(dir.path().join("bad.json"), "{not json").unwrap();
    let o = moe()
        .args(["data", "prepare"])
        .arg(dir.path().join("bad.json"))
        .arg("--out")
        .arg(dir.path().join("o"))
        .arg("--tokenizer")
        .arg(dir.path().join("bad.json"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("bad.json: cannot load as tokenizer.json"),
        "{err}"
    );
    let o = moe()
        .args(["data", "prepare"])
        .arg(dir.path().join("bad.json"))
        .arg("--out")
        .arg(dir.path().join("o"))
        .arg("--tokenizer")
        .arg(fixture("tokenizer.json"))
        .args(["--eos-token", "<nope>"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("\"<nope>\" is not in the vocabulary"),
        "{err}"
    );
}
