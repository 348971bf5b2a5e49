//! The CUDA backend: one `CudaDevice` per GPU (context, compute stream, cuBLAS handle, compiled
//! kernel modules) and `CudaStorage`, a device buffer from the driver's stream-ordered memory pool.
//!
//! Allocation goes through `cuMemAllocAsync` on the compute stream with the pool's release
//! threshold raised to "never", so freed blocks stay cached in the pool and a steady-state step
//! makes no cudaMalloc calls (and stays capturable in a CUDA graph). Kernels are CUDA C in
//! `kernels/*.cu`, one family per file, each compiled by NVRTC for the device's arch at its first
//! use and cached on disk with its kernels' parameter layouts (see `compile.rs`, `params.rs`). Everything is loaded at run time: a machine without a driver builds and
//! runs the same binary on the CPU.

mod blas;
mod compile;
pub mod graph;
pub mod kernels;
mod launch;
mod params;
pub mod profile;

pub(crate) use blas::gemm_bf16_or_f32 as blas_gemm;
pub(crate) use blas::{GemmArgs, GemmOperand};
pub use compile::{cache_dir, compile, precompile, CompiledFamily, KernelHeader, KernelSource};
pub(crate) use launch::{grid_1d, tensor_map, tensor_map_2d, LaunchBuilder};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys as dsys;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, HostSlice,
    PinnedHostSlice,
};

use super::{Error, Result};

/// Number of usable CUDA GPUs, or why there are none (no driver library, no device, init failure).
pub fn device_count() -> std::result::Result<usize, String> {
    static COUNT: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
    COUNT
        .get_or_init(|| {
            if std::env::var("MOE_DISABLE_CUDA").is_ok_and(|v| v == "1") {
                return Err("CUDA disabled by MOE_DISABLE_CUDA=1".into());
            }
            // Without the driver library cudarc's dynamic loader would panic on first use.
            if !unsafe { dsys::is_culib_present() } {
                return Err("no CUDA driver (libcuda.so) found".into());
            }
            match CudaContext::device_count() {
                Ok(n) => Ok(n.max(0) as usize),
                Err(e) => Err(format!("CUDA driver present but unusable: {e}")),
            }
        })
        .clone()
}

/// One GPU: its context, the compute stream every op is issued on, a cuBLAS handle bound to that
/// stream, and the kernel modules compiled for its arch.
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: String,
    sm_count: usize,
    blas: Mutex<blas::BlasHandle>,
    modules: Mutex<HashMap<&'static str, LoadedFamily>>,
    functions: Mutex<HashMap<&'static str, HashMap<String, Kernel>>>,
    counters: OnceLock<CudaSlice<i32>>,
}

/// A loaded kernel and its parameters' sizes in bytes (checked against every launch's arguments).
#[derive(Clone)]
pub(crate) struct Kernel {
    pub func: CudaFunction,
    pub params: Arc<[u32]>,
}

/// A family's loaded module and its kernels' parameter sizes.
type LoadedFamily = (Arc<CudaModule>, Arc<params::ParamLayouts>);

/// How many arrival counters `CudaDevice::arrival_counters` holds.
pub(crate) const ARRIVAL_COUNTERS: usize = 1 << 16;

/// The device object for GPU `ordinal`, created on first use.
pub fn device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
    let mut map = DEVICES
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| poisoned())?;
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = Arc::new(CudaDevice::new(ordinal)?);
    map.insert(ordinal, d.clone());
    Ok(d)
}

fn poisoned() -> Error {
    Error::Invalid("a CUDA device lock was poisoned by an earlier panic".into())
}

impl CudaDevice {
    fn new(ordinal: usize) -> Result<CudaDevice> {
        let count = device_count().map_err(|reason| Error::CudaUnavailable {
            requested: format!("cuda:{ordinal}"),
            reason,
        })?;
        if ordinal >= count {
            return Err(Error::CudaUnavailable {
                requested: format!("cuda:{ordinal}"),
                reason: format!("{count} GPU(s) visible"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::cuda("context", e))?;
        // One compute stream per device; ordering between streams uses explicit events, so
        // cudarc's per-buffer event tracking is pure overhead here.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| Error::cuda("stream", e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| Error::cuda("arch", e))?;
        // sm_90a unlocks Hopper-only instructions (wgmma); other archs compile for themselves.
        let arch = if (major, minor) == (9, 0) {
            "sm_90a".to_string()
        } else {
            format!("sm_{major}{minor}")
        };
        let sm_count = ctx
            .attribute(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| Error::cuda("attribute", e))? as usize;
        keep_freed_memory_in_pool(&ctx)?;
        let blas = blas::BlasHandle::new(&stream)?;
        Ok(CudaDevice {
            ordinal,
            ctx,
            stream,
            arch,
            sm_count,
            blas: Mutex::new(blas),
            modules: Mutex::new(HashMap::new()),
            functions: Mutex::new(HashMap::new()),
            counters: OnceLock::new(),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn arch(&self) -> &str {
        &self.arch
    }
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }
    /// Whether launches may use programmatic dependent launch (`LaunchBuilder::pdl`): sm_90 and
    /// newer, unless the `pdl` setting is off.
    pub fn pdl_enabled(&self) -> bool {
        let major: u32 = self
            .arch
            .trim_start_matches("sm_")
            .trim_end_matches('a')
            .parse::<u32>()
            .map_or(0, |v| v / 10);
        major >= 9 && crate::runtime::KernelSettings::read(|s| s.pdl)
    }
    /// The address of `ARRIVAL_COUNTERS` zeroed i32 kept for the device's lifetime, for kernels
    /// whose blocks count their arrivals (the last block of a group does the group's final step
    /// and sets its counter back to zero, so the buffer is all zeros between kernels; kernels on
    /// the one compute stream never overlap their use). None while the stream is being captured
    /// into a graph and the buffer does not exist yet: creating it would record its memset.
    pub(crate) fn arrival_counters(&self) -> Result<Option<u64>> {
        if let Some(c) = self.counters.get() {
            return Ok(Some(c.device_ptr(&self.stream).0));
        }
        let mut status = dsys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        unsafe { dsys::cuStreamIsCapturing(self.stream.cu_stream(), &mut status) }
            .result()
            .map_err(|e| Error::cuda("stream capture status", e))?;
        if status != dsys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
            return Ok(None);
        }
        let buf = self
            .stream
            .alloc_zeros::<i32>(ARRIVAL_COUNTERS)
            .map_err(|e| Error::cuda("alloc", e))?;
        let c = self.counters.get_or_init(|| buf);
        Ok(Some(c.device_ptr(&self.stream).0))
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown GPU".into())
    }

    /// Wait for all work issued on the compute stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| Error::cuda("synchronize", e))
    }

    /// Kernel `name` from `src`, its family compiled (or loaded from the disk cache) on first use,
    /// with the `kernel_defines` in force then (the family stays loaded with them).
    pub(crate) fn function(&self, src: &KernelSource, name: &str) -> Result<Kernel> {
        if let Some(k) = self
            .functions
            .lock()
            .map_err(|_| poisoned())?
            .get(src.name)
            .and_then(|m| m.get(name))
        {
            return Ok(k.clone());
        }
        let (module, layouts) = {
            let mut modules = self.modules.lock().map_err(|_| poisoned())?;
            match modules.get(src.name) {
                Some(m) => m.clone(),
                None => {
                    let compiled =
                        compile::compiled_module(src, &self.arch, &compile::kernel_defines())?;
                    self.ctx
                        .bind_to_thread()
                        .map_err(|e| Error::cuda("bind", e))?;
                    let m = self
                        .ctx
                        .load_module(cudarc::nvrtc::Ptx::from_binary(compiled.cubin))
                        .map_err(|e| Error::cuda("load_module", e))?;
                    let entry = (m, Arc::new(compiled.params));
                    modules.insert(src.name, entry.clone());
                    entry
                }
            }
        };
        let func = module.load_function(name).map_err(|e| Error::Cuda {
            op: "load_function",
            msg: format!("kernel '{name}' in {}.cu: {e}", src.name),
        })?;
        let params = layouts.get(name).cloned().ok_or_else(|| {
            Error::Invalid(format!(
                "kernel '{name}' in {}.cu: no parameter list in its PTX",
                src.name
            ))
        })?;
        let k = Kernel { func, params };
        self.functions
            .lock()
            .map_err(|_| poisoned())?
            .entry(src.name)
            .or_default()
            .insert(name.to_string(), k.clone());
        Ok(k)
    }

    pub(crate) fn with_blas<R>(&self, f: impl FnOnce(&blas::BlasHandle) -> Result<R>) -> Result<R> {
        let h = self.blas.lock().map_err(|_| poisoned())?;
        f(&h)
    }

    /// Bytes currently held by the stream-ordered pool (in use plus cached).
    pub fn pool_reserved_bytes(&self) -> Result<u64> {
        let mut v: u64 = 0;
        unsafe {
            let pool = cudarc::driver::result::device::get_default_mem_pool(self.ctx.cu_device())
                .map_err(|e| Error::cuda("mem pool", e))?;
            cudarc::driver::result::mem_pool::get_attribute(
                pool,
                dsys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
                &mut v as *mut u64 as *mut _,
            )
            .map_err(|e| Error::cuda("mem pool", e))?;
        }
        Ok(v)
    }
}

fn keep_freed_memory_in_pool(ctx: &Arc<CudaContext>) -> Result<()> {
    unsafe {
        let pool = cudarc::driver::result::device::get_default_mem_pool(ctx.cu_device())
            .map_err(|e| Error::cuda("mem pool", e))?;
        let mut threshold: u64 = u64::MAX;
        cudarc::driver::result::mem_pool::set_attribute(
            pool,
            dsys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut _,
        )
        .map_err(|e| Error::cuda("mem pool", e))
    }
}

/// A device buffer of `len` bytes. `ptr` is its raw address, read once at allocation: kernels
/// take raw pointers and every op is ordered on the one compute stream.
/// Page-locked host memory that a device tensor is copied into without blocking the host
/// (`fetch`, ordered after the work queued before it); `wait_i32` blocks until that copy has
/// landed. For results read back while later work is already queued (chained greedy decode
/// steps: step t's ids come back while step t + 1 runs).
pub struct HostReadback {
    buf: PinnedHostSlice<u8>,
    /// Recorded after each fetch's copy (the context does not track events for us).
    landed: cudarc::driver::CudaEvent,
    stream: Arc<CudaStream>,
}

impl HostReadback {
    /// Room for `bytes` bytes, pinned in `ordinal`'s context.
    pub fn new(ordinal: usize, bytes: usize) -> Result<HostReadback> {
        let dev = device(ordinal)?;
        // Cached (not write-combined) pages: the host reads them.
        let buf = unsafe { dev.ctx.alloc_pinned_with_flags::<u8>(bytes, 0) }
            .map_err(|e| Error::cuda("alloc pinned", e))?;
        let landed = dev
            .ctx
            .new_event(Some(dsys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| Error::cuda("event", e))?;
        Ok(HostReadback {
            buf,
            landed,
            stream: dev.stream.clone(),
        })
    }
    /// Queues the copy of `t` (a CUDA tensor of exactly this buffer's size).
    pub fn fetch(&mut self, t: &crate::runtime::Tensor) -> Result<()> {
        let s = t
            .cuda_storage()
            .ok_or_else(|| Error::Invalid("HostReadback::fetch of a CPU tensor".into()))?;
        s.download_async(&mut self.buf)?;
        self.landed
            .record(&self.stream)
            .map_err(|e| Error::cuda("event record", e))
    }
    /// Waits for the last fetch and returns its bytes as i32.
    pub fn wait_i32(&self) -> Result<Vec<i32>> {
        self.landed
            .synchronize()
            .map_err(|e| Error::cuda("readback", e))?;
        let b = self
            .buf
            .as_slice()
            .map_err(|e| Error::cuda("readback", e))?;
        Ok(b.chunks_exact(4)
            .map(bytemuck::pod_read_unaligned)
            .collect())
    }
}

pub struct CudaStorage {
    buf: CudaSlice<u8>,
    ptr: u64,
    len: usize,
    dev: Arc<CudaDevice>,
}

impl CudaStorage {
    pub(crate) fn alloc(ordinal: usize, len: usize) -> Result<CudaStorage> {
        let dev = device(ordinal)?;
        // The pool rejects zero-byte requests; empty tensors get a small block.
        let buf = unsafe { dev.stream.alloc::<u8>(len.max(16)) }.map_err(|e| Error::Cuda {
            op: "alloc",
            msg: format!("{len} bytes on cuda:{ordinal}: {e}"),
        })?;
        let (ptr, _) = buf.device_ptr(&dev.stream);
        Ok(CudaStorage { buf, ptr, len, dev })
    }

    pub(crate) fn zeros(ordinal: usize, len: usize) -> Result<CudaStorage> {
        let s = Self::alloc(ordinal, len)?;
        unsafe { cudarc::driver::result::memset_d8_async(s.ptr, 0, len, s.dev.stream.cu_stream()) }
            .map_err(|e| Error::cuda("memset", e))?;
        Ok(s)
    }

    pub(crate) fn upload(ordinal: usize, bytes: &[u8]) -> Result<CudaStorage> {
        let mut s = Self::alloc(ordinal, bytes.len())?;
        if !bytes.is_empty() {
            let stream = s.dev.stream.clone();
            let mut dst = s.buf.slice_mut(..bytes.len());
            stream
                .memcpy_htod(bytes, &mut dst)
                .map_err(|e| Error::cuda("upload", e))?;
        }
        Ok(s)
    }

    /// Overwrites the first `bytes.len()` bytes from the host, ordered on the compute stream.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.len() > self.len {
            return Err(Error::Invalid(format!(
                "write of {} bytes into a {}-byte buffer",
                bytes.len(),
                self.len
            )));
        }
        if !bytes.is_empty() {
            let stream = self.dev.stream.clone();
            let mut dst = self.buf.slice_mut(..bytes.len());
            stream
                .memcpy_htod(bytes, &mut dst)
                .map_err(|e| Error::cuda("upload", e))?;
        }
        Ok(())
    }

    /// Copy to the host; waits for the stream.
    pub(crate) fn download(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.len];
        self.download_into(&mut out)?;
        Ok(out)
    }

    /// Copy to a host buffer of exactly `len` bytes (a caller's reused buffer: no fresh pages to
    /// fault in per call); waits for the stream.
    pub(crate) fn download_into(&self, out: &mut [u8]) -> Result<()> {
        self.download_async(out)?;
        self.dev.synchronize()
    }

    /// Queues a copy into a host buffer of exactly `len` bytes on the compute stream and returns
    /// at once (page-locked memory: `HostReadback`, whose event marks its arrival).
    pub(crate) fn download_async<D: HostSlice<u8> + ?Sized>(&self, out: &mut D) -> Result<()> {
        if out.len() != self.len {
            return Err(Error::Invalid(format!(
                "download of a {}-byte buffer into {} bytes",
                self.len,
                out.len()
            )));
        }
        if self.len > 0 {
            let src = self.buf.slice(..self.len);
            self.dev
                .stream
                .memcpy_dtoh(&src, out)
                .map_err(|e| Error::cuda("download", e))?;
        }
        Ok(())
    }

    pub(crate) fn try_clone(&self) -> Result<CudaStorage> {
        let s = Self::alloc(self.dev.ordinal, self.len)?;
        self.copy_to(&s, 0, 0, self.len)?;
        Ok(s)
    }

    /// Copy `len` bytes from `self[src_off..]` to `dst[dst_off..]` on the compute stream.
    pub(crate) fn copy_to(
        &self,
        dst: &CudaStorage,
        src_off: usize,
        dst_off: usize,
        len: usize,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        if src_off + len > self.len || dst_off + len > dst.len {
            return Err(Error::Invalid(format!(
                "device copy of {len} bytes out of range ({src_off}/{} -> {dst_off}/{})",
                self.len, dst.len
            )));
        }
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst.ptr + dst_off as u64,
                self.ptr + src_off as u64,
                len,
                self.dev.stream.cu_stream(),
            )
        }
        .map_err(|e| Error::cuda("copy", e))
    }

    pub(crate) fn fill_u16(&self, pattern: u16) -> Result<()> {
        unsafe {
            dsys::cuMemsetD16Async(self.ptr, pattern, self.len / 2, self.dev.stream.cu_stream())
                .result()
        }
        .map_err(|e| Error::cuda("memset", e))?;
        Ok(())
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn ordinal(&self) -> usize {
        self.dev.ordinal
    }
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }
}
