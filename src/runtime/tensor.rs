//! `Tensor`: a dense row-major array with a shape, a dtype and a device. No strides and no views:
//! ops take the layouts the model needs (e.g. `x: [.., K]` for a linear layer) and write fresh
//! outputs. CPU data is a typed `Vec` or a read-only slice of a memory-mapped safetensors file;
//! CUDA data is a device buffer from the stream-ordered pool (see `cuda::CudaStorage`).

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use half::{bf16, f16};

use super::cuda::CudaStorage;
use super::{DType, Device, Element, Error, FloatElement, Result};

pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    pub(crate) storage: Storage,
}

pub(crate) enum Storage {
    Cpu(CpuStorage),
    Cuda(CudaStorage),
}

pub(crate) enum CpuStorage {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I32(Vec<i32>),
    /// Bytes of a memory-mapped file, aligned for `dtype` (checked when made). Read-only:
    /// the first mutable access copies it into an owned vector.
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len_bytes: usize,
    },
}

static POISON: AtomicBool = AtomicBool::new(false);

/// When on, every op output starts filled with NaN bytes (0x7FC0 repeated: NaN in f32, bf16
/// and f16, a huge id in i32), so a kernel that leaves an element unwritten fails a parity test.
pub fn set_poison_outputs(on: bool) {
    POISON.store(on, Ordering::Relaxed);
}

pub(crate) fn poison_outputs() -> bool {
    POISON.load(Ordering::Relaxed)
}

const POISON_U16: u16 = 0x7FC0;

pub(crate) fn numel_of(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Size of dimension `i`; negative counts from the end (-1 is the last).
    pub fn dim(&self, i: isize) -> usize {
        let r = self.shape.len() as isize;
        let j = if i < 0 { r + i } else { i };
        self.shape[j as usize]
    }
    pub fn numel(&self) -> usize {
        numel_of(&self.shape)
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.ordinal()),
        }
    }
    /// Last dimension (row length) and the number of rows before it.
    pub fn rows_cols(&self) -> (usize, usize) {
        let c = self.shape.last().copied().unwrap_or(1);
        (if c == 0 { 0 } else { self.numel() / c }, c)
    }

    // ---------------------------------------------------------------- construction

    /// A CPU tensor that owns `data`.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        if data.len() != numel_of(shape) {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!("{} elements do not fill shape {shape:?}", data.len()),
            ));
        }
        let storage = CpuStorage::from_vec(data);
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype: T::DTYPE,
            storage: Storage::Cpu(storage),
        })
    }

    /// `data` copied to `device`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize], device: Device) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape)?.to_device(device)
    }

    /// f32 values stored as `dtype` (rounded to nearest) on `device`.
    pub fn from_f32(data: &[f32], shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        let t = Tensor::from_vec(data.to_vec(), shape)?;
        let t = if dtype == DType::F32 {
            t
        } else {
            super::ops::cast(&t, dtype)?
        };
        t.to_device(device)
    }

    /// A tensor over bytes of a memory-mapped file. Falls back to a copy when the bytes are not
    /// aligned for `dtype` (safetensors only promises 8-byte alignment of the data section).
    pub fn from_mmap(
        map: Arc<memmap2::Mmap>,
        offset: usize,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        let len_bytes = numel_of(shape) * dtype.size_in_bytes();
        let end = offset
            .checked_add(len_bytes)
            .filter(|&e| e <= map.len())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "tensor bytes {offset}..{} run past the end of the mapped file ({} bytes)",
                    offset + len_bytes,
                    map.len()
                ))
            })?;
        let bytes = &map[offset..end];
        if (bytes.as_ptr() as usize) % dtype.size_in_bytes() == 0 {
            let storage = Storage::Cpu(CpuStorage::Mapped {
                map,
                offset,
                len_bytes,
            });
            return Ok(Tensor {
                shape: shape.to_vec(),
                dtype,
                storage,
            });
        }
        Tensor::from_bytes(bytes, shape, dtype)
    }

    /// A CPU tensor copied from little-endian bytes.
    pub fn from_bytes(bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Tensor> {
        let want = numel_of(shape) * dtype.size_in_bytes();
        if bytes.len() != want {
            return Err(Error::shape(
                "Tensor::from_bytes",
                format!(
                    "{} bytes given, shape {shape:?} of {dtype} needs {want}",
                    bytes.len()
                ),
            ));
        }
        fn read<T: Element>(bytes: &[u8]) -> Vec<T> {
            bytes
                .chunks_exact(std::mem::size_of::<T>())
                .map(bytemuck::pod_read_unaligned)
                .collect()
        }
        let storage = match dtype {
            DType::F32 => CpuStorage::F32(read(bytes)),
            DType::BF16 => CpuStorage::BF16(read(bytes)),
            DType::F16 => CpuStorage::F16(read(bytes)),
            DType::I32 => CpuStorage::I32(read(bytes)),
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Cpu(storage),
        })
    }

    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        let n = numel_of(shape);
        let storage = match device {
            Device::Cpu => Storage::Cpu(CpuStorage::zeros(dtype, n)),
            Device::Cuda(i) => Storage::Cuda(CudaStorage::zeros(i, n * dtype.size_in_bytes())?),
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage,
        })
    }

    /// An op's output buffer: contents unspecified (NaN-poisoned under `set_poison_outputs`).
    pub fn uninit(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        let n = numel_of(shape);
        let poison = poison_outputs();
        let storage = match device {
            Device::Cpu if poison => Storage::Cpu(CpuStorage::filled_u16(dtype, n, POISON_U16)),
            Device::Cpu => Storage::Cpu(CpuStorage::zeros(dtype, n)),
            Device::Cuda(i) => {
                let bytes = n * dtype.size_in_bytes();
                let s = CudaStorage::alloc(i, bytes)?;
                if poison {
                    s.fill_u16(POISON_U16)?;
                }
                Storage::Cuda(s)
            }
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage,
        })
    }

    /// Same shape, every element `value`.
    pub fn full(shape: &[usize], value: f32, dtype: DType, device: Device) -> Result<Tensor> {
        let n = numel_of(shape);
        let t = match dtype {
            DType::I32 => Tensor::from_vec(vec![value as i32; n], shape)?,
            _ => return Tensor::from_f32(&vec![value; n], shape, dtype, device),
        };
        t.to_device(device)
    }

    /// Normal(0, std²) values from a seeded ChaCha8 stream (Box–Muller), stored as `dtype`.
    pub fn randn(
        shape: &[usize],
        std: f32,
        seed: u64,
        dtype: DType,
        device: Device,
    ) -> Result<Tensor> {
        use rand::{Rng, SeedableRng};
        use rayon::prelude::*;
        // Chunks of 2^20 values, chunk i from ChaCha stream i: parallel, and the same values
        // for any thread count.
        let n = numel_of(shape);
        let mut v = vec![0f32; n];
        v.par_chunks_mut(1 << 20)
            .enumerate()
            .for_each(|(i, chunk)| {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(i as u64);
                for pair in chunk.chunks_mut(2) {
                    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                    let u2: f64 = rng.random();
                    let r = (-2.0 * u1.ln()).sqrt();
                    pair[0] = (r * (std::f64::consts::TAU * u2).cos()) as f32 * std;
                    if let Some(x) = pair.get_mut(1) {
                        *x = (r * (std::f64::consts::TAU * u2).sin()) as f32 * std;
                    }
                }
            });
        Tensor::from_f32(&v, shape, dtype, device)
    }

    /// Deep copy on the same device.
    pub fn try_clone(&self) -> Result<Tensor> {
        let storage = match &self.storage {
            Storage::Cpu(c) => Storage::Cpu(c.to_owned_storage(self.dtype)),
            Storage::Cuda(s) => Storage::Cuda(s.try_clone()?),
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            dtype: self.dtype,
            storage,
        })
    }

    /// Same data, new shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        if numel_of(shape) != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!(
                    "cannot view {:?} ({} elements) as {shape:?}",
                    self.shape,
                    self.numel()
                ),
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        let storage = match (&self.storage, device) {
            (Storage::Cpu(c), Device::Cpu) => Storage::Cpu(c.to_owned_storage(self.dtype)),
            (Storage::Cpu(c), Device::Cuda(i)) => {
                Storage::Cuda(CudaStorage::upload(i, c.bytes(self.dtype))?)
            }
            (Storage::Cuda(s), Device::Cpu) => {
                let bytes = s.download()?;
                return Tensor::from_bytes(&bytes, &self.shape, self.dtype);
            }
            (Storage::Cuda(s), Device::Cuda(i)) if s.ordinal() == i => {
                Storage::Cuda(s.try_clone()?)
            }
            (Storage::Cuda(s), Device::Cuda(i)) => {
                Storage::Cuda(CudaStorage::upload(i, &s.download()?)?)
            }
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            dtype: self.dtype,
            storage,
        })
    }

    /// Overwrites the elements with `data` (same count and dtype), in place: the buffer keeps its
    /// address (inputs of a captured CUDA graph).
    pub fn copy_from_host<T: Element>(&mut self, data: &[T]) -> Result<()> {
        if T::DTYPE != self.dtype || data.len() != self.numel() {
            return Err(Error::Invalid(format!(
                "copy_from_host: {} values of {} into a {:?} {} tensor",
                data.len(),
                T::DTYPE,
                self.shape,
                self.dtype
            )));
        }
        match &mut self.storage {
            Storage::Cpu(_) => {
                self.as_mut_slice::<T>()?.copy_from_slice(data);
                Ok(())
            }
            Storage::Cuda(s) => s.write(bytemuck::cast_slice(data)),
        }
    }

    /// Moves to `device`, without a copy when already there.
    pub fn into_device(self, device: Device) -> Result<Tensor> {
        if self.device() == device {
            Ok(self)
        } else {
            self.to_device(device)
        }
    }

    // ---------------------------------------------------------------- host access

    /// A copy of the elements on the host; `T` must be the tensor's dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.expect_dtype("to_vec", T::DTYPE)?;
        match &self.storage {
            Storage::Cpu(c) => Ok(bytemuck::cast_slice(c.bytes(self.dtype)).to_vec()),
            Storage::Cuda(s) => {
                let bytes = s.download()?;
                Ok(bytes
                    .chunks_exact(std::mem::size_of::<T>())
                    .map(bytemuck::pod_read_unaligned)
                    .collect())
            }
        }
    }

    /// The elements as f32 on the host, from any floating dtype.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        if let Storage::Cuda(s) = &self.storage {
            // Straight from the downloaded bytes: one host pass (the decode loop reads a step's
            // logits this way every token).
            return f32s_from_bytes(&s.download()?, self.dtype);
        }
        match self.dtype {
            DType::F32 => Ok(self.as_slice::<f32>()?.to_vec()),
            DType::BF16 => Ok(self
                .as_slice::<bf16>()?
                .iter()
                .map(|x| x.to_f32())
                .collect()),
            DType::F16 => Ok(self.as_slice::<f16>()?.iter().map(|x| x.to_f32()).collect()),
            DType::I32 => Err(Error::dtype("to_f32_vec", self.dtype, "a floating dtype")),
        }
    }

    /// `to_f32_vec` into a reused buffer (resized to numel): an f32 tensor on the GPU is copied
    /// straight into it. The decode loop reads a step's logits this way.
    pub fn read_f32_into(&self, out: &mut Vec<f32>) -> Result<()> {
        match &self.storage {
            Storage::Cuda(s) if self.dtype == DType::F32 => {
                out.resize(self.numel(), 0.0);
                s.download_into(bytemuck::cast_slice_mut(out.as_mut_slice()))
            }
            _ => {
                *out = self.to_f32_vec()?;
                Ok(())
            }
        }
    }

    /// A single-element tensor's value as f32.
    pub fn scalar_f32(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::shape(
                "scalar_f32",
                format!("shape {:?} is not a scalar", self.shape),
            ));
        }
        Ok(self.to_f32_vec()?[0])
    }

    /// Borrow the elements of a CPU tensor of dtype `T`.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        self.expect_dtype("as_slice", T::DTYPE)?;
        match &self.storage {
            Storage::Cpu(c) => Ok(bytemuck::cast_slice(c.bytes(self.dtype))),
            Storage::Cuda(_) => Err(Error::Invalid(format!(
                "as_slice: tensor lives on {}; copy it to the CPU first",
                self.device()
            ))),
        }
    }

    /// Mutably borrow the elements of a CPU tensor of dtype `T` (a mapped tensor is copied first).
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        self.expect_dtype("as_mut_slice", T::DTYPE)?;
        let dtype = self.dtype;
        match &mut self.storage {
            Storage::Cpu(c) => {
                if matches!(c, CpuStorage::Mapped { .. }) {
                    *c = c.to_owned_storage(dtype);
                }
                Ok(bytemuck::cast_slice_mut(c.bytes_mut()))
            }
            Storage::Cuda(_) => Err(Error::Invalid(
                "as_mut_slice: tensor lives on a GPU; copy it to the CPU first".into(),
            )),
        }
    }

    /// A CPU float tensor's values as f32, borrowed when already f32.
    pub fn cpu_f32(&self) -> Result<std::borrow::Cow<'_, [f32]>> {
        Ok(match self.dtype {
            DType::F32 => std::borrow::Cow::Borrowed(self.as_slice::<f32>()?),
            _ => std::borrow::Cow::Owned(self.to_f32_vec()?),
        })
    }

    pub(crate) fn cuda_storage(&self) -> Option<&CudaStorage> {
        match &self.storage {
            Storage::Cuda(s) => Some(s),
            Storage::Cpu(_) => None,
        }
    }

    pub fn expect_dtype(&self, op: &'static str, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::dtype(op, self.dtype, dtype.name()));
        }
        Ok(())
    }

    pub fn expect_float(&self, op: &'static str) -> Result<()> {
        if !self.dtype.is_float() {
            return Err(Error::dtype(op, self.dtype, "f32, bf16 or f16"));
        }
        Ok(())
    }

    pub fn expect_shape(&self, op: &'static str, what: &str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            return Err(Error::shape(
                op,
                format!("{what} has shape {:?}, expected {shape:?}", self.shape),
            ));
        }
        Ok(())
    }
}

impl CpuStorage {
    fn from_vec<T: Element>(data: Vec<T>) -> CpuStorage {
        // Move the vector into the variant of its dtype without copying.
        let any: Box<dyn std::any::Any> = Box::new(data);
        match T::DTYPE {
            DType::F32 => {
                CpuStorage::F32(*any.downcast::<Vec<f32>>().expect("dtype tag matches type"))
            }
            DType::BF16 => {
                CpuStorage::BF16(*any.downcast::<Vec<bf16>>().expect("dtype tag matches type"))
            }
            DType::F16 => {
                CpuStorage::F16(*any.downcast::<Vec<f16>>().expect("dtype tag matches type"))
            }
            DType::I32 => {
                CpuStorage::I32(*any.downcast::<Vec<i32>>().expect("dtype tag matches type"))
            }
        }
    }

    fn zeros(dtype: DType, n: usize) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![0.0; n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::ZERO; n]),
            DType::F16 => CpuStorage::F16(vec![f16::ZERO; n]),
            DType::I32 => CpuStorage::I32(vec![0; n]),
        }
    }

    fn filled_u16(dtype: DType, n: usize, pattern: u16) -> CpuStorage {
        let word = ((pattern as u32) << 16) | pattern as u32;
        match dtype {
            DType::F32 => CpuStorage::F32(vec![f32::from_bits(word); n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::from_bits(pattern); n]),
            DType::F16 => CpuStorage::F16(vec![f16::from_bits(pattern); n]),
            DType::I32 => CpuStorage::I32(vec![word as i32; n]),
        }
    }

    fn bytes(&self, dtype: DType) -> &[u8] {
        debug_assert!(!matches!(self, CpuStorage::Mapped { .. }) || dtype.size_in_bytes() > 0);
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
            CpuStorage::I32(v) => bytemuck::cast_slice(v),
            CpuStorage::Mapped {
                map,
                offset,
                len_bytes,
            } => &map[*offset..*offset + *len_bytes],
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::F16(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::I32(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::Mapped { .. } => {
                unreachable!("mapped storage is copied before mutable access")
            }
        }
    }

    fn to_owned_storage(&self, dtype: DType) -> CpuStorage {
        match self {
            CpuStorage::F32(v) => CpuStorage::F32(v.clone()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v.clone()),
            CpuStorage::F16(v) => CpuStorage::F16(v.clone()),
            CpuStorage::I32(v) => CpuStorage::I32(v.clone()),
            CpuStorage::Mapped { .. } => {
                let b = self.bytes(dtype);
                match dtype {
                    DType::F32 => CpuStorage::F32(bytemuck::cast_slice(b).to_vec()),
                    DType::BF16 => CpuStorage::BF16(bytemuck::cast_slice(b).to_vec()),
                    DType::F16 => CpuStorage::F16(bytemuck::cast_slice(b).to_vec()),
                    DType::I32 => CpuStorage::I32(bytemuck::cast_slice(b).to_vec()),
                }
            }
        }
    }
}

/// A CPU tensor of `dtype` from f32 values (rounded to nearest even for bf16/f16).
pub(crate) fn cpu_from_f32(values: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    fn conv<T: FloatElement>(v: &[f32]) -> Vec<T> {
        v.iter().map(|&x| T::from_f32(x)).collect()
    }
    match dtype {
        DType::F32 => Tensor::from_vec(values, shape),
        DType::BF16 => Tensor::from_vec(conv::<bf16>(&values), shape),
        DType::F16 => Tensor::from_vec(conv::<f16>(&values), shape),
        DType::I32 => Err(Error::dtype("cpu_from_f32", dtype, "a floating dtype")),
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({:?}, {}, {})",
            self.shape,
            self.dtype,
            self.device()
        )
    }
}

/// Little-endian element bytes of a float dtype as f32 values.
fn f32s_from_bytes(bytes: &[u8], dtype: DType) -> Result<Vec<f32>> {
    Ok(match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(bytemuck::pod_read_unaligned::<f32>)
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bytemuck::pod_read_unaligned::<bf16>(c).to_f32())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| bytemuck::pod_read_unaligned::<f16>(c).to_f32())
            .collect(),
        DType::I32 => return Err(Error::dtype("to_f32_vec", dtype, "a floating dtype")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device download path's conversion matches the CPU tensor's own, per dtype.
    #[test]
    fn f32s_from_bytes_matches_to_f32_vec() {
        let v = vec![1.5f32, -2.25, 3.0e-3, 65504.0, -0.0, 7.0];
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let t = Tensor::from_f32(&v, &[2, 3], dt, Device::Cpu).unwrap();
            let Storage::Cpu(c) = &t.storage else {
                unreachable!()
            };
            assert_eq!(
                f32s_from_bytes(c.bytes(dt), dt).unwrap(),
                t.to_f32_vec().unwrap(),
                "{dt}"
            );
        }
        let i = Tensor::from_vec(vec![1i32, 2], &[2]).unwrap();
        assert!(f32s_from_bytes(&[0u8; 8], DType::I32).is_err());
        assert!(i.to_f32_vec().is_err());
    }

    #[test]
    fn shapes_and_bytes_round_trip() {
        let t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
        assert_eq!(t.rows_cols(), (2, 3));
        assert_eq!(t.dim(-1), 3);
        let b = Tensor::from_bytes(
            bytemuck::cast_slice(t.as_slice::<f32>().unwrap()),
            &[3, 2],
            DType::F32,
        )
        .unwrap();
        assert_eq!(
            b.to_vec::<f32>().unwrap(),
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        assert!(Tensor::from_vec(vec![1.0f32; 5], &[2, 3]).is_err());
        assert!(t.reshape(&[4, 2]).is_err());
    }

    #[test]
    fn poisoned_outputs_are_nan() {
        set_poison_outputs(true);
        for dt in [DType::F32, DType::BF16, DType::F16] {
            let t = Tensor::uninit(&[3], dt, Device::Cpu).unwrap();
            assert!(t.to_f32_vec().unwrap().iter().all(|x| x.is_nan()), "{dt}");
        }
    }
}
