//! Checkpoints: one directory per saved step, `<run>/checkpoints/step-NNNNNNNN/`, holding
//!   model.safetensors      the parameters as the model holds them (f32 on CPU, bf16 on GPU),
//!                          by the model's canonical names (what `moe generate` loads);
//!   optimizer.safetensors  AdamW moments `m.NAME`, `v.NAME` and f32 masters `master.NAME`;
//!   state.json             step, data position, RNG, counters, and the run's config;
//!   config.toml            the same config, for people.
//! A save writes a hidden temp directory, syncs it, then renames it into place, and only then
//! prunes old steps (keeping the last `keep`): a failed save (disk full) leaves earlier
//! checkpoints untouched and removes its temp directory.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::runtime::{DType, Device, Tensor};

/// Bumped when the directory layout or `state.json` changes incompatibly.
pub const FORMAT: u32 = 1;

/// `[checkpoint]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many steps (0: only at the end).
    #[serde(default = "d_every")]
    pub every: u64,
    /// Keep the last this many checkpoints.
    #[serde(default = "d_keep")]
    pub keep: usize,
    /// At the end of the run, also write the model in Hugging Face layout to `<run>/hf` (when
    /// the architecture has one: Mixtral or Qwen3-MoE).
    #[serde(default = "d_export")]
    pub export_hf: bool,
}

fn d_every() -> u64 {
    250
}
fn d_keep() -> usize {
    2
}
fn d_export() -> bool {
    true
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every: d_every(),
            keep: d_keep(),
            export_hf: d_export(),
        }
    }
}

impl CheckpointConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.keep == 0 {
            return Err("checkpoint.keep = 0: must be >= 1".into());
        }
        Ok(())
    }
}

/// Where a run stands: everything besides tensors that resuming needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps completed (skipped non-finite steps included).
    pub step: u64,
    /// AdamW updates applied (its bias-correction count).
    pub optimizer_steps: u64,
    /// Index of the next training sequence.
    pub data_position: u64,
    /// Source of per-step seeds (router noise, token selection).
    pub rng: ChaCha8Rng,
    pub tokens_seen: u64,
    pub skipped_steps: u64,
    pub elapsed_s: f64,
    /// Tokens routed to each expert so far, per MoE layer.
    pub expert_load: Vec<Vec<u64>>,
}

#[derive(Serialize, Deserialize)]
struct Sidecar {
    format: u32,
    state: TrainState,
    config: serde_json::Value,
}

/// A safetensors view of a CPU tensor's bytes.
struct StView<'a> {
    dtype: DType,
    shape: &'a [usize],
    bytes: &'a [u8],
}

impl safetensors::View for StView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self.dtype {
            DType::F32 => safetensors::Dtype::F32,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::F16 => safetensors::Dtype::F16,
            DType::I32 => safetensors::Dtype::I32,
        }
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// The little-endian bytes of a CPU tensor.
fn cpu_bytes(t: &Tensor) -> Result<&[u8]> {
    Ok(match t.dtype() {
        DType::F32 => bytemuck::cast_slice(t.as_slice::<f32>()?),
        DType::BF16 => bytemuck::cast_slice(t.as_slice::<half::bf16>()?),
        DType::F16 => bytemuck::cast_slice(t.as_slice::<half::f16>()?),
        DType::I32 => bytemuck::cast_slice(t.as_slice::<i32>()?),
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_tensors(path: &Path, tensors: &[(&str, &Tensor)]) -> Result<()> {
    // GPU tensors are downloaded first, so a failed download fails the save.
    let downloaded: Vec<Option<Tensor>> = tensors
        .iter()
        .map(|(_, t)| match t.device() {
            Device::Cpu => Ok(None),
            Device::Cuda(_) => t.to_device(Device::Cpu).map(Some),
        })
        .collect::<crate::runtime::Result<_>>()?;
    let mut views = Vec::with_capacity(tensors.len());
    for (&(name, t), d) in tensors.iter().zip(&downloaded) {
        let t = d.as_ref().unwrap_or(t);
        views.push((
            name,
            StView {
                dtype: t.dtype(),
                shape: t.shape(),
                bytes: cpu_bytes(t)?,
            },
        ));
    }
    safetensors::serialize_to_file(views, None, path).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("write failed: {e}"),
    })?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// `step-NNNNNNNN` directories under `dir` with their step, ascending.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The newest checkpoint under `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(dir)?.pop().map(|(_, p)| p))
}

/// What to write: the model's named parameters, the optimizer's named state, the run state and
/// its config (as JSON for comparison on resume, as TOML for people).
pub struct Snapshot<'a> {
    pub model: &'a [(&'a str, &'a Tensor)],
    pub optimizer: &'a [(&'a str, &'a Tensor)],
    pub state: &'a TrainState,
    pub config: serde_json::Value,
    pub config_toml: &'a str,
}

/// Saves `snap` as `dir/step-NNNNNNNN` atomically and keeps the newest `keep` checkpoints.
pub fn save(dir: &Path, keep: usize, snap: &Snapshot) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = format!("step-{:08}", snap.state.step);
    let tmp = dir.join(format!(".{name}.tmp"));
    let fin = dir.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    let written = (|| -> Result<()> {
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        write_tensors(&tmp.join("model.safetensors"), snap.model)?;
        write_tensors(&tmp.join("optimizer.safetensors"), snap.optimizer)?;
        let sidecar = Sidecar {
            format: FORMAT,
            state: snap.state.clone(),
            config: snap.config.clone(),
        };
        let json = serde_json::to_vec_pretty(&sidecar).map_err(|e| Error::Checkpoint {
            path: tmp.clone(),
            msg: e.to_string(),
        })?;
        write_file(&tmp.join("state.json"), &json)?;
        write_file(&tmp.join("config.toml"), snap.config_toml.as_bytes())?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io(&tmp))
    })();
    if let Err(e) = written {
        // Best effort: the error that matters is the write's.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if fin.exists() {
        std::fs::remove_dir_all(&fin).map_err(io(&fin))?;
    }
    std::fs::rename(&tmp, &fin).map_err(io(&fin))?;
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))?;
    let all = list(dir)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(old).map_err(io(old))?;
    }
    Ok(fin)
}

/// A memory-mapped safetensors file whose tensors are taken by name.
pub struct TensorFile {
    path: PathBuf,
    map: Arc<Mmap>,
    index: HashMap<String, (DType, Vec<usize>, usize)>,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<TensorFile> {
        let bad = |msg: String| Error::Checkpoint {
            path: path.to_path_buf(),
            msg,
        };
        let file = File::open(path).map_err(io(path))?;
        // SAFETY: checkpoint files are complete once renamed into place and never rewritten.
        let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(io(path))?);
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| bad(format!("corrupt safetensors file: {e}")))?;
        let base = map.as_ptr() as usize;
        let mut index = HashMap::new();
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::BF16 => DType::BF16,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::I32 => DType::I32,
                d => return Err(bad(format!("tensor {name}: unsupported dtype {d:?}"))),
            };
            let offset = view.data().as_ptr() as usize - base;
            index.insert(name, (dtype, view.shape().to_vec(), offset));
        }
        Ok(TensorFile {
            path: path.to_path_buf(),
            map,
            index,
        })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The tensor `name` (a CPU view of the mapped file).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let (dtype, shape, offset) = self.index.get(name).ok_or_else(|| Error::Checkpoint {
            path: self.path.clone(),
            msg: format!("has no tensor {name} (saved by a different model or optimizer?)"),
        })?;
        Ok(Tensor::from_mmap(self.map.clone(), *offset, shape, *dtype)?)
    }
}

/// A checkpoint opened for resuming.
pub struct Loaded {
    pub path: PathBuf,
    pub state: TrainState,
    pub config: serde_json::Value,
    pub model: TensorFile,
    pub optimizer: TensorFile,
}

pub fn load(path: &Path) -> Result<Loaded> {
    let bad = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    if !path.is_dir() {
        return Err(bad("no such checkpoint directory".into()));
    }
    let sidecar_path = path.join("state.json");
    let bytes = std::fs::read(&sidecar_path).map_err(io(&sidecar_path))?;
    let sidecar: Sidecar =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("state.json is corrupt: {e}")))?;
    if sidecar.format != FORMAT {
        return Err(bad(format!(
            "checkpoint format {}, this build reads format {FORMAT}",
            sidecar.format
        )));
    }
    Ok(Loaded {
        path: path.to_path_buf(),
        state: sidecar.state,
        config: sidecar.config,
        model: TensorFile::open(&path.join("model.safetensors"))?,
        optimizer: TensorFile::open(&path.join("optimizer.safetensors"))?,
    })
}

/// The first field (dotted path) where `saved` and `current` differ, skipping `ignore`d paths,
/// as "field: checkpoint has A, config has B".
pub fn config_difference(
    saved: &serde_json::Value,
    current: &serde_json::Value,
    ignore: &[&str],
) -> Option<String> {
    fn walk(
        path: &str,
        a: &serde_json::Value,
        b: &serde_json::Value,
        ignore: &[&str],
    ) -> Option<String> {
        if ignore.contains(&path) {
            return None;
        }
        use serde_json::Value::Object;
        match (a, b) {
            (Object(x), Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                let null = serde_json::Value::Null;
                keys.into_iter().find_map(|k| {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(
                        &p,
                        x.get(k).unwrap_or(&null),
                        y.get(k).unwrap_or(&null),
                        ignore,
                    )
                })
            }
            _ if a == b => None,
            _ => Some(format!("{path}: checkpoint has {a}, config has {b}")),
        }
    }
    walk("", saved, current, ignore)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn state(step: u64) -> TrainState {
        TrainState {
            step,
            optimizer_steps: step,
            data_position: 8 * step,
            rng: ChaCha8Rng::seed_from_u64(step),
            tokens_seen: 100 * step,
            skipped_steps: 0,
            elapsed_s: 1.5,
            expert_load: vec![vec![1, 2], vec![3, 4]],
        }
    }

    fn snap<'a>(
        st: &'a TrainState,
        model: &'a [(&'a str, &'a Tensor)],
        opt: &'a [(&'a str, &'a Tensor)],
    ) -> Snapshot<'a> {
        Snapshot {
            model,
            optimizer: opt,
            state: st,
            config: serde_json::json!({"model": {"n_layers": 2}, "train": {"steps": 10}}),
            config_toml: "[model]\nn_layers = 2\n",
        }
    }

    #[test]
    fn save_load_keep_last() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], &[3]).unwrap();
        let b =
            Tensor::from_f32(&[0.5, -1.0], &[2], DType::BF16, crate::runtime::Device::Cpu).unwrap();
        let m = Tensor::from_vec(vec![0.25f32; 3], &[3]).unwrap();
        for step in [10, 20, 30] {
            let st = state(step);
            save(
                dir.path(),
                2,
                &snap(&st, &[("w", &w), ("b", &b)], &[("m.w", &m)]),
            )
            .unwrap();
        }
        let steps: Vec<u64> = list(dir.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, vec![20, 30]);
        let l = load(&latest(dir.path()).unwrap().unwrap()).unwrap();
        assert_eq!(l.state, state(30));
        assert_eq!(
            l.model.get("w").unwrap().to_vec::<f32>().unwrap(),
            vec![1.0, 2.0, 3.0]
        );
        assert_eq!(l.model.get("b").unwrap().dtype(), DType::BF16);
        assert_eq!(
            l.optimizer.get("m.w").unwrap().to_vec::<f32>().unwrap(),
            vec![0.25; 3]
        );
        let e = l.optimizer.get("v.w").err().unwrap().to_string();
        assert!(
            e.contains("optimizer.safetensors") && e.contains("v.w"),
            "{e}"
        );
        assert!(l.path.join("config.toml").exists());
    }

    #[test]
    fn failed_save_leaves_previous_intact() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::from_vec(vec![1.0f32; 4], &[4]).unwrap();
        let st = state(1);
        let first = save(dir.path(), 1, &snap(&st, &[("w", &w)], &[])).unwrap();
        let before = std::fs::read(first.join("model.safetensors")).unwrap();
        // A file squatting on the temp directory's name makes the save fail.
        let st2 = state(2);
        std::fs::write(dir.path().join(".step-00000002.tmp"), b"not a directory").unwrap();
        let e = save(dir.path(), 1, &snap(&st2, &[("w", &w)], &[]));
        assert!(e.is_err());
        assert_eq!(latest(dir.path()).unwrap().unwrap(), first);
        assert_eq!(
            std::fs::read(first.join("model.safetensors")).unwrap(),
            before
        );
        load(&first).unwrap();
    }

    #[test]
    fn corrupt_checkpoints_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::from_vec(vec![1.0f32; 4], &[4]).unwrap();
        let st = state(5);
        let p = save(dir.path(), 1, &snap(&st, &[("w", &w)], &[])).unwrap();
        let f = p.join("model.safetensors");
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() - 3]).unwrap();
        let e = load(&p).err().unwrap().to_string();
        assert!(
            e.contains("model.safetensors") && e.contains("corrupt"),
            "{e}"
        );
        std::fs::write(p.join("state.json"), b"{").unwrap();
        let e = load(&p).err().unwrap().to_string();
        assert!(e.contains("state.json is corrupt"), "{e}");
        let e = load(&dir.path().join("nope")).err().unwrap().to_string();
        assert!(e.contains("no such checkpoint"), "{e}");
    }

    #[test]
    fn config_differences_name_the_field() {
        let a =
            serde_json::json!({"model": {"n_layers": 2, "d_model": 64}, "train": {"steps": 10}});
        let b =
            serde_json::json!({"model": {"n_layers": 4, "d_model": 64}, "train": {"steps": 20}});
        assert_eq!(
            config_difference(&a, &b, &["train.steps"]).unwrap(),
            "model.n_layers: checkpoint has 2, config has 4"
        );
        let c =
            serde_json::json!({"model": {"n_layers": 2, "d_model": 64}, "train": {"steps": 20}});
        assert_eq!(config_difference(&a, &c, &["train.steps"]), None);
    }
}
