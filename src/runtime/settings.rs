//! Kernel settings: every choice between kernel variants, in one struct.
//!
//! `KernelSettings::current()` is what the ops and the decode plan consult: a value set for the
//! calling thread by `KernelSettings::scoped` (tests run both sides of a choice in one binary), or
//! else the process default — the code's defaults, with the `MOE_*` environment read once
//! (`from_env`; an unknown `MOE_*` name gets a warning). Users and operators set config fields
//! and CLI flags; the environment names here exist for developers' A/B runs (DEVELOPING.md).

use std::cell::RefCell;
use std::sync::OnceLock;

/// Which kernel variant each op runs. Defaults are the measured winners (BENCHMARKS.md); the
/// other sides exist as fallbacks a shape or a device can reach, or for A/B runs.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelSettings {
    /// Profile every kernel (synchronised timing; `MOE_PROFILE=1`).
    pub profile: bool,
    /// Decode steps as CUDA graphs (`MOE_CUDA_GRAPHS=0` turns them off).
    pub cuda_graphs: bool,
    /// Greedy decoding chains its steps on the GPU (`MOE_GREEDY_CHAIN=0`: host loop).
    pub greedy_chain: bool,
    /// Programmatic dependent launch on sm_90+ (`MOE_NO_PDL=1` turns it off).
    pub pdl: bool,
    /// 16-byte row kernels where rows allow (`MOE_NO_V8=1` turns them off).
    pub v8: bool,
    /// Fused flash attention in training/prefill (`MOE_NO_FLASH=1`: materialised path).
    pub flash: bool,
    /// Extra `-D` definitions for every kernel compile (`MOE_KERNEL_DEFINES`), already checked.
    pub kernel_defines: Vec<String>,

    // Grouped GEMM (training, prefill).
    /// Hopper: the mma.sync kernels instead of wgmma (`MOE_GG_KERNEL=mma`).
    pub gg_mma_on_hopper: bool,
    /// Hopper: TMA warp-specialised kernels (`MOE_GG_TMA=0`: cp.async wgmma).
    pub gg_tma: bool,
    /// Weight gradients through the ping-pong TMA kernel (`MOE_GG_PINGPONG=0`: cooperative).
    pub gg_pingpong: bool,
    /// Strip height of the TMA VARM schedule in m-tiles (`MOE_GG_SWIZZLE`).
    pub gg_swizzle: i32,
    /// One row threshold for the TMA weight gradient, replacing the rule (`MOE_GG_TMA_WGRAD_ROWS`).
    pub gg_tma_wgrad_rows: Option<usize>,
    /// Every n-th ping-pong accumulating tile through loads/stores, replacing the rule (`MOE_GG_PP_LDG`).
    pub gg_pp_ldg: Option<i32>,
    /// The cp.async kernel reading through the permutation instead of gathering (`MOE_GG_GATHERED=1`).
    pub gg_gathered: bool,

    // Decode.
    /// Tensor-core small-M kernels (`MOE_SMALL_MMA=0`: CUDA-core kernel).
    pub small_mma: bool,
    /// Forced K split of the tensor-core small-M kernels (`MOE_SMALL_MMA_KS`, 1/2/4).
    pub small_mma_ks: Option<usize>,
    /// Served experts slot by slot for few-row steps (`MOE_NO_SERVE_SLOTS=1`: dispatch path).
    pub serve_slots: bool,
    /// Served softmax router as one kernel (`MOE_FUSED_ROUTER=0`: GEMV + route).
    pub fused_router: bool,
    /// Router folded through the RMSNorm and o projection (`MOE_ROUTER_FOLD=0`).
    pub router_fold: bool,
    /// Residual add + RMSNorm folded into the next kernel (`MOE_FOLD_NORMS=0`: own kernels).
    pub fold_norms: bool,
    /// q/k/v GEMV folds the RMSNorm into its products (`MOE_QKV_NORM_FOLD=0`: norm pass).
    pub qkv_norm_fold: bool,
    /// One-row q/k/v streaming loop: (blocks per SM, columns per group); None: per-group kernels
    /// (`MOE_QKV_LOOP`, `MOE_QKV_LOOP_COLS`).
    pub qkv_loop: Option<(usize, usize)>,
    /// Served gate/up streaming loop: (blocks per SM, columns per group); None: per-group kernels
    /// (`MOE_SERVE_UP_LOOP`, `MOE_SERVE_UP_LOOP_COLS`).
    pub serve_up_loop: Option<(usize, usize)>,
    /// Served expert kernels' shapes `cCuUdD` (`MOE_SERVE_KERNELS`); None: the defaults.
    pub serve_kernels: Option<String>,
    /// Router K slices in o_route (`MOE_OROUTE_SLICES`); None: one 16-byte vector per thread.
    pub oroute_slices: Option<usize>,
    /// Decode attention with q/k norm, RoPE and the K/V write fused (`MOE_ATTN_FUSED_ROPE=0`).
    pub attn_fused_rope: bool,
    /// Head-dim-128 decode attention kernels (`MOE_ATTN_H128=0`: general kernel).
    pub attn_h128: bool,
    /// Separate split-KV combine kernel (`MOE_ATTN_COMBINE_KERNEL=1`).
    pub attn_combine_kernel: bool,
    /// Keys per split of the decode attention (`MOE_DECODE_CHUNK`, a multiple of 32).
    pub decode_chunk: usize,
    /// Two-kernel greedy arg-max (`MOE_ARGMAX_TWO_PASS=1`).
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
            kernel_defines: Vec::new(),
            gg_mma_on_hopper: false,
            gg_tma: true,
            gg_pingpong: true,
            gg_swizzle: 8,
            gg_tma_wgrad_rows: None,
            gg_pp_ldg: None,
            gg_gathered: false,
            small_mma: true,
            small_mma_ks: None,
            serve_slots: true,
            fused_router: true,
            router_fold: true,
            fold_norms: true,
            qkv_norm_fold: true,
            qkv_loop: Some((4, 4)),
            serve_up_loop: Some((4, 2)),
            serve_kernels: None,
            oroute_slices: None,
            attn_fused_rope: true,
            attn_h128: true,
            attn_combine_kernel: false,
            decode_chunk: 128,
            argmax_two_pass: false,
        }
    }
}

/// The `MOE_*` names read elsewhere (not kernel choices): not warned about.
const OTHER_NAMES: &[&str] = &[
    "MOE_CACHE_DIR",
    "MOE_DISABLE_CUDA",
    "MOE_LOG",
    "MOE_NVRTC_VERBOSE",
    "MOE_REQUIRE_GPU",
    "MOE_BIN",
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
        s.finish_loops();
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
        SCOPED
            .with(|c| c.borrow().clone())
            .unwrap_or_else(|| Self::from_env().clone())
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
        let num = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{name}={v:?}: expected a non-negative integer"))
        };
        match name {
            "MOE_PROFILE" => self.profile = flag("1"),
            "MOE_CUDA_GRAPHS" => self.cuda_graphs = v != "0",
            "MOE_GREEDY_CHAIN" => self.greedy_chain = v != "0",
            "MOE_NO_PDL" => self.pdl = !flag("1"),
            "MOE_NO_V8" => self.v8 = !flag("1"),
            "MOE_NO_FLASH" => self.flash = !flag("1"),
            "MOE_KERNEL_DEFINES" => self.kernel_defines = parse_defines(v)?,
            "MOE_GG_KERNEL" => self.gg_mma_on_hopper = v == "mma",
            "MOE_GG_TMA" => self.gg_tma = v != "0",
            "MOE_GG_PINGPONG" => self.gg_pingpong = v != "0",
            "MOE_GG_SWIZZLE" => {
                self.gg_swizzle = num(v)?.max(1) as i32;
            }
            "MOE_GG_TMA_WGRAD_ROWS" => self.gg_tma_wgrad_rows = Some(num(v)?),
            "MOE_GG_PP_LDG" => self.gg_pp_ldg = Some(num(v)? as i32),
            "MOE_GG_GATHERED" => self.gg_gathered = flag("1"),
            "MOE_SMALL_MMA" => self.small_mma = v != "0",
            "MOE_SMALL_MMA_KS" => {
                let k = num(v)?;
                if ![1, 2, 4].contains(&k) {
                    return Err(format!("{name}={v:?}: expected 1, 2 or 4"));
                }
                self.small_mma_ks = Some(k);
            }
            "MOE_NO_SERVE_SLOTS" => self.serve_slots = !flag("1"),
            "MOE_FUSED_ROUTER" => self.fused_router = v != "0",
            "MOE_ROUTER_FOLD" => self.router_fold = v != "0",
            "MOE_FOLD_NORMS" => self.fold_norms = v != "0",
            "MOE_QKV_NORM_FOLD" => self.qkv_norm_fold = v != "0",
            "MOE_QKV_LOOP" => self.qkv_loop = loop_blocks(self.qkv_loop, (4, 4), num(v)?),
            "MOE_QKV_LOOP_COLS" => {
                self.qkv_loop = loop_cols(self.qkv_loop, (4, 4), num(v)?, &[4, 8], name)?
            }
            "MOE_SERVE_UP_LOOP" => {
                self.serve_up_loop = loop_blocks(self.serve_up_loop, (4, 2), num(v)?)
            }
            "MOE_SERVE_UP_LOOP_COLS" => {
                self.serve_up_loop = loop_cols(self.serve_up_loop, (4, 2), num(v)?, &[2, 4], name)?
            }
            "MOE_SERVE_KERNELS" => self.serve_kernels = Some(v.to_string()),
            "MOE_OROUTE_SLICES" => self.oroute_slices = Some(num(v)?.max(1)),
            "MOE_ATTN_FUSED_ROPE" => self.attn_fused_rope = v != "0",
            "MOE_ATTN_H128" => self.attn_h128 = v != "0",
            "MOE_ATTN_COMBINE_KERNEL" => self.attn_combine_kernel = flag("1"),
            "MOE_DECODE_CHUNK" => {
                let c = num(v)?;
                if c < 32 || c % 32 != 0 {
                    return Err(format!("{name}={v:?}: expected a multiple of 32"));
                }
                self.decode_chunk = c;
            }
            "MOE_ARGMAX_TWO_PASS" => self.argmax_two_pass = flag("1"),
            _ => return Err(format!("unknown setting {name} (ignored)")),
        }
        Ok(())
    }

    /// A loop's blocks-per-SM 0 means "off"; kept as Some((0, c)) while parsing so a later
    /// `_COLS` does not turn it back on, then turned into None here.
    fn finish_loops(&mut self) {
        for l in [&mut self.qkv_loop, &mut self.serve_up_loop] {
            if matches!(l, Some((0, _))) {
                *l = None;
            }
        }
    }
}

fn loop_blocks(
    cur: Option<(usize, usize)>,
    def: (usize, usize),
    b: usize,
) -> Option<(usize, usize)> {
    let c = cur.unwrap_or(def).1;
    Some((b, c))
}

fn loop_cols(
    cur: Option<(usize, usize)>,
    def: (usize, usize),
    c: usize,
    allowed: &[usize],
    name: &str,
) -> Result<Option<(usize, usize)>, String> {
    if !allowed.contains(&c) {
        return Err(format!("{name}={c}: expected one of {allowed:?}"));
    }
    Ok(Some((cur.unwrap_or(def).0, c)))
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
            ("MOE_QKV_LOOP_COLS", "8"),
            ("MOE_SERVE_UP_LOOP_COLS", "4"),
            ("MOE_CACHE_DIR", "/tmp/x"),
            ("MOE_NO_SUCH_THING", "1"),
            ("MOE_DECODE_CHUNK", "100"),
            ("PATH", "/bin"),
        ]));
        assert!(!s.pdl);
        assert_eq!(s.qkv_loop, None, "0 blocks per SM turns the loop off");
        assert_eq!(s.serve_up_loop, Some((4, 4)));
        assert_eq!(s.decode_chunk, 128, "a bad value keeps the default");
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().any(|m| m.contains("MOE_NO_SUCH_THING")));
        assert!(w.iter().any(|m| m.contains("MOE_DECODE_CHUNK")));
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
