//! Training data: binary token shards written by `moe data prepare`, memory-mapped and sampled
//! deterministically, or the built-in synthetic corpus. Either way sequence `i` of a run is a
//! pure function of (seed, i), so the data position is one counter that a checkpoint stores.
//!
//! Shard file (little-endian): a 32-byte header
//!   magic `MOETOKS\0` | version u32 = 1 | bytes per token u32 (2 or 4) | token count u64 |
//!   vocab size u32 | end-of-document id u32 (u32::MAX: none)
//! then `count` token ids. A shard is cut into windows of seq_len + 1 tokens at stride seq_len
//! (windows stay inside one shard); each epoch visits every window once in an order shuffled
//! from (seed, epoch).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::synthetic::{SyntheticConfig, SyntheticCorpus};
use super::Error;

pub const MAGIC: [u8; 8] = *b"MOETOKS\0";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 32;

/// `[data]`: where training sequences come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "snake_case")]
pub enum DataConfig {
    /// The built-in task mixture (no files).
    Synthetic(SyntheticConfig),
    /// A directory of `*.bin` shards from `moe data prepare`.
    Shards(ShardsConfig),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardsConfig {
    pub dir: PathBuf,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig::Synthetic(SyntheticConfig::default())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    /// 2 (u16 ids) or 4 (u32 ids).
    pub token_bytes: u32,
    pub count: u64,
    pub vocab_size: u32,
    pub eos_id: Option<u32>,
}

impl ShardHeader {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.token_bytes.to_le_bytes());
        h[16..24].copy_from_slice(&self.count.to_le_bytes());
        h[24..28].copy_from_slice(&self.vocab_size.to_le_bytes());
        h[28..32].copy_from_slice(&self.eos_id.unwrap_or(u32::MAX).to_le_bytes());
        h
    }

    /// Parses and checks a header against the file length.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<ShardHeader, Error> {
        let bad = |msg: String| Error::Data {
            path: path.to_path_buf(),
            msg,
        };
        if bytes.len() < HEADER_BYTES || bytes[..8] != MAGIC {
            return Err(bad(
                "not a token shard (no MOETOKS header); make shards with `moe data prepare`".into(),
            ));
        }
        let u32_at =
            |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!(
                "shard version {version}, this build reads version {VERSION}"
            )));
        }
        let token_bytes = u32_at(12);
        if token_bytes != 2 && token_bytes != 4 {
            return Err(bad(format!(
                "bytes per token {token_bytes}, expected 2 or 4"
            )));
        }
        let mut c = [0u8; 8];
        c.copy_from_slice(&bytes[16..24]);
        let count = u64::from_le_bytes(c);
        let want = HEADER_BYTES as u64 + count * token_bytes as u64;
        if bytes.len() as u64 != want {
            return Err(bad(format!(
                "file is {} bytes, header promises {count} tokens = {want} bytes (truncated or \
                 corrupt)",
                bytes.len()
            )));
        }
        let eos = u32_at(28);
        Ok(ShardHeader {
            token_bytes,
            count,
            vocab_size: u32_at(24),
            eos_id: (eos != u32::MAX).then_some(eos),
        })
    }
}

/// Writes one shard atomically (temp file + rename).
pub fn write_shard(
    path: &Path,
    vocab_size: u32,
    eos_id: Option<u32>,
    tokens: &[u32],
) -> Result<(), Error> {
    let token_bytes = if vocab_size <= 1 << 16 { 2 } else { 4 };
    let header = ShardHeader {
        token_bytes,
        count: tokens.len() as u64,
        vocab_size,
        eos_id,
    };
    let mut bytes = Vec::with_capacity(HEADER_BYTES + tokens.len() * token_bytes as usize);
    bytes.extend_from_slice(&header.encode());
    for &t in tokens {
        if token_bytes == 2 {
            bytes.extend_from_slice(&(t as u16).to_le_bytes());
        } else {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
    }
    let tmp = path.with_extension("bin.tmp");
    let io = |source| Error::Io {
        path: tmp.clone(),
        source,
    };
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(&bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

struct Shard {
    map: Mmap,
    header: ShardHeader,
}

impl Shard {
    fn token(&self, i: usize) -> i32 {
        let at = HEADER_BYTES + i * self.header.token_bytes as usize;
        let b = &self.map[at..];
        if self.header.token_bytes == 2 {
            u16::from_le_bytes([b[0], b[1]]) as i32
        } else {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i32
        }
    }
}

/// Memory-mapped shards of one directory, cut into windows and visited in a seeded order.
pub struct ShardDataset {
    shards: Vec<Shard>,
    /// first_window[s] = index of shard s's first window; last entry = total windows.
    first_window: Vec<u64>,
    seq_len: usize,
    seed: u64,
    /// The window order of one epoch, cached: (epoch, permutation).
    order: Option<(u64, Vec<u32>)>,
}

impl ShardDataset {
    /// Opens every `*.bin` in `dir` (sorted by name) and checks each header and that token ids
    /// fit `model_vocab`.
    pub fn open(dir: &Path, seq_len: usize, seed: u64, model_vocab: usize) -> Result<Self, Error> {
        let bad = |msg: String| Error::Data {
            path: dir.to_path_buf(),
            msg,
        };
        let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "bin"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(bad(
                "no *.bin token shards here; make them with `moe data prepare FILES --out DIR`"
                    .into(),
            ));
        }
        let mut shards = Vec::with_capacity(paths.len());
        let mut first_window = vec![0u64];
        for path in paths {
            let file = File::open(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: shards are written once (temp + rename) and only read afterwards; a file
            // changed under a running job is outside what we support.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            let header = ShardHeader::decode(&map, &path)?;
            if header.vocab_size as usize > model_vocab {
                return Err(Error::Data {
                    path,
                    msg: format!(
                        "token ids go up to vocab size {}, the model's vocab_size is {model_vocab}",
                        header.vocab_size
                    ),
                });
            }
            let windows = header.count.saturating_sub(1) / seq_len as u64;
            first_window.push(first_window[first_window.len() - 1] + windows);
            shards.push(Shard { map, header });
        }
        let total = first_window[first_window.len() - 1];
        if total == 0 {
            let tokens: u64 = shards.iter().map(|s| s.header.count).sum();
            return Err(bad(format!(
                "the shards hold {tokens} tokens, not one window of seq_len + 1 = {} tokens",
                seq_len + 1
            )));
        }
        if total > u32::MAX as u64 {
            return Err(bad(format!(
                "{total} windows of seq_len {seq_len}: at most {} are supported; use a longer \
                 seq_len",
                u32::MAX
            )));
        }
        Ok(ShardDataset {
            shards,
            first_window,
            seq_len,
            seed,
            order: None,
        })
    }

    pub fn windows(&self) -> u64 {
        self.first_window[self.first_window.len() - 1]
    }

    pub fn tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.header.count).sum()
    }

    /// Sequence `index` (counting across epochs): (tokens, next-token targets), each seq_len.
    pub fn sequence(&mut self, index: u64) -> (Vec<i32>, Vec<i32>) {
        let n = self.windows();
        let (epoch, j) = (index / n, (index % n) as usize);
        if self.order.as_ref().map(|o| o.0) != Some(epoch) {
            let mut perm: Vec<u32> = (0..n as u32).collect();
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(epoch);
            for i in (1..perm.len()).rev() {
                perm.swap(i, rng.random_range(0..=i));
            }
            self.order = Some((epoch, perm));
        }
        let w = self.order.as_ref().map_or(0, |o| o.1[j]) as u64;
        let s = self.first_window.partition_point(|&f| f <= w) - 1;
        let shard = &self.shards[s];
        let start = ((w - self.first_window[s]) * self.seq_len as u64) as usize;
        let ids: Vec<i32> = (start..start + self.seq_len + 1)
            .map(|i| shard.token(i))
            .collect();
        (ids[..self.seq_len].to_vec(), ids[1..].to_vec())
    }
}

/// One micro-batch on the host: tokens and targets [batch, seq_len] row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub tokens: Vec<i32>,
    pub targets: Vec<i32>,
    pub batch: usize,
    pub seq_len: usize,
}

impl Batch {
    /// Positions whose target is not ignored.
    pub fn supervised(&self) -> usize {
        self.targets.iter().filter(|&&t| t >= 0).count()
    }
}

/// Where a run's sequences come from (`DataConfig` opened).
pub enum DataSource {
    Synthetic(SyntheticCorpus),
    Shards(ShardDataset),
}

impl DataSource {
    pub fn open(
        cfg: &DataConfig,
        seq_len: usize,
        seed: u64,
        model_vocab: usize,
    ) -> Result<Self, Error> {
        match cfg {
            DataConfig::Synthetic(s) => {
                if model_vocab < super::synthetic::VOCAB {
                    return Err(Error::Config(format!(
                        "model.vocab_size = {model_vocab}: the synthetic corpus is byte-level and \
                         needs >= {}",
                        super::synthetic::VOCAB
                    )));
                }
                Ok(DataSource::Synthetic(
                    SyntheticCorpus::new(s.clone(), seed, seq_len).map_err(Error::Config)?,
                ))
            }
            DataConfig::Shards(s) => Ok(DataSource::Shards(ShardDataset::open(
                &s.dir,
                seq_len,
                seed,
                model_vocab,
            )?)),
        }
    }

    pub fn seq_len(&self) -> usize {
        match self {
            DataSource::Synthetic(c) => c.seq_len(),
            DataSource::Shards(d) => d.seq_len,
        }
    }

    /// The `batch` sequences at `position`, `position + 1`, ...; advances `position`.
    pub fn next_batch(&mut self, position: &mut u64, batch: usize) -> Batch {
        let seq_len = self.seq_len();
        let mut tokens = Vec::with_capacity(batch * seq_len);
        let mut targets = Vec::with_capacity(batch * seq_len);
        for _ in 0..batch {
            let (t, y) = match self {
                DataSource::Synthetic(c) => c.sequence(*position),
                DataSource::Shards(d) => d.sequence(*position),
            };
            tokens.extend(t);
            targets.extend(y);
            *position += 1;
        }
        Batch {
            tokens,
            targets,
            batch,
            seq_len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn make_dir(shards: &[Vec<u32>], vocab: u32) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (i, s) in shards.iter().enumerate() {
            write_shard(
                &dir.path().join(format!("shard-{i:05}.bin")),
                vocab,
                Some(0),
                s,
            )
            .unwrap();
        }
        dir
    }

    #[test]
    fn header_round_trip() {
        let h = ShardHeader {
            token_bytes: 4,
            count: 3,
            vocab_size: 100_000,
            eos_id: None,
        };
        let mut bytes = h.encode().to_vec();
        bytes.extend([0u8; 12]);
        assert_eq!(ShardHeader::decode(&bytes, Path::new("x")).unwrap(), h);
        let e = ShardHeader::decode(&bytes[..40], Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let e =
            ShardHeader::decode(b"hello world, this is not a shard!", Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("not a token shard"), "{e}");
    }

    #[test]
    fn every_window_once_per_epoch_and_deterministic() {
        // Two shards: 0..=40 (5 windows of 8 + 1) and 100..=120 (2 windows + a short tail).
        let a: Vec<u32> = (0..41).collect();
        let b: Vec<u32> = (100..121).collect();
        let dir = make_dir(&[a, b], 200);
        let mut d = ShardDataset::open(dir.path(), 8, 3, 256).unwrap();
        assert_eq!(d.windows(), 7);
        let mut starts: Vec<i32> = (0..7).map(|i| d.sequence(i).0[0]).collect();
        let epoch1: Vec<i32> = (7..14).map(|i| d.sequence(i).0[0]).collect();
        assert_ne!(starts, epoch1, "epochs are shuffled differently");
        let (t, y) = d.sequence(2);
        assert_eq!(&t[1..], &y[..7]);
        assert_eq!(y[7], t[7] + 1);
        let mut again = ShardDataset::open(dir.path(), 8, 3, 256).unwrap();
        assert_eq!(again.sequence(9), d.sequence(9));
        starts.sort();
        assert_eq!(starts, vec![0, 8, 16, 24, 32, 100, 108]);
    }

    #[test]
    fn bad_shards_are_named() {
        let dir = make_dir(&[(0..5).collect()], 70_000);
        let e = ShardDataset::open(dir.path(), 8, 0, 256)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("vocab size 70000") && e.contains("256"), "{e}");
        let e = ShardDataset::open(dir.path(), 8, 0, 100_000)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not one window"), "{e}");
        let empty = tempfile::tempdir().unwrap();
        let e = ShardDataset::open(empty.path(), 8, 0, 256)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("moe data prepare"), "{e}");
        let e = ShardDataset::open(Path::new("/nonexistent/shards"), 8, 0, 256)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/nonexistent/shards"), "{e}");
    }
}
