//! NVRTC compilation of the kernel families in `kernels/*.cu` to a CUBIN for the device's arch,
//! cached on disk under `$MOE_CACHE_DIR` or `~/.cache/moe/kernels`, keyed by a hash of the source,
//! the arch, the options and the NVRTC version. A cache hit costs a file read; a miss compiles
//! (~0.2 s per family) and writes the CUBIN atomically (temp file, then rename).

use std::ffi::CString;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::runtime::{Error, Result};

/// One kernel family: a `.cu` file's name and text (with `common.cuh` prepended when compiled).
pub struct KernelSource {
    pub name: &'static str,
    pub src: &'static str,
}

const COMMON: &str = include_str!("kernels/common.cuh");

const OPTIONS: &[&str] = &["-std=c++17", "-lineinfo", "-default-device"];

/// `MOE_KERNEL_DEFINES`: space-separated `NAME` or `NAME=VALUE` preprocessor definitions added to
/// every kernel family's compile (A/B of compile-time kernel variants in one binary; part of the
/// cache key).
fn extra_defines() -> Result<Vec<String>> {
    std::env::var("MOE_KERNEL_DEFINES").map_or(Ok(Vec::new()), |v| parse_defines(&v))
}

/// `-D` options from a `MOE_KERNEL_DEFINES` value; anything but `NAME` or `NAME=VALUE` (a C
/// identifier, a value of letters, digits, `_ - .`) is refused with the offending word named.
fn parse_defines(v: &str) -> Result<Vec<String>> {
    v.split_whitespace()
        .map(|d| {
            let (name, value) = d.split_once('=').unwrap_or((d, ""));
            let ok = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
            if ok {
                Ok(format!("-D{d}"))
            } else {
                Err(Error::Invalid(format!(
                    "MOE_KERNEL_DEFINES: {d:?} is not NAME or NAME=VALUE (a C identifier; a \
                     value of letters, digits, '_', '-', '.')"
                )))
            }
        })
        .collect()
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

/// Where the CUBIN of `src` for `arch` is cached: keyed by the NVRTC version, the arch, the
/// options, `MOE_KERNEL_DEFINES` and the source.
fn cached_path(src: &KernelSource, arch: &str) -> Result<PathBuf> {
    let version = nvrtc_version()?;
    let defines = extra_defines()?;
    let mut h = Sha256::new();
    h.update(format!("{version:?}|{arch}|{OPTIONS:?}|{defines:?}|").as_bytes());
    h.update(COMMON.as_bytes());
    h.update(src.src.as_bytes());
    let digest = h.finalize();
    let key: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(cache_dir().join(format!("{}-{arch}-{key}.cubin", src.name)))
}

/// The CUBIN of `src` for `arch` (e.g. "sm_90a"), from the disk cache or freshly compiled.
pub(crate) fn compiled_module(src: &KernelSource, arch: &str) -> Result<Vec<u8>> {
    let path = cached_path(src, arch)?;
    if let Ok(bytes) = std::fs::read(&path) {
        if !bytes.is_empty() {
            return Ok(bytes);
        }
    }
    let cubin = compile(src, arch)?;
    // The cache is an optimisation: a read-only or full disk only costs a recompile next time.
    if let Some(dir) = path.parent().filter(|d| std::fs::create_dir_all(d).is_ok()) {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("kernel");
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        if std::fs::write(&tmp, &cubin).is_ok() && std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(cubin)
}

/// Compiles every kernel family for `arch` into the cache (`cache_dir`), families in parallel;
/// returns each family's name, whether it was already cached, and the seconds it took. Needs
/// NVRTC, not a GPU: a deployment (or a test run on a GPU machine) pays the compile beforehand.
pub fn precompile(arch: &str) -> Result<Vec<(&'static str, bool, f64)>> {
    nvrtc_version()?;
    std::thread::scope(|s| {
        let jobs: Vec<_> = super::kernels::ALL
            .iter()
            .map(|src| {
                s.spawn(move || {
                    let t = std::time::Instant::now();
                    let cached = cached_path(src, arch).is_ok_and(|p| p.is_file());
                    compiled_module(src, arch)
                        .map(|_| (src.name, cached, t.elapsed().as_secs_f64()))
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| j.join().expect("compile thread"))
            .collect()
    })
}

/// Compile `src` for `arch` with NVRTC; the error carries NVRTC's log.
pub fn compile(src: &KernelSource, arch: &str) -> Result<Vec<u8>> {
    nvrtc_version()?;
    let defines = extra_defines()?;
    let full = format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", src.name, src.src);
    let c_src = CString::new(full)
        .map_err(|_| Error::Invalid(format!("{}.cu contains a NUL byte", src.name)))?;
    let c_name = CString::new(format!("{}.cu", src.name)).expect("kernel names have no NUL");
    let prog = cudarc::nvrtc::result::create_program(&c_src, Some(&c_name))
        .map_err(|e| Error::cuda("nvrtc", e))?;
    let mut opts: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    opts.push(format!("--gpu-architecture={arch}"));
    opts.extend(defines);
    if std::env::var("MOE_NVRTC_VERBOSE").is_ok_and(|v| v == "1") {
        opts.push("--ptxas-options=-v".into());
    }
    let compiled = unsafe { cudarc::nvrtc::result::compile_program(prog, &opts) };
    let log = unsafe { cudarc::nvrtc::result::get_program_log(prog) }
        .map(|l| l.iter().map(|&c| c as u8 as char).collect::<String>())
        .unwrap_or_default();
    let log = log.trim_end_matches('\0').trim().to_string();
    let out = compiled.map_err(|e| Error::Cuda {
        op: "nvrtc",
        msg: format!("compiling {}.cu for {arch} failed ({e}):\n{log}", src.name),
    });
    let cubin = out.and_then(|_| unsafe {
        let mut size = 0usize;
        cudarc::nvrtc::sys::nvrtcGetCUBINSize(prog, &mut size)
            .result()
            .map_err(|e| Error::cuda("nvrtc", e))?;
        let mut buf = vec![0u8; size];
        cudarc::nvrtc::sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _)
            .result()
            .map_err(|e| Error::cuda("nvrtc", e))?;
        Ok(buf)
    });
    let _ = unsafe { cudarc::nvrtc::result::destroy_program(prog) };
    if std::env::var("MOE_NVRTC_VERBOSE").is_ok_and(|v| v == "1") && !log.is_empty() {
        eprintln!("nvrtc {}.cu ({arch}):\n{log}", src.name);
    }
    cubin
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_defines_are_checked() {
        assert_eq!(
            parse_defines(" MOE_X=3  FLAG _y=a.b-1 ").unwrap(),
            ["-DMOE_X=3", "-DFLAG", "-D_y=a.b-1"]
        );
        assert!(parse_defines("").unwrap().is_empty());
        for bad in ["1X=2", "X=$(rm)", "=3", "A;B", "X=a=b"] {
            let e = parse_defines(bad).unwrap_err().to_string();
            assert!(
                e.contains("MOE_KERNEL_DEFINES") && e.contains(bad),
                "{bad}: {e}"
            );
        }
    }

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
                let cubin = compile(src, arch).unwrap_or_else(|e| panic!("{e}"));
                assert!(cubin.len() > 100, "{}: empty cubin", src.name);
            }
        }
    }
}
