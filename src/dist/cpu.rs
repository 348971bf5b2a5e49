//! The CPU backend: ranks in separate processes joined by a full mesh of loopback (or LAN) TCP
//! sockets, set up through the rendezvous store. Every collective is one `exchange`: each rank
//! sends one framed message to every peer and reads one from every peer (a writer and a reader
//! thread per peer, so large messages cannot deadlock), with the socket timeout on every read and
//! write. Reductions run in rank order on every rank (`reduce_in_rank_order`), so all ranks get
//! bit-identical results. Correctness over speed: the NCCL backend is the fast path.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use half::{bf16, f16};

use super::store::StoreClient;
use super::{Error, PeerFault, ReduceOp, Result};
use crate::runtime::DType;

/// Sent first on every mesh connection: the mesh's key hash and the sender's index.
const HELLO: u64 = 0x6d6f_652d_6469_7374;
/// Bytes of an operation name carried in each message header.
const OP_NAME: usize = 24;

pub(crate) struct CpuMesh {
    me: usize,
    /// `peers[i]` is the socket to member i; `None` at `me`.
    peers: Vec<Option<TcpStream>>,
    /// World rank of each member, for error messages.
    world_ranks: Vec<usize>,
    timeout: Duration,
    seq: AtomicU64,
    broken: AtomicBool,
}

impl CpuMesh {
    /// Connects member `me` of the members `world_ranks` to all others. `key` names this mesh in
    /// the store; every member calls this with the same key and list.
    pub(crate) fn connect(
        store: &StoreClient,
        key: &str,
        me: usize,
        world_ranks: Vec<usize>,
        timeout: Duration,
    ) -> Result<CpuMesh> {
        let n = world_ranks.len();
        let deadline = Instant::now() + timeout;
        let rdv = |msg: String| Error::Rendezvous {
            addr: store.addr().to_string(),
            msg,
        };
        let listener = TcpListener::bind((store.local_ip()?, 0))
            .map_err(|e| rdv(format!("cannot open a socket for peers: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| rdv(format!("socket address: {e}")))?;
        store.set(&format!("{key}/addr/{me}"), addr.to_string().as_bytes())?;
        let tag = HELLO ^ fnv1a(key.as_bytes());
        let mut peers: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();

        // Lower members accept, higher members connect.
        let lower: Vec<String> = (0..me).map(|j| format!("{key}/addr/{j}")).collect();
        let addrs = store.get_all(&lower, deadline)?.map_err(|missing| {
            let ranks: Vec<usize> = missing.iter().map(|&j| world_ranks[j]).collect();
            never_arrived(store, key, &ranks, timeout)
        })?;
        for (j, a) in addrs.iter().enumerate() {
            let a: SocketAddr = String::from_utf8_lossy(a).parse().map_err(|e| {
                rdv(format!(
                    "rank {} published a bad address: {e}",
                    world_ranks[j]
                ))
            })?;
            let mut s = connect_until(a, deadline).map_err(|e| {
                rdv(format!(
                    "cannot connect to rank {} at {a}: {e}",
                    world_ranks[j]
                ))
            })?;
            let mut hello = tag.to_le_bytes().to_vec();
            hello.extend_from_slice(&(me as u64).to_le_bytes());
            s.write_all(&hello)
                .map_err(|e| rdv(format!("handshake with rank {}: {e}", world_ranks[j])))?;
            peers[j] = Some(s);
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| rdv(format!("socket setup: {e}")))?;
        while peers
            .iter()
            .enumerate()
            .skip(me + 1)
            .any(|(_, p)| p.is_none())
        {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)
                        .and_then(|_| s.set_read_timeout(Some(timeout)))
                        .map_err(|e| rdv(format!("socket setup: {e}")))?;
                    let mut hello = [0u8; 16];
                    // A stranger (port scan, stale peer) that does not say hello is dropped.
                    if s.read_exact(&mut hello).is_err() {
                        continue;
                    }
                    let their_tag = u64::from_le_bytes(hello[..8].try_into().expect("8 bytes"));
                    let j = u64::from_le_bytes(hello[8..].try_into().expect("8 bytes")) as usize;
                    if their_tag == tag && j > me && j < n && peers[j].is_none() {
                        peers[j] = Some(s);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let ranks: Vec<usize> = (me + 1..n)
                            .filter(|&j| peers[j].is_none())
                            .map(|j| world_ranks[j])
                            .collect();
                        return Err(never_arrived(store, key, &ranks, timeout));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(rdv(format!("accepting peers: {e}"))),
            }
        }
        for s in peers.iter().flatten() {
            s.set_nodelay(true)
                .and_then(|_| s.set_read_timeout(Some(timeout)))
                .and_then(|_| s.set_write_timeout(Some(timeout)))
                .map_err(|e| rdv(format!("socket setup: {e}")))?;
        }
        Ok(CpuMesh {
            me,
            peers,
            world_ranks,
            timeout,
            seq: AtomicU64::new(0),
            broken: AtomicBool::new(false),
        })
    }

    /// Sends `out[i]` to member i and returns what every member sent to this one (`out[me]` is
    /// this member's own slot, returned as is). `op` names the operation in errors.
    pub(crate) fn exchange(&self, op: &str, out: &[&[u8]]) -> Result<Vec<Vec<u8>>> {
        let n = self.peers.len();
        debug_assert_eq!(out.len(), n);
        if self.broken.load(Ordering::Relaxed) {
            let others: Vec<usize> = (0..n).filter(|&j| j != self.me).collect();
            return Err(Error::Peer {
                op: op.to_string(),
                ranks: others.iter().map(|&j| self.world_ranks[j]).collect(),
                fault: PeerFault::Broken,
            });
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let header = |len: usize| {
            let mut h = Vec::with_capacity(16 + OP_NAME);
            h.extend_from_slice(&seq.to_le_bytes());
            h.extend_from_slice(&(len as u64).to_le_bytes());
            let mut name = [0u8; OP_NAME];
            let b = op.as_bytes();
            name[..b.len().min(OP_NAME)].copy_from_slice(&b[..b.len().min(OP_NAME)]);
            h.extend_from_slice(&name);
            h
        };
        let mut results: Vec<std::result::Result<Vec<u8>, PeerFault>> =
            (0..n).map(|_| Ok(Vec::new())).collect();
        std::thread::scope(|scope| {
            let mut writers = Vec::new();
            let mut readers = Vec::new();
            for (j, peer) in self.peers.iter().enumerate() {
                let Some(stream) = peer else { continue };
                let h = header(out[j].len());
                let payload = out[j];
                writers.push((
                    j,
                    scope.spawn(move || -> std::io::Result<()> {
                        let mut w = stream;
                        w.write_all(&h)?;
                        w.write_all(payload)
                    }),
                ));
                readers.push((j, scope.spawn(move || self.read_message(stream, op, seq))));
            }
            for (j, r) in readers {
                results[j] = r
                    .join()
                    .unwrap_or_else(|_| Err(PeerFault::Io("reader panicked".into())));
            }
            for (j, w) in writers {
                let res = w
                    .join()
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::Other.into()));
                if let (Err(e), Ok(_)) = (res, &results[j]) {
                    results[j] = Err(self.io_fault(&e));
                }
            }
        });
        results[self.me] = Ok(out[self.me].to_vec());
        self.collect(op, seq, results)
    }

    fn read_message(
        &self,
        mut stream: &TcpStream,
        op: &str,
        seq: u64,
    ) -> std::result::Result<Vec<u8>, PeerFault> {
        let mut h = [0u8; 16 + OP_NAME];
        stream.read_exact(&mut h).map_err(|e| self.io_fault(&e))?;
        let their_seq = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")) as usize;
        let name = String::from_utf8_lossy(&h[16..])
            .trim_end_matches('\0')
            .to_string();
        if their_seq != seq || name != op {
            return Err(PeerFault::Protocol(format!(
                "it ran {name} (operation #{their_seq} on this group) while this rank ran {op} \
                 (#{seq}): the ranks called collectives in different orders"
            )));
        }
        let mut payload = vec![0u8; len];
        stream
            .read_exact(&mut payload)
            .map_err(|e| self.io_fault(&e))?;
        Ok(payload)
    }

    fn io_fault(&self, e: &std::io::Error) -> PeerFault {
        use std::io::ErrorKind::*;
        match e.kind() {
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => PeerFault::Closed,
            WouldBlock | TimedOut => PeerFault::Timeout(self.timeout),
            _ => PeerFault::Io(e.to_string()),
        }
    }

    /// The payloads, or one error naming the peers of the most telling fault (closed before
    /// timed out before protocol before other I/O).
    fn collect(
        &self,
        op: &str,
        seq: u64,
        results: Vec<std::result::Result<Vec<u8>, PeerFault>>,
    ) -> Result<Vec<Vec<u8>>> {
        let faults: Vec<(usize, PeerFault)> = results
            .iter()
            .enumerate()
            .filter_map(|(j, r)| r.as_ref().err().map(|f| (self.world_ranks[j], f.clone())))
            .collect();
        if faults.is_empty() {
            return Ok(results.into_iter().map(|r| r.unwrap_or_default()).collect());
        }
        self.broken.store(true, Ordering::Relaxed);
        let rank_of = |pred: &dyn Fn(&PeerFault) -> bool| -> Vec<usize> {
            faults
                .iter()
                .filter(|(_, f)| pred(f))
                .map(|(r, _)| *r)
                .collect()
        };
        let picks: [&dyn Fn(&PeerFault) -> bool; 4] = [
            &|f| matches!(f, PeerFault::Closed),
            &|f| matches!(f, PeerFault::Timeout(_)),
            &|f| matches!(f, PeerFault::Protocol(_)),
            &|_| true,
        ];
        for pick in picks {
            let ranks = rank_of(pick);
            if let Some(first) = faults.iter().find(|(_, f)| pick(f)) {
                return Err(Error::Peer {
                    op: format!("{op} (#{seq}, rank {})", self.world_ranks[self.me]),
                    ranks,
                    fault: first.1.clone(),
                });
            }
        }
        unreachable!("the last pick matches every fault")
    }
}

/// The error for members that never joined a mesh: names them, and the whole world's missing
/// ranks when they never even joined the store.
fn never_arrived(store: &StoreClient, key: &str, ranks: &[usize], timeout: Duration) -> Error {
    let list: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    Error::Rendezvous {
        addr: store.addr().to_string(),
        msg: format!(
            "rank(s) {} never arrived within {:.1} s (mesh '{key}'; did they start, with the \
             same MASTER_ADDR/MASTER_PORT and WORLD_SIZE?)",
            list.join(", "),
            timeout.as_secs_f64()
        ),
    }
}

fn connect_until(addr: SocketAddr, deadline: Instant) -> std::io::Result<TcpStream> {
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Element-wise sum of `parts` (little-endian elements of `dtype`) taken in the order given,
/// accumulated in f32 for floats (rounded once at the end) and wrapping for i32; `Avg` divides the
/// f32 sum by the number of parts. The CPU backend's reduction, and so the reference result.
pub(crate) fn reduce_in_rank_order(parts: &[&[u8]], dtype: DType, op: ReduceOp) -> Result<Vec<u8>> {
    let n = parts.first().map_or(0, |p| p.len());
    if parts.iter().any(|p| p.len() != n) {
        return Err(Error::invalid(
            "reduce",
            "ranks contributed buffers of different sizes (the tensors' shapes differ between ranks)",
        ));
    }
    fn floats<T: bytemuck::Pod>(
        parts: &[&[u8]],
        op: ReduceOp,
        to: fn(T) -> f32,
        from: fn(f32) -> T,
    ) -> Vec<u8> {
        let size = std::mem::size_of::<T>();
        let len = parts[0].len() / size;
        let mut acc = vec![0f32; len];
        for (r, p) in parts.iter().enumerate() {
            for (i, c) in p.chunks_exact(size).enumerate() {
                let x = to(bytemuck::pod_read_unaligned(c));
                acc[i] = if r == 0 { x } else { acc[i] + x };
            }
        }
        if op == ReduceOp::Avg {
            let k = parts.len() as f32;
            acc.iter_mut().for_each(|a| *a /= k);
        }
        let out: Vec<T> = acc.into_iter().map(from).collect();
        bytemuck::cast_slice(&out).to_vec()
    }
    Ok(match dtype {
        DType::F32 => floats::<f32>(parts, op, |x| x, |x| x),
        DType::BF16 => floats::<bf16>(parts, op, bf16::to_f32, bf16::from_f32),
        DType::F16 => floats::<f16>(parts, op, f16::to_f32, f16::from_f32),
        DType::I32 => {
            if op == ReduceOp::Avg {
                return Err(Error::invalid(
                    "reduce",
                    "Avg of i32 tensors is not defined; use Sum",
                ));
            }
            let mut acc = vec![0i32; n / 4];
            for p in parts {
                for (a, c) in acc.iter_mut().zip(p.chunks_exact(4)) {
                    *a = a.wrapping_add(bytemuck::pod_read_unaligned::<i32>(c));
                }
            }
            bytemuck::cast_slice(&acc).to_vec()
        }
    })
}
