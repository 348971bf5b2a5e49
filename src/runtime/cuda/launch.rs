//! A kernel launch with raw arguments: device addresses, ints and floats, pushed in the order of
//! the kernel's parameter list. Every launch goes on the device's compute stream. The arguments'
//! count and sizes are checked against the kernel's parameters (from its PTX entry, `params.rs`)
//! before every launch: a compare of a few dozen words, 50-90 ns for 20 arguments on a loaded
//! 2-core machine (about what building the driver's pointer array costs); graph replays do not
//! launch again.

use std::ffi::c_void;

use cudarc::driver::sys as dsys;

use super::{CudaDevice, KernelSource};
use crate::runtime::{DType, Error, Result};

/// A kernel parameter's bytes: a scalar or address (`bytes` of 4 or 8, held in 8 so the driver's
/// read of the parameter's size stays inside the slot), or a TMA tensor map (128 bytes, passed by
/// value as a `__grid_constant__` parameter).
enum Slot {
    Word { bits: u64, bytes: u32 },
    Map(Box<TensorMap>),
}

impl Slot {
    /// The size of the parameter this argument is for.
    fn bytes(&self) -> u32 {
        match self {
            Slot::Word { bytes, .. } => *bytes,
            Slot::Map(_) => std::mem::size_of::<TensorMap>() as u32,
        }
    }
}

/// A TMA tensor map (`CUtensorMap`) encoded on the host.
pub(crate) type TensorMap = dsys::CUtensorMap;

pub(crate) struct LaunchBuilder<'a> {
    dev: &'a CudaDevice,
    func: cudarc::driver::CudaFunction,
    kernel: String,
    /// The kernel's parameter sizes in bytes (its PTX entry).
    params: std::sync::Arc<[u32]>,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: u32,
    // One slot per parameter; the driver reads sizeof(param) bytes from each.
    slots: Vec<Slot>,
    pdl: bool,
}

/// Blocks of `block` threads covering `n` items.
pub(crate) fn grid_1d(n: usize, block: u32) -> u32 {
    n.div_ceil(block as usize).max(1) as u32
}

impl CudaDevice {
    /// A launch of `kernel` from family `src` (compiled on first use) on the compute stream; push
    /// its arguments, then `run`.
    ///
    /// # Safety contract
    /// This is a safe function around an unsafe driver call, so the callers keep the contract the
    /// type system cannot: the arguments are pushed in the order and with the types of the kernel's
    /// parameter list (checked against the count and sizes of its PTX entry; a 4-byte `.i32` for an
    /// `int`, `.ptr` for a pointer, `.map` for a tensor map), every address is a device buffer on
    /// this device large enough for what the kernel reads and writes with the given sizes, and
    /// those buffers stay allocated until the kernel has run (buffers freed on the host go back to
    /// the stream-ordered pool behind it, so a tensor dropped after `run` is safe). `grid`, `block`
    /// and `smem` fit the kernel's `__launch_bounds__` and shared memory.
    pub(crate) fn launch(
        &self,
        src: &KernelSource,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
    ) -> Result<LaunchBuilder<'_>> {
        let k = self.function(src, kernel)?;
        Ok(LaunchBuilder {
            dev: self,
            func: k.func,
            kernel: kernel.to_string(),
            params: k.params,
            grid,
            block,
            smem,
            slots: Vec::with_capacity(16),
            pdl: false,
        })
    }
}

impl LaunchBuilder<'_> {
    /// Programmatic dependent launch: the kernel may start while the previous one on the stream
    /// finishes (its launch and the previous kernel's tail overlap; decode graphs are chains of
    /// small kernels). Only for kernels whose first statement is `PDL_ENTRY()`. Taken on sm_90+
    /// unless `MOE_NO_PDL=1`.
    pub fn pdl(mut self) -> Self {
        self.pdl = self.dev.pdl_enabled();
        self
    }
    fn word(mut self, bits: u64, bytes: u32) -> Self {
        self.slots.push(Slot::Word { bits, bytes });
        self
    }
    pub fn ptr(self, p: u64) -> Self {
        self.word(p, 8)
    }
    pub fn i32(self, v: i32) -> Self {
        self.word(v as u32 as u64, 4)
    }
    pub fn usize_as_i32(self, v: usize) -> Result<Self> {
        let v = i32::try_from(v).map_err(|_| {
            Error::Invalid(format!(
                "{}: size {v} does not fit the kernel's 32-bit index",
                self.kernel
            ))
        })?;
        Ok(self.i32(v))
    }
    pub fn i64(self, v: i64) -> Self {
        self.word(v as u64, 8)
    }
    /// A tensor map by value (a `const __grid_constant__ TmaMap` parameter).
    pub fn map(mut self, m: TensorMap) -> Self {
        self.slots.push(Slot::Map(Box::new(m)));
        self
    }
    pub fn f32(self, v: f32) -> Self {
        self.word(v.to_bits() as u64, 4)
    }

    pub fn run(self) -> Result<()> {
        let stream = self.dev.stream.clone();
        let name = self.kernel.clone();
        super::profile::timed(&name, &stream, move || self.run_now())
    }

    fn run_now(mut self) -> Result<()> {
        super::params::check_args(
            &self.kernel,
            &self.params,
            self.slots.iter().map(Slot::bytes),
        )?;
        let f = self.func.cu_function();
        if self.smem > 48 * 1024 {
            unsafe {
                cudarc::driver::result::function::set_function_attribute(
                    f,
                    dsys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    self.smem as i32,
                )
            }
            .map_err(|e| {
                Error::cuda(
                    "launch",
                    format!("{}: shared memory {}: {e}", self.kernel, self.smem),
                )
            })?;
        }
        let mut params: Vec<*mut c_void> = self
            .slots
            .iter_mut()
            .map(|s| match s {
                Slot::Word { bits, .. } => bits as *mut u64 as *mut c_void,
                Slot::Map(m) => &mut **m as *mut TensorMap as *mut c_void,
            })
            .collect();
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(|e| Error::cuda("bind", e))?;
        let launched = if self.pdl {
            let mut attr = dsys::CUlaunchAttribute {
                id:
                    dsys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                pad: [0; 4],
                value: unsafe { std::mem::zeroed() },
            };
            attr.value.programmaticStreamSerializationAllowed = 1;
            let cfg = dsys::CUlaunchConfig {
                gridDimX: self.grid.0,
                gridDimY: self.grid.1,
                gridDimZ: self.grid.2,
                blockDimX: self.block.0,
                blockDimY: self.block.1,
                blockDimZ: self.block.2,
                sharedMemBytes: self.smem,
                hStream: self.dev.stream.cu_stream(),
                attrs: &mut attr,
                numAttrs: 1,
            };
            // SAFETY: `params` holds one pointer per kernel parameter into `self.slots`, alive
            // across the call (the driver copies the values); the rest is `launch`'s contract.
            unsafe {
                dsys::cuLaunchKernelEx(&cfg, f, params.as_mut_ptr(), std::ptr::null_mut()).result()
            }
        } else {
            // SAFETY: as for cuLaunchKernelEx above.
            unsafe {
                cudarc::driver::result::launch_kernel(
                    f,
                    self.grid,
                    self.block,
                    self.smem,
                    self.dev.stream.cu_stream(),
                    &mut params,
                )
            }
        };
        launched.map_err(|e| Error::Cuda {
            op: "launch",
            msg: format!(
                "{} grid {:?} block {:?} smem {}: {e}",
                self.kernel, self.grid, self.block, self.smem
            ),
        })
    }
}

/// A 2-D tensor map over a row-major bf16 or f16 matrix [rows, inner] at device address `ptr`,
/// read in boxes of `box_rows` × `box_inner` elements into 128-byte-swizzled shared memory
/// (`box_inner` · 2 must be 128: one swizzle line per box row). Elements outside the matrix read
/// as zeros.
pub(crate) fn tensor_map_2d(
    ptr: u64,
    dt: DType,
    inner: usize,
    rows: usize,
    box_inner: u32,
    box_rows: u32,
) -> Result<TensorMap> {
    tensor_map(ptr, dt, &[inner, rows], &[box_inner, box_rows])
}

/// A tensor map over a row-major tensor at `ptr` whose dims are given innermost first, moved in
/// boxes `boxes` (innermost first) to or from 128-byte-swizzled shared memory: the innermost box
/// extent must span 128 bytes. Reads outside the tensor give zeros; writes outside are dropped.
pub(crate) fn tensor_map(ptr: u64, dt: DType, dims: &[usize], boxes: &[u32]) -> Result<TensorMap> {
    let bad = |what: &str| Error::Invalid(format!("tensor map {dims:?} of {dt}: {what}"));
    let es = dt.size_in_bytes();
    let cu_dt = match dt {
        DType::BF16 => dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        DType::F16 => dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::F32 => dsys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
        _ => return Err(bad("only bf16, f16 and f32")),
    };
    if dims.is_empty() || dims.len() > 5 || boxes.len() != dims.len() {
        return Err(bad("1 to 5 dims, one box extent each"));
    }
    if boxes[0] as usize * es != 128 || boxes.iter().any(|&b| !(1..=256).contains(&b)) {
        return Err(bad(
            "the inner box extent must span 128 bytes, every extent 1..=256",
        ));
    }
    if (dims[0] * es) % 16 != 0 || ptr % 16 != 0 || dims.iter().any(|&d| d >= 1 << 32) {
        return Err(bad("rows must be 16-byte aligned and dims below 2^32"));
    }
    let mut map: TensorMap = unsafe { std::mem::zeroed() };
    let gdims: Vec<u64> = dims.iter().map(|&d| d.max(1) as u64).collect();
    // Byte strides of dims 1.. (dim 0 is contiguous).
    let strides: Vec<u64> = (1..dims.len())
        .map(|i| (dims[..i].iter().product::<usize>() * es) as u64)
        .collect();
    let elem = vec![1u32; dims.len()];
    unsafe {
        dsys::cuTensorMapEncodeTiled(
            &mut map,
            cu_dt,
            dims.len() as u32,
            ptr as *mut c_void,
            gdims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            dsys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            dsys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            dsys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            dsys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
    }
    .map_err(|e| Error::cuda("cuTensorMapEncodeTiled", e))?;
    Ok(map)
}
