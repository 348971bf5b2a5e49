//! CUDA vs CPU parity for every runtime op. Inputs are random and fresh per run (the seed is
//! printed; MOE_SEED=<n> replays one); outputs are NaN-poisoned before each kernel runs, so an
//! element a kernel forgets to write fails the comparison. Skips cleanly without a GPU.
//!
//! Tolerances (relative L2 error ‖gpu − cpu‖ / ‖cpu‖): f32 1e-5 (same math, another summation
//! order); bf16/f16 1e-2 (both sides round the same f32 result to 8 or 11 mantissa bits; a one-ulp
//! difference in a few elements stays well under 1e-2). Integer outputs must match exactly.

mod common;

use common::gpu;
use moe::runtime::cuda::profile;
use moe::runtime::ops::{self, Activation, AdamW, Matmul, RopeTable, Softmax};
use moe::runtime::{DType, Device, KernelSettings, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rng(test: &str) -> ChaCha8Rng {
    let seed = std::env::var("MOE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: MOE_SEED={seed}");
    ChaCha8Rng::seed_from_u64(seed)
}

/// The same random values on the CPU and on `dev`.
fn pair(r: &mut ChaCha8Rng, shape: &[usize], dtype: DType, dev: Device) -> (Tensor, Tensor) {
    scaled_pair(r, shape, 1.0, dtype, dev)
}

/// `pair` with the values times `s` (weights scaled by 1/sqrt(fan-in) as a model's are: f16
/// products of unscaled ones overflow).
fn scaled_pair(
    r: &mut ChaCha8Rng,
    shape: &[usize],
    s: f32,
    dtype: DType,
    dev: Device,
) -> (Tensor, Tensor) {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| r.random_range(-2.0f32..2.0) * s).collect();
    let c = Tensor::from_f32(&v, shape, dtype, Device::Cpu).unwrap();
    let g = c.to_device(dev).unwrap();
    (c, g)
}

fn ids_pair(r: &mut ChaCha8Rng, n: usize, hi: i32, dev: Device) -> (Tensor, Tensor) {
    let v: Vec<i32> = (0..n).map(|_| r.random_range(0..hi)).collect();
    let c = Tensor::from_vec(v, &[n]).unwrap();
    let g = c.to_device(dev).unwrap();
    (c, g)
}

/// Group offsets for these group sizes: the values, and as CPU and `dev` tensors.
fn offsets_pair(sizes: &[usize], dev: Device) -> (Vec<i32>, Tensor, Tensor) {
    let mut off = vec![0i32];
    for s in sizes {
        off.push(off.last().unwrap() + *s as i32);
    }
    let n = off.len();
    let cpu = Tensor::from_vec(off.clone(), &[n]).unwrap();
    let gpu = Tensor::from_slice(&off, &[n], dev).unwrap();
    (off, cpu, gpu)
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-5
    } else {
        1e-2
    }
}

#[track_caller]
fn close(what: &str, cpu: &Tensor, gpu: &Tensor) {
    assert_eq!(cpu.shape(), gpu.shape(), "{what}: shapes");
    assert_eq!(cpu.dtype(), gpu.dtype(), "{what}: dtypes");
    if cpu.dtype() == DType::I32 {
        assert_eq!(
            cpu.to_vec::<i32>().unwrap(),
            gpu.to_vec::<i32>().unwrap(),
            "{what}"
        );
        return;
    }
    let (a, b) = (cpu.to_f32_vec().unwrap(), gpu.to_f32_vec().unwrap());
    if let Some(i) = b.iter().position(|v| !v.is_finite()) {
        panic!(
            "{what}: GPU element {i} is {} (unwritten or overflow), CPU has {}",
            b[i], a[i]
        );
    }
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = a
        .iter()
        .map(|x| (*x as f64).powi(2))
        .sum::<f64>()
        .sqrt()
        .max(1e-30);
    let t = tol(cpu.dtype());
    assert!(
        num / den <= t,
        "{what}: relative L2 error {:.3e} > {t:.0e}",
        num / den
    );
}

/// `close`, and every element within `tol · (|cpu| + rms(cpu))`: a layout bug confined to a few
/// rows or one tile would hide in a whole-tensor L2 norm.
fn close_each(what: &str, cpu: &Tensor, gpu: &Tensor) {
    close_each_within(what, cpu, gpu, tol(cpu.dtype()));
}

/// `close_each` with the per-element tolerance `t`.
fn close_each_within(what: &str, cpu: &Tensor, gpu: &Tensor, t: f64) {
    close(what, cpu, gpu);
    let (a, b) = (cpu.to_f32_vec().unwrap(), gpu.to_f32_vec().unwrap());
    let rms = (a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / a.len().max(1) as f64).sqrt();
    if let Some(i) =
        (0..a.len()).find(|&i| ((a[i] - b[i]) as f64).abs() > t * ((a[i] as f64).abs() + rms))
    {
        panic!(
            "{what}: element {i}: CPU {} GPU {} (rms {rms:.3e}, tol {t:.0e})",
            a[i], b[i]
        );
    }
}

const FLOATS: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// Runs `f` under `settings` (with kernel profiling on, to count launches) and asserts that each
/// kernel named in `ran` was launched meanwhile: a test of a fallback must fail if the default
/// path ran instead.
#[track_caller]
fn forcing<R>(settings: &KernelSettings, ran: &[String], f: impl FnOnce() -> R) -> R {
    let before: Vec<u64> = ran.iter().map(|k| profile::calls(k)).collect();
    let out = KernelSettings {
        profile: true,
        ..settings.clone()
    }
    .scoped(f);
    for (k, b) in ran.iter().zip(before) {
        assert!(profile::calls(k) > b, "{k} did not run under {settings:?}");
    }
    out
}

#[test]
fn matmul_variants() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("matmul_variants");
    for dt in FLOATS {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let (m, n, k) = (
                r.random_range(1..200),
                r.random_range(1..200),
                r.random_range(1..300),
            );
            let (ac, ag) = pair(&mut r, &if ta { [k, m] } else { [m, k] }, dt, dev);
            let (bc, bg) = pair(&mut r, &if tb { [n, k] } else { [k, n] }, dt, dev);
            let spec = Matmul {
                trans_a: ta,
                trans_b: tb,
                alpha: 0.5,
                out_dtype: None,
            };
            close(
                &format!("matmul {dt} ta={ta} tb={tb}"),
                &ops::matmul(&ac, &bc, spec).unwrap(),
                &ops::matmul(&ag, &bg, spec).unwrap(),
            );
        }
        // Decode-sized x·Wᵀ (the GEMV kernel for 16-bit types): 1..=8 rows, same-dtype and f32
        // outputs, N not a multiple of its 32-column blocks.
        // 2..=64 rows of 16-bit types with K % 32 == 0 take the tensor-core small-M kernel (8,
        // 16 or 32 rows per pass; 33 rows = two passes), K % 32 != 0 the CUDA-core one.
        for (m, n, k) in [
            (1usize, 2048usize, 2048usize),
            (3, 200, 512),
            (8, 50, 4096),
            (5, 64, 40),
            (13, 100, 96),
            (33, 2048, 1024),
            (64, 72, 32),
        ] {
            let (ac, ag) = pair(&mut r, &[m, k], dt, dev);
            let (bc, bg) = pair(&mut r, &[n, k], dt, dev);
            for out_dtype in [None, Some(DType::F32)] {
                let spec = Matmul {
                    trans_b: true,
                    out_dtype,
                    ..Default::default()
                };
                close(
                    &format!("decode matmul {dt} m={m} n={n} k={k} out {out_dtype:?}"),
                    &ops::matmul(&ac, &bc, spec).unwrap(),
                    &ops::matmul(&ag, &bg, spec).unwrap(),
                );
            }
        }
        // Batched against a batch, and a [B, S, K] input against one shared weight.
        let (ac, ag) = pair(&mut r, &[3, 17, 33], dt, dev);
        let (bc, bg) = pair(&mut r, &[3, 33, 9], dt, dev);
        close(
            &format!("batched {dt}"),
            &ops::matmul(&ac, &bc, Matmul::default()).unwrap(),
            &ops::matmul(&ag, &bg, Matmul::default()).unwrap(),
        );
        let (wc, wg) = pair(&mut r, &[21, 33], dt, dev);
        let (bc2, bg2) = pair(&mut r, &[21], dt, dev);
        close(
            &format!("linear {dt}"),
            &ops::linear(&ac, &wc, Some(&bc2)).unwrap(),
            &ops::linear(&ag, &wg, Some(&bg2)).unwrap(),
        );
        let (bt, btg) = pair(&mut r, &[3, 9, 33], dt, dev);
        let spec = Matmul {
            trans_b: true,
            ..Default::default()
        };
        close(
            &format!("batched nt {dt}"),
            &ops::matmul(&ac, &bt, spec).unwrap(),
            &ops::matmul(&ag, &btg, spec).unwrap(),
        );
    }
    // bf16 operands with an f32 result accumulated into (weight-gradient style).
    let (ac, ag) = pair(&mut r, &[64, 40], DType::BF16, dev);
    let (bc, bg) = pair(&mut r, &[64, 24], DType::BF16, dev);
    let (mut oc, _) = pair(&mut r, &[40, 24], DType::F32, dev);
    let mut og = oc.to_device(dev).unwrap();
    let spec = Matmul {
        trans_a: true,
        out_dtype: Some(DType::F32),
        ..Default::default()
    };
    ops::matmul_into(&mut oc, &ac, &bc, spec, 1.0).unwrap();
    ops::matmul_into(&mut og, &ag, &bg, spec, 1.0).unwrap();
    close("matmul_into bf16->f32 beta=1", &oc, &og);
}

#[test]
fn elementwise_and_activations() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("elementwise_and_activations");
    // An odd width (one element per thread) and a multiple of 8 (the 8-wide kernels).
    for (dt, odd) in FLOATS.iter().flat_map(|&d| [(d, true), (d, false)]) {
        let cols = if odd {
            r.random_range(0..150) * 2 + 1
        } else {
            8 * r.random_range(1..40)
        };
        let shape = [r.random_range(1..50), cols];
        let (ac, ag) = pair(&mut r, &shape, dt, dev);
        let (bc, bg) = pair(&mut r, &shape, dt, dev);
        close(
            &format!("add {dt}"),
            &ops::add(&ac, &bc).unwrap(),
            &ops::add(&ag, &bg).unwrap(),
        );
        close(
            &format!("mul {dt}"),
            &ops::mul(&ac, &bc).unwrap(),
            &ops::mul(&ag, &bg).unwrap(),
        );
        close(
            &format!("clamp {dt}"),
            &ops::clamp(&ac, 0.7).unwrap(),
            &ops::clamp(&ag, 0.7).unwrap(),
        );
        close(
            &format!("scale {dt}"),
            &ops::scale(&ac, -1.5).unwrap(),
            &ops::scale(&ag, -1.5).unwrap(),
        );
        let (biasc, biasg) = pair(&mut r, &[shape[1]], dt, dev);
        close(
            &format!("add_bias {dt}"),
            &ops::add_bias(&ac, &biasc).unwrap(),
            &ops::add_bias(&ag, &biasg).unwrap(),
        );
        for act in [Activation::Silu, Activation::Gelu, Activation::GeluTanh] {
            close(
                &format!("{act:?} {dt}"),
                &ops::activation(&ac, act).unwrap(),
                &ops::activation(&ag, act).unwrap(),
            );
            close(
                &format!("{act:?} backward {dt}"),
                &ops::activation_backward(&ac, &bc, act).unwrap(),
                &ops::activation_backward(&ag, &bg, act).unwrap(),
            );
        }
        let (guc, gug) = pair(&mut r, &[shape[0], 2 * shape[1]], dt, dev);
        close(
            &format!("swiglu {dt}"),
            &ops::swiglu(&guc).unwrap(),
            &ops::swiglu(&gug).unwrap(),
        );
        close(
            &format!("swiglu backward {dt}"),
            &ops::swiglu_backward(&guc, &ac).unwrap(),
            &ops::swiglu_backward(&gug, &ag).unwrap(),
        );
        // In-place accumulation, also of a low-precision source into f32.
        let (mut dc, _) = pair(&mut r, &shape, DType::F32, dev);
        let mut dg = dc.to_device(dev).unwrap();
        ops::add_scaled(&mut dc, &ac, 0.25).unwrap();
        ops::add_scaled(&mut dg, &ag, 0.25).unwrap();
        close(&format!("add_scaled f32 += {dt}"), &dc, &dg);
        for to in FLOATS {
            close(
                &format!("cast {dt}->{to}"),
                &ops::cast(&ac, to).unwrap(),
                &ops::cast(&ag, to).unwrap(),
            );
        }
    }
}

#[test]
fn softmax_family() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("softmax_family");
    for dt in FLOATS {
        for cols in [1usize, 7, 128, 1000, 5000] {
            let rows = r.random_range(1..40);
            let (xc, xg) = pair(&mut r, &[rows, cols], dt, dev);
            let spec = Softmax {
                scale: 0.7,
                causal: None,
                window: None,
            };
            let (yc, yg) = (
                ops::softmax(&xc, spec).unwrap(),
                ops::softmax(&xg, spec).unwrap(),
            );
            close(&format!("softmax {dt} cols={cols}"), &yc, &yg);
            let (dc, dg) = pair(&mut r, &[rows, cols], dt, dev);
            close(
                &format!("softmax_backward {dt}"),
                &ops::softmax_backward(&yc, &dc, 0.7).unwrap(),
                &ops::softmax_backward(&yg, &dg, 0.7).unwrap(),
            );
            close(
                &format!("log_softmax {dt}"),
                &ops::log_softmax(&xc).unwrap(),
                &ops::log_softmax(&xg).unwrap(),
            );
        }
        // Causal attention scores: 2 heads sharing a KV head stacked along M, query offset 3;
        // then 72 keys (several 8-wide chunks, whole chunks masked and skipped).
        for (q_len, keys, offset, win) in [(5usize, 8usize, 3usize, 3usize), (40, 72, 32, 20)] {
            let (sc, sg) = pair(&mut r, &[4, 2 * q_len, keys], dt, dev);
            for window in [None, Some(win)] {
                let spec = Softmax {
                    scale: 0.125,
                    causal: Some((q_len, offset)),
                    window,
                };
                let (yc, yg) = (
                    ops::softmax(&sc, spec).unwrap(),
                    ops::softmax(&sg, spec).unwrap(),
                );
                close(&format!("causal softmax {dt} window {window:?}"), &yc, &yg);
                let y = yc.to_f32_vec().unwrap();
                for row in 0..2 * q_len {
                    let p = offset + row % q_len;
                    for key in 0..keys {
                        let visible = key <= p && window.is_none_or(|w| key + w > p);
                        assert_eq!(
                            y[row * keys + key] != 0.0,
                            visible,
                            "key {key} of row {row} (window {window:?})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn norm_rope_embedding_loss() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("norm_rope_embedding_loss");
    for dt in FLOATS {
        // An odd width (one element per thread), and multiples of 8 (register-resident rows:
        // one chunk per thread in the `c1` kernels up to 2048 columns (backward) / 8192
        // (forward); past that the 4-chunk kernels, and past 8192 the backward's scalar one;
        // 300 and 3000 rows make the backward's blocks loop over rows). Rows of at most 256
        // take the warp-per-row backward (5000 rows: each warp loops over several).
        for (rows, cols) in [
            (r.random_range(1..70), r.random_range(0..1050) * 2 + 1),
            (300, 8 * r.random_range(33..256)),
            (3000, 2048),
            (5000, 128),
            (r.random_range(1..300), 8 * r.random_range(1..33)),
            (r.random_range(1..10), 8 * r.random_range(300..1000)),
            (r.random_range(1..10), 8 * r.random_range(1030..1100)),
        ] {
            let (xc, xg) = pair(&mut r, &[rows, cols], dt, dev);
            let (wc, wg) = pair(&mut r, &[cols], dt, dev);
            let ((yc, rc), (yg, rg)) = (
                ops::rmsnorm(&xc, &wc, 1e-6).unwrap(),
                ops::rmsnorm(&xg, &wg, 1e-6).unwrap(),
            );
            close(&format!("rmsnorm {dt} {cols}"), &yc, &yg);
            close(&format!("rmsnorm rstd {dt} {cols}"), &rc, &rg);
            let (dc, dg) = pair(&mut r, &[rows, cols], dt, dev);
            let ((dxc, dwc), (dxg, dwg)) = (
                ops::rmsnorm_backward(&xc, &wc, &rc, &dc).unwrap(),
                ops::rmsnorm_backward(&xg, &wg, &rg, &dg).unwrap(),
            );
            close(&format!("rmsnorm dx {dt} {cols}"), &dxc, &dxg);
            close(&format!("rmsnorm dw {dt} {cols}"), &dwc, &dwg);
            // dx added into a residual gradient.
            let (mut ac, mut ag) = pair(&mut r, &[rows, cols], dt, dev);
            let dwc = ops::rmsnorm_backward_acc(&xc, &wc, &rc, &dc, &mut ac).unwrap();
            let dwg = ops::rmsnorm_backward_acc(&xg, &wg, &rg, &dg, &mut ag).unwrap();
            close(&format!("rmsnorm acc dx {dt} {cols}"), &ac, &ag);
            close(&format!("rmsnorm acc dw {dt} {cols}"), &dwc, &dwg);
        }

        // RoPE on [T, H, hd] with partial rotary dims and arbitrary positions: the scalar
        // kernel (half 6) and the 8-wide one (full rotation, and half the dims passed through).
        for (hd, rot) in [(16usize, 12usize), (128, 128), (128, 64)] {
            let (t, h) = (r.random_range(1..30), 3);
            let inv: Vec<f32> = (0..rot / 2)
                .map(|i| 10000f32.powf(-((2 * i) as f32) / rot as f32))
                .collect();
            let (tc, tg) = (
                RopeTable::new(&inv, 64, 1.0, Device::Cpu).unwrap(),
                RopeTable::new(&inv, 64, 1.0, dev).unwrap(),
            );
            let (qc, qg) = pair(&mut r, &[t, h, hd], dt, dev);
            let (pc, pg) = ids_pair(&mut r, t, 64, dev);
            let (oc, og) = (
                ops::rope(&qc, &tc, &pc).unwrap(),
                ops::rope(&qg, &tg, &pg).unwrap(),
            );
            close_each(&format!("rope {dt} hd={hd} rot={rot}"), &oc, &og);
            close_each(
                &format!("rope backward {dt} hd={hd} rot={rot}"),
                &ops::rope_backward(&oc, &tc, &pc).unwrap(),
                &ops::rope_backward(&og, &tg, &pg).unwrap(),
            );
        }

        // Embedding gather and gradient scatter-add (f32 atomics on the GPU: order differs).
        let (vocab, d, n) = (50, 24, 40);
        let (tabc, tabg) = pair(&mut r, &[vocab, d], dt, dev);
        let (ic, ig) = ids_pair(&mut r, n, vocab as i32, dev);
        close(
            &format!("embedding {dt}"),
            &ops::embedding(&ic, &tabc).unwrap(),
            &ops::embedding(&ig, &tabg).unwrap(),
        );
        let (dyc, dyg) = pair(&mut r, &[n, d], dt, dev);
        let mut gc = Tensor::zeros(&[vocab, d], DType::F32, Device::Cpu).unwrap();
        let mut gg = Tensor::zeros(&[vocab, d], DType::F32, dev).unwrap();
        ops::embedding_backward(&ic, &dyc, &mut gc).unwrap();
        ops::embedding_backward(&ig, &dyg, &mut gg).unwrap();
        close(&format!("embedding backward {dt}"), &gc, &gg);

        // Cross-entropy with an ignored target: any vocabulary (one element per thread), and a
        // multiple of 8 (the 8-wide kernels; up to ~12k chunks, several per thread).
        for v in [r.random_range(2..3000), 8 * r.random_range(1..12_000)] {
            let t = r.random_range(2..20);
            let (lc, lg) = pair(&mut r, &[t, v], dt, dev);
            let mut tgt: Vec<i32> = (0..t).map(|_| r.random_range(0..v as i32)).collect();
            tgt[0] = -100;
            let (yc, yg) = (
                Tensor::from_vec(tgt.clone(), &[t]).unwrap(),
                Tensor::from_slice(&tgt, &[t], dev).unwrap(),
            );
            let ((lossc, lsec), (lossg, lseg)) = (
                ops::cross_entropy(&lc, &yc, -100).unwrap(),
                ops::cross_entropy(&lg, &yg, -100).unwrap(),
            );
            close(&format!("cross_entropy {dt}"), &lossc, &lossg);
            close(&format!("cross_entropy lse {dt}"), &lsec, &lseg);
            close(
                &format!("cross_entropy backward {dt}"),
                &ops::cross_entropy_backward(&lc, &yc, &lsec, -100, 0.1).unwrap(),
                &ops::cross_entropy_backward(&lg, &yg, &lseg, -100, 0.1).unwrap(),
            );
        }
    }
}

#[test]
fn index_ops() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("index_ops");
    for dt in FLOATS {
        for (cols, k) in [(8usize, 2usize), (64, 8), (128, 8), (300, 17)] {
            let rows = r.random_range(1..100);
            let (xc, xg) = pair(&mut r, &[rows, cols], dt, dev);
            let ((vc, ic), (vg, ig)) = (ops::topk(&xc, k).unwrap(), ops::topk(&xg, k).unwrap());
            close(&format!("topk values {dt} {cols}/{k}"), &vc, &vg);
            close(&format!("topk ids {dt} {cols}/{k}"), &ic, &ig);
        }
        let (xc, xg) = pair(&mut r, &[37, 19], dt, dev);
        let idx: Vec<i32> = (0..50).map(|_| r.random_range(-2..40)).collect(); // some out of range
        let (ic, ig) = (
            Tensor::from_vec(idx.clone(), &[50]).unwrap(),
            Tensor::from_slice(&idx, &[50], dev).unwrap(),
        );
        close(
            &format!("gather_rows {dt}"),
            &ops::gather_rows(&xc, &ic).unwrap(),
            &ops::gather_rows(&xg, &ig).unwrap(),
        );
        let (sc, sg) = pair(&mut r, &[50, 19], dt, dev);
        let (wc, wg) = pair(&mut r, &[50], DType::F32, dev);
        let mut dc = Tensor::zeros(&[37, 19], DType::F32, Device::Cpu).unwrap();
        let mut dg = Tensor::zeros(&[37, 19], DType::F32, dev).unwrap();
        ops::scatter_add_rows(&mut dc, &ic, &sc, Some(&wc)).unwrap();
        ops::scatter_add_rows(&mut dg, &ig, &sg, Some(&wg)).unwrap();
        close(&format!("scatter_add_rows {dt}"), &dc, &dg);
        close(
            &format!("slice_rows {dt}"),
            &ops::slice_rows(&xc, 5, 20).unwrap(),
            &ops::slice_rows(&xg, 5, 20).unwrap(),
        );
        let (mut kc, _) = pair(&mut r, &[40, 19], dt, dev);
        let mut kg = kc.to_device(dev).unwrap();
        ops::write_rows(&mut kc, 3, &xc).unwrap();
        ops::write_rows(&mut kg, 3, &xg).unwrap();
        close(&format!("write_rows {dt}"), &kc, &kg);
        // Last dimension 7: one element per thread; 16: the 8-wide kernel.
        for dd in [7usize, 16] {
            let (tc, tg) = pair(&mut r, &[2, 5, 3, dd], dt, dev);
            close(
                &format!("transpose_12 {dt} D={dd}"),
                &ops::transpose_12(&tc).unwrap(),
                &ops::transpose_12(&tg).unwrap(),
            );
        }
        let (x24c, x24g) = pair(&mut r, &[37, 24], dt, dev);
        close(
            &format!("gather_rows {dt} d=24"),
            &ops::gather_rows(&x24c, &ic).unwrap(),
            &ops::gather_rows(&x24g, &ig).unwrap(),
        );
        close(
            &format!("sum_rows {dt}"),
            &ops::sum_rows(&xc).unwrap(),
            &ops::sum_rows(&xg).unwrap(),
        );
        close(
            &format!("sum_all {dt}"),
            &ops::sum_all(&xc).unwrap(),
            &ops::sum_all(&xg).unwrap(),
        );
        close(
            &format!("sum_squares {dt}"),
            &ops::sum_squares(&xc).unwrap(),
            &ops::sum_squares(&xg).unwrap(),
        );
        // A multiple of 8 elements, more than one grid's worth: the 8-wide block sums (squares:
        // a sum of positives, so the f32 tolerance is meaningful).
        let (bc, bg) = pair(&mut r, &[1100, 1000], dt, dev);
        close(
            &format!("sum_squares {dt} 1.1M"),
            &ops::sum_squares(&bc).unwrap(),
            &ops::sum_squares(&bg).unwrap(),
        );
        // Many tensors in one launch (the gradient norm): sizes from one unit of 8 to several
        // blocks' worth, one not a multiple of 8 and one of another dtype (both added apart).
        let other = if dt == DType::F32 {
            DType::BF16
        } else {
            DType::F32
        };
        let shapes: [(&[usize], DType); 6] = [
            (&[8], dt),
            (&[3000, 1024], dt),
            (&[13], dt),
            (&[64, 2048], dt),
            (&[40], other),
            (&[1, 70_000 * 8], dt),
        ];
        let ts: Vec<(Tensor, Tensor)> = shapes
            .iter()
            .map(|&(s, d)| pair(&mut r, s, d, dev))
            .collect();
        let cs: Vec<&Tensor> = ts.iter().map(|t| &t.0).collect();
        let gs: Vec<&Tensor> = ts.iter().map(|t| &t.1).collect();
        close(
            &format!("sum_squares_many {dt}"),
            &ops::sum_squares_many(&cs).unwrap(),
            &ops::sum_squares_many(&gs).unwrap(),
        );
    }
    // The MoE dispatch: histogram and a stable sort of expert ids (with out-of-range ids).
    for (n, bins) in [
        (1usize, 1usize),
        (1000, 8),
        (65536, 128),
        (5000, 256),
        (3000, 1000),
    ] {
        let ids: Vec<i32> = (0..n)
            .map(|_| r.random_range(-1..bins as i32 + 1))
            .collect();
        let (c, g) = (
            Tensor::from_vec(ids.clone(), &[n]).unwrap(),
            Tensor::from_slice(&ids, &[n], dev).unwrap(),
        );
        close(
            &format!("histogram n={n} bins={bins}"),
            &ops::histogram(&c, bins).unwrap(),
            &ops::histogram(&g, bins).unwrap(),
        );
        close(
            &format!("argsort_stable n={n} bins={bins}"),
            &ops::argsort_stable(&c, bins).unwrap(),
            &ops::argsort_stable(&g, bins).unwrap(),
        );
    }
}

#[test]
fn adamw_matches() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("adamw_matches");
    let hp = AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    // 10 000 elements: the 4-wide kernel; 9 999: one element per thread.
    for (gdt, n) in FLOATS.iter().flat_map(|&d| [(d, 10_000usize), (d, 9_999)]) {
        let (mut pc, _) = pair(&mut r, &[n], DType::F32, dev);
        let (gc, gg) = pair(&mut r, &[n], gdt, dev);
        let (mut mc, _) = pair(&mut r, &[n], DType::F32, dev);
        let mut vc = ops::scale(&ops::mul(&mc, &mc).unwrap(), 1.0).unwrap();
        let (mut pg, mut mg, mut vg) = (
            pc.to_device(dev).unwrap(),
            mc.to_device(dev).unwrap(),
            vc.to_device(dev).unwrap(),
        );
        let mut copy_c = Tensor::zeros(&[n], DType::BF16, Device::Cpu).unwrap();
        let mut copy_g = Tensor::zeros(&[n], DType::BF16, dev).unwrap();
        ops::adamw_step(
            &mut pc,
            &gc,
            &mut mc,
            &mut vc,
            &hp,
            7,
            0.5,
            Some(&mut copy_c),
        )
        .unwrap();
        ops::adamw_step(
            &mut pg,
            &gg,
            &mut mg,
            &mut vg,
            &hp,
            7,
            0.5,
            Some(&mut copy_g),
        )
        .unwrap();
        close(&format!("adamw param (grad {gdt}, n {n})"), &pc, &pg);
        close("adamw m", &mc, &mg);
        close("adamw v", &vc, &vg);
        close("adamw bf16 copy", &copy_c, &copy_g);
    }
}

/// (groups, K, N, fewest and most rows per group) of the grouped GEMM tests: the first nine take
/// the tiled tensor-core kernels (on Hopper the 128×256×64 wgmma ones: the fifth and sixth have K
/// and N tails, several 128-row tiles per group and, in wgrad, group sizes that are not
/// multiples of 64; the seventh has more groups than the tile-prefix scan's 256-thread block; the
/// eighth and ninth take the persistent TMA kernels with several tiles per CTA, the weight
/// gradient's too (>= 256 rows per group on average), the ninth with K and N tails), the last
/// three the small-M (decode) kernel, one of them with groups larger than its 8-row chunk and N
/// not a multiple of 32.
const GROUPED_SHAPES: [(usize, usize, usize, usize, usize); 12] = [
    (1, 64, 32, 0, 200),
    (8, 256, 384, 0, 200),
    (64, 128, 96, 0, 200),
    (5, 72, 40, 0, 200),
    (4, 200, 520, 0, 400),
    (3, 1024, 776, 0, 700),
    (300, 64, 32, 0, 40),
    (8, 512, 1536, 300, 1000),
    (3, 200, 776, 500, 900),
    (16, 2048, 1536, 0, 3),
    (32, 512, 200, 0, 3),
    (128, 256, 64, 0, 2),
];

#[test]
fn grouped_gemm() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("grouped_gemm");
    for dt in FLOATS {
        for shape in GROUPED_SHAPES {
            grouped_case(&mut r, dev, dt, shape);
        }
    }
}

/// The grouped GEMMs' other kernels on Hopper, forced through the settings, on the tiled and TMA
/// shapes of `GROUPED_SHAPES` (2nd, 6th, 8th, 9th): the cp.async wgmma kernels (what unaligned
/// bases take), the cooperative TMA weight gradient (what accumulating with sums takes) and the
/// mma.sync kernels other GPUs run. Elsewhere the settings change nothing and the cases run as
/// in `grouped_gemm`.
#[test]
fn grouped_gemm_fallbacks() {
    let Some(dev) = gpu() else { return };
    let hopper = moe::runtime::cuda::device(0).unwrap().arch() == "sm_90a";
    let mut r = rng("grouped_gemm_fallbacks");
    let base = KernelSettings::default();
    for dt in [DType::BF16, DType::F16] {
        let n = dt.name();
        // Each variant's kernels by name (on Hopper): forward x·Wᵀ and x·W, weight gradient
        // written f32, accumulated f32 and written in dt.
        let names = |p: &str| {
            vec![
                format!("{p}_tn_{n}_f32"),
                format!("{p}_tn_{n}_f32_acc"),
                format!("{p}_tn_{n}_{n}"),
            ]
        };
        let with_products = |p: &str| {
            let mut v = vec![format!("{p}_nt_{n}"), format!("{p}_nn_{n}")];
            v.extend(names(p));
            v
        };
        let variants = [
            (
                KernelSettings {
                    gg_tma: false,
                    ..base.clone()
                },
                with_products("wg"),
            ),
            (
                KernelSettings {
                    gg_pingpong: false,
                    ..base.clone()
                },
                names("tt"),
            ),
            (
                KernelSettings {
                    gg_mma_on_hopper: true,
                    ..base.clone()
                },
                with_products("gg"),
            ),
        ];
        for (settings, kernels) in variants {
            let ran = if hopper { kernels } else { Vec::new() };
            forcing(&settings, &ran, || {
                for i in [1, 5, 7, 8] {
                    grouped_case(&mut r, dev, dt, GROUPED_SHAPES[i]);
                }
            });
        }
    }
}

/// One grouped GEMM case of `dt` on both devices, every element compared: x·W[e]ᵀ and x·W[e],
/// the weight gradient written and accumulated (f32 and `dt`, with and without the sums of
/// squares), and the gathered forward and weight gradient.
fn grouped_case(
    r: &mut ChaCha8Rng,
    dev: Device,
    dt: DType,
    (e, k, n, least, most): (usize, usize, usize, usize, usize),
) {
    let mut sizes: Vec<usize> = (0..e).map(|_| r.random_range(least..most)).collect();
    sizes[0] = 0; // an empty group
    if e == 32 {
        sizes[1] = 20; // more rows than one chunk of the small-M kernel
    }
    let (off, oc, og) = offsets_pair(&sizes, dev);
    let m = *off.last().unwrap() as usize + 3; // trailing rows in no group
    let (xc, xg) = pair(r, &[m, k], dt, dev);
    let (wc, wg) = pair(r, &[e, n, k], dt, dev);
    close_each(
        &format!("grouped nt {dt} e={e} k={k} n={n}"),
        &ops::grouped_matmul(&xc, &wc, &oc, true).unwrap(),
        &ops::grouped_matmul(&xg, &wg, &og, true).unwrap(),
    );
    let (w2c, w2g) = pair(r, &[e, k, n], dt, dev);
    close_each(
        &format!("grouped nn {dt} e={e} k={k} n={n}"),
        &ops::grouped_matmul(&xc, &w2c, &oc, false).unwrap(),
        &ops::grouped_matmul(&xg, &w2g, &og, false).unwrap(),
    );
    let (dyc, dyg) = pair(r, &[m, n], dt, dev);
    close_each(
        &format!("grouped tn {dt} e={e} k={k} n={n}"),
        &ops::grouped_matmul_tn(&dyc, &xc, &oc, DType::F32).unwrap(),
        &ops::grouped_matmul_tn(&dyg, &xg, &og, DType::F32).unwrap(),
    );
    // Writing (accumulate false) and accumulating into an existing f32 or same-dtype
    // gradient, with and without the squares of the values summed onto 0.25 (on Hopper
    // the gradients leave through TMA stores, or TMA reduce-adds when accumulating
    // without sums, f32 and 16-bit alike; accumulating with sums reads them back).
    for (acc_dt, accumulate, sums) in [
        (DType::F32, true, true),
        (DType::F32, true, false),
        (DType::F32, false, true),
        (dt, true, true),
        (dt, true, false),
        (dt, false, true),
    ] {
        let (mut gc, mut gg) = pair(r, &[e, n, k], acc_dt, dev);
        let mut sc = Tensor::from_vec(vec![0.25f32], &[1]).unwrap();
        let mut sg = sc.to_device(dev).unwrap();
        let (scm, sgm) = if sums {
            (Some(&mut sc), Some(&mut sg))
        } else {
            (None, None)
        };
        ops::grouped_matmul_tn_into(&mut gc, &dyc, &xc, &oc, accumulate, scm).unwrap();
        ops::grouped_matmul_tn_into(&mut gg, &dyg, &xg, &og, accumulate, sgm).unwrap();
        let what = format!(
            "grouped tn {} {dt}->{acc_dt} (sums {sums}) e={e} k={k} n={n}",
            if accumulate { "+=" } else { "=" }
        );
        close_each(&what, &gc, &gg);
        if sums {
            let (a, g) = (sc.scalar_f32().unwrap(), sg.scalar_f32().unwrap());
            assert!(((a - g) / a).abs() < 1e-4, "{what}: sumsq CPU {a} GPU {g}");
        }
    }
    if dt != DType::F32 {
        close_each(
            &format!("grouped tn {dt}->{dt} e={e} k={k} n={n}"),
            &ops::grouped_matmul_tn(&dyc, &xc, &oc, dt).unwrap(),
            &ops::grouped_matmul_tn(&dyg, &xg, &og, dt).unwrap(),
        );
    }
    // x read through a permutation (the MoE experts): rows of a smaller source with
    // repeats, and two indices out of range (zero rows); gathered first, then the plain
    // kernels.
    let src = m / 2 + 1;
    let mut idx: Vec<i32> = (0..m).map(|_| r.random_range(0..src as i32)).collect();
    idx[m / 3] = -1;
    idx[m - 1] = src as i32;
    let (ic, ig) = (
        Tensor::from_vec(idx.clone(), &[m]).unwrap(),
        Tensor::from_slice(&idx, &[m], dev).unwrap(),
    );
    let (sxc, sxg) = pair(r, &[src, k], dt, dev);
    close_each(
        &format!("grouped nt gather {dt} e={e} k={k} n={n}"),
        &ops::grouped_matmul_gather(&sxc, &ic, &wc, &oc).unwrap(),
        &ops::grouped_matmul_gather(&sxg, &ig, &wg, &og).unwrap(),
    );
    for (acc, acc_dt) in [(false, DType::F32), (true, DType::F32), (true, dt)] {
        let (mut gc, mut gg) = pair(r, &[e, n, k], acc_dt, dev);
        let mut sc = Tensor::from_vec(vec![0.5f32], &[1]).unwrap();
        let mut sg = sc.to_device(dev).unwrap();
        ops::grouped_matmul_tn_gather_into(&mut gc, &dyc, &sxc, &ic, &oc, acc, Some(&mut sc))
            .unwrap();
        ops::grouped_matmul_tn_gather_into(&mut gg, &dyg, &sxg, &ig, &og, acc, Some(&mut sg))
            .unwrap();
        close_each(
            &format!("grouped tn gather (acc {acc}) {dt}->{acc_dt} e={e} k={k} n={n}"),
            &gc,
            &gg,
        );
        let (a, g) = (sc.scalar_f32().unwrap(), sg.scalar_f32().unwrap());
        assert!(
            ((a - g) / a).abs() < 1e-4,
            "grouped tn gather sumsq {dt}->{acc_dt} e={e} k={k} n={n}: CPU {a} GPU {g}"
        );
    }
}

/// Batched decode's experts (a few rows per group, 16-bit types, K % 32 == 0): the tensor-core
/// small-M kernel with 1, 2 and 4 eight-row tiles per pass, groups larger than one pass, empty
/// groups, N not a multiple of its 64-column blocks, rows in no group; and the same cases
/// through the CUDA-core kernel (what f32 and single rows take), forced by `small_mma` off.
#[test]
fn small_m_tensor_core_grouped_gemm() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("small_m_tensor_core_grouped_gemm");
    let cuda_cores = KernelSettings {
        small_mma: false,
        ..KernelSettings::default()
    };
    for dt in [DType::BF16, DType::F16] {
        for (sizes, k, n) in [
            (
                vec![0usize, 5, 3, 8, 1, 4, 0, 7, 2, 6, 4, 4],
                1024usize,
                264usize,
            ),
            (vec![9, 0, 10, 7], 96, 136),
            (vec![0, 45, 12], 2048, 200),
            (vec![2; 64], 768, 2048),
            // ~10 rows per group (m <= 64): two tiles per pass, one group of 18 in two passes.
            (vec![10, 12, 9, 11, 0, 18, 1], 256, 96),
        ] {
            let e = sizes.len();
            let (off, oc, og) = offsets_pair(&sizes, dev);
            let m = *off.last().unwrap() as usize + 3; // trailing rows in no group
            let (xc, xg) = pair(&mut r, &[m, k], dt, dev);
            let (wc, wg) = pair(&mut r, &[e, n, k], dt, dev);
            let want = ops::grouped_matmul(&xc, &wc, &oc, true).unwrap();
            close_each(
                &format!("small-M tensor-core grouped nt {dt} sizes={sizes:?} k={k} n={n}"),
                &want,
                &ops::grouped_matmul(&xg, &wg, &og, true).unwrap(),
            );
            // The CUDA-core kernel's rows per chunk: the mean rows per group, to a power of 2.
            let chunk = m.div_ceil(e).clamp(1, 8).next_power_of_two();
            let kernel = format!("gg_small_nt_r{chunk}_{}", dt.name());
            close_each(
                &format!("small-M CUDA-core grouped nt {dt} sizes={sizes:?} k={k} n={n}"),
                &want,
                &forcing(&cuda_cores, &[kernel], || {
                    ops::grouped_matmul(&xg, &wg, &og, true).unwrap()
                }),
            );
        }
    }
}

/// The served experts from router slots (decode): CUDA against the CPU twin, with column tails
/// (F not a multiple of the 4-column blocks, N not of 8), more choices than warps, tokens
/// sharing an expert, and an id outside [0, E) (no contribution on the GPU: the CPU gets the
/// same slot with weight 0).
#[test]
fn moe_serve_swiglu_matches() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("moe_serve_swiglu");
    for dt in FLOATS {
        for (t, kd, f, n, e, k) in [
            (1usize, 2048usize, 768usize, 2048usize, 128usize, 8usize),
            (2, 64, 40, 44, 16, 4),
            (3, 72, 24, 72, 8, 10),
            (1, 128, 64, 64, 8, 2),
            (2, 64, 32, 48, 4, 1),
            (1, 64, 24, 40, 8, 3),
        ] {
            let ids: Vec<i32> = (0..k * t).map(|_| r.random_range(0..e as i32)).collect();
            let mut wts: Vec<f32> = (0..k * t).map(|_| r.random_range(0.0..1.0)).collect();
            let mut scaled = |shape: &[usize], s: f32| scaled_pair(&mut r, shape, s, dt, dev);
            let (xc, xg) = scaled(&[t, kd], 1.0);
            let (w1c, w1g) = scaled(&[e, 2 * f, kd], 1.0 / (kd as f32).sqrt());
            let (w2c, w2g) = scaled(&[e, n, f], 1.0 / (f as f32).sqrt());
            let mut gids = ids.clone();
            gids[k * t - 1] = e as i32;
            wts[k * t - 1] = 0.0;
            let y = |x: &Tensor, w1: &Tensor, w2: &Tensor, ids: &[i32], d: Device| {
                let it = Tensor::from_slice(ids, &[k, t], d).unwrap();
                let wt = Tensor::from_slice(&wts, &[k, t], d).unwrap();
                ops::moe_serve_swiglu(x, w1, w2, &it, &wt).unwrap()
            };
            close_each(
                &format!("moe_serve_swiglu {dt} t={t} k={k} e={e} f={f} n={n}"),
                &y(&xc, &w1c, &w2c, &ids, Device::Cpu),
                &y(&xg, &w1g, &w2g, &gids, dev),
            );
        }
    }
}

/// The served router in one launch (GEMV blocks, then the last block routes each row in a warp)
/// against the CPU twin: logits within tolerance, the same experts in slot order, the same combine
/// weights; ties in the logits (the lower index wins, as in the route kernel), E not a multiple of
/// 32, up to 8 rows and 256 experts, and calls back to back (the arrival counter must be reset).
#[test]
fn router_topk_matches() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("router_topk");
    for dt in [DType::BF16, DType::F16] {
        for (t, kd, e, k, normalize) in [
            (1usize, 2048usize, 64usize, 8usize, false),
            (1, 2048, 128, 8, true),
            (3, 64, 33, 2, true),
            (8, 128, 256, 4, false),
            (2, 64, 8, 1, true),
        ] {
            let (xc, xg) = pair(&mut r, &[t, kd], dt, dev);
            // Router rows 0 and 5 equal (a tie in every row's logits) when E allows.
            let mut wv: Vec<f32> = (0..e * kd).map(|_| r.random_range(-0.1f32..0.1)).collect();
            wv.copy_within(0..kd, 5.min(e - 1) * kd);
            let wc = Tensor::from_f32(&wv, &[e, kd], dt, Device::Cpu).unwrap();
            let wg = wc.to_device(dev).unwrap();
            let rule = ops::SoftmaxTopK {
                k,
                normalize,
                add: 0.0,
                clamp_min: 0.0,
                scale: 1.0,
            };
            let what = format!("router_topk {dt} t={t} K={kd} E={e} k={k}");
            // The experts and weights the rule gives for the GPU's own logits (f32 sums in
            // another order may round differently from the CPU's): exact ids, close weights.
            let check = |what: &str, lg: &Tensor, ig: &Tensor, wtg: &Tensor| {
                assert_eq!(ig.shape(), &[k, t]);
                let gl = lg.to_f32_vec().unwrap();
                let ic = ig.to_device(Device::Cpu).unwrap();
                let (gi, gw) = (ic.as_slice::<i32>().unwrap(), wtg.to_f32_vec().unwrap());
                for ti in 0..t {
                    let row = &gl[ti * e..(ti + 1) * e];
                    let mut order: Vec<usize> = (0..e).collect();
                    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                    let m = row[order[0]];
                    let lse = m + row.iter().map(|&v| (v - m).exp()).sum::<f32>().ln();
                    let g: Vec<f32> = order[..k].iter().map(|&i| (row[i] - lse).exp()).collect();
                    let d = if normalize {
                        g.iter().sum::<f32>()
                    } else {
                        1.0
                    };
                    for j in 0..k {
                        assert_eq!(
                            gi[j * t + ti] as usize,
                            order[j],
                            "{what}: row {ti} choice {j}"
                        );
                        let want = g[j] / d;
                        assert!(
                            (gw[j * t + ti] - want).abs() <= 1e-5 * (1.0 + want),
                            "{what}: row {ti} weight {j}: {} vs {want}",
                            gw[j * t + ti]
                        );
                    }
                }
            };
            let (lc, _, _) = ops::router_topk(&xc, &wc, &rule).unwrap().unwrap();
            // The residual add + RMSNorm folded in: rows x + a normed by g.
            let (ac, ag) = pair(&mut r, &[t, kd], dt, dev);
            let (gc, gg) = pair(&mut r, &[kd], dt, dev);
            let (xnc, hc, _, _, _) = ops::add_rmsnorm_router_topk(&xc, &ac, &gc, 1e-6, &wc, &rule)
                .unwrap()
                .unwrap();
            for _ in 0..3 {
                let (lg, ig, wtg) = ops::router_topk(&xg, &wg, &rule)
                    .unwrap()
                    .expect("router_topk applies on the GPU here");
                close_each(&format!("{what} logits"), &lc, &lg);
                check(&what, &lg, &ig, &wtg);
                let (xng, hg, lng, ing, wng) =
                    ops::add_rmsnorm_router_topk(&xg, &ag, &gg, 1e-6, &wg, &rule)
                        .unwrap()
                        .expect("add_rmsnorm_router_topk applies on the GPU here");
                close_each(&format!("{what} addnorm residual"), &xnc, &xng);
                close_each(&format!("{what} addnorm rows"), &hc, &hg);
                // The logits against the CPU router on the GPU's normed rows (just checked at
                // the row dtype's tolerance): a row element that rounds to the other bf16/f16
                // neighbour moves logits of the CPU's own rows past the f32 tolerance.
                let hgc = hg.to_device(Device::Cpu).unwrap();
                let (lhc, _, _) = ops::router_topk(&hgc, &wc, &rule).unwrap().unwrap();
                close_each(
                    &format!("{what} addnorm logits of the GPU rows"),
                    &lhc,
                    &lng,
                );
                check(&format!("{what} addnorm"), &lng, &ing, &wng);
            }
            // x itself is left as it was.
            close(&format!("{what} x untouched"), &xc, &xg);
        }
    }
}

/// A served MoE block's o projection + residual add and folded router in one launch
/// (`ops::o_router_topk`) and the experts with the RMSNorm and combine weights folded in
/// (`ops::moe_serve_swiglu_norm`) against their CPU twins: new residual and z within tolerance,
/// the GPU's ids exactly the top k of its own z (ties to the lower index: two equal router
/// rows), E not a multiple of the 4-expert router blocks, up to 8 rows and 256 experts, calls
/// back to back (the arrival counter must be reset); then the experts from the GPU's s, z and ids
/// on both sides.
#[test]
fn o_router_and_served_norm_match() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("o_router_topk");
    for dt in [DType::BF16, DType::F16] {
        for (t, d, c, e, k, f, normalize) in [
            (
                1usize, 2048usize, 2048usize, 64usize, 8usize, 1024usize, false,
            ),
            (1, 2048, 4096, 128, 8, 768, true),
            (3, 64, 48, 33, 2, 40, true),
            (8, 128, 64, 256, 4, 24, false),
            (2, 64, 64, 8, 1, 32, true),
            // Two 16-byte vectors per thread (the second partial), then K past the loop's limit.
            (1, 4096, 64, 8, 2, 64, true),
            (1, 2056, 64, 8, 2, 24, false),
            (1, 8192, 64, 8, 2, 16, true),
        ] {
            let mut scaled = |shape: &[usize], s: f32| scaled_pair(&mut r, shape, s, dt, dev);
            let (xc, xg) = scaled(&[t, d], 1.0);
            let (cc, cg) = scaled(&[t, c], 1.0);
            let (woc, wog) = scaled(&[d, c], 1.0 / (c as f32).sqrt());
            let (gc, gg) = scaled(&[d], 1.0);
            let (w1c, w1g) = scaled(&[e, 2 * f, d], 1.0 / (d as f32).sqrt());
            let (w2c, w2g) = scaled(&[e, d, f], 1.0 / (f as f32).sqrt());
            // Folded router rows 0 and 5 equal (a tie in every row's z) when E allows.
            let mut wv: Vec<f32> = (0..e * (d + c))
                .map(|_| r.random_range(-0.1f32..0.1))
                .collect();
            wv.copy_within(0..d + c, 5.min(e - 1) * (d + c));
            let wfc = Tensor::from_f32(&wv, &[e, d + c], dt, Device::Cpu).unwrap();
            let wfg = wfc.to_device(dev).unwrap();
            let what = format!("o_router_topk {dt} t={t} D={d} C={c} E={e} k={k}");
            let (sc, zc, _) = ops::o_router_topk(&cc, &woc, &xc, &wfc, k)
                .unwrap()
                .unwrap();
            let rule = ops::SoftmaxTopK {
                k,
                normalize,
                add: 0.0,
                clamp_min: 0.0,
                scale: 1.5,
            };
            for _ in 0..3 {
                let (sg, zg, ig) = ops::o_router_topk(&cg, &wog, &xg, &wfg, k)
                    .unwrap()
                    .expect("o_router_topk applies on the GPU here");
                close_each(&format!("{what} new residual"), &sc, &sg);
                close_each_within(&format!("{what} z"), &zc, &zg, 1e-4);
                assert_eq!(ig.shape(), &[k, t]);
                let (gz, gi) = (zg.to_f32_vec().unwrap(), ig.to_vec::<i32>().unwrap());
                for ti in 0..t {
                    let row = &gz[ti * e..(ti + 1) * e];
                    let mut order: Vec<usize> = (0..e).collect();
                    order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
                    for j in 0..k {
                        assert_eq!(
                            gi[j * t + ti] as usize,
                            order[j],
                            "{what}: row {ti} choice {j}"
                        );
                    }
                }
                // The experts from the GPU's s, z and ids on both sides.
                let cpu = |v: &Tensor| v.to_device(Device::Cpu).unwrap();
                let yc = ops::moe_serve_swiglu_norm(
                    &cpu(&sg),
                    &gc,
                    1e-6,
                    &cpu(&zg),
                    &cpu(&ig),
                    &rule,
                    &w1c,
                    &w2c,
                )
                .unwrap();
                let yg = ops::moe_serve_swiglu_norm(&sg, &gg, 1e-6, &zg, &ig, &rule, &w1g, &w2g)
                    .unwrap();
                close(&format!("{what} served y"), &yc, &yg);
            }
            close(&format!("{what} x untouched"), &xc, &xg);
        }
    }
}

/// The one-row streaming-loop kernels' fallbacks, forced through the settings (`qkv_loop` and
/// `serve_up_loop` off; hidden sizes over 4096 take them by shape), every element against the
/// CPU: the q/k/v GEMV with the residual add + RMSNorm folded in, and the served gate/up with the
/// norm and combine weights, one block per column group.
#[test]
fn streaming_loop_fallbacks() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("streaming_loop_fallbacks");
    let off = KernelSettings {
        qkv_loop: false,
        serve_up_loop: false,
        ..KernelSettings::default()
    };
    let (d, nq, nk, e, k, f) = (2048usize, 2048usize, 512usize, 64usize, 8usize, 1024usize);
    for dt in [DType::BF16, DType::F16] {
        let n = dt.name();
        let mut scaled = |shape: &[usize], s: f32| scaled_pair(&mut r, shape, s, dt, dev);
        let (xc, xg) = scaled(&[1, d], 1.0);
        let (ac, ag) = scaled(&[1, d], 1.0);
        let (gc, gg) = scaled(&[d], 1.0);
        let ws = 1.0 / (d as f32).sqrt();
        let (wqc, wqg) = scaled(&[nq, d], ws);
        let (wkc, wkg) = scaled(&[nk, d], ws);
        let (wvc, wvg) = scaled(&[nk, d], ws);
        let (w1c, w1g) = scaled(&[e, 2 * f, d], ws);
        let (w2c, w2g) = scaled(&[e, d, f], 1.0 / (f as f32).sqrt());
        let (zc, zg) = scaled_pair(&mut r, &[1, e], 1.0, DType::F32, dev);
        let want =
            ops::add_rmsnorm_linear_qkv(&xc, &ac, &gc, 1e-6, &wqc, None, &wkc, None, &wvc, None)
                .unwrap()
                .expect("the CPU always computes add_rmsnorm_linear_qkv");
        let got = forcing(&off, &[format!("gemv3_addnormf_r1_{n}")], || {
            ops::add_rmsnorm_linear_qkv(&xg, &ag, &gg, 1e-6, &wqg, None, &wkg, None, &wvg, None)
                .unwrap()
                .expect("16-bit rows take the fused kernel")
        });
        let what = format!("add_rmsnorm_linear_qkv per-group kernel {dt}");
        close_each(&format!("{what}: residual"), &want.0, &got.0);
        close_each(&format!("{what}: q"), &want.1, &got.1);
        close_each(&format!("{what}: k"), &want.2, &got.2);
        close_each(&format!("{what}: v"), &want.3, &got.3);
        // k distinct experts for the one token, in slots [k, 1].
        let mut ids: Vec<i32> = Vec::new();
        while ids.len() < k {
            let id = r.random_range(0..e as i32);
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        let (ic, ig) = (
            Tensor::from_vec(ids.clone(), &[k, 1]).unwrap(),
            Tensor::from_slice(&ids, &[k, 1], dev).unwrap(),
        );
        let rule = ops::SoftmaxTopK {
            k,
            normalize: true,
            add: 0.0,
            clamp_min: 0.0,
            scale: 1.5,
        };
        let want = ops::moe_serve_swiglu_norm(&xc, &gc, 1e-6, &zc, &ic, &rule, &w1c, &w2c).unwrap();
        let got = forcing(&off, &[format!("moe_serve_up_norm_c8_{n}")], || {
            ops::moe_serve_swiglu_norm(&xg, &gg, 1e-6, &zg, &ig, &rule, &w1g, &w2g).unwrap()
        });
        close_each(
            &format!("moe_serve_swiglu_norm per-group kernel {dt} ids={ids:?}"),
            &want,
            &got,
        );
    }
}

/// RoPE tables (CPU, device) for `rot` rotary dims over `max_pos` positions, base 10000.
fn rope_tables(rot: usize, max_pos: usize, dev: Device) -> (RopeTable, RopeTable) {
    let inv: Vec<f32> = (0..rot / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / rot as f32))
        .collect();
    let table = |d: Device| RopeTable::new(&inv, max_pos, 1.0, d).unwrap();
    (table(Device::Cpu), table(dev))
}

/// A decode step's random (CPU, device) inputs: raw q [B, H·hd], k, v [B, Hkv·hd], and q/k norm
/// weights per head [hd] and over the full width.
struct StepInputs {
    q: (Tensor, Tensor),
    k: (Tensor, Tensor),
    v: (Tensor, Tensor),
    qw_head: (Tensor, Tensor),
    kw_head: (Tensor, Tensor),
    qw_full: (Tensor, Tensor),
    kw_full: (Tensor, Tensor),
}

fn step_inputs(
    r: &mut ChaCha8Rng,
    (b, h, hkv, hd): (usize, usize, usize, usize),
    dt: DType,
    dev: Device,
) -> StepInputs {
    StepInputs {
        q: pair(r, &[b, h * hd], dt, dev),
        k: pair(r, &[b, hkv * hd], dt, dev),
        v: pair(r, &[b, hkv * hd], dt, dev),
        qw_head: pair(r, &[hd], dt, dev),
        kw_head: pair(r, &[hd], dt, dev),
        qw_full: pair(r, &[h * hd], dt, dev),
        kw_full: pair(r, &[hkv * hd], dt, dev),
    }
}

/// The q/k norm and clip of a decode-step test case: mode 0 none (clip 1.5 on the raw
/// projections, inputs in ±2), 1 per head (clip 0.8 after the norm: normed values are ~±1..3,
/// as OLMoE's clip_qkv), 2 over the full width (no clip). Weights (q, k) per head and full width.
fn qk_norm_case<'a>(
    mode: usize,
    per_head: (&'a Tensor, &'a Tensor),
    full: (&'a Tensor, &'a Tensor),
) -> (Option<ops::QkNormSpec<'a>>, Option<f32>) {
    let spec = |(q, k): (&'a Tensor, &'a Tensor), per_head| {
        Some(ops::QkNormSpec {
            q,
            k,
            per_head,
            eps: 1e-6,
        })
    };
    match mode {
        0 => (None, Some(1.5)),
        1 => (spec(per_head, true), Some(0.8)),
        _ => (spec(full, false), None),
    }
}

/// A decode step's q/k norm + RoPE + K/V cache writes folded into the attention kernel
/// (attention_decode_step, head_dim 128, 16-bit) against the CPU's qk_rope_kv_write +
/// attention_decode: the context and both caches, for each norm mode with clip, partial
/// rotary, GQA, new positions at and around the 128-key split boundaries and at the cache end,
/// windows, and a position past lens (written, not read); the splits merged by each head's
/// last block and by the separate combine kernel (`attn_combine_kernel`), every element; and
/// with `attn_fused_rope` off, the step declines.
#[test]
fn fused_decode_attention_step() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("fused_decode_attention_step");
    let combine = KernelSettings {
        attn_combine_kernel: true,
        ..KernelSettings::default()
    };
    let unfused = KernelSettings {
        attn_fused_rope: false,
        ..KernelSettings::default()
    };
    for dt in [DType::BF16, DType::F16] {
        let rope_kernel = format!("attention_decode_rope_h128_{}", dt.name());
        let combine_kernel = format!("attention_decode_combine_{}", dt.name());
        for (h, hkv, rot, l, max_pos, pos) in [
            (16usize, 16usize, 128usize, 300usize, 300usize, vec![127i32]),
            (32, 4, 128, 260, 260, vec![128, 0, 259, 200]),
            (8, 2, 64, 520, 520, vec![450, 383]),
            (4, 4, 128, 130, 130, vec![129, 5, 64]),
        ] {
            let (b, hd) = (pos.len(), 128usize);
            let (tc, tg) = rope_tables(rot, max_pos, dev);
            let StepInputs {
                q: (qc, qg),
                k: (kc, kg),
                v: (vc, vg),
                qw_head: (qw_h, qw_hg),
                kw_head: (kw_h, kw_hg),
                qw_full: (qw_f, qw_fg),
                kw_full: (kw_f, kw_fg),
            } = step_inputs(&mut r, (b, h, hkv, hd), dt, dev);
            let seqs: Vec<i32> = (0..b as i32).collect();
            // lens = pos + 1 (the new key visible), except the last sequence of a batch of 4:
            // its new key lies past lens (written to the cache, not attended).
            let lens: Vec<i32> = pos
                .iter()
                .enumerate()
                .map(|(i, &p)| if b == 4 && i == 3 { p } else { p + 1 })
                .collect();
            let t = |v: &[i32], d: Device| Tensor::from_slice(v, &[v.len()], d).unwrap();
            let (sc, pc, lc) = (
                t(&seqs, Device::Cpu),
                t(&pos, Device::Cpu),
                t(&lens, Device::Cpu),
            );
            let (pg, lg) = (t(&pos, dev), t(&lens, dev));
            for (mode, window) in [(0, None), (1, Some(100)), (2, None)] {
                let (mut ckc, ckg) = pair(&mut r, &[b, hkv, l, hd], dt, dev);
                let (mut cvc, cvg) = pair(&mut r, &[b, hkv, l, hd], dt, dev);
                let (nc, clip) = qk_norm_case(mode, (&qw_h, &kw_h), (&qw_f, &kw_f));
                let (ng, _) = qk_norm_case(mode, (&qw_hg, &kw_hg), (&qw_fg, &kw_fg));
                let scale = 1.0 / (hd as f32).sqrt();
                let qr = ops::qk_rope_kv_write(
                    &qc, &kc, &vc, nc, clip, &tc, &pc, &sc, &mut ckc, &mut cvc, h,
                )
                .unwrap();
                let oc = ops::attention_decode(&qr, &ckc, &cvc, &lc, scale, window).unwrap();
                assert!(ops::attention_decode_step(
                    &qc,
                    &kc,
                    &vc,
                    nc,
                    clip,
                    &tc,
                    &pc,
                    &mut ckc.try_clone().unwrap(),
                    &mut cvc.try_clone().unwrap(),
                    &lc,
                    h,
                    scale,
                    window
                )
                .unwrap()
                .is_none());
                // The heads' splits merged by their last block (default) or by the separate
                // combine kernel.
                for (settings, kernels) in [
                    (KernelSettings::default(), vec![rope_kernel.clone()]),
                    (
                        combine.clone(),
                        vec![rope_kernel.clone(), combine_kernel.clone()],
                    ),
                ] {
                    let (mut ckg, mut cvg) = (ckg.try_clone().unwrap(), cvg.try_clone().unwrap());
                    let og = forcing(&settings, &kernels, || {
                        ops::attention_decode_step(
                            &qg, &kg, &vg, ng, clip, &tg, &pg, &mut ckg, &mut cvg, &lg, h, scale,
                            window,
                        )
                        .unwrap()
                        .expect("attention_decode_step fuses for head_dim 128 in 16-bit types")
                    });
                    let what = format!(
                        "attention_decode_step {dt} b={b} h={h}/{hkv} rot={rot} pos={pos:?} \
                         mode={mode} window={window:?} combine kernel {}",
                        settings.attn_combine_kernel
                    );
                    close_each(&format!("{what}: context"), &oc, &og);
                    close_each(&format!("{what}: k cache"), &ckc, &ckg);
                    close_each(&format!("{what}: v cache"), &cvc, &cvg);
                }
                // With the fused step off it declines (the caller runs qk_rope_kv_write and
                // attention_decode, as for other head dims).
                let declined = unfused.clone().scoped(|| {
                    ops::attention_decode_step(
                        &qg,
                        &kg,
                        &vg,
                        ng,
                        clip,
                        &tg,
                        &pg,
                        &mut ckg.try_clone().unwrap(),
                        &mut cvg.try_clone().unwrap(),
                        &lg,
                        h,
                        scale,
                        window,
                    )
                    .unwrap()
                    .is_none()
                });
                assert!(declined, "attention_decode_step with attn_fused_rope off");
            }
        }
    }
}

/// Greedy decoding's row arg-max on the GPU against the CPU's, with ties across parts, NaN,
/// -inf rows and +inf, at vocabulary sizes from tiny to Qwen3's: the one-pass kernel (the last
/// block of a row reduces its parts) and the two-kernel path (taken past the device's arrival
/// counters or in a graph's first capture), forced by `argmax_two_pass`.
#[test]
fn argmax_rows_matches() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("argmax_rows");
    let two_pass = KernelSettings {
        argmax_two_pass: true,
        ..KernelSettings::default()
    };
    for (settings, kernel) in [
        (KernelSettings::default(), "argmax_onepass"),
        (two_pass, "argmax_part"),
    ] {
        for dt in FLOATS {
            forcing(&settings, &[format!("{kernel}_{}", dt.name())], || {
                // (More than 256 parts of 2048 for the one-pass kernel's last block in the last
                // case.)
                for (rows, cols) in [
                    (1usize, 151_936usize),
                    (32, 50_304),
                    (3, 7),
                    (5, 4097),
                    (2, 600_008),
                ] {
                    let mut v: Vec<f32> = (0..rows * cols)
                        .map(|_| r.random_range(-4.0f32..4.0))
                        .collect();
                    // Row 0: the maximum twice, far apart (the first must win across parts).
                    v[cols - 1] = 9.0;
                    v[cols / 3] = 9.0;
                    if rows > 1 {
                        v[cols..2 * cols].fill(f32::NEG_INFINITY);
                        v[cols + cols / 2] = f32::NAN;
                    }
                    if rows > 2 {
                        v[2 * cols] = f32::NAN;
                        v[3 * cols - 1] = f32::INFINITY;
                    }
                    let c = Tensor::from_f32(&v, &[rows, cols], dt, Device::Cpu).unwrap();
                    let g = c.to_device(dev).unwrap();
                    let want = ops::argmax_rows(&c).unwrap().to_vec::<i32>().unwrap();
                    assert_eq!(
                        ops::argmax_rows(&g).unwrap().to_vec::<i32>().unwrap(),
                        want,
                        "argmax_rows ({kernel}) {dt} {rows}x{cols}"
                    );
                    // The greedy decode step's advance: ids into a given buffer, positions and
                    // lengths one further, on both devices.
                    let pos: Vec<i32> = (0..rows as i32).map(|i| 7 * i).collect();
                    let lens: Vec<i32> = pos.iter().map(|p| p + 1).collect();
                    for (d, x) in [(Device::Cpu, &c), (dev, &g)] {
                        let mut ids = Tensor::zeros(&[rows], DType::I32, d).unwrap();
                        let mut p = Tensor::from_slice(&pos, &[rows], d).unwrap();
                        let mut l = Tensor::from_slice(&lens, &[rows], d).unwrap();
                        ops::argmax_rows_advance(x, &mut ids, &mut p, &mut l).unwrap();
                        assert_eq!(
                            ids.to_vec::<i32>().unwrap(),
                            want,
                            "argmax_rows_advance ({kernel}) {d:?} {dt} {rows}x{cols}"
                        );
                        let plus = |v: &[i32]| v.iter().map(|x| x + 1).collect::<Vec<_>>();
                        assert_eq!(p.to_vec::<i32>().unwrap(), plus(&pos), "positions {d:?}");
                        assert_eq!(l.to_vec::<i32>().unwrap(), plus(&lens), "lengths {d:?}");
                    }
                }
            });
        }
    }
}

#[test]
fn bad_device_strings_are_errors() {
    for s in ["tpu", "cuda:x", "cuda:-1", ""] {
        let err = Device::parse(s).unwrap_err().to_string();
        assert!(err.contains("unknown device"), "{s}: {err}");
    }
    if gpu().is_none() {
        let err = Device::parse("cuda").unwrap_err().to_string();
        assert!(err.contains("none is usable"), "{err}");
    }
}

#[test]
fn kv_cache_write_and_decode_attention() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("kv_cache_write_and_decode_attention");
    for dt in FLOATS {
        for (b, h, hkv, l, hd) in [
            (1usize, 4usize, 4usize, 40usize, 64usize),
            (3, 8, 2, 100, 128),
            (2, 6, 3, 17, 80),
            // bf16 rows of 36 take the scalar key loads; 300 keys span three 128-key splits.
            (2, 4, 2, 300, 36),
            // head_dim 128 in 16-bit types: the one-round-per-32-keys kernel, over several
            // splits with partial 32-key groups and warps with no keys.
            (2, 4, 2, 600, 128),
            (1, 2, 1, 257, 128),
        ] {
            let (kc, _) = pair(&mut r, &[b, hkv, l, hd], dt, dev);
            let (vc, _) = pair(&mut r, &[b, hkv, l, hd], dt, dev);
            let (mut kc, mut vc) = (kc, vc);
            let (mut kg, mut vg) = (kc.to_device(dev).unwrap(), vc.to_device(dev).unwrap());
            // Append 5 new rows to random (sequence, position) slots.
            let (nc, ng) = pair(&mut r, &[5, hkv, hd], dt, dev);
            // Distinct slots (a cache never receives two rows for one position in one call).
            let mut slots: Vec<(i32, i32)> = Vec::new();
            while slots.len() < 5 {
                let s = (r.random_range(0..b as i32), r.random_range(0..l as i32));
                if !slots.contains(&s) {
                    slots.push(s);
                }
            }
            let bi: Vec<i32> = slots.iter().map(|s| s.0).collect();
            let pi: Vec<i32> = slots.iter().map(|s| s.1).collect();
            let (bc, bg) = (
                Tensor::from_vec(bi.clone(), &[5]).unwrap(),
                Tensor::from_slice(&bi, &[5], dev).unwrap(),
            );
            let (pc, pg) = (
                Tensor::from_vec(pi.clone(), &[5]).unwrap(),
                Tensor::from_slice(&pi, &[5], dev).unwrap(),
            );
            ops::kv_write(&mut kc, &nc, &bc, &pc).unwrap();
            ops::kv_write(&mut kg, &ng, &bg, &pg).unwrap();
            ops::kv_write(&mut vc, &nc, &bc, &pc).unwrap();
            ops::kv_write(&mut vg, &ng, &bg, &pg).unwrap();
            close(&format!("kv_write {dt}"), &kc, &kg);
            let lens: Vec<i32> = (0..b).map(|_| r.random_range(1..=l as i32)).collect();
            let (lc, lg) = (
                Tensor::from_vec(lens.clone(), &[b]).unwrap(),
                Tensor::from_slice(&lens, &[b], dev).unwrap(),
            );
            let (qc, qg) = pair(&mut r, &[b, h, hd], dt, dev);
            for window in [None, Some(7), Some(100)] {
                let scale = 1.0 / (hd as f32).sqrt();
                close(
                    &format!("attention_decode {dt} b={b} h={h}/{hkv} window={window:?}"),
                    &ops::attention_decode(&qc, &kc, &vc, &lc, scale, window).unwrap(),
                    &ops::attention_decode(&qg, &kg, &vg, &lg, scale, window).unwrap(),
                );
            }
        }
    }
}

/// Decode attention's other kernels on head dim 128 (16-bit), forced through the settings, every
/// element against the CPU: the general kernel (what other head dims and f32 run;
/// `attn_h128` off) and the head-dim-128 kernel with the separate split-KV combine kernel (taken
/// past the device's arrival counters or in a graph's first capture; `attn_combine_kernel`),
/// over one, several and partial 128-key splits, GQA and windows.
#[test]
fn decode_attention_fallbacks() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("decode_attention_fallbacks");
    let general = KernelSettings {
        attn_h128: false,
        ..KernelSettings::default()
    };
    let combine = KernelSettings {
        attn_combine_kernel: true,
        ..KernelSettings::default()
    };
    for dt in [DType::BF16, DType::F16] {
        let n = dt.name();
        let variants = [
            (
                "general kernel",
                &general,
                vec![format!("attention_decode_{n}")],
            ),
            (
                "combine kernel",
                &combine,
                vec![
                    format!("attention_decode_h128_{n}"),
                    format!("attention_decode_combine_{n}"),
                ],
            ),
        ];
        for (b, h, hkv, l) in [
            (2usize, 4usize, 2usize, 600usize),
            (3, 8, 2, 100),
            (1, 2, 1, 257),
        ] {
            let hd = 128;
            let (kc, kg) = pair(&mut r, &[b, hkv, l, hd], dt, dev);
            let (vc, vg) = pair(&mut r, &[b, hkv, l, hd], dt, dev);
            let (qc, qg) = pair(&mut r, &[b, h, hd], dt, dev);
            let lens: Vec<i32> = (0..b).map(|_| r.random_range(1..=l as i32)).collect();
            let (lc, lg) = (
                Tensor::from_vec(lens.clone(), &[b]).unwrap(),
                Tensor::from_slice(&lens, &[b], dev).unwrap(),
            );
            let scale = 1.0 / (hd as f32).sqrt();
            for window in [None, Some(100)] {
                let want = ops::attention_decode(&qc, &kc, &vc, &lc, scale, window).unwrap();
                for (what, settings, kernels) in &variants {
                    let got = forcing(settings, kernels, || {
                        ops::attention_decode(&qg, &kg, &vg, &lg, scale, window).unwrap()
                    });
                    close_each(
                        &format!(
                            "attention_decode ({what}) {dt} b={b} h={h}/{hkv} l={l} lens={lens:?} \
                             window={window:?}"
                        ),
                        &want,
                        &got,
                    );
                }
            }
        }
    }
}

/// The fused inference kernels against their composed CPU twins: residual add + RMSNorm, and the
/// decode step's q/k norm (none, per head, full width) + RoPE (full and partial rotary) + K/V
/// cache writes (GQA, a cache row whose other slots must stay untouched).
#[test]
fn fused_decode_ops() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("fused_decode_ops");
    for dt in FLOATS {
        for (rows, cols) in [(1usize, 2048usize), (5, 100), (3, 4096)] {
            let (mut xc, xg) = pair(&mut r, &[rows, cols], dt, dev);
            let mut xg = xg;
            let (ac, ag) = pair(&mut r, &[rows, cols], dt, dev);
            let (wc, wg) = pair(&mut r, &[cols], dt, dev);
            let yc = ops::add_rmsnorm(&mut xc, &ac, &wc, 1e-6).unwrap();
            let yg = ops::add_rmsnorm(&mut xg, &ag, &wg, 1e-6).unwrap();
            close(&format!("add_rmsnorm y {dt} {rows}x{cols}"), &yc, &yg);
            close(&format!("add_rmsnorm x {dt} {rows}x{cols}"), &xc, &xg);
        }
        // q/k/v projections of 1..8 rows in one launch (16-bit; f32 takes three GEMMs).
        for (m, kdim, nq, nk, bias) in [
            (1usize, 2048usize, 2048usize, 512usize, false),
            (3, 256, 128, 64, true),
            (8, 512, 1000, 96, false),
            // One row: the streaming-loop kernel (partial column groups; one and two vectors
            // per thread, the second partial), and past its K.
            (1, 136, 100, 20, true),
            (1, 4096, 256, 64, false),
            (1, 2056, 64, 16, false),
            (1, 8192, 64, 16, false),
        ] {
            let (xc, xg) = pair(&mut r, &[m, kdim], dt, dev);
            let (wqc, wqg) = pair(&mut r, &[nq, kdim], dt, dev);
            let (wkc, wkg) = pair(&mut r, &[nk, kdim], dt, dev);
            let (wvc, wvg) = pair(&mut r, &[nk, kdim], dt, dev);
            let (bqc, bqg) = pair(&mut r, &[nq], dt, dev);
            let (bkc, bkg) = pair(&mut r, &[nk], dt, dev);
            let (bvc, bvg) = pair(&mut r, &[nk], dt, dev);
            let (oc, og) = if bias {
                (
                    ops::linear_qkv(&xc, &wqc, Some(&bqc), &wkc, Some(&bkc), &wvc, Some(&bvc)),
                    ops::linear_qkv(&xg, &wqg, Some(&bqg), &wkg, Some(&bkg), &wvg, Some(&bvg)),
                )
            } else {
                (
                    ops::linear_qkv(&xc, &wqc, None, &wkc, None, &wvc, None),
                    ops::linear_qkv(&xg, &wqg, None, &wkg, None, &wvg, None),
                )
            };
            let (oc, og) = (oc.unwrap(), og.unwrap());
            let what = format!("linear_qkv {dt} m={m} k={kdim} nq={nq} nk={nk} bias={bias}");
            close(&format!("{what}: q"), &oc.0, &og.0);
            close(&format!("{what}: k"), &oc.1, &og.1);
            close(&format!("{what}: v"), &oc.2, &og.2);
            // With the residual add + RMSNorm folded in (16-bit: one launch; f32: None).
            let (ac, ag) = pair(&mut r, &[m, kdim], dt, dev);
            let (gc, gg) = pair(&mut r, &[kdim], dt, dev);
            let bq = |c: bool| bias.then_some(if c { &bqc } else { &bqg });
            let bk = |c: bool| bias.then_some(if c { &bkc } else { &bkg });
            let bv = |c: bool| bias.then_some(if c { &bvc } else { &bvg });
            let fc = ops::add_rmsnorm_linear_qkv(
                &xc,
                &ac,
                &gc,
                1e-6,
                &wqc,
                bq(true),
                &wkc,
                bk(true),
                &wvc,
                bv(true),
            )
            .unwrap()
            .expect("the CPU always computes add_rmsnorm_linear_qkv");
            let fg = ops::add_rmsnorm_linear_qkv(
                &xg,
                &ag,
                &gg,
                1e-6,
                &wqg,
                bq(false),
                &wkg,
                bk(false),
                &wvg,
                bv(false),
            )
            .unwrap();
            assert_eq!(
                fg.is_some(),
                dt != DType::F32,
                "{what}: addnorm applies to 16-bit rows"
            );
            if let Some(fg) = fg {
                close(&format!("{what} addnorm: residual"), &fc.0, &fg.0);
                close(&format!("{what} addnorm: q"), &fc.1, &fg.1);
                close(&format!("{what} addnorm: k"), &fc.2, &fg.2);
                close(&format!("{what} addnorm: v"), &fc.3, &fg.3);
                close(&format!("{what} addnorm: x untouched"), &xc, &xg);
            }
        }
        for (b, h, hkv, hd, rot, l) in [
            (1usize, 16usize, 16usize, 128usize, 128usize, 40usize),
            (4, 32, 4, 128, 128, 64),
            (3, 6, 2, 80, 40, 20),
        ] {
            let (tc, tg) = rope_tables(rot, l, dev);
            let StepInputs {
                q: (qc, qg),
                k: (kc, kg),
                v: (vc, vg),
                qw_head: (qw_h, qw_hg),
                kw_head: (kw_h, kw_hg),
                qw_full: (qw_f, qw_fg),
                kw_full: (kw_f, kw_fg),
            } = step_inputs(&mut r, (b, h, hkv, hd), dt, dev);
            // Cache rows b+1 (one more than the batch) with random contents; each sequence i
            // writes cache row seqs[i] at a random position.
            let seqs: Vec<i32> = (0..b as i32).rev().collect();
            let pos: Vec<i32> = (0..b).map(|_| r.random_range(0..l as i32)).collect();
            let (sc, sg) = (
                Tensor::from_vec(seqs.clone(), &[b]).unwrap(),
                Tensor::from_slice(&seqs, &[b], dev).unwrap(),
            );
            let (pc, pg) = (
                Tensor::from_vec(pos.clone(), &[b]).unwrap(),
                Tensor::from_slice(&pos, &[b], dev).unwrap(),
            );
            for mode in 0..3 {
                let (mut ckc, mut ckg) = pair(&mut r, &[b + 1, hkv, l, hd], dt, dev);
                let (mut cvc, mut cvg) = pair(&mut r, &[b + 1, hkv, l, hd], dt, dev);
                let (nc, clip) = qk_norm_case(mode, (&qw_h, &kw_h), (&qw_f, &kw_f));
                let (ng, _) = qk_norm_case(mode, (&qw_hg, &kw_hg), (&qw_fg, &kw_fg));
                let oc = ops::qk_rope_kv_write(
                    &qc, &kc, &vc, nc, clip, &tc, &pc, &sc, &mut ckc, &mut cvc, h,
                )
                .unwrap();
                let og = ops::qk_rope_kv_write(
                    &qg, &kg, &vg, ng, clip, &tg, &pg, &sg, &mut ckg, &mut cvg, h,
                )
                .unwrap();
                let what = format!(
                    "qk_rope_kv {dt} b={b} h={h}/{hkv} hd={hd} rot={rot} mode={mode} clip={clip:?}"
                );
                close(&format!("{what}: q"), &oc, &og);
                close(&format!("{what}: k cache"), &ckc, &ckg);
                close(&format!("{what}: v cache"), &cvc, &cvg);
            }
        }
    }
}

/// Fused causal attention against its CPU twin: forward (o, lse) with the projections' row
/// layout and with a head-major KV cache continuing at a later position, and the backward (dq,
/// dk, dv). Shapes cover both head dims, GQA, sequences that are not a multiple of the 64-row
/// tile, a single token and a sliding window.
#[test]
fn flash_attention_matches() {
    let Some(dev) = gpu() else { return };
    let mut r = rng("flash_attention_matches");
    let rel = |a: &Tensor, b: &Tensor| {
        let (a, b) = (a.to_f32_vec().unwrap(), b.to_f32_vec().unwrap());
        assert!(b.iter().all(|v| v.is_finite()), "non-finite GPU lse");
        let num: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum();
        let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    };
    for dt in [DType::BF16, DType::F16] {
        for (b, s, h, hkv, hd, window, start) in [
            (2usize, 200usize, 4usize, 2usize, 128usize, None, 37usize),
            (1, 64, 2, 2, 64, None, 0),
            (2, 130, 6, 3, 64, Some(50usize), 70),
            (1, 1, 2, 1, 128, None, 5),
            (1, 300, 2, 1, 128, Some(100), 0),
        ] {
            let what = format!("{dt} b={b} s={s} h={h}/{hkv} hd={hd} window={window:?}");
            let spec = ops::FlashSpec {
                scale: 1.0 / (hd as f32).sqrt(),
                start: 0,
                window,
            };
            let (qc, qg) = pair(&mut r, &[b, s, h, hd], dt, dev);
            let (kc, kg) = pair(&mut r, &[b, s, hkv, hd], dt, dev);
            let (vc, vg) = pair(&mut r, &[b, s, hkv, hd], dt, dev);
            let tok = ops::KvLayout::Tokens;
            let (oc, lc) = ops::flash_attention(&qc, &kc, &vc, tok, s, spec).unwrap();
            let (og, lg) = ops::flash_attention(&qg, &kg, &vg, tok, s, spec).unwrap();
            close_each(&format!("flash fwd o {what}"), &oc, &og);
            let e = rel(&lc, &lg);
            assert!(e < 1e-4, "flash fwd lse {what}: relative error {e:.2e}");
            // A continuation: queries at start.. over a head-major cache with spare rows.
            let cap = start + s + 9;
            let (cc, cg) = pair(&mut r, &[b, hkv, cap, hd], dt, dev);
            let (wc, wg) = pair(&mut r, &[b, hkv, cap, hd], dt, dev);
            let spec_c = ops::FlashSpec { start, ..spec };
            let heads = ops::KvLayout::Heads;
            let (oc2, lc2) = ops::flash_attention(&qc, &cc, &wc, heads, start + s, spec_c).unwrap();
            let (og2, lg2) = ops::flash_attention(&qg, &cg, &wg, heads, start + s, spec_c).unwrap();
            close_each(
                &format!("flash fwd cache start={start} o {what}"),
                &oc2,
                &og2,
            );
            let e = rel(&lc2, &lg2);
            assert!(
                e < 1e-4,
                "flash fwd cache lse {what}: relative error {e:.2e}"
            );
            // (With one query its only key gets all the weight: dq = 0 exactly, and the GPU's
            // rounding noise has no scale to be relative to. The forward still runs at s = 1.)
            if s == 1 {
                continue;
            }
            let (dc, dg) = pair(&mut r, &[b * s, h * hd], dt, dev);
            // The CPU twin gets the GPU's o and lse: the comparison isolates the backward.
            let (ogc, lgc) = (
                og.to_device(Device::Cpu).unwrap(),
                lg.to_device(Device::Cpu).unwrap(),
            );
            let (dqc, dkc, dvc) =
                ops::flash_attention_backward(&qc, &kc, &vc, &ogc, &lgc, &dc, spec).unwrap();
            let (dqg, dkg, dvg) =
                ops::flash_attention_backward(&qg, &kg, &vg, &og, &lg, &dg, spec).unwrap();
            // The kernel rounds P and dS to the input type before their GEMMs (as every
            // flash backward does) and dS sums to zero over a row, so dq/dk see cancellation:
            // bf16 elements are held to 3e-2 of (|x| + rms), f16 to 1e-2 (L2 stays at 1e-2).
            let t = if dt == DType::BF16 { 3e-2 } else { 1e-2 };
            close_each_within(&format!("flash bwd dq {what}"), &dqc, &dqg, t);
            close_each_within(&format!("flash bwd dk {what}"), &dkc, &dkg, t);
            close_each_within(&format!("flash bwd dv {what}"), &dvc, &dvg, t);
        }
    }
    // More sequences than the grid's y dimension holds: a clear error, not a failed launch.
    let q = Tensor::zeros(&[65536, 1, 1, 64], DType::BF16, dev).unwrap();
    let spec = ops::FlashSpec {
        scale: 0.125,
        start: 0,
        window: None,
    };
    let err = ops::flash_attention(&q, &q, &q, ops::KvLayout::Tokens, 1, spec).unwrap_err();
    assert!(err.to_string().contains("65535"), "{err}");
}
