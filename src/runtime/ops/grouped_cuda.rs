//! CUDA launchers for the grouped GEMMs (kernels in `cuda/kernels/grouped_*.cu`, the small-M ones
//! in `gemv.cu`) and the served decode path's routers and experts (`serve_router.cu`,
//! `serve_experts.cu`); the CPU twins and the contract are in `grouped.rs`. bf16/f16 with every
//! contiguous dimension a multiple of 8 take the tensor-core kernels; f32 and odd shapes take the
//! SIMT fallback. Variant choices come from `KernelSettings::current()`, read once per op call.

use std::sync::Arc;

use super::dptr;
use crate::runtime::cuda::{grid_1d, kernels, tensor_map, tensor_map_2d, CudaDevice};
use crate::runtime::{DType, Error, KernelSettings, Result, Tensor};

const BM: usize = 128;
const BN: usize = 128;
/// 4 stages × (128×32 + 128×32) × 2 bytes.
const SMEM: u32 = 4 * (128 * 32 + 128 * 32) * 2;
/// Hopper wgmma kernels: 128×256 tiles, 4 stages × (128×64 + 256×64) × 2 bytes, plus 1 KB to
/// align the swizzled stage buffers to 1024 bytes.
const WG_BN: usize = 256;
const WG_SMEM: u32 = 4 * (128 * 64 + 256 * 64) * 2 + 1024;

/// The tiled grouped-GEMM family: on Hopper the wgmma kernels ("wg"; `gg_mma_on_hopper` picks
/// the mma.sync ones), elsewhere the mma.sync kernels ("gg").
/// (name prefix, N tile, dynamic shared memory)
fn tiled_family(dev: &CudaDevice, s: &KernelSettings) -> (&'static str, usize, u32) {
    if dev.arch() == "sm_90a" && !s.gg_mma_on_hopper {
        ("wg", WG_BN, WG_SMEM)
    } else {
        ("gg", BN, SMEM)
    }
}

fn tensor_cores(dt: DType, dims: &[usize]) -> bool {
    matches!(dt, DType::BF16 | DType::F16) && dims.iter().all(|d| d % 8 == 0)
}

/// Output columns per block of the small-M kernels.
pub(crate) const SMALL_COLS: usize = 8;

/// The small-M kernels' rows per chunk (1, 2, 4 or 8) for about `rows` rows per group.
pub(crate) fn small_rows(rows: usize) -> usize {
    rows.clamp(1, 8).next_power_of_two()
}

/// The tensor-core small-M kernels' K split: 1, 2 or 4 warps per 16-column tile (a block covers
/// 64 / split columns) — the largest that leaves each warp at least one full round of loads
/// (8 chunks of 32 k; 4 with four row tiles). Returns (split, columns per block).
fn small_mma_split(k: usize, tiles: usize) -> (usize, usize) {
    let round = if tiles >= 4 { 4 } else { 8 };
    let ks = [4, 2]
        .into_iter()
        .find(|&ks| k / (32 * ks) >= round)
        .unwrap_or(1);
    (ks, 64 / ks)
}

/// The tensor-core small-M kernels (`gg_mma_small_t*`) for about `rows` rows per group: their
/// 8-row tiles per pass (1, 2 or 4), or `None` where the CUDA-core kernel is used — f32, K not a
/// multiple of 32, or single rows (the CUDA-core GEMV reads the same bytes with less work per
/// byte). `small_mma` off takes the CUDA-core kernel everywhere.
fn small_mma_tiles(s: &KernelSettings, dt: DType, k: usize, rows: usize) -> Option<usize> {
    if !s.small_mma || !matches!(dt, DType::BF16 | DType::F16) || k % 32 != 0 || rows < 2 {
        return None;
    }
    Some(match rows {
        0..=4 => 1,
        5..=10 => 2,
        _ => 4,
    })
}

/// Whether x [m, k]·W[e]ᵀ over `e` groups takes the small-M kernels (decode: a few rows per
/// group) rather than the tiled ones. (Up to 16 rows per group through the tensor-core variant
/// was 3% slower than the tiled kernels at OLMoE's batch 64: 6.66 vs 6.45 ms per step.)
fn small_m(dt: DType, m: usize, n: usize, k: usize, e: usize) -> bool {
    m > 0 && n > 0 && k % (16 / dt.size_in_bytes()) == 0 && (m <= 64 || m <= 4 * e)
}

pub(crate) fn grouped_matmul(
    dev: &Arc<CudaDevice>,
    x: &Tensor,
    w: &Tensor,
    offsets: &Tensor,
    trans_w: bool,
    n: usize,
) -> Result<Tensor> {
    let (m, k) = (x.dim(0), x.dim(1));
    let e = offsets.numel() - 1;
    let dt = x.dtype().name();
    let s = KernelSettings::current();
    // Few rows per group (decode): the memory-bound small-M kernel reads each active expert's
    // weights once instead of a mostly empty 128-row tile per column block.
    if trans_w && small_m(x.dtype(), m, n, k, e) {
        let mean = m.div_ceil(e.max(1));
        let mma = small_mma_tiles(&s, x.dtype(), k, mean);
        let y = Tensor::zeros(&[m, n], x.dtype(), x.device())?;
        // At most min(E, M) groups hold rows: one grid row per possibly non-empty group.
        let groups = e.min(m) as u32;
        let launch = match mma {
            Some(tiles) => {
                let (ks, cols) = small_mma_split(k, tiles);
                dev.launch(
                    &kernels::GEMV,
                    &format!("gg_mma_small_t{tiles}_k{ks}_{dt}"),
                    (n.div_ceil(cols) as u32, groups, 1),
                    (128, 1, 1),
                    0,
                )?
            }
            // Rows per chunk: about the mean rows per group (groups beyond it loop over chunks).
            None => dev.launch(
                &kernels::GEMV,
                &format!("gg_small_nt_r{}_{dt}", small_rows(mean)),
                (n.div_ceil(SMALL_COLS) as u32, groups, 1),
                (256, 1, 1),
                0,
            )?,
        };
        launch
            .pdl()
            .ptr(dptr(&y))
            .ptr(dptr(x))
            .ptr(dptr(w))
            .ptr(dptr(offsets))
            .usize_as_i32(e)?
            .usize_as_i32(n)?
            .usize_as_i32(k)?
            .run()?;
        return Ok(y);
    }
    let y = Tensor::uninit(&[m, n], x.dtype(), x.device())?;
    if m == 0 || n == 0 {
        return Ok(y);
    }
    if tensor_cores(x.dtype(), &[k, n]) {
        if !tma_varm(dev, &s, &y, x, w, offsets, trans_w)? {
            let prefix_name = tiled_family(dev, &s).0;
            let name = format!("{prefix_name}_{}_{dt}", if trans_w { "nt" } else { "nn" });
            launch_tiled_varm(dev, &s, &name, &y, x, w, offsets, n)?;
        }
    } else {
        dev.launch(
            &kernels::GROUPED_SIMT,
            &format!("gg_simt_varm_{dt}"),
            (grid_1d(m * n, 256).min(65535 * 8), 1, 1),
            (256, 1, 1),
            0,
        )?
        .ptr(dptr(&y))
        .ptr(dptr(x))
        .ptr(dptr(w))
        .ptr(dptr(offsets))
        .usize_as_i32(e)?
        .usize_as_i32(m)?
        .usize_as_i32(n)?
        .usize_as_i32(k)?
        .i32(trans_w as i32)
        .run()?;
    }
    Ok(y)
}

/// out [E, P, Q] = (out if `accumulate`) + per group a[rows]ᵀ · b[rows]; out is f32 or a's dtype.
pub(crate) fn grouped_matmul_tn_into(
    dev: &Arc<CudaDevice>,
    out: &mut Tensor,
    a: &Tensor,
    b: &Tensor,
    offsets: &Tensor,
    accumulate: bool,
    sumsq: Option<&mut Tensor>,
) -> Result<()> {
    let (p, q) = (a.dim(1), b.dim(1));
    let e = offsets.numel() - 1;
    let out_dtype = out.dtype();
    let same = out_dtype == a.dtype();
    if !same && out_dtype != DType::F32 {
        return Err(Error::dtype(
            "grouped_matmul_tn",
            out_dtype,
            format!("f32 or the input dtype {}", a.dtype()),
        ));
    }
    if e * p * q == 0 {
        return Ok(());
    }
    let dt = a.dtype().name();
    let acc = if accumulate { "_acc" } else { "" };
    let name = format!("tn_{dt}_{}{acc}", out_dtype.name());
    if tensor_cores(a.dtype(), &[p, q]) {
        let s = KernelSettings::current();
        let sums = sumsq.as_deref().map_or(0, dptr);
        if tma_vark(dev, &s, out, a, b, offsets, &name, sums)? {
            return Ok(());
        }
        let (prefix_name, bn, smem) = tiled_family(dev, &s);
        let tiles = p.div_ceil(BM) * q.div_ceil(bn);
        dev.launch(
            kernels::grouped_tiled(prefix_name),
            &format!("{prefix_name}_{name}"),
            (tiles as u32, e as u32, 1),
            (256, 1, 1),
            smem,
        )?
        .ptr(dptr(out))
        .ptr(dptr(a))
        .ptr(dptr(b))
        .ptr(dptr(offsets))
        .usize_as_i32(p)?
        .usize_as_i32(q)?
        .ptr(sums)
        .run()?;
    } else {
        let name = format!("gg_simt_vark_{dt}_{}", if same { "same" } else { "f32" });
        dev.launch(
            &kernels::GROUPED_SIMT,
            &name,
            (grid_1d(e * p * q, 256).min(65535 * 8), 1, 1),
            (256, 1, 1),
            0,
        )?
        .ptr(dptr(out))
        .ptr(dptr(a))
        .ptr(dptr(b))
        .ptr(dptr(offsets))
        .usize_as_i32(e)?
        .usize_as_i32(p)?
        .usize_as_i32(q)?
        .i32(accumulate as i32)
        .run()?;
        if let Some(s) = sumsq {
            super::add_assign(s, &super::sum_squares(out)?)?;
        }
    }
    Ok(())
}

/// tile_prefix[e] = Σ_{e' < e} ceil(rows_e' / 128) over the device offsets (the tiled VARM
/// kernels' schedule).
fn tile_prefix(dev: &Arc<CudaDevice>, offsets: &Tensor) -> Result<Tensor> {
    let e = offsets.numel() - 1;
    let prefix = Tensor::uninit(&[e + 1], DType::I32, offsets.device())?;
    dev.launch(
        &kernels::GROUPED_SCHEDULE,
        "gg_tile_prefix",
        (1, 1, 1),
        (256, 1, 1),
        0,
    )?
    .ptr(dptr(&prefix))
    .ptr(dptr(offsets))
    .usize_as_i32(e)?
    .run()?;
    Ok(prefix)
}

/// Shared memory of the TMA kernels: the wgmma stage ring, 2 × 4 mbarriers, 1 KB of alignment.
const TT_SMEM: u32 = 4 * (128 * 64 + 256 * 64) * 2 + 64 + 1024;
/// The weight-gradient TMA kernels add their epilogue's staging: 32 rows of 264 f32 before 128
/// bytes of barriers (231 552 bytes in all, of the 232 448 an sm_90 block may have).
const TT_SMEM_K: u32 = 4 * (128 * 64 + 256 * 64) * 2 + 128 + 32 * 264 * 4 + 1024;
/// The ping-pong weight gradient: a ring of 6 stages of 128 + 128 rows of 64 k, two 16 KB
/// stagings, 14 barriers, alignment (230 528 bytes).
const TT_SMEM_PP: u32 = 6 * (128 * 64 + 128 * 64) * 2 + 2 * 32 * 128 * 4 + 128 + 1024;

/// Whether the TMA warp-specialised kernels (`tt_*`) take 16-bit operands at device addresses
/// `bases`: Hopper, the wgmma family, and 16-byte aligned bases (tensor maps need them; the
/// cp.async kernels take anything else). `gg_tma` off keeps the cp.async kernels.
fn tma_applies(dev: &CudaDevice, s: &KernelSettings, dt: DType, bases: &[u64]) -> bool {
    s.gg_tma
        && tiled_family(dev, s).0 == "wg"
        && matches!(dt, DType::BF16 | DType::F16)
        && bases.iter().all(|b| b % 16 == 0)
}

/// The TMA kernels' persistent grid: one CTA per SM, at most one per tile.
fn tma_grid(dev: &CudaDevice, tiles: usize) -> u32 {
    tiles.min(dev.sm_count()).max(1) as u32
}

/// y = per group x[rows of e] · op(w[e]) with the TMA kernels, when they apply (false: the
/// caller takes another kernel). For W as [K, N], K must be a multiple of 64: a box of 64 k
/// rows must not reach into the next expert.
fn tma_varm(
    dev: &Arc<CudaDevice>,
    s: &KernelSettings,
    y: &Tensor,
    x: &Tensor,
    w: &Tensor,
    offsets: &Tensor,
    trans_w: bool,
) -> Result<bool> {
    let (m, n, k) = (y.dim(0), y.dim(1), x.dim(1));
    let e = offsets.numel() - 1;
    let dt = x.dtype();
    if !tma_applies(dev, s, dt, &[dptr(x), dptr(w)]) || !(trans_w || k % 64 == 0) {
        return Ok(false);
    }
    let ta = tensor_map_2d(dptr(x), dt, k, x.dim(0), 64, 128)?;
    let tb = if trans_w {
        tensor_map_2d(dptr(w), dt, k, e * n, 64, 256)?
    } else {
        tensor_map_2d(dptr(w), dt, n, e * k, 64, 64)?
    };
    let prefix = tile_prefix(dev, offsets)?;
    let tiles = (m.div_ceil(BM) + e) * n.div_ceil(WG_BN);
    let name = format!("tt_{}_{}", if trans_w { "nt" } else { "nn" }, dt.name());
    dev.launch(
        &kernels::GROUPED_WGMMA,
        &name,
        (tma_grid(dev, tiles), 1, 1),
        (384, 1, 1),
        TT_SMEM,
    )?
    .ptr(dptr(y))
    .map(ta)
    .map(tb)
    .ptr(dptr(offsets))
    .ptr(dptr(&prefix))
    .usize_as_i32(e)?
    .usize_as_i32(m)?
    .usize_as_i32(n)?
    .usize_as_i32(k)?
    .run()?;
    Ok(true)
}

/// The weight gradient `tn_{..}` (kernel name past its family prefix) with the TMA kernels, when
/// they apply (false: the caller takes another kernel): where groups average at least 256 rows,
/// or at least 32 when the gradient is written or 16-bit. With fewer rows each tile's main loop
/// is a step or two and the epilogue is the work: an f32 one accumulating is streamed better by
/// the cp.async kernel's loads and stores than by the L2's reduce-adds (BENCHMARKS 2026-12-01,
/// thirteenth session: GPT-MoE shape, 64 rows per group, f+b 23.0 vs 25.3 ms), while TMA stores
/// win writing (16.45 vs 17.15 ms) and with 16-bit gradients (14.7-14.9 vs 15.25-15.4 written).
/// Decode-sized groups (a row or two) keep the cp.async kernel's grid of every tile at once. A
/// persistent grid walks the E · tiles (e, p-tile, q-tile).
#[allow(clippy::too_many_arguments)]
fn tma_vark(
    dev: &Arc<CudaDevice>,
    s: &KernelSettings,
    out: &Tensor,
    a: &Tensor,
    b: &Tensor,
    offsets: &Tensor,
    name: &str,
    sumsq: u64,
) -> Result<bool> {
    let (m, p, q) = (a.dim(0), a.dim(1), b.dim(1));
    let e = offsets.numel() - 1;
    let dt = a.dtype();
    let f32_acc = out.dtype() == DType::F32 && name.ends_with("_acc");
    let rows = if f32_acc { 256 } else { 32 };
    if !tma_applies(dev, s, dt, &[dptr(a), dptr(b), dptr(out)]) || m < rows * e {
        return Ok(false);
    }
    let ta = tensor_map_2d(dptr(a), dt, p, m, 64, 64)?;
    let tb = tensor_map_2d(dptr(b), dt, q, m, 64, 64)?;
    // The ping-pong kernel (the default; `gg_pingpong` off takes the cooperative 128 × 256 one;
    // BENCHMARKS 2026-12-01: ping-pong 1-2% faster f+b written, within the spread accumulating):
    // 128 × 128 tiles, one per consumer warpgroup, the gradient out through TMA stores or
    // reduce-adds (f32: boxes of 32 rows × 32 columns; 16-bit, the operands' type: 32 × 64).
    // Accumulating with sums reads the old values: the cooperative kernel. The cooperative one
    // also stores f32 through TMA; 16-bit there is written by the threads and takes no map.
    let pp = s.gg_pingpong && !(name.ends_with("_acc") && sumsq != 0);
    let od = out.dtype();
    let to = if pp || od == DType::F32 {
        let cols = (128 / od.size_in_bytes()) as u32;
        tensor_map(dptr(out), od, &[q, p, e], &[cols, 32, 1])?
    } else {
        unsafe { std::mem::zeroed() }
    };
    let (tiles, kernel, smem) = if pp {
        let tiles = e * p.div_ceil(128) * q.div_ceil(128);
        (tiles, format!("tt_{name}_pp"), TT_SMEM_PP)
    } else {
        let tiles = e * p.div_ceil(BM) * q.div_ceil(WG_BN);
        (tiles, format!("tt_{name}"), TT_SMEM_K)
    };
    let launch = dev
        .launch(
            &kernels::GROUPED_WGMMA,
            &kernel,
            (tma_grid(dev, tiles), 1, 1),
            (384, 1, 1),
            smem,
        )?
        .ptr(dptr(out))
        .map(ta)
        .map(tb)
        .map(to)
        .ptr(dptr(offsets))
        .usize_as_i32(e)?
        .usize_as_i32(p)?
        .usize_as_i32(q)?
        .ptr(sumsq);
    let launch = if pp {
        // Every n-th accumulating f32 tile adds through loads and stores (16-byte rows: Q % 4 == 0).
        launch.i32(if q % 4 == 0 && od == DType::F32 {
            pp_ldg_every(m, e)
        } else {
            0
        })
    } else {
        launch
    };
    launch.run()?;
    Ok(true)
}

/// Every how many accumulating tiles of the ping-pong kernel one adds through loads and stores
/// instead of the L2's reduce-adds (0: none). Where groups are short (under 768 rows on average
/// over `m` rows and `e` groups) a tile's main loop is short next to its f32 epilogue and the
/// reduce-add rate bounds the kernel: every 4th tile takes the other path (BENCHMARKS 2026-12-01:
/// Qwen3 shape, 512 rows a group, f+b 2.8-4.8% faster in 8 of 8 pairs; OLMoE's 1024 rows 1.8%
/// slower, Mixtral's 2048 0.3%; n = 1, 2, 3 no better than 4).
fn pp_ldg_every(m: usize, e: usize) -> i32 {
    if m < 768 * e {
        4
    } else {
        0
    }
}

/// The tiled VARM kernels: tile prefix, then one CTA per 128-row tile and column block plus E
/// spare ones that zero the rows past offsets[E]. `name` is the kernel.
#[allow(clippy::too_many_arguments)]
fn launch_tiled_varm(
    dev: &Arc<CudaDevice>,
    s: &KernelSettings,
    name: &str,
    y: &Tensor,
    x: &Tensor,
    w: &Tensor,
    offsets: &Tensor,
    n: usize,
) -> Result<()> {
    let (m, k) = (y.dim(0), x.dim(1));
    let e = offsets.numel() - 1;
    let prefix = tile_prefix(dev, offsets)?;
    let (_, bn, smem) = tiled_family(dev, s);
    let blocks = (m.div_ceil(BM) + e) * n.div_ceil(bn);
    let grid = u32::try_from(blocks).map_err(|_| {
        Error::Invalid(format!(
            "grouped_matmul: {blocks} tiles exceed the grid limit"
        ))
    })?;
    dev.launch(
        kernels::grouped_tiled(name),
        name,
        (grid, 1, 1),
        (256, 1, 1),
        smem,
    )?
    .ptr(dptr(y))
    .ptr(dptr(x))
    .ptr(dptr(w))
    .ptr(dptr(offsets))
    .ptr(dptr(&prefix))
    .usize_as_i32(e)?
    .usize_as_i32(m)?
    .usize_as_i32(n)?
    .usize_as_i32(k)?
    .run()
}

/// The served-decode kernels' shapes (BENCHMARKS, 2026-11-30 fifth session, per batch-1 step): 4
/// gate/up columns per block, 1.5-2.5% faster than 8 and 5% faster than 2; the down kernel's 4
/// output columns per block with 4 vectors per lane in flight, 1.3% faster than 8 columns with 2
/// (2026-12-01 ninth session, Qwen3: 1.351-1.353 ms against 1.374-1.377).
const SERVE_UP_COLS: usize = 4;
const SERVE_DOWN_UNROLL: usize = 4;
const SERVE_DOWN_COLS: usize = 4;
/// Gate/up columns per block of the kernel that also norms its rows where the streaming loop
/// does not apply (BENCHMARKS, 2026-12-01: 22.7 us a layer against 28.0 for 4).
const SERVE_NORM_COLS: usize = 8;
/// The norming gate/up kernel as a streaming loop: 4 blocks per SM, 2-column groups
/// (BENCHMARKS, 2026-12-01 tenth session: OLMoE batch-1 step 1.061 -> 1.013 ms, Qwen3 1.531 ->
/// 1.471; 2 or 3 blocks per SM 1.022-1.033 / 1.490-1.495; 4-column groups 1.018 / 1.471).
const SERVE_UP_LOOP: (usize, usize) = (4, 2);

/// A streaming-loop kernel's 16-byte vectors per thread (NV) for rows of `k` values of `dtype`,
/// and its one wave of blocks at `per_sm` blocks per SM (two vectors per thread hold twice the
/// weights in flight: half the blocks); None where a row needs more than two vectors per thread.
pub(crate) fn loop_wave(
    dev: &CudaDevice,
    per_sm: usize,
    k: usize,
    dtype: DType,
) -> Option<(usize, usize)> {
    let nv = (k / (16 / dtype.size_in_bytes())).div_ceil(256).max(1);
    (nv <= 2).then(|| (nv, (per_sm / nv).max(1) * dev.sm_count()))
}

/// `ops::moe_serve_swiglu`'s first kernel: a [k·T, F] = silu(g) ⊙ u per slot.
pub(crate) fn moe_serve_up(
    dev: &Arc<CudaDevice>,
    x: &Tensor,
    w1: &Tensor,
    ids: &Tensor,
    (e, f, k): (usize, usize, usize),
) -> Result<Tensor> {
    let (t, kd) = (x.dim(0), x.dim(1));
    let a = Tensor::uninit(&[k * t, f], x.dtype(), x.device())?;
    if f * k * t == 0 {
        return Ok(a);
    }
    dev.launch(
        &kernels::SERVE_EXPERTS,
        &format!("moe_serve_up_c{SERVE_UP_COLS}_{}", x.dtype().name()),
        (f.div_ceil(SERVE_UP_COLS) as u32, (k * t) as u32, 1),
        (256, 1, 1),
        0,
    )?
    .pdl()
    .ptr(dptr(&a))
    .ptr(dptr(x))
    .ptr(dptr(w1))
    .ptr(dptr(ids))
    .usize_as_i32(e)?
    .usize_as_i32(t)?
    .usize_as_i32(f)?
    .usize_as_i32(kd)?
    .run()?;
    Ok(a)
}

/// `ops::moe_serve_swiglu`'s second kernel: y [T, N] = Σ_j weights[j, t] · a[j, t]·W2[e]ᵀ.
pub(crate) fn moe_serve_down(
    dev: &Arc<CudaDevice>,
    a: &Tensor,
    w2: &Tensor,
    ids: &Tensor,
    weights: &Tensor,
    (e, t, n): (usize, usize, usize),
) -> Result<Tensor> {
    let (kt, f) = (a.dim(0), a.dim(1));
    let y = Tensor::uninit(&[t, n], a.dtype(), a.device())?;
    if t * n == 0 {
        return Ok(y);
    }
    dev.launch(
        &kernels::SERVE_EXPERTS,
        &format!(
            "moe_serve_down_u{SERVE_DOWN_UNROLL}d{SERVE_DOWN_COLS}_{}",
            a.dtype().name()
        ),
        (n.div_ceil(SERVE_DOWN_COLS) as u32, t as u32, 1),
        (256, 1, 1),
        0,
    )?
    .pdl()
    .ptr(dptr(&y))
    .ptr(dptr(a))
    .ptr(dptr(w2))
    .ptr(dptr(ids))
    .ptr(dptr(weights))
    .usize_as_i32(e)?
    .usize_as_i32(t)?
    .usize_as_i32(kt / t)?
    .usize_as_i32(n)?
    .usize_as_i32(f)?
    .run()?;
    Ok(y)
}

/// `ops::moe_serve_swiglu` (shapes checked there).
pub(crate) fn moe_serve_swiglu(
    dev: &Arc<CudaDevice>,
    x: &Tensor,
    w1: &Tensor,
    w2: &Tensor,
    ids: &Tensor,
    weights: &Tensor,
    (e, f, n, k): (usize, usize, usize, usize),
) -> Result<Tensor> {
    let (t, kd) = (x.dim(0), x.dim(1));
    let vec = 16 / x.dtype().size_in_bytes();
    if kd % vec != 0 || f % vec != 0 {
        return Err(Error::Invalid(format!(
            "moe_serve_swiglu: K {kd} and F {f} must be multiples of {vec} (16-byte rows)"
        )));
    }
    if t == 0 {
        return Tensor::uninit(&[0, n], x.dtype(), x.device());
    }
    let a = moe_serve_up(dev, x, w1, ids, (e, f, k))?;
    moe_serve_down(dev, &a, w2, ids, weights, (e, t, n))
}

/// `ops::router_topk` on the GPU (its conditions checked there): Ok(None) when the device's
/// arrival counters cannot be had (first use inside a graph capture).
pub(crate) fn router_topk(
    dev: &Arc<CudaDevice>,
    x: &Tensor,
    w: &Tensor,
    rule: &super::SoftmaxTopK,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let Some((logits, ids, wts, launch)) = router_topk_launch(dev, x, w, rule, false)? else {
        return Ok(None);
    };
    launch.run()?;
    Ok(Some((logits, ids, wts)))
}

/// `ops::add_rmsnorm_router_topk` on the GPU (its conditions checked there).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
pub(crate) fn add_rmsnorm_router_topk(
    dev: &Arc<CudaDevice>,
    x: &Tensor,
    a: &Tensor,
    g: &Tensor,
    eps: f32,
    w: &Tensor,
    rule: &super::SoftmaxTopK,
) -> Result<Option<(Tensor, Tensor, Tensor, Tensor, Tensor)>> {
    let Some((logits, ids, wts, launch)) = router_topk_launch(dev, x, w, rule, true)? else {
        return Ok(None);
    };
    let xn = Tensor::uninit(x.shape(), x.dtype(), x.device())?;
    let h = Tensor::uninit(x.shape(), x.dtype(), x.device())?;
    launch
        .ptr(dptr(a))
        .ptr(dptr(g))
        .f32(eps)
        .ptr(dptr(&xn))
        .ptr(dptr(&h))
        .run()?;
    Ok(Some((xn, h, logits, ids, wts)))
}

/// `ops::o_router_topk` on the GPU (its conditions checked there): (s, z, ids), or Ok(None)
/// when the device's arrival counters cannot be had (first use inside a graph capture).
pub(crate) fn o_router_topk(
    dev: &Arc<CudaDevice>,
    ctx: &Tensor,
    wo: &Tensor,
    x: &Tensor,
    wf: &Tensor,
    k: usize,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let Some(counter) = dev.arrival_counters()? else {
        return Ok(None);
    };
    let (t, d, c, e) = (x.dim(0), x.dim(1), ctx.dim(1), wf.dim(0));
    let s = Tensor::uninit(&[t, d], x.dtype(), x.device())?;
    let z = Tensor::uninit(&[t, e], DType::F32, x.device())?;
    let ids = Tensor::uninit(&[k, t], DType::I32, x.device())?;
    // Router blocks of 4 experts (OR_RC) times the slices of K = D + C (one 16-byte vector per
    // thread of 256 each, partial logits in zp; BENCHMARKS 2026-12-01: Qwen3 batch-1 step 1.357
    // -> 1.328 ms against one slice), then the o projection's blocks of SMALL_COLS columns.
    let slices = ((d + c) / (16 / x.dtype().size_in_bytes())).div_ceil(256);
    let zp = Tensor::uninit(&[slices, t, e], DType::F32, x.device())?;
    let blocks = e.div_ceil(4) * slices + d.div_ceil(SMALL_COLS);
    dev.launch(
        &kernels::SERVE_ROUTER,
        &format!("o_route_r{}_{}", small_rows(t), x.dtype().name()),
        (blocks as u32, 1, 1),
        (256, 1, 1),
        0,
    )?
    .pdl()
    .ptr(dptr(&s))
    .ptr(dptr(&z))
    .ptr(dptr(&zp))
    .ptr(dptr(&ids))
    .ptr(dptr(ctx))
    .ptr(dptr(x))
    .ptr(dptr(wo))
    .ptr(dptr(wf))
    .usize_as_i32(t)?
    .usize_as_i32(d)?
    .usize_as_i32(c)?
    .usize_as_i32(e)?
    .usize_as_i32(k)?
    .usize_as_i32(slices)?
    .ptr(counter)
    .run()?;
    Ok(Some((s, z, ids)))
}

/// `ops::moe_serve_swiglu_norm` on the GPU (shapes checked there).
#[allow(clippy::too_many_arguments)]
pub(crate) fn moe_serve_swiglu_norm(
    dev: &Arc<CudaDevice>,
    s: &Tensor,
    g: &Tensor,
    eps: f32,
    z: &Tensor,
    ids: &Tensor,
    rule: &super::SoftmaxTopK,
    w1: &Tensor,
    w2: &Tensor,
    (e, f, n): (usize, usize, usize),
) -> Result<Tensor> {
    let (t, kd) = (s.dim(0), s.dim(1));
    let k = ids.dim(0);
    let a = Tensor::uninit(&[k * t, f], s.dtype(), s.device())?;
    let wts = Tensor::uninit(&[k, t], DType::F32, s.device())?;
    // The streaming-loop kernel (one wave of blocks, each looping over column groups) where up
    // to two 16-byte vectors per thread cover K; else one block per column group.
    let (per_sm, cols) = SERVE_UP_LOOP;
    let wave = KernelSettings::read(|set| set.serve_up_loop)
        .then(|| loop_wave(dev, per_sm, kd, s.dtype()))
        .flatten();
    let (name, grid_x) = match wave {
        Some((nv, wave)) => {
            let groups = f.div_ceil(cols);
            let want = wave.div_ceil(k * t);
            (
                format!("moe_serve_up_norm_loop_c{cols}v{nv}_{}", s.dtype().name()),
                want.clamp(1, groups),
            )
        }
        None => (
            format!("moe_serve_up_norm_c{SERVE_NORM_COLS}_{}", s.dtype().name()),
            f.div_ceil(SERVE_NORM_COLS),
        ),
    };
    dev.launch(
        &kernels::SERVE_EXPERTS,
        &name,
        (grid_x as u32, (k * t) as u32, 1),
        (256, 1, 1),
        0,
    )?
    .pdl()
    .ptr(dptr(&a))
    .ptr(dptr(s))
    .ptr(dptr(g))
    .f32(eps)
    .ptr(dptr(z))
    .ptr(dptr(&wts))
    .i32(rule.normalize as i32)
    .f32(rule.add)
    .f32(rule.clamp_min)
    .f32(rule.scale)
    .ptr(dptr(w1))
    .ptr(dptr(ids))
    .usize_as_i32(e)?
    .usize_as_i32(t)?
    .usize_as_i32(k)?
    .usize_as_i32(f)?
    .usize_as_i32(kd)?
    .run()?;
    moe_serve_down(dev, &a, w2, ids, &wts, (e, t, n))
}

/// The router_topk launch with its common arguments pushed (the addnorm variant's follow).
#[allow(clippy::type_complexity)]
fn router_topk_launch<'d>(
    dev: &'d Arc<CudaDevice>,
    x: &Tensor,
    w: &Tensor,
    rule: &super::SoftmaxTopK,
    addnorm: bool,
) -> Result<
    Option<(
        Tensor,
        Tensor,
        Tensor,
        crate::runtime::cuda::LaunchBuilder<'d>,
    )>,
> {
    let Some(counter) = dev.arrival_counters()? else {
        return Ok(None);
    };
    let (t, kd, e) = (x.dim(0), x.dim(1), w.dim(0));
    let logits = Tensor::uninit(&[t, e], DType::F32, x.device())?;
    let ids = Tensor::uninit(&[rule.k, t], DType::I32, x.device())?;
    let wts = Tensor::uninit(&[rule.k, t], DType::F32, x.device())?;
    let (name, smem) = if addnorm {
        ("router_topk_addnorm", t * kd * x.dtype().size_in_bytes())
    } else {
        ("router_topk", 0)
    };
    let launch = dev
        .launch(
            &kernels::SERVE_ROUTER,
            &format!("{name}_r{}_{}", small_rows(t), x.dtype().name()),
            (e.div_ceil(SMALL_COLS) as u32, 1, 1),
            (256, 1, 1),
            smem as u32,
        )?
        .pdl()
        .ptr(dptr(&logits))
        .ptr(dptr(&ids))
        .ptr(dptr(&wts))
        .ptr(dptr(x))
        .ptr(dptr(w))
        .usize_as_i32(t)?
        .usize_as_i32(e)?
        .usize_as_i32(kd)?
        .usize_as_i32(rule.k)?
        .i32(rule.normalize as i32)
        .f32(rule.add)
        .f32(rule.clamp_min)
        .f32(rule.scale)
        .ptr(counter);
    Ok(Some((logits, ids, wts, launch)))
}
