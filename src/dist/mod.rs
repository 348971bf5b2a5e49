//! Collectives between ranks behind one interface, `Group`: all-reduce (sum, mean), reduce-scatter,
//! all-gather, broadcast, variable-size all-to-all, barrier, sub-groups (`split`) and the
//! agreement check (`agree`). Backends, a closed set: `Single` (world size 1: copies), `Cpu`
//! (processes joined by TCP sockets, deterministic; `cpu.rs`) and `Nccl` (one process per GPU;
//! `nccl.rs`). Ranks find each other through the rendezvous store (`store.rs`) at the address
//! that torchrun, Slurm or `moe launch` put in the environment (`env.rs`, `launch.rs`).
//! Tensors are `[rows, ..]` row-major; collectives split and join along dimension 0.

mod cpu;
mod env;
mod error;
pub mod exchange;
pub mod launch;
mod nccl;
mod store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub use env::{expand_nodelist, first_host, DistEnv, DEFAULT_MASTER_PORT};
pub use error::{Error, PeerFault, Result};

use crate::runtime::{DType, Device, Tensor};
use cpu::CpuMesh;
use nccl::NcclComm;
use store::StoreClient;

/// `parallel.timeout_s` when not set: how long any wait on a peer may last.
pub const DEFAULT_TIMEOUT_S: u64 = 300;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// The sum divided by the group size (floats only).
    Avg,
}

/// Which transport a multi-process group uses.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// Sockets between processes, tensors reduced on the host: tests and CPU runs.
    Cpu,
    /// NCCL on GPU `LOCAL_RANK`: one process per GPU.
    Nccl,
}

enum Backend {
    Single,
    Cpu(CpuMesh),
    Nccl(NcclComm),
}

/// A set of ranks that run collectives together: the world, or a sub-group made by `split`.
/// Every member calls the same collectives in the same order.
pub struct Group {
    /// This process's index among the members.
    rank: usize,
    /// World rank of each member.
    world_ranks: Vec<usize>,
    backend: Backend,
    store: Option<Arc<StoreClient>>,
    /// Names this group's meshes in the store.
    key: String,
    splits: AtomicU64,
    timeout: Duration,
}

impl Group {
    /// World size 1 without any transport: every collective is a copy.
    pub fn single() -> Group {
        Group {
            rank: 0,
            world_ranks: vec![0],
            backend: Backend::Single,
            store: None,
            key: "world".into(),
            splits: AtomicU64::new(0),
            timeout: Duration::from_secs(DEFAULT_TIMEOUT_S),
        }
    }

    /// The world group of this process, from the environment (`DistEnv::from_env`).
    pub fn from_env(kind: BackendKind, timeout: Duration) -> Result<Group> {
        Self::init(&DistEnv::from_env()?, kind, timeout)
    }

    /// Joins the world described by `env`: rank 0 hosts the store, every rank checks in (same
    /// world size, no rank twice, all present within `timeout`), then the transport connects.
    /// The CPU backend at world size 1 is `single()`; NCCL at world size 1 is a real communicator.
    pub fn init(env: &DistEnv, kind: BackendKind, timeout: Duration) -> Result<Group> {
        let world_ranks: Vec<usize> = (0..env.world_size).collect();
        let group = |backend, store| Group {
            rank: env.rank,
            world_ranks: world_ranks.clone(),
            backend,
            store,
            key: "world".into(),
            splits: AtomicU64::new(0),
            timeout,
        };
        if kind == BackendKind::Nccl {
            nccl::check_library()?;
            crate::runtime::cuda::device(env.local_rank)?;
        }
        match (kind, env.world_size) {
            (BackendKind::Cpu, 1) => {
                return Ok(Group {
                    timeout,
                    ..Group::single()
                })
            }
            (BackendKind::Nccl, 1) => {
                let id = nccl::unique_id()?;
                let comm = NcclComm::init(env.local_rank, &id, 0, world_ranks.clone(), timeout)?;
                return Ok(group(Backend::Nccl(comm), None));
            }
            _ => {}
        }
        if env.rank == 0 {
            store::serve(env.master_port)?;
        }
        let store = Arc::new(StoreClient::connect(&env.master(), timeout)?);
        check_in(&store, env, timeout)?;
        let backend = match kind {
            BackendKind::Cpu => Backend::Cpu(CpuMesh::connect(
                &store,
                "world",
                env.rank,
                world_ranks.clone(),
                timeout,
            )?),
            BackendKind::Nccl => {
                let id = share_nccl_id(&store, "world/nccl", env.rank == 0, timeout)?;
                Backend::Nccl(NcclComm::init(
                    env.local_rank,
                    &id,
                    env.rank,
                    world_ranks.clone(),
                    timeout,
                )?)
            }
        };
        Ok(group(backend, Some(store)))
    }

    /// This process's rank within the group.
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.world_ranks.len()
    }
    /// World rank of each member, in group-rank order.
    pub fn world_ranks(&self) -> &[usize] {
        &self.world_ranks
    }
    /// Where the group's collectives run: the NCCL communicator's GPU, else the CPU (the CPU
    /// backend also takes CUDA tensors, through host copies).
    pub fn device(&self) -> Device {
        match &self.backend {
            Backend::Nccl(c) => c.device(),
            _ => Device::Cpu,
        }
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Element-wise sum (or mean) of `t` over the members; every member gets the same result.
    /// The CPU backend sums in rank order in f32 (i32 wrapping) and rounds once.
    pub fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        check_reduce_op("all_reduce", t, op)?;
        match &self.backend {
            Backend::Single => Ok(t.try_clone()?),
            Backend::Nccl(c) => c.all_reduce(t, op),
            Backend::Cpu(m) => {
                let mine = host_bytes(t)?;
                let parts = m.exchange("all_reduce", &vec![&mine[..]; self.size()])?;
                let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
                let sum = cpu::reduce_in_rank_order(&refs, t.dtype(), op)?;
                from_host(&sum, t.shape(), t.dtype(), t.device())
            }
        }
    }

    /// `t: [size * m, ..]` on every member → this member's `[m, ..]`: rows
    /// `[rank * m, (rank + 1) * m)` reduced over the members.
    pub fn reduce_scatter(&self, t: &Tensor, op: ReduceOp) -> Result<Tensor> {
        check_reduce_op("reduce_scatter", t, op)?;
        let n = self.size();
        let rows = first_dim("reduce_scatter", t)?;
        if rows % n != 0 {
            return Err(Error::invalid(
                "reduce_scatter",
                format!("{rows} rows do not split evenly over {n} ranks"),
            ));
        }
        let mut shape = t.shape().to_vec();
        shape[0] = rows / n;
        match &self.backend {
            Backend::Single => Ok(t.try_clone()?),
            Backend::Nccl(c) => c.reduce_scatter(t, &shape, op),
            Backend::Cpu(m) => {
                let mine = host_bytes(t)?;
                let chunks: Vec<&[u8]> = mine.chunks(mine.len() / n.max(1)).collect();
                let chunks = if mine.is_empty() {
                    vec![&mine[..]; n]
                } else {
                    chunks
                };
                let parts = m.exchange("reduce_scatter", &chunks)?;
                let refs: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
                let sum = cpu::reduce_in_rank_order(&refs, t.dtype(), op)?;
                from_host(&sum, &shape, t.dtype(), t.device())
            }
        }
    }

    /// `t: [m, ..]` on every member → `[size * m, ..]`, member i's rows at `[i * m, (i + 1) * m)`.
    pub fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let rows = first_dim("all_gather", t)?;
        let mut shape = t.shape().to_vec();
        shape[0] = rows * self.size();
        match &self.backend {
            Backend::Single => Ok(t.try_clone()?),
            Backend::Nccl(c) => c.all_gather(t, &shape),
            Backend::Cpu(m) => {
                let mine = host_bytes(t)?;
                let parts = m.exchange("all_gather", &vec![&mine[..]; self.size()])?;
                let expect = mine.len();
                if let Some(i) = parts.iter().position(|p| p.len() != expect) {
                    return Err(self.size_mismatch("all_gather", i, parts[i].len(), expect));
                }
                from_host(&parts.concat(), &shape, t.dtype(), t.device())
            }
        }
    }

    /// Member `root`'s `t` on every member (the others pass a tensor of the same shape and dtype,
    /// whose values are ignored).
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if root >= self.size() {
            return Err(Error::invalid(
                "broadcast",
                format!("root {root} is not a rank of a group of {}", self.size()),
            ));
        }
        match &self.backend {
            Backend::Single => Ok(t.try_clone()?),
            Backend::Nccl(c) => c.broadcast(t, root),
            Backend::Cpu(m) => {
                let mine = if self.rank == root {
                    host_bytes(t)?
                } else {
                    Vec::new()
                };
                let mut parts = m.exchange("broadcast", &vec![&mine[..]; self.size()])?;
                let got = std::mem::take(&mut parts[root]);
                if got.len() != t.size_in_bytes() {
                    return Err(self.size_mismatch(
                        "broadcast",
                        root,
                        got.len(),
                        t.size_in_bytes(),
                    ));
                }
                from_host(&got, t.shape(), t.dtype(), t.device())
            }
        }
    }

    /// Variable-size all-to-all with known counts. `t: [N, ..]` holds the rows for member 0, then
    /// member 1, ... (`send_rows[p]` rows each, summing to N); the result holds `recv_rows[p]`
    /// rows from each member p in member order. Counts must agree pairwise (this member's
    /// `send_rows[p]` is p's `recv_rows[me]`); `all_to_all_counts` exchanges them.
    pub fn all_to_all(
        &self,
        t: &Tensor,
        send_rows: &[usize],
        recv_rows: &[usize],
    ) -> Result<Tensor> {
        let n = self.size();
        let rows = first_dim("all_to_all", t)?;
        if send_rows.len() != n || recv_rows.len() != n {
            return Err(Error::invalid(
                "all_to_all",
                format!(
                    "{} send counts and {} receive counts for a group of {n}",
                    send_rows.len(),
                    recv_rows.len()
                ),
            ));
        }
        if send_rows.iter().sum::<usize>() != rows {
            return Err(Error::invalid(
                "all_to_all",
                format!("send counts {send_rows:?} do not add up to the tensor's {rows} rows"),
            ));
        }
        let row_bytes = t.shape()[1..].iter().product::<usize>() * t.dtype().size_in_bytes();
        let mut shape = t.shape().to_vec();
        shape[0] = recv_rows.iter().sum();
        let offsets = |counts: &[usize]| -> Vec<usize> {
            std::iter::once(0)
                .chain(counts.iter().scan(0, |acc, &c| {
                    *acc += c * row_bytes;
                    Some(*acc)
                }))
                .collect()
        };
        let (send_off, recv_off) = (offsets(send_rows), offsets(recv_rows));
        match &self.backend {
            Backend::Single => {
                if send_rows != recv_rows {
                    return Err(Error::invalid(
                        "all_to_all",
                        format!(
                            "one rank sends {send_rows:?} rows to itself but expects {recv_rows:?}"
                        ),
                    ));
                }
                Ok(t.try_clone()?)
            }
            Backend::Nccl(c) => c.all_to_all(t, &send_off, &recv_off, &shape),
            Backend::Cpu(m) => {
                let mine = host_bytes(t)?;
                let out: Vec<&[u8]> = (0..n)
                    .map(|p| &mine[send_off[p]..send_off[p + 1]])
                    .collect();
                let parts = m.exchange("all_to_all", &out)?;
                for (p, part) in parts.iter().enumerate() {
                    let expect = recv_off[p + 1] - recv_off[p];
                    if part.len() != expect {
                        return Err(self.size_mismatch("all_to_all", p, part.len(), expect));
                    }
                }
                from_host(&parts.concat(), &shape, t.dtype(), t.device())
            }
        }
    }

    /// Exchanges counts: `send: [size * k]` holds k counts for each member in order; the result
    /// holds the k counts each member sent to this one, in member order.
    pub fn all_to_all_counts(&self, send: &[usize]) -> Result<Vec<usize>> {
        let n = self.size();
        if send.len() % n != 0 {
            return Err(Error::invalid(
                "all_to_all_counts",
                format!("{} counts do not split evenly over {n} ranks", send.len()),
            ));
        }
        let k = send.len() / n;
        match &self.backend {
            Backend::Single => Ok(send.to_vec()),
            Backend::Cpu(m) => {
                let bytes: Vec<u8> = send
                    .iter()
                    .flat_map(|&c| (c as u64).to_le_bytes())
                    .collect();
                let out: Vec<&[u8]> = bytes.chunks(8 * k.max(1)).collect();
                let out = if k == 0 { vec![&bytes[..]; n] } else { out };
                let parts = m.exchange("all_to_all_counts", &out)?;
                let got: Vec<usize> = parts
                    .concat()
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) as usize)
                    .collect();
                if got.len() != send.len() {
                    return Err(Error::invalid(
                        "all_to_all_counts",
                        format!(
                            "received {} counts, expected {} (ranks passed different k)",
                            got.len(),
                            send.len()
                        ),
                    ));
                }
                Ok(got)
            }
            Backend::Nccl(c) => {
                let as_i32: Vec<i32> = send
                    .iter()
                    .map(|&v| {
                        i32::try_from(v).map_err(|_| {
                            Error::invalid("all_to_all_counts", format!("count {v} exceeds i32"))
                        })
                    })
                    .collect::<Result<_>>()?;
                let t = Tensor::from_slice(&as_i32, &[send.len()], c.device())?;
                let off: Vec<usize> = (0..=n).map(|p| p * k * 4).collect();
                let got = c.all_to_all(&t, &off, &off, &[send.len()])?;
                Ok(got
                    .to_vec::<i32>()?
                    .into_iter()
                    .map(|v| v as usize)
                    .collect())
            }
        }
    }

    /// Returns once every member has called it (or fails naming the members that did not come).
    pub fn barrier(&self) -> Result<()> {
        match &self.backend {
            Backend::Single => Ok(()),
            Backend::Cpu(m) => m
                .exchange("barrier", &vec![&[][..]; self.size()])
                .map(|_| ()),
            Backend::Nccl(c) => {
                let one = Tensor::full(&[1], 1.0, DType::I32, c.device())?;
                c.all_reduce(&one, ReduceOp::Sum).map(|_| ())
            }
        }
    }

    /// Checks that every member passed the same bytes (a config, a code version, a data hash):
    /// their SHA-256 digests are all-gathered; a difference is an error naming `label` and the
    /// members (world ranks) that differ from member 0.
    pub fn agree(&self, label: &str, bytes: &[u8]) -> Result<()> {
        let digest = Sha256::digest(bytes);
        let words: Vec<i32> = digest
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let mine = Tensor::from_slice(&words, &[1, words.len()], self.device())?;
        let all = self.all_gather(&mine)?.to_vec::<i32>()?;
        let digests: Vec<&[i32]> = all.chunks_exact(words.len()).collect();
        let differing: Vec<usize> = digests
            .iter()
            .enumerate()
            .filter(|(_, d)| *d != &digests[0])
            .map(|(i, _)| self.world_ranks[i])
            .collect();
        if differing.is_empty() {
            Ok(())
        } else {
            Err(Error::Mismatch {
                label: label.to_string(),
                reference: self.world_ranks[0],
                differing,
            })
        }
    }

    /// Splits this group into sub-groups: `layout` lists the world ranks of each sub-group and
    /// must cover every member exactly once; every member calls this with the same layout (checked)
    /// and gets the sub-group it belongs to, ranked in the order its list gives. E.g. a world of
    /// 4 as 2 (data-parallel) x 2 (expert-parallel): EP groups `[[0, 1], [2, 3]]`, DP groups
    /// `[[0, 2], [1, 3]]`.
    pub fn split(&self, layout: &[Vec<usize>]) -> Result<Group> {
        let me = self.world_ranks[self.rank];
        let mut seen = vec![0usize; self.size()];
        for &r in layout.iter().flatten() {
            match self.world_ranks.iter().position(|&w| w == r) {
                Some(i) => seen[i] += 1,
                None => {
                    return Err(Error::invalid(
                        "split",
                        format!(
                            "rank {r} in layout {layout:?} is not a member of this group {:?}",
                            self.world_ranks
                        ),
                    ))
                }
            }
        }
        if let Some(i) = seen.iter().position(|&c| c != 1) {
            return Err(Error::invalid(
                "split",
                format!(
                    "layout {layout:?} lists rank {} {} times; each member must appear once",
                    self.world_ranks[i], seen[i]
                ),
            ));
        }
        self.agree("split layout", format!("{layout:?}").as_bytes())?;
        let n = self.splits.fetch_add(1, Ordering::Relaxed);
        let (color, members) = layout
            .iter()
            .enumerate()
            .find(|(_, g)| g.contains(&me))
            .map(|(c, g)| (c, g.clone()))
            .expect("every member appears once (checked above)");
        let rank = members
            .iter()
            .position(|&r| r == me)
            .expect("member of its group");
        let key = format!("{}/split{n}/{color}", self.key);
        let backend = match &self.backend {
            Backend::Nccl(c) => Backend::Nccl(c.split(color, rank, members.clone())?),
            _ if members.len() == 1 => Backend::Single,
            Backend::Single => Backend::Single,
            Backend::Cpu(_) => {
                let store = self
                    .store
                    .as_ref()
                    .expect("a multi-rank CPU group has a store");
                Backend::Cpu(CpuMesh::connect(
                    store,
                    &key,
                    rank,
                    members.clone(),
                    self.timeout,
                )?)
            }
        };
        Ok(Group {
            rank,
            world_ranks: members,
            backend,
            store: self.store.clone(),
            key,
            splits: AtomicU64::new(0),
            timeout: self.timeout,
        })
    }

    fn size_mismatch(&self, op: &str, member: usize, got: usize, expect: usize) -> Error {
        Error::Peer {
            op: op.to_string(),
            ranks: vec![self.world_ranks[member]],
            fault: PeerFault::Protocol(format!(
                "sent {got} bytes where this rank expected {expect} (shapes or counts differ between ranks)"
            )),
        }
    }
}

/// The world-level check-in at the store: world sizes agree, no rank is claimed twice, and all
/// ranks arrive before the timeout (else the error names the missing ones).
fn check_in(store: &StoreClient, env: &DistEnv, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let rdv = |msg: String| Error::Rendezvous {
        addr: store.addr().to_string(),
        msg,
    };
    if env.rank == 0 {
        store.set("world_size", env.world_size.to_string().as_bytes())?;
    }
    let theirs = store.get_until("world_size", deadline)?.ok_or_else(|| {
        rdv(format!(
            "rank 0 never arrived within {:.1} s",
            timeout.as_secs_f64()
        ))
    })?;
    let theirs = String::from_utf8_lossy(&theirs).into_owned();
    if theirs != env.world_size.to_string() {
        return Err(Error::Env {
            var: "WORLD_SIZE",
            value: env.world_size.to_string(),
            expected: format!("the same on every rank (rank 0 has {theirs})"),
        });
    }
    let me = format!(
        "pid {} on {}",
        std::process::id(),
        store
            .local_ip()
            .map(|ip| ip.to_string())
            .unwrap_or_default()
    );
    if let Err(other) = store.set_new(&format!("join/{}", env.rank), me.as_bytes())? {
        return Err(Error::Env {
            var: "RANK",
            value: env.rank.to_string(),
            expected: format!(
                "unique, but another process ({}) already joined as rank {}",
                String::from_utf8_lossy(&other),
                env.rank
            ),
        });
    }
    let mut missing = Vec::new();
    for r in 0..env.world_size {
        match store.get_until(&format!("join/{r}"), deadline) {
            Ok(Some(_)) => {}
            Ok(None) => missing.push(r.to_string()),
            // Rank 0 started first, so it gives up first; its store goes with it.
            Err(e) if env.rank != 0 => {
                return Err(rdv(format!(
                    "rank {r} never arrived: the store went away while this rank waited for it \
                     (rank 0 gave up first?): {e}"
                )))
            }
            Err(e) => return Err(e),
        }
    }
    if !missing.is_empty() {
        return Err(rdv(format!(
            "rank(s) {} never arrived within {:.1} s (world size {}; did they start, with the same \
             MASTER_ADDR/MASTER_PORT?)",
            missing.join(", "),
            timeout.as_secs_f64(),
            env.world_size
        )));
    }
    Ok(())
}

/// Rank 0 makes an NCCL unique id and publishes it under `key`; the others wait for it.
fn share_nccl_id(
    store: &StoreClient,
    key: &str,
    make: bool,
    timeout: Duration,
) -> Result<[u8; nccl::ID_BYTES]> {
    if make {
        let id = nccl::unique_id()?;
        store.set(key, &id)?;
        return Ok(id);
    }
    let bytes = store
        .get_until(key, Instant::now() + timeout)?
        .ok_or_else(|| Error::Rendezvous {
            addr: store.addr().to_string(),
            msg: format!(
                "rank 0 did not publish the NCCL id within {:.1} s",
                timeout.as_secs_f64()
            ),
        })?;
    bytes.try_into().map_err(|b: Vec<u8>| Error::Rendezvous {
        addr: store.addr().to_string(),
        msg: format!(
            "the NCCL id has {} bytes, expected {}",
            b.len(),
            nccl::ID_BYTES
        ),
    })
}

fn check_reduce_op(op_name: &'static str, t: &Tensor, op: ReduceOp) -> Result<()> {
    if op == ReduceOp::Avg && t.dtype() == DType::I32 {
        return Err(Error::invalid(
            op_name,
            "Avg of i32 tensors is not defined; use Sum",
        ));
    }
    Ok(())
}

fn first_dim(op: &'static str, t: &Tensor) -> Result<usize> {
    t.shape().first().copied().ok_or_else(|| {
        Error::invalid(
            op,
            "a scalar tensor has no rows to split or join; reshape it to [1]",
        )
    })
}

/// A tensor's elements as little-endian bytes on the host.
fn host_bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(match t.dtype() {
        DType::F32 => bytemuck::cast_slice(&t.to_vec::<f32>()?).to_vec(),
        DType::BF16 => bytemuck::cast_slice(&t.to_vec::<half::bf16>()?).to_vec(),
        DType::F16 => bytemuck::cast_slice(&t.to_vec::<half::f16>()?).to_vec(),
        DType::I32 => bytemuck::cast_slice(&t.to_vec::<i32>()?).to_vec(),
    })
}

fn from_host(bytes: &[u8], shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
    Ok(Tensor::from_bytes(bytes, shape, dtype)?.into_device(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// World size 1: every collective returns its input, the counts come back unchanged.
    #[test]
    fn single_group_is_identity() {
        let g = Group::single();
        let t = Tensor::from_vec(vec![1.5f32, -2.0, 0.25, 8.0], &[2, 2]).unwrap();
        for out in [
            g.all_reduce(&t, ReduceOp::Sum).unwrap(),
            g.all_reduce(&t, ReduceOp::Avg).unwrap(),
            g.reduce_scatter(&t, ReduceOp::Sum).unwrap(),
            g.all_gather(&t).unwrap(),
            g.broadcast(&t, 0).unwrap(),
            g.all_to_all(&t, &[2], &[2]).unwrap(),
        ] {
            assert_eq!(out.shape(), &[2, 2]);
            assert_eq!(out.to_vec::<f32>().unwrap(), vec![1.5, -2.0, 0.25, 8.0]);
        }
        assert_eq!(g.all_to_all_counts(&[3, 0, 2]).unwrap(), vec![3, 0, 2]);
        g.barrier().unwrap();
        g.agree("config", b"x").unwrap();
        let sub = g.split(&[vec![0]]).unwrap();
        assert_eq!((sub.rank(), sub.size()), (0, 1));
        assert!(g
            .broadcast(&t, 1)
            .unwrap_err()
            .to_string()
            .contains("root 1"));
        assert!(g.all_to_all(&t, &[1], &[1]).is_err());
        assert!(g.split(&[vec![0], vec![1]]).is_err());
        let ids = Tensor::from_vec(vec![1i32, 2], &[2]).unwrap();
        assert!(g
            .all_reduce(&ids, ReduceOp::Avg)
            .unwrap_err()
            .to_string()
            .contains("Avg of i32"));
    }

    /// The CPU backend's reduction: rank order, f32 accumulation, one rounding; i32 wraps.
    #[test]
    fn reduction_order_and_rounding() {
        let a = [1.0e8f32, 1.0, -1.0e8];
        let b = [1.0f32, 1.0, 1.0];
        let c = [-1.0e8f32, 0.5, 1.0e8];
        let bytes = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
        let (a, b, c) = (bytes(&a), bytes(&b), bytes(&c));
        let sum = cpu::reduce_in_rank_order(&[&a, &b, &c], DType::F32, ReduceOp::Sum).unwrap();
        // 1e8 + 1 rounds to 1e8 and -1e8 + 1 to -1e8 in f32: columns 0 and 2 sum to 0, not 1.
        assert_eq!(bytemuck::cast_slice::<u8, f32>(&sum), &[0.0, 2.5, 0.0]);
        let avg = cpu::reduce_in_rank_order(&[&b, &b], DType::F32, ReduceOp::Avg).unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, f32>(&avg), &[1.0, 1.0, 1.0]);
        let h = |v: &[f32]| -> Vec<u8> {
            let x: Vec<half::bf16> = v.iter().map(|&f| half::bf16::from_f32(f)).collect();
            bytemuck::cast_slice(&x).to_vec()
        };
        // bf16 parts summed in f32 (256 + 1 + 1 = 258 is a bf16 value), rounded once.
        let s = cpu::reduce_in_rank_order(
            &[&h(&[256.0]), &h(&[1.0]), &h(&[1.0])],
            DType::BF16,
            ReduceOp::Sum,
        )
        .unwrap();
        assert_eq!(
            bytemuck::cast_slice::<u8, half::bf16>(&s)[0].to_f32(),
            258.0
        );
        let i = |v: &[i32]| bytemuck::cast_slice::<i32, u8>(v).to_vec();
        let s = cpu::reduce_in_rank_order(
            &[&i(&[i32::MAX, 3]), &i(&[1, -5])],
            DType::I32,
            ReduceOp::Sum,
        )
        .unwrap();
        assert_eq!(bytemuck::cast_slice::<u8, i32>(&s), &[i32::MIN, -2]);
        assert!(cpu::reduce_in_rank_order(&[&a, &a[..4]], DType::F32, ReduceOp::Sum).is_err());
    }
}
