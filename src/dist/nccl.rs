//! The NCCL backend: one process per GPU, a communicator from a unique id that rank 0 makes and
//! shares through the rendezvous store, collectives queued on the device's compute stream
//! (`runtime::cuda`). Each call waits for its own completion by polling the stream and
//! `ncclCommGetAsyncError`; past the group's timeout (or on an async error) the communicator is
//! aborted and the error names the operation and the group's ranks. The all-to-all is grouped
//! `ncclSend`/`ncclRecv` in bytes. The CPU backend (`cpu.rs`) is the reference it is tested against.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys as dsys;
use cudarc::nccl::{result, sys};

use super::{Error, ReduceOp, Result};
use crate::runtime::cuda::{self, CudaDevice};
use crate::runtime::{DType, Device, Tensor};

/// Bytes of an NCCL unique id.
pub(crate) const ID_BYTES: usize = 128;

/// Checks that the NCCL library can be loaded (cudarc's loader panics when it cannot).
pub(crate) fn check_library() -> Result<()> {
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    Err(Error::NcclMissing {
        tried: cudarc::get_lib_name_candidates("nccl").join(", "),
        ld_path: std::env::var("LD_LIBRARY_PATH").unwrap_or_default(),
    })
}

/// A fresh unique id (rank 0 makes it; the others read it from the store).
pub(crate) fn unique_id() -> Result<[u8; ID_BYTES]> {
    check_library()?;
    let id = result::get_uniqueid().map_err(|e| nccl_err("get unique id", e))?;
    Ok(id.internal.map(|c| c as u8))
}

pub(crate) struct NcclComm {
    comm: sys::ncclComm_t,
    dev: Arc<CudaDevice>,
    /// World rank of each member of this communicator, for error messages.
    world_ranks: Vec<usize>,
    timeout: Duration,
    aborted: AtomicBool,
}

// The communicator handle is only used through `&self` calls that the owning `Group` makes one at
// a time; NCCL allows a communicator to move between threads.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Member `rank` of `world_ranks.len()` on GPU `ordinal`. Blocks until every member has called
    /// this (the caller first meets them at the store, so a missing rank fails there with a
    /// timeout instead of hanging here).
    pub(crate) fn init(
        ordinal: usize,
        id: &[u8; ID_BYTES],
        rank: usize,
        world_ranks: Vec<usize>,
        timeout: Duration,
    ) -> Result<NcclComm> {
        check_library()?;
        let dev = cuda::device(ordinal)?;
        dev.context()
            .bind_to_thread()
            .map_err(|e| Error::Runtime(crate::runtime::Error::cuda("bind", e)))?;
        let id = sys::ncclUniqueId {
            internal: id.map(|b| b as ::core::ffi::c_char),
        };
        let mut comm = std::ptr::null_mut();
        unsafe { result::comm_init_rank(&mut comm, world_ranks.len() as i32, id, rank as i32) }
            .map_err(|e| nccl_err("init", e))?;
        Ok(NcclComm {
            comm,
            dev,
            world_ranks,
            timeout,
            aborted: AtomicBool::new(false),
        })
    }

    /// The sub-communicator of the members with the same `color`, ordered by `key`; every member
    /// of this communicator calls it.
    pub(crate) fn split(
        &self,
        color: usize,
        key: usize,
        world_ranks: Vec<usize>,
    ) -> Result<NcclComm> {
        self.bind()?;
        let mut comm = std::ptr::null_mut();
        unsafe {
            sys::ncclCommSplit(
                self.comm,
                color as i32,
                key as i32,
                &mut comm,
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(|e| nccl_err("split", e))?;
        Ok(NcclComm {
            comm,
            dev: self.dev.clone(),
            world_ranks,
            timeout: self.timeout,
            aborted: AtomicBool::new(false),
        })
    }

    pub(crate) fn device(&self) -> Device {
        Device::Cuda(self.dev.ordinal())
    }

    fn bind(&self) -> Result<()> {
        if self.aborted.load(Ordering::Relaxed) {
            return Err(Error::Nccl {
                op: "call",
                msg: "the communicator was aborted after an earlier failure".into(),
            });
        }
        self.dev
            .context()
            .bind_to_thread()
            .map_err(|e| Error::Runtime(crate::runtime::Error::cuda("bind", e)))
    }

    fn stream(&self) -> sys::cudaStream_t {
        self.dev.stream().cu_stream() as sys::cudaStream_t
    }

    fn ptr(&self, op: &'static str, t: &Tensor) -> Result<u64> {
        match t.cuda_storage() {
            Some(s) if s.ordinal() == self.dev.ordinal() => Ok(s.ptr()),
            _ => Err(Error::invalid(
                op,
                format!(
                    "the NCCL group lives on cuda:{} but the tensor is on {}",
                    self.dev.ordinal(),
                    t.device()
                ),
            )),
        }
    }

    fn out(&self, shape: &[usize], dtype: DType) -> Result<(Tensor, u64)> {
        let t = Tensor::uninit(shape, dtype, self.device())?;
        let p = t.cuda_storage().map(|s| s.ptr()).unwrap_or(0);
        Ok((t, p))
    }

    pub(crate) fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let src = self.ptr("all_reduce", t)?;
        let (out, dst) = self.out(t.shape(), t.dtype())?;
        self.bind()?;
        unsafe {
            result::all_reduce(
                src as _,
                dst as _,
                t.numel(),
                nccl_dtype(t.dtype()),
                nccl_op(op, t.dtype())?,
                self.comm,
                self.stream(),
            )
        }
        .map_err(|e| nccl_err("all_reduce", e))?;
        self.wait("all_reduce")?;
        Ok(out)
    }

    /// `t` is `[size * m, ..]`; this member gets rows `[rank * m, (rank + 1) * m)` reduced.
    pub(crate) fn reduce_scatter(
        &self,
        t: &Tensor,
        out_shape: &[usize],
        op: ReduceOp,
    ) -> Result<Tensor> {
        let src = self.ptr("reduce_scatter", t)?;
        let (out, dst) = self.out(out_shape, t.dtype())?;
        self.bind()?;
        unsafe {
            result::reduce_scatter(
                src as _,
                dst as _,
                out.numel(),
                nccl_dtype(t.dtype()),
                nccl_op(op, t.dtype())?,
                self.comm,
                self.stream(),
            )
        }
        .map_err(|e| nccl_err("reduce_scatter", e))?;
        self.wait("reduce_scatter")?;
        Ok(out)
    }

    pub(crate) fn all_gather(&self, t: &Tensor, out_shape: &[usize]) -> Result<Tensor> {
        let src = self.ptr("all_gather", t)?;
        let (out, dst) = self.out(out_shape, t.dtype())?;
        self.bind()?;
        unsafe {
            result::all_gather(
                src as _,
                dst as _,
                t.numel(),
                nccl_dtype(t.dtype()),
                self.comm,
                self.stream(),
            )
        }
        .map_err(|e| nccl_err("all_gather", e))?;
        self.wait("all_gather")?;
        Ok(out)
    }

    pub(crate) fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let src = self.ptr("broadcast", t)?;
        let (out, dst) = self.out(t.shape(), t.dtype())?;
        self.bind()?;
        unsafe {
            result::broadcast(
                src as _,
                dst as _,
                t.numel(),
                nccl_dtype(t.dtype()),
                root as i32,
                self.comm,
                self.stream(),
            )
        }
        .map_err(|e| nccl_err("broadcast", e))?;
        self.wait("broadcast")?;
        Ok(out)
    }

    /// Sends bytes `[send_off[p], send_off[p + 1])` of `t` to member p and receives member p's
    /// bytes into `[recv_off[p], recv_off[p + 1])` of a fresh `out_shape` tensor.
    pub(crate) fn all_to_all(
        &self,
        t: &Tensor,
        send_off: &[usize],
        recv_off: &[usize],
        out_shape: &[usize],
    ) -> Result<Tensor> {
        let src = self.ptr("all_to_all", t)?;
        let (out, dst) = self.out(out_shape, t.dtype())?;
        self.bind()?;
        let u8t = sys::ncclDataType_t::ncclUint8;
        result::group_start().map_err(|e| nccl_err("all_to_all", e))?;
        let mut queued = Ok(result::NcclStatus::Success);
        for p in 0..self.world_ranks.len() {
            let (s0, s1) = (send_off[p], send_off[p + 1]);
            let (r0, r1) = (recv_off[p], recv_off[p + 1]);
            // Zero-byte pairs are skipped on both sides: the counts were agreed before.
            if s1 > s0 {
                queued = queued.and(unsafe {
                    result::send(
                        (src + s0 as u64) as _,
                        s1 - s0,
                        u8t,
                        p as i32,
                        self.comm,
                        self.stream(),
                    )
                });
            }
            if r1 > r0 {
                queued = queued.and(unsafe {
                    result::recv(
                        (dst + r0 as u64) as _,
                        r1 - r0,
                        u8t,
                        p as i32,
                        self.comm,
                        self.stream(),
                    )
                });
            }
        }
        let ended = result::group_end();
        queued.and(ended).map_err(|e| nccl_err("all_to_all", e))?;
        self.wait("all_to_all")?;
        Ok(out)
    }

    /// Waits for the compute stream (so for the collective just queued), polling NCCL's async
    /// error; aborts the communicator on an error or after the timeout.
    fn wait(&self, op: &'static str) -> Result<()> {
        let start = Instant::now();
        loop {
            let status = unsafe { dsys::cuStreamQuery(self.dev.stream().cu_stream()) };
            match status {
                dsys::cudaError_enum::CUDA_SUCCESS => return Ok(()),
                dsys::cudaError_enum::CUDA_ERROR_NOT_READY => {}
                e => {
                    return Err(Error::Runtime(crate::runtime::Error::cuda(
                        op,
                        format!("{e:?}"),
                    )))
                }
            }
            let mut async_err = sys::ncclResult_t::ncclSuccess;
            let _ = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut async_err) };
            if !matches!(
                async_err,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            ) {
                self.abort();
                return Err(Error::Nccl {
                    op,
                    msg: format!(
                        "{} (group of ranks {:?}); the communicator was aborted",
                        error_string(async_err),
                        self.world_ranks
                    ),
                });
            }
            let waited = start.elapsed();
            if waited > self.timeout {
                self.abort();
                return Err(Error::Nccl {
                    op,
                    msg: format!(
                        "did not complete within {:.1} s (a peer among ranks {:?} stalled or \
                         died; parallel.timeout_s sets the limit); the communicator was aborted",
                        self.timeout.as_secs_f64(),
                        self.world_ranks
                    ),
                });
            }
            if waited < Duration::from_millis(2) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    fn abort(&self) {
        if !self.aborted.swap(true, Ordering::Relaxed) {
            let _ = unsafe { result::comm_abort(self.comm) };
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Abort rather than destroy: it never waits for peers that may be gone.
        self.abort();
    }
}

fn nccl_dtype(dtype: DType) -> sys::ncclDataType_t {
    match dtype {
        DType::F32 => sys::ncclDataType_t::ncclFloat32,
        DType::BF16 => sys::ncclDataType_t::ncclBfloat16,
        DType::F16 => sys::ncclDataType_t::ncclFloat16,
        DType::I32 => sys::ncclDataType_t::ncclInt32,
    }
}

fn nccl_op(op: ReduceOp, dtype: DType) -> Result<sys::ncclRedOp_t> {
    Ok(match (op, dtype) {
        (ReduceOp::Sum, _) => sys::ncclRedOp_t::ncclSum,
        (ReduceOp::Avg, DType::I32) => {
            return Err(Error::invalid(
                "reduce",
                "Avg of i32 tensors is not defined; use Sum",
            ))
        }
        (ReduceOp::Avg, _) => sys::ncclRedOp_t::ncclAvg,
    })
}

fn error_string(r: sys::ncclResult_t) -> String {
    let s = unsafe { sys::ncclGetErrorString(r) };
    if s.is_null() {
        return format!("{r:?}");
    }
    let msg = unsafe { std::ffi::CStr::from_ptr(s) }.to_string_lossy();
    format!("{r:?}: {msg}")
}

fn nccl_err(op: &'static str, e: result::NcclError) -> Error {
    Error::Nccl {
        op,
        msg: error_string(e.0),
    }
}
