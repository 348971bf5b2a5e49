//! Where a tensor lives: the CPU or one CUDA GPU. `--device auto|cpu|cuda[:n]` resolves here;
//! `auto` picks GPU 0 when the driver and a GPU are present and otherwise says once that it runs
//! on the CPU.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{cuda, Error, Result};

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl Device {
    /// Parse and resolve a device string: `auto`, `cpu`, `cuda`, `cuda:N` (also `gpu`, `gpu:N`).
    pub fn parse(s: &str) -> Result<Device> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::auto()),
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Self::cuda(0, &s),
            _ => {
                let n = s.strip_prefix("cuda:").or_else(|| s.strip_prefix("gpu:"));
                match n.and_then(|n| n.parse::<usize>().ok()) {
                    Some(n) => Self::cuda(n, &s),
                    None => Err(Error::BadDevice(s)),
                }
            }
        }
    }

    /// GPU 0 when one is usable, else the CPU (with a one-time notice on stderr).
    pub fn auto() -> Device {
        match cuda::device_count() {
            Ok(n) if n > 0 => Device::Cuda(0),
            Ok(_) => {
                notice_cpu_fallback("no CUDA GPU found");
                Device::Cpu
            }
            Err(reason) => {
                notice_cpu_fallback(&reason);
                Device::Cpu
            }
        }
    }

    fn cuda(n: usize, requested: &str) -> Result<Device> {
        let count = cuda::device_count().map_err(|reason| Error::CudaUnavailable {
            requested: requested.to_string(),
            reason,
        })?;
        if n >= count {
            return Err(Error::CudaUnavailable {
                requested: requested.to_string(),
                reason: format!("GPU {n} does not exist ({count} visible)"),
            });
        }
        Ok(Device::Cuda(n))
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

fn notice_cpu_fallback(reason: &str) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        eprintln!("moe: {reason}; running on CPU");
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}
