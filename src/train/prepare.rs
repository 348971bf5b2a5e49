//! `moe data prepare`: tokenizes text files into token shards (format in `data.rs`). Each input
//! file is one document, followed by the end-of-document id when the tokenizer has one. The
//! tokenizer is a HF `tokenizer.json` (the `tokenizers` crate) or the byte-level one: ids 0..=255
//! are bytes, 256 ends a document (vocab 257).

use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::data::write_shard;
use super::{Error, Result};

pub enum TextTokenizer {
    Bytes,
    Hf {
        tokenizer: Box<tokenizers::Tokenizer>,
        eos_id: Option<u32>,
        /// The tokenizer.json it was read from (kept with the shards, with the files beside it
        /// that carry its special tokens and chat template).
        source: PathBuf,
    },
}

/// Files of a HF tokenizer kept with the shards and copied into a run's `hf/` export.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// End-of-document names tried, in order, when `--eos-token` is not given.
const EOS_NAMES: &[&str] = &[
    "<|endoftext|>",
    "</s>",
    "<|end_of_text|>",
    "<eos>",
    "<|eos|>",
];

impl TextTokenizer {
    /// `spec` is `bytes` or the path of a tokenizer.json; `eos_token` names the end-of-document
    /// token (default: the first of `EOS_NAMES` the vocabulary has).
    pub fn load(spec: &str, eos_token: Option<&str>) -> Result<Self> {
        if spec == "bytes" {
            if let Some(e) = eos_token {
                return Err(Error::Config(format!(
                    "--eos-token {e}: the byte-level tokenizer's end-of-document id is fixed (256)"
                )));
            }
            return Ok(TextTokenizer::Bytes);
        }
        let path = Path::new(spec);
        let tokenizer = tokenizers::Tokenizer::from_file(path).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            msg: format!("cannot load as tokenizer.json: {e}"),
        })?;
        let eos_id = match eos_token {
            Some(name) => Some(tokenizer.token_to_id(name).ok_or_else(|| Error::Data {
                path: path.to_path_buf(),
                msg: format!("--eos-token {name:?} is not in the vocabulary"),
            })?),
            None => EOS_NAMES.iter().find_map(|n| tokenizer.token_to_id(n)),
        };
        Ok(TextTokenizer::Hf {
            tokenizer: Box::new(tokenizer),
            eos_id,
            source: path.to_path_buf(),
        })
    }

    pub fn vocab_size(&self) -> u32 {
        match self {
            TextTokenizer::Bytes => 257,
            TextTokenizer::Hf { tokenizer, .. } => tokenizer.get_vocab_size(true) as u32,
        }
    }

    pub fn eos_id(&self) -> Option<u32> {
        match self {
            TextTokenizer::Bytes => Some(256),
            TextTokenizer::Hf { eos_id, .. } => *eos_id,
        }
    }

    /// Token ids of one document (without the end-of-document id).
    pub fn encode(&self, bytes: &[u8], path: &Path) -> Result<Vec<u32>> {
        match self {
            TextTokenizer::Bytes => Ok(bytes.iter().map(|&b| b as u32).collect()),
            TextTokenizer::Hf { tokenizer, .. } => {
                let text = std::str::from_utf8(bytes).map_err(|e| Error::Data {
                    path: path.to_path_buf(),
                    msg: format!(
                        "not UTF-8 text (invalid byte at offset {}); use --tokenizer bytes for \
                         binary data",
                        e.valid_up_to()
                    ),
                })?;
                let enc = tokenizer.encode(text, false).map_err(|e| Error::Data {
                    path: path.to_path_buf(),
                    msg: format!("tokenizer failed: {e}"),
                })?;
                Ok(enc.get_ids().to_vec())
            }
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrepareReport {
    pub documents: usize,
    pub tokens: u64,
    pub shards: Vec<PathBuf>,
}

/// Input files: each path itself, or the regular files under a directory (recursively, sorted,
/// hidden entries skipped).
fn input_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let io = |source| Error::Io {
            path: dir.to_path_buf(),
            source,
        };
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.is_file() {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for p in inputs {
        if p.is_dir() {
            walk(p, &mut files)?;
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            return Err(Error::Data {
                path: p.clone(),
                msg: "no such file or directory".into(),
            });
        }
    }
    if files.is_empty() {
        return Err(Error::Config(
            "moe data prepare: no input files (give text files or directories)".into(),
        ));
    }
    Ok(files)
}

/// Tokenizes `inputs` into `out/shard-NNNNN.bin`, `shard_tokens` tokens per shard (the last one
/// shorter). `out` must not already hold shards.
pub fn prepare(
    inputs: &[PathBuf],
    tokenizer: &TextTokenizer,
    out: &Path,
    shard_tokens: usize,
) -> Result<PrepareReport> {
    if shard_tokens == 0 {
        return Err(Error::Config("--shard-tokens 0: must be > 0".into()));
    }
    let files = input_files(inputs)?;
    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let existing = std::fs::read_dir(out)
        .map_err(|source| Error::Io {
            path: out.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok())
        .any(|e| e.path().extension().is_some_and(|x| x == "bin"));
    if existing {
        return Err(Error::Data {
            path: out.to_path_buf(),
            msg: "already holds *.bin shards; remove them or choose another --out".into(),
        });
    }
    let (vocab, eos) = (tokenizer.vocab_size(), tokenizer.eos_id());
    let mut report = PrepareReport::default();
    let mut pending: Vec<u32> = Vec::new();
    let flush = |pending: &mut Vec<u32>, report: &mut PrepareReport, all: bool| -> Result<()> {
        while pending.len() >= shard_tokens || (all && !pending.is_empty()) {
            let n = pending.len().min(shard_tokens);
            let path = out.join(format!("shard-{:05}.bin", report.shards.len()));
            write_shard(&path, vocab, eos, &pending[..n])?;
            pending.drain(..n);
            report.shards.push(path);
        }
        Ok(())
    };
    // Files are tokenized in parallel a chunk at a time, and appended in input order.
    for chunk in files.chunks(4 * rayon::current_num_threads()) {
        let docs: Vec<Vec<u32>> = chunk
            .par_iter()
            .map(|path| {
                let bytes = std::fs::read(path).map_err(|source| Error::Io {
                    path: path.clone(),
                    source,
                })?;
                tokenizer.encode(&bytes, path)
            })
            .collect::<Result<_>>()?;
        for doc in docs {
            report.tokens += doc.len() as u64 + eos.is_some() as u64;
            report.documents += 1;
            pending.extend(doc);
            pending.extend(eos);
            flush(&mut pending, &mut report, false)?;
        }
    }
    flush(&mut pending, &mut report, true)?;
    keep_tokenizer(tokenizer, out)?;
    Ok(report)
}

/// Keeps the tokenizer with the shards (`TOKENIZER_FILES` found beside a tokenizer.json, or the
/// byte-level tokenizer.json), so a run trained on them exports a model `moe generate` and
/// transformers can load without a tokenizer copied by hand.
fn keep_tokenizer(tokenizer: &TextTokenizer, out: &Path) -> Result<()> {
    let TextTokenizer::Hf { source, .. } = tokenizer else {
        return write_byte_tokenizer(&out.join("tokenizer.json"));
    };
    let from_dir = source.parent().unwrap_or(Path::new("."));
    for (name, from) in TOKENIZER_FILES.iter().map(|n| {
        let from = if *n == "tokenizer.json" {
            source.clone()
        } else {
            from_dir.join(n)
        };
        (n, from)
    }) {
        if from.is_file() {
            copy_atomic(&from, &out.join(name))?;
        }
    }
    Ok(())
}

/// Copies `from` to `to` through a temporary file renamed into place.
pub(crate) fn copy_atomic(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("tmp");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::copy(from, &tmp).map_err(io(from))?;
    std::fs::rename(&tmp, to).map_err(io(to))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::ShardDataset;

    #[test]
    fn bytes_into_shards() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        let b = dir.path().join("sub/b.txt");
        std::fs::create_dir_all(b.parent().unwrap()).unwrap();
        std::fs::write(&a, "hello").unwrap();
        std::fs::write(&b, "world!").unwrap();
        let out = dir.path().join("out");
        let r = prepare(&[dir.path().to_path_buf()], &TextTokenizer::Bytes, &out, 5).unwrap();
        // "hello" 256 "world!" 256 = 13 tokens -> shards of 5, 5, 3.
        assert_eq!(r.documents, 2);
        assert_eq!(r.tokens, 13);
        assert_eq!(r.shards.len(), 3);
        let mut d = ShardDataset::open(&out, 4, 0, 257).unwrap();
        assert_eq!(d.windows(), 2);
        let (t, y) = d.sequence(0);
        assert_eq!(t.len(), 4);
        assert_eq!(y[3], d.sequence(0).1[3]);
        let e = prepare(&[a.clone()], &TextTokenizer::Bytes, &out, 5).unwrap_err();
        assert!(e.to_string().contains("already holds"), "{e}");
        let e = prepare(
            &[dir.path().join("missing.txt")],
            &TextTokenizer::Bytes,
            &out,
            5,
        )
        .unwrap_err();
        assert!(e.to_string().contains("missing.txt: no such file"), "{e}");
    }
}

/// GPT-2's byte → printable character map (ByteLevel pre-tokenizer and decoder).
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap_or('?')
}

/// Writes a tokenizer.json whose ids are the bytes 0..=255 (and 256 = `<|endoftext|>`, the
/// byte-level tokenizer's end of document): a BPE without merges over GPT-2's byte-level
/// alphabet, which `tokenizers` and transformers load like any other.
pub fn write_byte_tokenizer(path: &Path) -> Result<()> {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..=255u8)
        .map(|b| (byte_char(b).to_string(), serde_json::Value::from(b as u32)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": 256, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    });
    let text = serde_json::to_string_pretty(&json).unwrap_or_default();
    std::fs::write(path, text).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod byte_tokenizer_tests {
    #[test]
    fn byte_tokenizer_json_maps_bytes_to_ids() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        super::write_byte_tokenizer(&p).unwrap();
        let t = tokenizers::Tokenizer::from_file(&p).unwrap();
        let text = "rev:a b\u{e9}=\n";
        let ids = t.encode(text, false).unwrap().get_ids().to_vec();
        let want: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, want);
        assert_eq!(t.decode(&want, false).unwrap(), text);
        assert_eq!(t.token_to_id("<|endoftext|>"), Some(256));
    }
}
