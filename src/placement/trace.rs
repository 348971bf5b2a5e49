//! Routing traces: per step and MoE layer, the tokens routed to each expert. JSONL: a header line
//! naming the model (`TraceHeader`), then one line per (step, layer):
//! `{"step": 3, "layer": 0, "counts": [c_0, ..., c_{E-1}]}`. Written by the trainer through
//! `TraceWriter::record`, read back whole by `Trace::read`, which refuses a trace of another model.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Error, Result};

/// Format version written in every header.
pub const TRACE_VERSION: u32 = 1;

/// The model a trace belongs to. `config_hash` is the caller's hash of the model config (any
/// string that changes with it); `tokens_per_step` = tokens one rank routes per step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceHeader {
    pub moe_trace: u32,
    pub model: String,
    pub config_hash: String,
    pub layers: usize,
    pub experts: usize,
    pub top_k: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub tokens_per_step: usize,
}

impl TraceHeader {
    /// The first field in which `self` (a trace's header) and `expected` describe different
    /// models: "field = found in the trace, expected".
    pub fn model_mismatch(&self, expected: &TraceHeader) -> Option<String> {
        let fields: [(&str, String, String); 7] = [
            ("model", self.model.clone(), expected.model.clone()),
            (
                "config_hash",
                self.config_hash.clone(),
                expected.config_hash.clone(),
            ),
            (
                "layers",
                self.layers.to_string(),
                expected.layers.to_string(),
            ),
            (
                "experts",
                self.experts.to_string(),
                expected.experts.to_string(),
            ),
            ("top_k", self.top_k.to_string(), expected.top_k.to_string()),
            (
                "d_model",
                self.d_model.to_string(),
                expected.d_model.to_string(),
            ),
            ("d_ff", self.d_ff.to_string(), expected.d_ff.to_string()),
        ];
        fields
            .into_iter()
            .find(|(_, a, b)| a != b)
            .map(|(f, a, b)| format!("{f} = {a} in the trace, {b} expected"))
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    step: u64,
    layer: usize,
    counts: Vec<u64>,
}

/// Appends per-(step, layer) counts to a trace file; `finish` flushes it.
pub struct TraceWriter {
    out: BufWriter<File>,
    path: PathBuf,
    header: TraceHeader,
}

impl TraceWriter {
    pub fn create(path: &Path, header: TraceHeader) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut out = BufWriter::new(File::create(path).map_err(io)?);
        let line = serde_json::to_string(&header).map_err(|e| io(e.into()))?;
        writeln!(out, "{line}").map_err(io)?;
        Ok(TraceWriter {
            out,
            path: path.to_path_buf(),
            header,
        })
    }

    /// Records the tokens routed to each expert of `layer` at `step` (`counts.len()` = experts).
    pub fn record(&mut self, step: u64, layer: usize, counts: &[u64]) -> Result<()> {
        if layer >= self.header.layers || counts.len() != self.header.experts {
            return Err(Error::Config(format!(
                "trace {}: record of layer {layer} with {} counts, the model has {} layers of {} \
                 experts",
                self.path.display(),
                counts.len(),
                self.header.layers,
                self.header.experts
            )));
        }
        let line = serde_json::to_string(&Record {
            step,
            layer,
            counts: counts.to_vec(),
        })
        .map_err(|e| self.io(e.into()))?;
        writeln!(self.out, "{line}").map_err(|e| self.io(e))
    }

    pub fn finish(mut self) -> Result<()> {
        self.out.flush().map_err(|e| self.io(e))
    }

    fn io(&self, source: std::io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            source,
        }
    }
}

/// A whole trace: `steps[i]` = (step number, counts `[layer][expert]`), steps ascending.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    pub header: TraceHeader,
    pub steps: Vec<(u64, Vec<Vec<u64>>)>,
}

impl Trace {
    /// Reads a trace; with `expected`, refuses one whose header names another model. Every step
    /// must carry every layer exactly once.
    pub fn read(path: &Path, expected: Option<&TraceHeader>) -> Result<Trace> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |line: usize, msg: String| Error::Trace {
            path: path.to_path_buf(),
            line,
            msg,
        };
        let mut lines = BufReader::new(file).lines();
        let first = lines
            .next()
            .ok_or_else(|| bad(1, "empty file: expected a header line".into()))?
            .map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let header: TraceHeader = serde_json::from_str(&first)
            .map_err(|e| bad(1, format!("not a routing-trace header: {e}")))?;
        if header.moe_trace != TRACE_VERSION {
            return Err(bad(
                1,
                format!(
                    "moe_trace = {}: this moe reads version {TRACE_VERSION}",
                    header.moe_trace
                ),
            ));
        }
        if header.layers == 0 || header.experts == 0 {
            return Err(bad(1, "layers and experts must be > 0".into()));
        }
        if let Some(diff) = expected.and_then(|x| header.model_mismatch(x)) {
            return Err(bad(1, format!("trace of another model: {diff}")));
        }
        let mut steps: BTreeMap<u64, Vec<Option<Vec<u64>>>> = BTreeMap::new();
        let mut end = 1;
        for (i, line) in lines.enumerate() {
            let n = i + 2;
            end = n;
            let line = line.map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let r: Record = serde_json::from_str(&line).map_err(|e| {
                bad(
                    n,
                    format!("expected {{\"step\", \"layer\", \"counts\"}}: {e}"),
                )
            })?;
            if r.layer >= header.layers || r.counts.len() != header.experts {
                return Err(bad(
                    n,
                    format!(
                        "layer {} with {} counts: the header has {} layers of {} experts",
                        r.layer,
                        r.counts.len(),
                        header.layers,
                        header.experts
                    ),
                ));
            }
            let slot = &mut steps
                .entry(r.step)
                .or_insert_with(|| vec![None; header.layers])[r.layer];
            if slot.is_some() {
                return Err(bad(
                    n,
                    format!("step {} layer {} recorded twice", r.step, r.layer),
                ));
            }
            *slot = Some(r.counts);
        }
        let mut out = Vec::with_capacity(steps.len());
        for (step, layers) in steps {
            let mut full = Vec::with_capacity(layers.len());
            for (l, c) in layers.into_iter().enumerate() {
                full.push(c.ok_or_else(|| {
                    bad(
                        end,
                        format!("at the end: step {step} has no counts for layer {l}"),
                    )
                })?);
            }
            out.push((step, full));
        }
        if out.is_empty() {
            return Err(bad(1, "no steps after the header".into()));
        }
        Ok(Trace { header, steps: out })
    }

    /// Writes the whole trace (steps in order, layers in order).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut w = TraceWriter::create(path, self.header.clone())?;
        for (step, layers) in &self.steps {
            for (l, counts) in layers.iter().enumerate() {
                w.record(*step, l, counts)?;
            }
        }
        w.finish()
    }
}
