//! Elementwise ops: add / mul / scale / axpy, row-broadcast bias, activations (SiLU, GeLU erf,
//! GeLU tanh) with their gradients, and the fused SwiGLU `silu(gate) * up` over a [.., 2F] tensor
//! laid out as [gate | up]. Kernels: `cuda/kernels/elementwise.cu`. All memory-bound: bytes per
//! call = elements × (inputs + outputs) × dtype size.

use rayon::prelude::*;

use super::{cuda_dev, dptr, kname, same_device};
use crate::runtime::cuda::{grid_1d, kernels};
use crate::runtime::{cpu_from_f32, DType, Device, Error, Result, Tensor};

#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// x·σ(x) (HF "silu", "swish").
    Silu,
    /// Exact GeLU, 0.5·x·(1 + erf(x/√2)) (HF "gelu").
    Gelu,
    /// Tanh approximation (HF "gelu_new", "gelu_pytorch_tanh"; GPT-2 / GPT-MoE).
    GeluTanh,
    /// σ(x) (gates: Qwen2-MoE's shared-expert gate, PR-MoE's mixing coefficient).
    Sigmoid,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Activation> {
        match name {
            "silu" | "swish" => Some(Activation::Silu),
            "gelu" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            _ => None,
        }
    }
    fn code(self) -> i32 {
        self as i32
    }
    #[inline]
    pub(crate) fn f(self, x: f32) -> f32 {
        match self {
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::Gelu => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::GeluTanh => {
                let u = GELU_C * (x + 0.044715 * x * x * x);
                0.5 * x * (1.0 + u.tanh())
            }
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        }
    }
    #[inline]
    fn df(self, x: f32) -> f32 {
        match self {
            Activation::Silu => {
                let s = 1.0 / (1.0 + (-x).exp());
                s * (1.0 + x * (1.0 - s))
            }
            Activation::Gelu => {
                let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                cdf + x * (-0.5 * x * x).exp() * INV_SQRT_2PI
            }
            Activation::GeluTanh => {
                let u = GELU_C * (x + 0.044715 * x * x * x);
                let t = u.tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
            }
            Activation::Sigmoid => {
                let s = 1.0 / (1.0 + (-x).exp());
                s * (1.0 - s)
            }
        }
    }
}

const GELU_C: f32 = 0.797_884_6; // sqrt(2/pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit), so GeLU matches PyTorch's
/// erf-based GeLU to f32 precision.
pub(crate) fn erf(x: f32) -> f32 {
    let z = (x as f64).abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let y = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    let r = 1.0 - y;
    (if x >= 0.0 { r } else { -r }) as f32
}

fn check_same(op: &'static str, a: &Tensor, b: &Tensor) -> Result<Device> {
    let d = same_device(op, &[a, b])?;
    a.expect_float(op)?;
    if a.shape() != b.shape() {
        return Err(Error::shape(
            op,
            format!("shapes differ: {:?} vs {:?}", a.shape(), b.shape()),
        ));
    }
    if a.dtype() != b.dtype() {
        return Err(Error::Invalid(format!(
            "{op}: dtypes differ ({} vs {})",
            a.dtype(),
            b.dtype()
        )));
    }
    Ok(d)
}

fn cpu_map2(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<Tensor> {
    let (av, bv) = (a.cpu_f32()?, b.cpu_f32()?);
    let out: Vec<f32> = av
        .par_iter()
        .zip(bv.par_iter())
        .map(|(&x, &y)| f(x, y))
        .collect();
    cpu_from_f32(out, a.shape(), a.dtype())
}

fn binary(
    op: &'static str,
    code: i32,
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<Tensor> {
    match check_same(op, a, b)? {
        Device::Cpu => cpu_map2(a, b, f),
        Device::Cuda(_) => {
            let out = Tensor::uninit(a.shape(), a.dtype(), a.device())?;
            let n = a.numel();
            let (name, units) = if super::rows_v8(n, &[&out, a, b]) {
                (kname("binary_v8", a), n / 8)
            } else {
                (kname("binary", a), n)
            };
            if units == 0 {
                return Ok(out);
            }
            cuda_dev(a)?
                .launch(
                    &kernels::ELEMENTWISE,
                    &name,
                    (grid_1d(units, 256).min(65535 * 8), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(&out))
                .ptr(dptr(a))
                .ptr(dptr(b))
                .i64(units as i64)
                .i32(code)
                .run()?;
            Ok(out)
        }
    }
}

/// a + b (same shape and dtype).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary("add", 0, a, b, |x, y| x + y)
}

/// a ⊙ b (same shape and dtype).
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    binary("mul", 1, a, b, |x, y| x * y)
}

/// s · a.
pub fn scale(a: &Tensor, s: f32) -> Result<Tensor> {
    let mut out = a.try_clone()?;
    scale_in_place(&mut out, s)?;
    Ok(out)
}

/// x clamped to [−c, c] (c > 0), NaN kept (as torch.clamp): OLMoE's `clip_qkv`.
pub fn clamp(x: &Tensor, c: f32) -> Result<Tensor> {
    let op = "clamp";
    x.expect_float(op)?;
    if !(c > 0.0 && c.is_finite()) {
        return Err(Error::Invalid(format!(
            "{op}: bound must be finite and > 0, got {c}"
        )));
    }
    let mut t = x.try_clone()?;
    match t.device() {
        Device::Cpu => {
            let shape = t.shape().to_vec();
            let v: Vec<f32> = t
                .cpu_f32()?
                .par_iter()
                .map(|&v| {
                    if v > c {
                        c
                    } else if v < -c {
                        -c
                    } else {
                        v
                    }
                })
                .collect();
            t = cpu_from_f32(v, &shape, t.dtype())?;
        }
        Device::Cuda(_) => {
            let n = t.numel();
            if n > 0 {
                cuda_dev(&t)?
                    .launch(
                        &kernels::ELEMENTWISE,
                        &kname("clamp", &t),
                        (grid_1d(n, 256).min(65535 * 8), 1, 1),
                        (256, 1, 1),
                        0,
                    )?
                    .ptr(dptr(&t))
                    .i64(n as i64)
                    .f32(c)
                    .run()?;
            }
        }
    }
    Ok(t)
}

pub(crate) fn scale_in_place(t: &mut Tensor, s: f32) -> Result<()> {
    t.expect_float("scale")?;
    match t.device() {
        Device::Cpu => {
            let shape = t.shape().to_vec();
            let v: Vec<f32> = t.cpu_f32()?.par_iter().map(|&x| x * s).collect();
            *t = cpu_from_f32(v, &shape, t.dtype())?;
            Ok(())
        }
        Device::Cuda(_) => {
            let n = t.numel();
            cuda_dev(t)?
                .launch(
                    &kernels::ELEMENTWISE,
                    &kname("scale", t),
                    (grid_1d(n, 256).min(65535 * 8), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(t))
                .i64(n as i64)
                .f32(s)
                .run()
        }
    }
}

/// dst += src.
pub fn add_assign(dst: &mut Tensor, src: &Tensor) -> Result<()> {
    add_scaled(dst, src, 1.0)
}

/// dst += s · src. `src` may be bf16/f16 when `dst` is f32 (gradients into f32 accumulators).
pub fn add_scaled(dst: &mut Tensor, src: &Tensor, s: f32) -> Result<()> {
    let op = "add_scaled";
    same_device(op, &[dst, src])?;
    dst.expect_float(op)?;
    src.expect_float(op)?;
    if dst.numel() != src.numel() {
        return Err(Error::shape(
            op,
            format!("shapes differ: {:?} vs {:?}", dst.shape(), src.shape()),
        ));
    }
    if dst.dtype() != src.dtype() && dst.dtype() != DType::F32 {
        return Err(Error::Invalid(format!(
            "{op}: cannot add {} into {}",
            src.dtype(),
            dst.dtype()
        )));
    }
    match dst.device() {
        Device::Cpu => {
            let sv = src.cpu_f32()?;
            if dst.dtype() == DType::F32 {
                let d = dst.as_mut_slice::<f32>()?;
                d.par_iter_mut()
                    .zip(sv.par_iter())
                    .for_each(|(x, &y)| *x += s * y);
            } else {
                let shape = dst.shape().to_vec();
                let v: Vec<f32> = dst
                    .cpu_f32()?
                    .iter()
                    .zip(sv.iter())
                    .map(|(&x, &y)| x + s * y)
                    .collect();
                *dst = cpu_from_f32(v, &shape, dst.dtype())?;
            }
            Ok(())
        }
        Device::Cuda(_) => {
            let n = dst.numel();
            let v8 = super::rows_v8(n, &[dst, src]);
            let (name, units) = if v8 {
                let d = dst.dtype().name();
                (format!("axpy_v8_{d}_{}", src.dtype().name()), n / 8)
            } else {
                let d = dst.dtype().name();
                (format!("axpy_{d}_{}", src.dtype().name()), n)
            };
            cuda_dev(dst)?
                .launch(
                    &kernels::ELEMENTWISE,
                    &name,
                    (grid_1d(units, 256).min(65535 * 8), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(dst))
                .ptr(dptr(src))
                .i64(units as i64)
                .f32(s)
                .run()
        }
    }
}

/// x [.., C] + b [C].
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let op = "add_bias";
    same_device(op, &[x, b])?;
    x.expect_float(op)?;
    let (rows, cols) = x.rows_cols();
    if b.numel() != cols || b.dtype() != x.dtype() {
        return Err(Error::shape(
            op,
            format!(
                "bias {:?} {} does not fit x {:?} {}",
                b.shape(),
                b.dtype(),
                x.shape(),
                x.dtype()
            ),
        ));
    }
    match x.device() {
        Device::Cpu => {
            let (xv, bv) = (x.cpu_f32()?, b.cpu_f32()?);
            let mut out = vec![0.0f32; rows * cols];
            out.par_chunks_mut(cols.max(1))
                .zip(xv.par_chunks(cols.max(1)))
                .for_each(|(o, xr)| {
                    for ((o, &xi), &bi) in o.iter_mut().zip(xr).zip(bv.iter()) {
                        *o = xi + bi;
                    }
                });
            cpu_from_f32(out, x.shape(), x.dtype())
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(x.shape(), x.dtype(), x.device())?;
            let n = x.numel();
            cuda_dev(x)?
                .launch(
                    &kernels::ELEMENTWISE,
                    &kname("add_bias", x),
                    (grid_1d(n, 256).min(65535 * 8), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(&out))
                .ptr(dptr(x))
                .ptr(dptr(b))
                .i64(n as i64)
                .i32(cols as i32)
                .run()?;
            Ok(out)
        }
    }
}

/// act(x).
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    x.expect_float("activation")?;
    match x.device() {
        Device::Cpu => {
            let out: Vec<f32> = x.cpu_f32()?.par_iter().map(|&v| act.f(v)).collect();
            cpu_from_f32(out, x.shape(), x.dtype())
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(x.shape(), x.dtype(), x.device())?;
            let n = x.numel();
            cuda_dev(x)?
                .launch(
                    &kernels::ELEMENTWISE,
                    &kname("act_fwd", x),
                    (grid_1d(n, 256).min(65535 * 8), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(&out))
                .ptr(dptr(x))
                .i64(n as i64)
                .i32(act.code())
                .run()?;
            Ok(out)
        }
    }
}

/// dx = dy ⊙ act'(x), with `x` the forward input.
pub fn activation_backward(x: &Tensor, dy: &Tensor, act: Activation) -> Result<Tensor> {
    match check_same("activation_backward", x, dy)? {
        Device::Cpu => cpu_map2(x, dy, |xv, g| g * act.df(xv)),
        Device::Cuda(_) => {
            let out = Tensor::uninit(x.shape(), x.dtype(), x.device())?;
            let n = x.numel();
            cuda_dev(x)?
                .launch(
                    &kernels::ELEMENTWISE,
                    &kname("act_bwd", x),
                    (grid_1d(n, 256).min(65535 * 8), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(&out))
                .ptr(dptr(x))
                .ptr(dptr(dy))
                .i64(n as i64)
                .i32(act.code())
                .run()?;
            Ok(out)
        }
    }
}

/// x [R, C] with row r scaled by s[r] (s [R] f32).
pub fn scale_rows(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    let op = "scale_rows";
    same_device(op, &[x, s])?;
    x.expect_float(op)?;
    s.expect_dtype(op, DType::F32)?;
    let (rows, cols) = x.rows_cols();
    if s.numel() != rows {
        return Err(Error::shape(
            op,
            format!("{} scales for {rows} rows of {:?}", s.numel(), x.shape()),
        ));
    }
    match x.device() {
        Device::Cpu => {
            let (xv, sv) = (x.cpu_f32()?, s.as_slice::<f32>()?);
            let mut out = vec![0.0f32; rows * cols];
            if cols > 0 {
                out.par_chunks_mut(cols)
                    .zip(xv.par_chunks(cols))
                    .zip(sv.par_iter())
                    .for_each(|((o, r), &k)| {
                        o.iter_mut().zip(r).for_each(|(o, &v)| *o = v * k);
                    });
            }
            cpu_from_f32(out, x.shape(), x.dtype())
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(x.shape(), x.dtype(), x.device())?;
            let n = x.numel();
            if n > 0 {
                cuda_dev(x)?
                    .launch(
                        &kernels::ELEMENTWISE,
                        &kname("scale_rows", x),
                        (grid_1d(n, 256), 1, 1),
                        (256, 1, 1),
                        0,
                    )?
                    .ptr(dptr(&out))
                    .ptr(dptr(x))
                    .ptr(dptr(s))
                    .i64(n as i64)
                    .usize_as_i32(cols)?
                    .run()?;
            }
            Ok(out)
        }
    }
}

/// out[r] = ⟨a[r], b[r]⟩ over the last dim: [R] f32.
pub fn row_dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    check_same("row_dot", a, b)?;
    let (rows, cols) = a.rows_cols();
    match a.device() {
        Device::Cpu => {
            let (av, bv) = (a.cpu_f32()?, b.cpu_f32()?);
            let out: Vec<f32> = (0..rows)
                .into_par_iter()
                .map(|r| {
                    av[r * cols..(r + 1) * cols]
                        .iter()
                        .zip(&bv[r * cols..(r + 1) * cols])
                        .map(|(x, y)| x * y)
                        .sum()
                })
                .collect();
            Tensor::from_vec(out, &[rows])
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(&[rows], DType::F32, a.device())?;
            if rows > 0 {
                cuda_dev(a)?
                    .launch(
                        &kernels::ELEMENTWISE,
                        &kname("row_dot", a),
                        (grid_1d(rows * 32, 256), 1, 1),
                        (256, 1, 1),
                        0,
                    )?
                    .ptr(dptr(&out))
                    .ptr(dptr(a))
                    .ptr(dptr(b))
                    .usize_as_i32(rows)?
                    .usize_as_i32(cols)?
                    .run()?;
            }
            Ok(out)
        }
    }
}

fn swiglu_dims(op: &'static str, gu: &Tensor) -> Result<(usize, usize)> {
    gu.expect_float(op)?;
    let (rows, cols) = gu.rows_cols();
    if cols % 2 != 0 {
        return Err(Error::shape(
            op,
            format!("last dim of {:?} must be even ([gate | up])", gu.shape()),
        ));
    }
    Ok((rows, cols / 2))
}

/// h = silu(gate) ⊙ up for gu = [.., gate (F) | up (F)] -> [.., F].
pub fn swiglu(gu: &Tensor) -> Result<Tensor> {
    let (rows, f) = swiglu_dims("swiglu", gu)?;
    let mut shape = gu.shape().to_vec();
    *shape.last_mut().expect("rank >= 1") = f;
    match gu.device() {
        Device::Cpu => {
            let v = gu.cpu_f32()?;
            let mut out = vec![0.0f32; rows * f];
            if f > 0 {
                out.par_chunks_mut(f)
                    .zip(v.par_chunks(2 * f))
                    .for_each(|(o, r)| {
                        let (g, u) = r.split_at(f);
                        for i in 0..f {
                            o[i] = Activation::Silu.f(g[i]) * u[i];
                        }
                    });
            }
            cpu_from_f32(out, &shape, gu.dtype())
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(&shape, gu.dtype(), gu.device())?;
            let n = rows * f;
            let (name, units) = if super::rows_v8(f, &[&out, gu]) {
                (kname("swiglu_fwd_v8", gu), n / 8)
            } else {
                (kname("swiglu_fwd", gu), n)
            };
            cuda_dev(gu)?
                .launch(
                    &kernels::ELEMENTWISE,
                    &name,
                    (grid_1d(units, 256).min(65535 * 8), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(&out))
                .ptr(dptr(gu))
                .i64(units as i64)
                .i32(f as i32)
                .run()?;
            Ok(out)
        }
    }
}

/// d(gu) for h = swiglu(gu): [.., F] gradient in, [.., 2F] out.
pub fn swiglu_backward(gu: &Tensor, dh: &Tensor) -> Result<Tensor> {
    let op = "swiglu_backward";
    let (rows, f) = swiglu_dims(op, gu)?;
    same_device(op, &[gu, dh])?;
    if dh.numel() != rows * f || dh.dtype() != gu.dtype() {
        return Err(Error::shape(
            op,
            format!(
                "dh {:?} {} does not fit gu {:?} {}",
                dh.shape(),
                dh.dtype(),
                gu.shape(),
                gu.dtype()
            ),
        ));
    }
    match gu.device() {
        Device::Cpu => {
            let (v, d) = (gu.cpu_f32()?, dh.cpu_f32()?);
            let mut out = vec![0.0f32; rows * 2 * f];
            if f > 0 {
                out.par_chunks_mut(2 * f)
                    .zip(v.par_chunks(2 * f))
                    .zip(d.par_chunks(f))
                    .for_each(|((o, r), dr)| {
                        let (g, u) = r.split_at(f);
                        let (og, ou) = o.split_at_mut(f);
                        for i in 0..f {
                            og[i] = dr[i] * u[i] * Activation::Silu.df(g[i]);
                            ou[i] = dr[i] * Activation::Silu.f(g[i]);
                        }
                    });
            }
            cpu_from_f32(out, gu.shape(), gu.dtype())
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(gu.shape(), gu.dtype(), gu.device())?;
            let n = rows * f;
            let (name, units) = if super::rows_v8(f, &[&out, gu, dh]) {
                (kname("swiglu_bwd_v8", gu), n / 8)
            } else {
                (kname("swiglu_bwd", gu), n)
            };
            cuda_dev(gu)?
                .launch(
                    &kernels::ELEMENTWISE,
                    &name,
                    (grid_1d(units, 256).min(65535 * 8), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(&out))
                .ptr(dptr(gu))
                .ptr(dptr(dh))
                .i64(units as i64)
                .i32(f as i32)
                .run()?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0f32, 0.0f32),
            (0.5, 0.520_499_9),
            (1.0, 0.842_700_8),
            (-2.0, -0.995_322_3),
            (3.5, 0.999_999_26),
        ] {
            assert!(
                (erf(x) - want).abs() < 2e-7,
                "erf({x}) = {} want {want}",
                erf(x)
            );
        }
    }

    #[test]
    fn activation_gradients_match_finite_differences() {
        for act in [
            Activation::Silu,
            Activation::Gelu,
            Activation::GeluTanh,
            Activation::Sigmoid,
        ] {
            for &x in &[-3.0f32, -0.7, 0.0, 0.4, 2.5] {
                let h = 1e-3f64;
                let fd = (act.f((x as f64 + h) as f32) as f64
                    - act.f((x as f64 - h) as f32) as f64)
                    / (2.0 * h);
                assert!(
                    (fd - act.df(x) as f64).abs() < 2e-3,
                    "{act:?} at {x}: fd {fd} vs {}",
                    act.df(x)
                );
            }
        }
    }
}
