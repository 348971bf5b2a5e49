//! CUDA graphs: the work a closure issues on a device's compute stream is recorded once and
//! replayed with one launch (decode steps: hundreds of small kernels, no host work between).
//! Inside the closure only stream-ordered work is allowed: kernel launches, cuBLAS calls,
//! stream-ordered allocations and frees, device-to-device copies; host transfers and
//! synchronisations make the capture fail (with an error, never silently).

use cudarc::driver::sys as dsys;

use super::CudaDevice;
use crate::runtime::{Error, Result};

pub struct Graph {
    inner: cudarc::driver::CudaGraph,
}

impl CudaDevice {
    /// Records what `f` issues into a graph; nothing runs until `Graph::launch`.
    pub fn capture<T, E: From<Error>>(
        &self,
        f: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<(T, Graph), E> {
        if super::profile::enabled() {
            return Err(Error::Invalid(
                "CUDA graph capture is off under MOE_PROFILE (it synchronises)".into(),
            )
            .into());
        }
        self.stream
            .begin_capture(dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| Error::cuda("begin capture", e))?;
        let r = f();
        // Always end the capture, so the stream is usable whatever happened inside.
        let g = self
            .stream
            .end_capture(dsys::CUgraphInstantiate_flags(0))
            .map_err(|e| Error::cuda("end capture", e));
        let value = r?;
        let inner = g?.ok_or_else(|| Error::cuda("end capture", "no graph was recorded"))?;
        Ok((value, Graph { inner }))
    }
}

impl Graph {
    /// Replays the recorded work on the compute stream.
    pub fn launch(&self) -> Result<()> {
        self.inner
            .launch()
            .map_err(|e| Error::cuda("graph launch", e))
    }
}
