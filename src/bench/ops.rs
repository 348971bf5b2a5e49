//! `moe bench ops`: the two ceilings every kernel is judged against, measured through our own
//! runtime: a square bf16 GEMM (cuBLAS, f32 accumulation) in TFLOP/s and elementwise add / cast
//! in GB/s (bytes read + written). Reference ceilings (DEVICE.md, H200): 816 TFLOP/s, 4.2 TB/s.

use clap::Args;
use rand::{Rng, SeedableRng};

use super::median_ms;
use crate::runtime::ops::{self, Matmul};
use crate::runtime::{DType, Device, Tensor};

#[derive(Args)]
pub struct OpsArgs {
    /// Device: auto, cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// GEMM sizes (M = N = K); default 4096,8192 on GPU, 1024 on CPU.
    #[arg(long, value_delimiter = ',')]
    gemm: Vec<usize>,
    /// Elements per elementwise operand; default 2^28 on GPU, 2^24 on CPU.
    #[arg(long)]
    elems: Option<usize>,
    /// Timed repetitions (median reported).
    #[arg(long, default_value_t = 20)]
    reps: usize,
}

fn random(shape: &[usize], dtype: DType, device: Device, seed: u64) -> anyhow::Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Ok(Tensor::from_f32(&v, shape, dtype, device)?)
}

pub fn run(a: OpsArgs) -> anyhow::Result<()> {
    let device = Device::parse(&a.device)?;
    let gpu = device.is_cuda();
    if let Device::Cuda(i) = device {
        let d = crate::runtime::cuda::device(i)?;
        println!("device: {} ({}), {} SMs", d.name(), d.arch(), d.sm_count());
    } else {
        println!("device: cpu, {} threads", rayon::current_num_threads());
    }
    let sizes = if a.gemm.is_empty() {
        if gpu {
            vec![4096, 8192]
        } else {
            vec![1024]
        }
    } else {
        a.gemm.clone()
    };
    let dtype = if gpu { DType::BF16 } else { DType::F32 };
    println!("{:<34} {:>10} {:>12}", "op", "ms", "rate");
    for n in sizes {
        let x = random(&[n, n], dtype, device, 1)?;
        let y = random(&[n, n], dtype, device, 2)?;
        let ms = median_ms(device, 3, a.reps, || {
            ops::matmul(&x, &y, Matmul::nt()).map(drop)
        })?;
        let tflops = 2.0 * (n as f64).powi(3) / (ms * 1e-3) / 1e12;
        println!(
            "{:<34} {:>10.3} {:>8.1} TFLOP/s",
            format!("gemm {dtype} {n}x{n}x{n} (x·yᵀ)"),
            ms,
            tflops
        );
    }
    let n = a.elems.unwrap_or(if gpu { 1 << 28 } else { 1 << 24 });
    let x = random(&[n], dtype, device, 3)?;
    let y = random(&[n], dtype, device, 4)?;
    let es = dtype.size_in_bytes() as f64;
    let ms = median_ms(device, 3, a.reps, || ops::add(&x, &y).map(drop))?;
    println!(
        "{:<34} {:>10.3} {:>8.1} GB/s",
        format!("add {dtype} n={n}"),
        ms,
        3.0 * n as f64 * es / (ms * 1e-3) / 1e9
    );
    let to = if dtype == DType::F32 {
        DType::BF16
    } else {
        DType::F32
    };
    let ms = median_ms(device, 3, a.reps, || ops::cast(&x, to).map(drop))?;
    let bytes = n as f64 * (es + to.size_in_bytes() as f64);
    println!(
        "{:<34} {:>10.3} {:>8.1} GB/s",
        format!("cast {dtype}->{to} n={n}"),
        ms,
        bytes / (ms * 1e-3) / 1e9
    );
    // RMSNorm forward and backward over 16M elements (2^20 on the CPU) at a model width and at
    // a per-head width (q/k norms). Bytes: x read + y written; x, dy read + dx written.
    for cols in [2048usize, 128] {
        let rows = (if gpu { 1 << 24 } else { 1 << 20 }) / cols;
        let x = random(&[rows, cols], dtype, device, 5)?;
        let w = random(&[cols], dtype, device, 6)?;
        let dy = random(&[rows, cols], dtype, device, 7)?;
        let (_, rstd) = ops::rmsnorm(&x, &w, 1e-6)?;
        let m = (rows * cols) as f64 * es;
        let ms = median_ms(device, 3, a.reps, || ops::rmsnorm(&x, &w, 1e-6).map(drop))?;
        println!(
            "{:<34} {:>10.3} {:>8.1} GB/s",
            format!("rmsnorm {dtype} {rows}x{cols}"),
            ms,
            2.0 * m / (ms * 1e-3) / 1e9
        );
        let ms = median_ms(device, 3, a.reps, || {
            ops::rmsnorm_backward(&x, &w, &rstd, &dy).map(drop)
        })?;
        println!(
            "{:<34} {:>10.3} {:>8.1} GB/s",
            format!("rmsnorm backward {dtype} {rows}x{cols}"),
            ms,
            3.0 * m / (ms * 1e-3) / 1e9
        );
    }
    Ok(())
}
