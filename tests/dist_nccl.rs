//! The NCCL backend at world size 1 on one GPU (skipped without a GPU or NCCL;
//! MOE_REQUIRE_GPU=1 makes that a failure): every call runs for real — all-to-all to self with
//! uneven counts through the exchange plan, reduce-scatter, all-gather, all-reduce (sum and
//! mean), broadcast, barrier, agree, split — and equals the single-process result exactly.

use std::time::Duration;

use moe::dist::exchange::exchange;
use moe::dist::{BackendKind, DistEnv, Group, ReduceOp};
use moe::runtime::{DType, Device, Tensor};

fn nccl_group() -> Option<Group> {
    let required = std::env::var("MOE_REQUIRE_GPU").is_ok_and(|v| v == "1");
    match Group::init(
        &DistEnv::single(),
        BackendKind::Nccl,
        Duration::from_secs(60),
    ) {
        Ok(g) => Some(g),
        Err(e) if required => panic!("MOE_REQUIRE_GPU=1 but NCCL is not usable: {e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            None
        }
    }
}

#[test]
fn nccl_world_size_1_matches_single() {
    let Some(g) = nccl_group() else { return };
    let dev = g.device();
    assert!(dev.is_cuda());
    assert_eq!((g.rank(), g.size()), (0, 1));
    let single = Group::single();
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::I32] {
        let x = Tensor::randn(&[6, 8], 1.0, 7, DType::F32, Device::Cpu).unwrap();
        let x = match dtype {
            DType::I32 => {
                let v: Vec<i32> = x
                    .to_vec::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| (v * 100.0) as i32)
                    .collect();
                Tensor::from_vec(v, &[6, 8]).unwrap()
            }
            _ => moe::runtime::ops::cast(&x, dtype).unwrap(),
        };
        let xd = x.to_device(dev).unwrap();
        let same = |what: &str, got: Tensor, want: Tensor| {
            assert_eq!(got.device(), dev, "{what} {dtype}");
            assert_eq!(got.shape(), want.shape(), "{what} {dtype}");
            let (g, w) = (got.to_device(Device::Cpu).unwrap(), want);
            let bytes = |t: &Tensor| match dtype {
                DType::I32 => t
                    .to_vec::<i32>()
                    .unwrap()
                    .iter()
                    .map(|v| *v as f64)
                    .collect::<Vec<_>>(),
                _ => t.to_f32_vec().unwrap().iter().map(|v| *v as f64).collect(),
            };
            assert_eq!(bytes(&g), bytes(&w), "{what} {dtype}");
        };
        same(
            "all_reduce",
            g.all_reduce(&xd, ReduceOp::Sum).unwrap(),
            single.all_reduce(&x, ReduceOp::Sum).unwrap(),
        );
        if dtype != DType::I32 {
            same(
                "all_reduce avg",
                g.all_reduce(&xd, ReduceOp::Avg).unwrap(),
                single.all_reduce(&x, ReduceOp::Avg).unwrap(),
            );
        }
        same(
            "reduce_scatter",
            g.reduce_scatter(&xd, ReduceOp::Sum).unwrap(),
            x.try_clone().unwrap(),
        );
        same(
            "all_gather",
            g.all_gather(&xd).unwrap(),
            x.try_clone().unwrap(),
        );
        same(
            "broadcast",
            g.broadcast(&xd, 0).unwrap(),
            x.try_clone().unwrap(),
        );
        same(
            "all_to_all",
            g.all_to_all(&xd, &[6], &[6]).unwrap(),
            x.try_clone().unwrap(),
        );
        // Three local experts with 2, 0 and 4 rows: counts to self, then rows there and back.
        let (got, plan) = exchange(&g, &xd, &[2, 0, 4]).unwrap();
        assert_eq!(plan.recv_counts(), &[2, 0, 4]);
        let back = plan.reverse(&g, &got).unwrap();
        same("exchange", got, x.try_clone().unwrap());
        same("exchange back", back, x.try_clone().unwrap());
    }
    // A zero-row all-to-all (nothing routed here this step).
    let empty = Tensor::zeros(&[0, 8], DType::BF16, dev).unwrap();
    assert_eq!(g.all_to_all(&empty, &[0], &[0]).unwrap().shape(), &[0, 8]);
    g.barrier().unwrap();
    g.agree("config", b"one rank").unwrap();
    let sub = g.split(&[vec![0]]).unwrap();
    assert_eq!((sub.rank(), sub.size(), sub.device()), (0, 1, dev));
    let ones = Tensor::full(&[4], 1.0, DType::F32, dev).unwrap();
    assert_eq!(
        sub.all_reduce(&ones, ReduceOp::Sum)
            .unwrap()
            .to_vec::<f32>()
            .unwrap(),
        vec![1.0; 4]
    );
    // A CPU tensor is refused by the GPU group, naming both devices.
    let e = g
        .all_reduce(&x_cpu(), ReduceOp::Sum)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cuda:0") && e.contains("cpu"), "{e}");
}

fn x_cpu() -> Tensor {
    Tensor::full(&[2], 1.0, DType::F32, Device::Cpu).unwrap()
}
