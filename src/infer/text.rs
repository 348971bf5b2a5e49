//! Text in and out of a model directory: tokenizer.json (the `tokenizers` crate), the chat
//! template (tokenizer_config.json `chat_template` or chat_template.jinja, rendered with
//! minijinja as transformers renders it), generation_config.json defaults, and a streaming
//! decoder that emits text only once its UTF-8 is complete.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{Error, Result};

/// A model directory's tokenizer with its special tokens.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    chat_template: Option<String>,
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::File {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::File {
            path: path.to_path_buf(),
            msg: format!("is not valid JSON: {e}"),
        })
}

/// A special token as tokenizer_config.json writes it: a string or {"content": ...}.
fn token_str(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, when present, tokenizer_config.json and
    /// chat_template.jinja.
    pub fn load(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::File {
                path,
                msg: "not found (moe needs the model's tokenizer.json)".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::File {
            path: path.clone(),
            msg: format!("cannot be loaded as a tokenizer: {e}"),
        })?;
        let cfg = read_json(&dir.join("tokenizer_config.json"))?;
        let get = |k: &str| cfg.as_ref().and_then(|c| c.get(k));
        let mut chat_template = match get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: the "default" one.
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if jinja.exists() {
            chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::File {
                path: jinja.clone(),
                msg: e.to_string(),
            })?);
        }
        Ok(Tokenizer {
            inner,
            path,
            bos_token: token_str(get("bos_token")),
            eos_token: token_str(get("eos_token")),
            chat_template,
        })
    }

    /// Ids of `text`; `special` adds what the tokenizer's post-processor adds (e.g. BOS), as
    /// `tokenizer(text)` does in transformers.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, special)
            .map_err(|e| Error::File {
                path: self.path.clone(),
                msg: format!("cannot encode the prompt: {e}"),
            })?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::File {
            path: self.path.clone(),
            msg: format!("cannot decode ids: {e}"),
        })
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template over `messages` with the generation prompt appended.
    pub fn apply_chat_template(&self, messages: &[Message]) -> Result<String> {
        let tpl = self.chat_template.as_deref().ok_or_else(|| Error::File {
            path: self.path.with_file_name("tokenizer_config.json"),
            msg: "has no chat_template (and there is no chat_template.jinja); use a plain prompt"
                .into(),
        })?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for today's date (UTC).
            let (y, m, d, ..) = utc_now();
            const MONTHS: [&str; 12] = [
                "January",
                "February",
                "March",
                "April",
                "May",
                "June",
                "July",
                "August",
                "September",
                "October",
                "November",
                "December",
            ];
            let month = MONTHS[(m as usize).clamp(1, 12) - 1];
            fmt.replace("%Y", &format!("{y:04}"))
                .replace("%m", &format!("{m:02}"))
                .replace("%d", &format!("{d:02}"))
                .replace("%B", month)
                .replace("%b", &month[..3])
        });
        env.add_template("chat", tpl)
            .map_err(|e| Error::Template(e.to_string()))?;
        let t = env
            .get_template("chat")
            .map_err(|e| Error::Template(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| Error::Template(format!("{e:#}")))
    }
}

/// The UTC date and time now: (year, month, day, hour, minute, second).
pub fn utc_now() -> (i64, u32, u32, u32, u32, u32) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    let r = rem as u32;
    (y, m, d, r / 3600, (r % 3600) / 60, r % 60)
}

/// One chat message.
#[derive(Clone, Debug, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Emits the text of a growing id sequence piece by piece. A token may end inside a UTF-8
/// character (byte-level and byte-fallback vocabularies); such text is held back until the
/// character completes, and decoding a window of recent ids keeps tokenizers' context-dependent
/// spacing right.
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Default for StreamDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds one id; returns the newly completed text (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            let new = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(new)
        } else if !now.starts_with(&before) && !now.ends_with('\u{FFFD}') {
            // Decoding is not prefix-stable across this boundary: emit the difference by chars.
            let common = before
                .char_indices()
                .zip(now.chars())
                .find(|((_, a), b)| a != b)
                .map(|((i, _), _)| i)
                .unwrap_or(before.len());
            let new = now[common.min(now.len())..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(new)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is held back at the end (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(now.get(before.len()..).unwrap_or("").to_string())
    }
}

/// Defaults from generation_config.json (what transformers' `generate` would use).
#[derive(Clone, Debug, Default)]
pub struct GenerationDefaults {
    pub eos_token_ids: Vec<u32>,
    pub do_sample: bool,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationDefaults {
    pub fn load(dir: &Path) -> Result<GenerationDefaults> {
        let path = dir.join("generation_config.json");
        let Some(v) = read_json(&path)? else {
            return Ok(GenerationDefaults::default());
        };
        let f = |k: &str| v.get(k).and_then(|x| x.as_f64()).map(|x| x as f32);
        let eos_token_ids = match v.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|x| vec![x as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect(),
            _ => Vec::new(),
        };
        Ok(GenerationDefaults {
            eos_token_ids,
            do_sample: v
                .get("do_sample")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            temperature: f("temperature"),
            top_k: v.get("top_k").and_then(|x| x.as_u64()).map(|x| x as usize),
            top_p: f("top_p"),
            min_p: f("min_p"),
            repetition_penalty: f("repetition_penalty"),
            max_new_tokens: v
                .get("max_new_tokens")
                .and_then(|x| x.as_u64())
                .map(|x| x as usize),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn byte_tok() -> (tempfile::TempDir, Tokenizer) {
        let dir = tempfile::tempdir().unwrap();
        crate::train::prepare::write_byte_tokenizer(&dir.path().join("tokenizer.json")).unwrap();
        let t = Tokenizer::load(dir.path()).unwrap();
        (dir, t)
    }

    #[test]
    fn stream_holds_partial_utf8_until_complete() {
        let (_d, t) = byte_tok();
        let text = "a é 漢字 🙂!";
        let mut s = StreamDecoder::new();
        let mut out = String::new();
        let mut pieces = Vec::new();
        for b in text.bytes() {
            let p = s.push(&t, b as u32).unwrap();
            assert!(
                !p.contains('\u{FFFD}'),
                "emitted a partial character: {p:?}"
            );
            if !p.is_empty() {
                pieces.push(p.clone());
            }
            out += &p;
        }
        out += &s.finish(&t).unwrap();
        assert_eq!(out, text);
        assert!(pieces.contains(&"🙂".to_string()), "{pieces:?}");
        // A truncated character at the end comes out as U+FFFD once, at finish.
        let mut s = StreamDecoder::new();
        let mut out = s.push(&t, b'x' as u32).unwrap();
        out += &s.push(&t, 0xE6).unwrap();
        out += &s.finish(&t).unwrap();
        assert_eq!(out, "x\u{FFFD}");
    }

    #[test]
    fn stream_matches_whole_decode_on_a_bpe_vocabulary() {
        let dir = tempfile::tempdir().unwrap();
        let mut fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/train/tokenizer.json");
        if !fixture.exists() {
            // A copy of the repository elsewhere (the GPU machine): relative to its root.
            fixture = "tests/fixtures/train/tokenizer.json".into();
        }
        std::fs::copy(fixture, dir.path().join("tokenizer.json")).unwrap();
        let t = Tokenizer::load(dir.path()).unwrap();
        let text = "The quick brown fox, naïve café — 東京 🙂 jumps over the lazy dog.";
        let ids = t.encode(text, false).unwrap();
        let mut s = StreamDecoder::new();
        let mut out = String::new();
        for &id in &ids {
            out += &s.push(&t, id).unwrap();
        }
        out += &s.finish(&t).unwrap();
        assert_eq!(out, t.decode(&ids).unwrap());
        assert_eq!(out, text);
    }

    #[test]
    fn chat_template_renders_like_transformers() {
        let (d, _) = byte_tok();
        let cfg = serde_json::json!({
            "bos_token": {"content": "<s>"},
            "eos_token": "</s>",
            "chat_template": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}<|{{ m.role }}|>{{ m['content'] | trim }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
        });
        std::fs::write(d.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = Tokenizer::load(d.path()).unwrap();
        let m = |r: &str, c: &str| Message {
            role: r.into(),
            content: c.into(),
        };
        let s = t.apply_chat_template(&[m("user", " hi ")]).unwrap();
        assert_eq!(s, "<s><|user|>hi</s><|assistant|>");
        let e = t
            .apply_chat_template(&[m("system", "x")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no system"), "{e}");
        // chat_template.jinja (transformers >= 4.43 saves it separately) wins.
        std::fs::write(
            d.path().join("chat_template.jinja"),
            "{{ messages[0].content.upper() }}",
        )
        .unwrap();
        let t = Tokenizer::load(d.path()).unwrap();
        assert_eq!(t.apply_chat_template(&[m("user", "abc")]).unwrap(), "ABC");
    }

    #[test]
    fn missing_tokenizer_is_named() {
        let d = tempfile::tempdir().unwrap();
        let e = Tokenizer::load(d.path()).err().unwrap().to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("not found"),
            "{e}"
        );
        std::fs::write(d.path().join("tokenizer.json"), "{").unwrap();
        let e = Tokenizer::load(d.path()).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
    }
}
