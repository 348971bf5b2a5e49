//! Timing for benchmarks: CUDA events around device work (no host clock on asynchronous work),
//! a monotonic clock on the CPU.

use std::time::Instant;

use cudarc::driver::CudaEvent;

use crate::runtime::{cuda, Device, Error, Result};

pub enum Timer {
    Cpu(Option<Instant>),
    Cuda {
        start: CudaEvent,
        end: CudaEvent,
        dev: std::sync::Arc<cuda::CudaDevice>,
    },
}

impl Timer {
    pub fn new(device: Device) -> Result<Timer> {
        match device {
            Device::Cpu => Ok(Timer::Cpu(None)),
            Device::Cuda(i) => {
                let dev = cuda::device(i)?;
                let ev = || {
                    dev.context()
                        .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                        .map_err(|e| Error::cuda("event", e))
                };
                Ok(Timer::Cuda {
                    start: ev()?,
                    end: ev()?,
                    dev: dev.clone(),
                })
            }
        }
    }

    /// Milliseconds taken by `f` (device time between events on the compute stream for CUDA).
    pub fn time(&mut self, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        match self {
            Timer::Cpu(t) => {
                *t = Some(Instant::now());
                f()?;
                Ok(t.expect("set above").elapsed().as_secs_f64() * 1e3)
            }
            Timer::Cuda { start, end, dev } => {
                start
                    .record(dev.stream())
                    .map_err(|e| Error::cuda("event", e))?;
                f()?;
                end.record(dev.stream())
                    .map_err(|e| Error::cuda("event", e))?;
                end.synchronize().map_err(|e| Error::cuda("event", e))?;
                Ok(start.elapsed_ms(end).map_err(|e| Error::cuda("event", e))? as f64)
            }
        }
    }
}

/// Median of `reps` timings of `f` after `warmup` untimed calls.
pub fn median_ms(
    device: Device,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut timer = Timer::new(device)?;
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        ts.push(timer.time(&mut f)?);
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[ts.len() / 2])
}
