//! Safetensors checkpoints as Hugging Face saves them: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Files are memory-mapped; a tensor kept in its stored dtype on
//! the CPU is a zero-copy view of the mapping, and one bound for the GPU is uploaded straight from
//! it, so the weights are never held twice. Saving writes a temp file and renames it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::tensor::{Dtype as StDtype, SafeTensors};

use super::ModelError;
use crate::runtime::ops;
use crate::runtime::{DType, Device, Tensor};

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    offset: usize,
}

pub struct Checkpoint {
    files: Vec<(PathBuf, Arc<memmap2::Mmap>)>,
    tensors: HashMap<String, Entry>,
}

fn map_dtype(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::BF16 => Some(DType::BF16),
        StDtype::F16 => Some(DType::F16),
        StDtype::I32 => Some(DType::I32),
        _ => None,
    }
}

impl Checkpoint {
    /// Open `dir/model.safetensors` or the shards named by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Checkpoint, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::file(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::file(&index, "missing object `weight_map`"))?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::file(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ));
        };
        let mut ck = Checkpoint {
            files: vec![],
            tensors: HashMap::new(),
        };
        for (fi, path) in files.iter().enumerate() {
            let f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
            // SAFETY: the mapping is read-only; a file changed under us is the user's doing.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| ModelError::io(path, e))?;
            let (header, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
                ModelError::file(
                    path,
                    format!("not a valid safetensors file ({e:?}); is it truncated?"),
                )
            })?;
            let data_start = 8 + header;
            for (name, info) in meta.tensors() {
                let dtype = map_dtype(info.dtype).ok_or_else(|| {
                    ModelError::tensor(
                        path,
                        &name,
                        format!(
                            "dtype {:?} is not supported (f32, bf16, f16, i32)",
                            info.dtype
                        ),
                    )
                })?;
                let (a, b) = info.data_offsets;
                let want = info.shape.iter().product::<usize>() * dtype.size_in_bytes();
                if b - a != want || data_start + b > map.len() {
                    return Err(ModelError::tensor(path, &name, format!("data range {a}..{b} does not fit shape {:?} or runs past the end of the file ({} bytes); the file may be truncated", info.shape, map.len())));
                }
                ck.tensors.insert(
                    name,
                    Entry {
                        file: fi,
                        dtype,
                        shape: info.shape.clone(),
                        offset: data_start + a,
                    },
                );
            }
            ck.files.push((path.clone(), Arc::new(map)));
        }
        Ok(ck)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// The stored dtype of the floating tensors (the first one found), for `--dtype auto`.
    pub fn float_dtype(&self) -> Option<DType> {
        let mut v: Vec<(&String, &Entry)> = self.tensors.iter().collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v.iter().map(|(_, e)| e.dtype).find(|d| d.is_float())
    }

    /// Tensor `name`, checked against `shape`, as `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: Device,
    ) -> Result<Tensor, ModelError> {
        let e = self.tensors.get(name).ok_or_else(|| {
            let files: Vec<String> = self
                .files
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect();
            ModelError::Missing {
                name: name.to_string(),
                files: files.join(", "),
            }
        })?;
        let path = &self.files[e.file].0;
        if e.shape != shape {
            return Err(ModelError::tensor(
                path,
                name,
                format!("has shape {:?}, expected {shape:?}", e.shape),
            ));
        }
        let t = Tensor::from_mmap(self.files[e.file].1.clone(), e.offset, &e.shape, e.dtype)
            .map_err(|err| ModelError::tensor(path, name, err.to_string()))?;
        let t = if e.dtype == dtype {
            t
        } else {
            ops::cast(&t, dtype)?
        };
        Ok(t.into_device(device)?)
    }
}

/// Write `tensors` to `path` as safetensors (temp file, then rename), with `metadata`.
pub fn save(
    path: &Path,
    tensors: &BTreeMap<String, &Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), ModelError> {
    struct Host {
        dtype: StDtype,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    }
    impl safetensors::View for &Host {
        fn dtype(&self) -> StDtype {
            self.dtype
        }
        fn shape(&self) -> &[usize] {
            &self.shape
        }
        fn data(&self) -> std::borrow::Cow<'_, [u8]> {
            std::borrow::Cow::Borrowed(&self.bytes)
        }
        fn data_len(&self) -> usize {
            self.bytes.len()
        }
    }
    let mut host = BTreeMap::new();
    for (name, t) in tensors {
        let t = t.to_device(Device::Cpu)?;
        let (dtype, bytes) = match t.dtype() {
            DType::F32 => (
                StDtype::F32,
                bytemuck::cast_slice(t.as_slice::<f32>()?).to_vec(),
            ),
            DType::BF16 => (
                StDtype::BF16,
                bytemuck::cast_slice(t.as_slice::<half::bf16>()?).to_vec(),
            ),
            DType::F16 => (
                StDtype::F16,
                bytemuck::cast_slice(t.as_slice::<half::f16>()?).to_vec(),
            ),
            DType::I32 => (
                StDtype::I32,
                bytemuck::cast_slice(t.as_slice::<i32>()?).to_vec(),
            ),
        };
        host.insert(
            name.clone(),
            Host {
                dtype,
                shape: t.shape().to_vec(),
                bytes,
            },
        );
    }
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(host.iter().map(|(k, v)| (k.as_str(), v)), metadata, &tmp)
        .map_err(|e| ModelError::file(&tmp, format!("write failed: {e:?}")))?;
    std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))?;
    Ok(())
}
