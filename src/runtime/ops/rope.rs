//! Rotary position embedding, rotate-half layout (GPT-NeoX / Llama / Mixtral / Qwen / OLMoE):
//! for i < rot/2, (x[i], x[i + rot/2]) is rotated by angle pos · inv_freq[i]; dims past `rot`
//! pass through. The backward is the inverse rotation. Tables are built on the host from the
//! model's inv_freq (so any rope scaling is the model's business). Kernel: `cuda/kernels/rope.cu`.
//! Bytes: 2 × T·H·hd·sizeof(T) + table reads (cached).

use super::{cuda_dev, dptr, kname, same_device};
use crate::runtime::cuda::{grid_1d, kernels};
use crate::runtime::{cpu_from_f32, DType, Device, Error, Result, Tensor};

/// cos/sin of pos · inv_freq[i] for pos < max_positions: two [max_positions, rot/2] f32 tensors.
pub struct RopeTable {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTable {
    /// Table from inverse frequencies (length rot/2) and an attention scaling factor applied to
    /// both cos and sin (YaRN's mscale; 1.0 otherwise).
    pub fn new(
        inv_freq: &[f32],
        max_positions: usize,
        attention_scaling: f32,
        device: Device,
    ) -> Result<RopeTable> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in inv_freq {
                // Angles in f32 as PyTorch computes them (positions × inv_freq in float32).
                let a = p as f32 * f;
                cos.push(a.cos() * attention_scaling);
                sin.push(a.sin() * attention_scaling);
            }
        }
        Ok(RopeTable {
            cos: Tensor::from_vec(cos, &[max_positions, half])?.into_device(device)?,
            sin: Tensor::from_vec(sin, &[max_positions, half])?.into_device(device)?,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0)
    }
    pub fn rot_dim(&self) -> usize {
        2 * self.cos.dim(1)
    }
}

/// x [T, H, hd] rotated by each token's position (positions [T] i32).
pub fn rope(x: &Tensor, table: &RopeTable, positions: &Tensor) -> Result<Tensor> {
    rotate("rope", x, table, positions, false)
}

/// Gradient of `rope`: the inverse rotation applied to dy.
pub fn rope_backward(dy: &Tensor, table: &RopeTable, positions: &Tensor) -> Result<Tensor> {
    rotate("rope_backward", dy, table, positions, true)
}

fn rotate(
    op: &'static str,
    x: &Tensor,
    table: &RopeTable,
    positions: &Tensor,
    inverse: bool,
) -> Result<Tensor> {
    same_device(op, &[x, &table.cos, positions])?;
    x.expect_float(op)?;
    positions.expect_dtype(op, DType::I32)?;
    if x.rank() != 3 || positions.numel() != x.dim(0) {
        return Err(Error::shape(
            op,
            format!(
                "x must be [T, H, hd] with positions [T]; got {:?} and {:?}",
                x.shape(),
                positions.shape()
            ),
        ));
    }
    let (t, h, hd) = (x.dim(0), x.dim(1), x.dim(2));
    let rot = table.rot_dim();
    if rot > hd || rot == 0 {
        return Err(Error::shape(
            op,
            format!("rotary dim {rot} does not fit head dim {hd}"),
        ));
    }
    let half = rot / 2;
    let maxp = table.max_positions();
    let sign = if inverse { -1.0f32 } else { 1.0 };
    match x.device() {
        Device::Cpu => {
            let pos = positions.as_slice::<i32>()?;
            if let Some(&p) = pos.iter().find(|&&p| p < 0 || p as usize >= maxp) {
                return Err(Error::Invalid(format!(
                    "{op}: position {p} outside the rope table (0..{maxp})"
                )));
            }
            let (cs, sn) = (table.cos.as_slice::<f32>()?, table.sin.as_slice::<f32>()?);
            let mut v = x.cpu_f32()?.into_owned();
            for ti in 0..t {
                let p = pos[ti] as usize;
                for hi in 0..h {
                    let row = &mut v[(ti * h + hi) * hd..(ti * h + hi + 1) * hd];
                    for i in 0..half {
                        let (c, s) = (cs[p * half + i], sign * sn[p * half + i]);
                        let (a, b) = (row[i], row[i + half]);
                        row[i] = a * c - b * s;
                        row[i + half] = b * c + a * s;
                    }
                }
            }
            cpu_from_f32(v, x.shape(), x.dtype())
        }
        Device::Cuda(_) => {
            let out = Tensor::uninit(x.shape(), x.dtype(), x.device())?;
            // 8-wide when the halves and rows split into aligned 8-element chunks.
            let v8 = half % 8 == 0 && super::rows_v8(hd, &[x, &out, &table.cos, &table.sin]);
            let (base, n) = if v8 {
                ("rope_v8", t * h * (half / 8 + (hd - 2 * half) / 8))
            } else {
                ("rope", t * h * half)
            };
            cuda_dev(x)?
                .launch(
                    &kernels::ROPE,
                    &kname(base, x),
                    (grid_1d(n, 256), 1, 1),
                    (256, 1, 1),
                    0,
                )?
                .ptr(dptr(&out))
                .ptr(dptr(x))
                .ptr(dptr(&table.cos))
                .ptr(dptr(&table.sin))
                .ptr(dptr(positions))
                .usize_as_i32(t)?
                .usize_as_i32(h)?
                .usize_as_i32(hd)?
                .usize_as_i32(half)?
                .usize_as_i32(maxp)?
                .f32(sign)
                .run()?;
            Ok(out)
        }
    }
}
