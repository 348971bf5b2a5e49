//! Kernel settings: every choice between kernel variants, in one struct.
//!
//! `KernelSettings::current()` is what the ops and the decode plan consult: a value set for the
//! calling thread by `KernelSettings::scoped` (tests run both sides of a choice in one binary), or
//! else the process default — the code's defaults, with the `MOE_*` environment read once
//! (`from_env`; an unknown `MOE_*` name gets a warning). Users and operators set config fields,
//! CLI flags and the few names README.md lists (profiling, CUDA graphs); the other names exist
//! for developers' A/B runs and are listed in DEVELOPING.md.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

/// Which kernel variant each op runs. Defaults are the measured winners (BENCHMARKS.md); the
/// other sides are fallbacks a shape or a device reaches, kept switchable so a test can run them
/// on any GPU and a developer can A/B them. Cloning allocates nothing (the one list is shared):
/// ops read `current()` once per call, per-launch checks use `read`.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelSettings {
    /// Profile every kernel (synchronised timing; `MOE_PROFILE=1`).
    pub profile: bool,
    /// Decode steps as CUDA graphs (`MOE_CUDA_GRAPHS=0` turns them off).
    pub cuda_graphs: bool,
    /// Greedy decoding chains its steps on the GPU (`MOE_GREEDY_CHAIN=0`: host loop).
    pub greedy_chain: bool,
    /// Programmatic dependent launch on sm_90+ (`MOE_NO_PDL=1` turns it off; older GPUs never
    /// use it).
    pub pdl: bool,
    /// 16-byte row kernels where rows allow (`MOE_NO_V8=1`: the one-element kernels that odd or
    /// unaligned rows take).
    pub v8: bool,
    /// Fused flash attention in training/prefill (`MOE_NO_FLASH=1`: the materialised path that
    /// f32 and other head dims take).
    pub flash: bool,
    /// Extra `-D` definitions for every kernel compile (`MOE_KERNEL_DEFINES`), already checked.
    pub kernel_defines: Arc<[String]>,

    // Grouped GEMM (training, prefill).
    /// Hopper: the mma.sync kernels other GPUs run instead of wgmma (`MOE_GG_KERNEL=mma`).
    pub gg_mma_on_hopper: bool,
    /// Hopper: TMA warp-specialised kernels (`MOE_GG_TMA=0`: the cp.async wgmma kernels that
    /// unaligned bases take).
    pub gg_tma: bool,
    /// Weight gradients through the ping-pong TMA kernel (`MOE_GG_PINGPONG=0`: the cooperative
    /// one, which accumulating with sums of squares takes).
    pub gg_pingpong: bool,

    // Decode.
    /// Tensor-core small-M kernels (`MOE_SMALL_MMA=0`: the CUDA-core kernel that f32, single
    /// rows and K not a multiple of 32 take).
    pub small_mma: bool,
    /// Served experts slot by slot for few-row steps (`MOE_NO_SERVE_SLOTS=1`: dispatch path).
    pub serve_slots: bool,
    /// Served softmax router as one kernel (`MOE_FUSED_ROUTER=0`: GEMV + route).
    pub fused_router: bool,
    /// Router folded through the RMSNorm and o projection (`MOE_ROUTER_FOLD=0`).
    pub router_fold: bool,
    /// Residual add + RMSNorm folded into the next kernel (`MOE_FOLD_NORMS=0`: own kernels).
    pub fold_norms: bool,
    /// One-row q/k/v projection as a streaming loop (`MOE_QKV_LOOP=0`: one block per column
    /// group, as hidden sizes over 4096 run).
    pub qkv_loop: bool,
    /// Served gate/up (with the norm) as a streaming loop (`MOE_SERVE_UP_LOOP=0`: one block per
    /// column group, as hidden sizes over 4096 run).
    pub serve_up_loop: bool,
    /// Decode attention with q/k norm, RoPE and the K/V write fused (`MOE_ATTN_FUSED_ROPE=0`:
    /// separate kernels, as head dims other than 128 run).
    pub attn_fused_rope: bool,
    /// Head-dim-128 decode attention kernels (`MOE_ATTN_H128=0`: the general kernel).
    pub attn_h128: bool,
    /// Separate split-KV combine kernel (`MOE_ATTN_COMBINE_KERNEL=1`; also taken past the
    /// device's arrival counters).
    pub attn_combine_kernel: bool,
    /// Two-kernel greedy arg-max (`MOE_ARGMAX_TWO_PASS=1`; also taken past the device's arrival
    /// counters).
    pub argmax_two_pass: bool,
}

impl Default for KernelSettings {
    fn default() -> Self {
        KernelSettings {
            profile: false,
            cuda_graphs: true,
            greedy_chain: true,
            pdl: true,
            v8: true,
            flash: true,
            kernel_defines: Arc::from([]),
            gg_mma_on_hopper: false,
            gg_tma: true,
            gg_pingpong: true,
            small_mma: true,
            serve_slots: true,
            fused_router: true,
            router_fold: true,
            fold_norms: true,
            qkv_loop: true,
            serve_up_loop: true,
            attn_fused_rope: true,
            attn_h128: true,
            attn_combine_kernel: false,
            argmax_two_pass: false,
        }
    }
}

/// The `MOE_*` names read elsewhere (not kernel choices): not warned about. The product reads
/// the first four; the tests and scripts the others.
const OTHER_NAMES: &[&str] = &[
    "MOE_CACHE_DIR",
    "MOE_DISABLE_CUDA",
    "MOE_LOG",
    "MOE_NVRTC_VERBOSE",
    "MOE_REQUIRE_GPU",
    "MOE_SEED",
    "MOE_BIN",
    "MOE_NVRTC_LIB",
];

thread_local! {
    static SCOPED: RefCell<Option<KernelSettings>> = const { RefCell::new(None) };
}

impl KernelSettings {
    /// The defaults with the environment `vars` applied; unknown `MOE_*` names and unparsable
    /// values are returned as warnings (the value keeps its default).
    pub fn from_vars<I: IntoIterator<Item = (String, String)>>(vars: I) -> (Self, Vec<String>) {
        let mut s = KernelSettings::default();
        let mut warnings = Vec::new();
        for (name, value) in vars {
            if !name.starts_with("MOE_") || OTHER_NAMES.contains(&name.as_str()) {
                continue;
            }
            if let Err(e) = s.apply(&name, &value) {
                warnings.push(e);
            }
        }
        (s, warnings)
    }

    /// The defaults with the process environment applied, read once; warnings are logged.
    pub fn from_env() -> &'static KernelSettings {
        static ENV: OnceLock<KernelSettings> = OnceLock::new();
        ENV.get_or_init(|| {
            let (s, warnings) = Self::from_vars(std::env::vars());
            for w in warnings {
                tracing::warn!("{w}");
            }
            s
        })
    }

    /// The settings in force on this thread: those of an enclosing `scoped` call, else `from_env`.
    pub fn current() -> KernelSettings {
        Self::read(KernelSettings::clone)
    }

    /// `f` of the settings in force on this thread, without a copy: for per-launch reads (~6 ns
    /// against ~50 for `current()`'s copy, measured on this project's 2-core CI machine).
    pub fn read<R>(f: impl FnOnce(&KernelSettings) -> R) -> R {
        SCOPED.with(|c| match &*c.borrow() {
            Some(s) => f(s),
            None => f(Self::from_env()),
        })
    }

    /// Runs `f` with `self` as this thread's settings (restored afterwards, also on panic).
    pub fn scoped<R>(self, f: impl FnOnce() -> R) -> R {
        struct Restore(Option<KernelSettings>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let prev = self.0.take();
                SCOPED.with(|c| *c.borrow_mut() = prev);
            }
        }
        let prev = SCOPED.with(|c| c.borrow_mut().replace(self));
        let _restore = Restore(prev);
        f()
    }

    fn apply(&mut self, name: &str, v: &str) -> Result<(), String> {
        let flag = |on: &str| v == on;
        match name {
            "MOE_PROFILE" => self.profile = flag("1"),
            "MOE_CUDA_GRAPHS" => self.cuda_graphs = v != "0",
            "MOE_GREEDY_CHAIN" => self.greedy_chain = v != "0",
            "MOE_NO_PDL" => self.pdl = !flag("1"),
            "MOE_NO_V8" => self.v8 = !flag("1"),
            "MOE_NO_FLASH" => self.flash = !flag("1"),
            "MOE_KERNEL_DEFINES" => self.kernel_defines = parse_defines(v)?.into(),
            "MOE_GG_KERNEL" => self.gg_mma_on_hopper = v == "mma",
            "MOE_GG_TMA" => self.gg_tma = v != "0",
            "MOE_GG_PINGPONG" => self.gg_pingpong = v != "0",
            "MOE_SMALL_MMA" => self.small_mma = v != "0",
            "MOE_NO_SERVE_SLOTS" => self.serve_slots = !flag("1"),
            "MOE_FUSED_ROUTER" => self.fused_router = v != "0",
            "MOE_ROUTER_FOLD" => self.router_fold = v != "0",
            "MOE_FOLD_NORMS" => self.fold_norms = v != "0",
            "MOE_QKV_LOOP" => self.qkv_loop = v != "0",
            "MOE_SERVE_UP_LOOP" => self.serve_up_loop = v != "0",
            "MOE_ATTN_FUSED_ROPE" => self.attn_fused_rope = v != "0",
            "MOE_ATTN_H128" => self.attn_h128 = v != "0",
            "MOE_ATTN_COMBINE_KERNEL" => self.attn_combine_kernel = flag("1"),
            "MOE_ARGMAX_TWO_PASS" => self.argmax_two_pass = flag("1"),
            _ => return Err(format!("unknown setting {name} (ignored)")),
        }
        Ok(())
    }
}

/// `-D` options from a `MOE_KERNEL_DEFINES` value; anything but `NAME` or `NAME=VALUE` (a C
/// identifier, a value of letters, digits, `_ - .`) is refused with the offending word named.
pub fn parse_defines(v: &str) -> Result<Vec<String>, String> {
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
                Err(format!(
                    "MOE_KERNEL_DEFINES: {d:?} is not NAME or NAME=VALUE (a C identifier; a \
                     value of letters, digits, '_', '-', '.')"
                ))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn environment_overrides_defaults_and_warns_on_unknown_names() {
        let (s, w) = KernelSettings::from_vars(vars(&[
            ("MOE_NO_PDL", "1"),
            ("MOE_QKV_LOOP", "0"),
            ("MOE_ARGMAX_TWO_PASS", "1"),
            ("MOE_KERNEL_DEFINES", "A=1 B"),
            ("MOE_CACHE_DIR", "/tmp/x"),
            ("MOE_NO_SUCH_THING", "1"),
            // A removed experiment: warned about like any unknown name.
            ("MOE_DECODE_CHUNK", "64"),
            ("MOE_KERNEL_DEFINES", "1A"),
            ("PATH", "/bin"),
        ]));
        let want = KernelSettings {
            pdl: false,
            qkv_loop: false,
            argmax_two_pass: true,
            kernel_defines: vec!["-DA=1".to_string(), "-DB".to_string()].into(),
            ..KernelSettings::default()
        };
        assert_eq!(s, want, "a bad value keeps the one before");
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].contains("unknown setting MOE_NO_SUCH_THING"), "{w:?}");
        assert!(w[1].contains("unknown setting MOE_DECODE_CHUNK"), "{w:?}");
        assert!(w[2].contains("\"1A\""), "{w:?}");
    }

    #[test]
    fn scoped_settings_apply_to_this_thread_only_and_are_restored() {
        let base = KernelSettings::current();
        let s = KernelSettings {
            argmax_two_pass: !base.argmax_two_pass,
            ..base.clone()
        };
        KernelSettings::scoped(s.clone(), || {
            assert_eq!(KernelSettings::current(), s);
            assert_eq!(
                KernelSettings::read(|c| c.argmax_two_pass),
                s.argmax_two_pass
            );
            let other = std::thread::spawn(KernelSettings::current).join().unwrap();
            assert_eq!(other, base);
        });
        assert_eq!(KernelSettings::current(), base);
    }

    #[test]
    fn defines_are_checked() {
        assert_eq!(parse_defines("A=1 _B").unwrap(), vec!["-DA=1", "-D_B"]);
        assert!(parse_defines("1A").unwrap_err().contains("\"1A\""));
    }
}
