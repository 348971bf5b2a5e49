//! NVRTC compilation of the kernel families in `kernels/*.cu` to a CUBIN for the device's arch,
//! cached on disk under `$MOE_CACHE_DIR` or `~/.cache/moe/kernels` with the kernels' parameter
//! layouts beside it (`params.rs`), keyed by a hash of the family's source and headers, the arch,
//! the options, the `-D` definitions and the NVRTC version. A hit costs two file reads; a miss
//! compiles (0.1 s to ~30 s per family) and writes both files atomically (temp file, then rename).

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::params::{self, ParamLayouts};
use crate::runtime::{Error, KernelSettings, Result};

/// One kernel family: a `.cu` file's name and text (compiled with `common.cuh` prepended) and the
/// headers it `#include`s by name.
pub struct KernelSource {
    pub name: &'static str,
    pub src: &'static str,
    pub headers: &'static [KernelHeader],
}

/// A header shared by several families (`kernels/*.cuh`), given to NVRTC under its file name.
pub struct KernelHeader {
    pub name: &'static str,
    pub src: &'static str,
}

/// A compiled family: the CUBIN and each kernel's parameter sizes.
pub struct CompiledFamily {
    pub cubin: Vec<u8>,
    pub(crate) params: ParamLayouts,
}

const COMMON: &str = include_str!("kernels/common.cuh");

const OPTIONS: &[&str] = &["-std=c++17", "-lineinfo", "-default-device"];

/// The `-D` definitions every compile gets (`KernelSettings::kernel_defines`, A/B of compile-time
/// kernel variants; part of the cache key).
pub(crate) fn kernel_defines() -> std::sync::Arc<[String]> {
    KernelSettings::current().kernel_defines
}

pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MOE_CACHE_DIR") {
        return PathBuf::from(d).join("kernels");
    }
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("moe")
        .join("kernels")
}

fn nvrtc_version() -> Result<(i32, i32)> {
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(Error::Cuda {
            op: "nvrtc",
            msg: "libnvrtc.so not found: the CUDA runtime compiler is needed to build kernels \
                  (install the CUDA toolkit or the nvidia-cuda-nvrtc wheel and add its lib to LD_LIBRARY_PATH)"
                .into(),
        });
    }
    let (mut major, mut minor) = (0, 0);
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::cuda("nvrtc", e))?;
    Ok((major, minor))
}

/// Where `src` compiled for `arch` is cached, without extension (`.cubin`, `.params`): keyed by
/// the NVRTC version, the arch, the options, the definitions, `common.cuh`, the family's headers
/// and its source.
fn cached_path(src: &KernelSource, arch: &str, defines: &[String]) -> Result<PathBuf> {
    let version = nvrtc_version()?;
    let mut h = Sha256::new();
    h.update(format!("{version:?}|{arch}|{OPTIONS:?}|{defines:?}|").as_bytes());
    h.update(COMMON.as_bytes());
    for header in src.headers {
        h.update(format!("|{}|{}|", header.name, header.src.len()).as_bytes());
        h.update(header.src.as_bytes());
    }
    h.update(src.src.as_bytes());
    let digest = h.finalize();
    let key: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(cache_dir().join(format!("{}-{arch}-{key}", src.name)))
}

fn read_cached(path: &Path) -> Option<CompiledFamily> {
    let cubin = std::fs::read(path.with_extension("cubin")).ok()?;
    let text = std::fs::read_to_string(path.with_extension("params")).ok()?;
    let params = params::from_text(&text)?;
    (!cubin.is_empty() && !params.is_empty()).then_some(CompiledFamily { cubin, params })
}

/// Writes `bytes` to `path` through a temp file and a rename; false if any step failed.
fn write_atomic(path: &Path, bytes: &[u8]) -> bool {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return false;
    };
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let ok = std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, path).is_ok();
    if !ok {
        let _ = std::fs::remove_file(&tmp);
    }
    ok
}

/// `src` compiled for `arch` (e.g. "sm_90a") with `defines`, from the disk cache or freshly
/// compiled.
pub(crate) fn compiled_module(
    src: &KernelSource,
    arch: &str,
    defines: &[String],
) -> Result<CompiledFamily> {
    let path = cached_path(src, arch, defines)?;
    if let Some(hit) = read_cached(&path) {
        return Ok(hit);
    }
    let compiled = compile(src, arch, defines)?;
    // The cache is an optimisation: a read-only or full disk only costs a recompile next time.
    // The layouts land first, so a CUBIN on disk always has its layouts beside it.
    if path
        .parent()
        .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
        && write_atomic(
            &path.with_extension("params"),
            params::to_text(&compiled.params).as_bytes(),
        )
    {
        write_atomic(&path.with_extension("cubin"), &compiled.cubin);
    }
    Ok(compiled)
}

/// Compiles every kernel family for `arch` into the cache (`cache_dir`), families in parallel;
/// returns each family's name, whether it was already cached, and the seconds it took. Needs
/// NVRTC, not a GPU: a deployment (or a test run on a GPU machine) pays the compile beforehand.
pub fn precompile(arch: &str) -> Result<Vec<(&'static str, bool, f64)>> {
    nvrtc_version()?;
    let defines = kernel_defines();
    let defines = &defines;
    std::thread::scope(|s| {
        let jobs: Vec<_> = super::kernels::ALL
            .iter()
            .map(|src| {
                s.spawn(move || {
                    let t = std::time::Instant::now();
                    let cached =
                        cached_path(src, arch, defines).is_ok_and(|p| read_cached(&p).is_some());
                    compiled_module(src, arch, defines)
                        .map(|_| (src.name, cached, t.elapsed().as_secs_f64()))
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().expect("compile thread"))
            .collect()
    })
}

/// The bytes of an NVRTC output (CUBIN or PTX) through its size and copy calls.
fn nvrtc_output(
    prog: cudarc::nvrtc::sys::nvrtcProgram,
    size: unsafe fn(
        cudarc::nvrtc::sys::nvrtcProgram,
        *mut usize,
    ) -> cudarc::nvrtc::sys::nvrtcResult,
    copy: unsafe fn(
        cudarc::nvrtc::sys::nvrtcProgram,
        *mut c_char,
    ) -> cudarc::nvrtc::sys::nvrtcResult,
) -> Result<Vec<u8>> {
    let mut n = 0usize;
    // SAFETY: `prog` was compiled successfully; the buffer holds the `n` bytes NVRTC reports.
    unsafe {
        size(prog, &mut n)
            .result()
            .map_err(|e| Error::cuda("nvrtc", e))?;
        let mut buf = vec![0u8; n];
        copy(prog, buf.as_mut_ptr() as *mut c_char)
            .result()
            .map_err(|e| Error::cuda("nvrtc", e))?;
        Ok(buf)
    }
}

/// Compile `src` for `arch` with NVRTC: the CUBIN, and the parameter layouts from the PTX. The
/// error carries NVRTC's log.
pub fn compile(src: &KernelSource, arch: &str, defines: &[String]) -> Result<CompiledFamily> {
    use cudarc::nvrtc::sys;
    nvrtc_version()?;
    let cstr = |what: &str, s: String| {
        CString::new(s).map_err(|_| Error::Invalid(format!("{what} contains a NUL byte")))
    };
    let file = format!("{}.cu", src.name);
    let full = cstr(&file, format!("{COMMON}\n#line 1 \"{file}\"\n{}", src.src))?;
    let c_name = cstr(&file, file.clone())?;
    let header_srcs = src
        .headers
        .iter()
        .map(|h| cstr(h.name, h.src.to_string()))
        .collect::<Result<Vec<_>>>()?;
    let header_names = src
        .headers
        .iter()
        .map(|h| cstr(h.name, h.name.to_string()))
        .collect::<Result<Vec<_>>>()?;
    let srcs: Vec<*const c_char> = header_srcs.iter().map(|h| h.as_ptr()).collect();
    let names: Vec<*const c_char> = header_names.iter().map(|h| h.as_ptr()).collect();
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is a NUL-terminated string alive until the call returns (NVRTC copies
    // them); `srcs` and `names` have `headers.len()` entries.
    unsafe {
        sys::nvrtcCreateProgram(
            &mut prog,
            full.as_ptr(),
            c_name.as_ptr(),
            src.headers.len() as i32,
            srcs.as_ptr(),
            names.as_ptr(),
        )
    }
    .result()
    .map_err(|e| Error::cuda("nvrtc", e))?;
    let mut opts: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.push(format!("--gpu-architecture={arch}"));
    opts.extend(defines.iter().cloned());
    if std::env::var("MOE_NVRTC_VERBOSE").is_ok_and(|v| v == "1") {
        opts.push("--ptxas-options=-v".into());
    }
    let compiled = unsafe { cudarc::nvrtc::result::compile_program(prog, &opts) };
    let log = unsafe { cudarc::nvrtc::result::get_program_log(prog) }
        .map(|l| l.iter().map(|&c| c as u8 as char).collect::<String>())
        .unwrap_or_default();
    let log = log.trim_end_matches('\0').trim().to_string();
    let out = compiled
        .map_err(|e| Error::Cuda {
            op: "nvrtc",
            msg: format!("compiling {file} for {arch} failed ({e}):\n{log}"),
        })
        .and_then(|_| {
            let cubin = nvrtc_output(prog, sys::nvrtcGetCUBINSize, sys::nvrtcGetCUBIN)?;
            let ptx = nvrtc_output(prog, sys::nvrtcGetPTXSize, sys::nvrtcGetPTX)?;
            let ptx = String::from_utf8_lossy(&ptx);
            let params = params::from_ptx(ptx.trim_end_matches('\0'))
                .map_err(|e| Error::Invalid(format!("{file} for {arch}: {e}")))?;
            Ok(CompiledFamily { cubin, params })
        });
    let _ = unsafe { cudarc::nvrtc::result::destroy_program(prog) };
    if std::env::var("MOE_NVRTC_VERBOSE").is_ok_and(|v| v == "1") && !log.is_empty() {
        eprintln!("nvrtc {file} ({arch}):\n{log}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel family compiles for Hopper (sm_90a) and Ampere (sm_80). Needs only NVRTC
    /// (e.g. the nvidia-cuda-nvrtc wheel on LD_LIBRARY_PATH), not a GPU; skipped without it.
    #[test]
    fn all_kernel_families_compile() {
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            eprintln!("skipped: libnvrtc not found");
            return;
        }
        for arch in ["sm_90a", "sm_80"] {
            for src in super::super::kernels::ALL {
                let c = compile(src, arch, &[]).unwrap_or_else(|e| panic!("{e}"));
                assert!(c.cubin.len() > 100, "{}: empty cubin", src.name);
                assert!(!c.params.is_empty(), "{}: no kernel entries", src.name);
            }
        }
    }
}
