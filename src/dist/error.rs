//! The `dist` layer's error type. Every fault that involves another process names the rank(s)
//! (world ranks) and the operation; bad launch input names the variable, its value and what was
//! expected.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{var}={value:?}: {expected}")]
    Env {
        var: &'static str,
        value: String,
        expected: String,
    },
    #[error("rendezvous at {addr}: {msg}")]
    Rendezvous { addr: String, msg: String },
    #[error("{op}: {}", describe_peers(ranks, fault))]
    Peer {
        op: String,
        ranks: Vec<usize>,
        fault: PeerFault,
    },
    #[error(
        "ranks disagree on '{label}': {}",
        describe_mismatch(reference, differing)
    )]
    Mismatch {
        label: String,
        reference: usize,
        differing: Vec<usize>,
    },
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    #[error("NCCL {op}: {msg}")]
    Nccl { op: &'static str, msg: String },
    #[error(
        "the NCCL library (libnccl.so.2) was not found: tried {tried} with LD_LIBRARY_PATH={ld_path:?}; \
         install NCCL (e.g. pip install nvidia-nccl-cu13) and add its lib/ folder to LD_LIBRARY_PATH"
    )]
    NcclMissing { tried: String, ld_path: String },
    #[error("launch: {0}")]
    Launch(String),
    #[error(transparent)]
    Runtime(#[from] crate::runtime::Error),
}

/// What went wrong with a peer during an operation.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerFault {
    /// The peer closed its connection: it exited or crashed.
    Closed,
    /// Nothing arrived from (or could be sent to) the peer within the timeout.
    Timeout(Duration),
    /// The peer ran a different operation (the ranks called collectives in different orders).
    Protocol(String),
    /// A socket error other than the above.
    Io(String),
    /// An earlier operation on this group failed; the group cannot be used any more.
    Broken,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid {
            op,
            msg: msg.into(),
        }
    }
}

fn rank_list(ranks: &[usize]) -> String {
    let names: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    match ranks.len() {
        1 => format!("rank {}", names[0]),
        _ => format!("ranks {}", names.join(", ")),
    }
}

fn describe_peers(ranks: &[usize], fault: &PeerFault) -> String {
    let who = rank_list(ranks);
    match fault {
        PeerFault::Closed => format!("{who} closed the connection (exited or crashed)"),
        PeerFault::Timeout(t) => format!(
            "timed out after {:.1} s waiting for {who} (stalled, or still in an earlier step; \
             parallel.timeout_s sets the limit)",
            t.as_secs_f64()
        ),
        PeerFault::Protocol(msg) => format!("{who}: {msg}"),
        PeerFault::Io(msg) => format!("{who}: {msg}"),
        PeerFault::Broken => {
            format!("the group of {who} is unusable after an earlier failed operation")
        }
    }
}

fn describe_mismatch(reference: &usize, differing: &[usize]) -> String {
    format!("{} differ from rank {reference}", rank_list(differing))
}
