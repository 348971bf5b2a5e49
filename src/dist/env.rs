//! Where this process sits in a distributed run, read from the environment that torchrun
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), `moe launch` (the same) or
//! Slurm (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, master = first host of
//! `SLURM_JOB_NODELIST`, compact `node[01-04,07]` form expanded here) sets. Neither set: a
//! single process.

use super::{Error, Result};

/// Port of the rendezvous store when `MASTER_PORT` is not set (torchrun's default).
pub const DEFAULT_MASTER_PORT: u16 = 29500;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes of this host (picks the GPU).
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl DistEnv {
    /// One process, no peers.
    pub fn single() -> DistEnv {
        DistEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: DEFAULT_MASTER_PORT,
        }
    }

    /// From the process environment (see the module comment).
    pub fn from_env() -> Result<DistEnv> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From variables given by `get` (tests pass a map). torchrun's variables win over Slurm's.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<DistEnv> {
        let env = if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            let rank = number(&get, "RANK")?;
            let world_size = number(&get, "WORLD_SIZE")?;
            let local_rank = optional_number(&get, "LOCAL_RANK")?.unwrap_or(rank);
            let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
            let master_port = port(&get, "MASTER_PORT")?.unwrap_or(DEFAULT_MASTER_PORT);
            DistEnv {
                rank,
                world_size,
                local_rank,
                master_addr,
                master_port,
            }
        } else if get("SLURM_PROCID").is_some() || get("SLURM_NTASKS").is_some() {
            let rank = number(&get, "SLURM_PROCID")?;
            let world_size = number(&get, "SLURM_NTASKS")?;
            let local_rank = optional_number(&get, "SLURM_LOCALID")?.unwrap_or(0);
            let master_addr = match get("MASTER_ADDR") {
                Some(a) => a,
                None => {
                    let list = get("SLURM_JOB_NODELIST")
                        .or_else(|| get("SLURM_NODELIST"))
                        .ok_or(Error::Env {
                            var: "SLURM_JOB_NODELIST",
                            value: String::new(),
                            expected: "set by Slurm (or set MASTER_ADDR) to find the master host"
                                .into(),
                        })?;
                    first_host(&list)?
                }
            };
            // Jobs sharing a node get different ports: derived from the job id.
            let job_port = match optional_number(&get, "SLURM_JOB_ID")? {
                Some(id) => 20000 + (id % 20000) as u16,
                None => DEFAULT_MASTER_PORT,
            };
            let master_port = port(&get, "MASTER_PORT")?.unwrap_or(job_port);
            DistEnv {
                rank,
                world_size,
                local_rank,
                master_addr,
                master_port,
            }
        } else {
            DistEnv::single()
        };
        env.check()?;
        Ok(env)
    }

    fn check(&self) -> Result<()> {
        if self.world_size == 0 {
            return Err(Error::Env {
                var: "WORLD_SIZE",
                value: "0".into(),
                expected: "at least 1".into(),
            });
        }
        if self.rank >= self.world_size {
            return Err(Error::Env {
                var: "RANK",
                value: self.rank.to_string(),
                expected: format!("below WORLD_SIZE={}", self.world_size),
            });
        }
        Ok(())
    }

    /// `MASTER_ADDR:MASTER_PORT`.
    pub fn master(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }
}

fn optional_number(
    get: &impl Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Option<usize>> {
    match get(var) {
        None => Ok(None),
        Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| Error::Env {
            var,
            value: v,
            expected: "a non-negative integer".into(),
        }),
    }
}

fn number(get: &impl Fn(&str) -> Option<String>, var: &'static str) -> Result<usize> {
    optional_number(get, var)?.ok_or(Error::Env {
        var,
        value: String::new(),
        expected: "set (the launcher sets RANK and WORLD_SIZE together)".into(),
    })
}

fn port(get: &impl Fn(&str) -> Option<String>, var: &'static str) -> Result<Option<u16>> {
    match get(var) {
        None => Ok(None),
        Some(v) => match v.trim().parse::<u16>() {
            Ok(p) if p > 0 => Ok(Some(p)),
            _ => Err(Error::Env {
                var,
                value: v,
                expected: "a TCP port, 1 to 65535".into(),
            }),
        },
    }
}

/// The first host of a Slurm node list.
pub fn first_host(list: &str) -> Result<String> {
    expand_nodelist(list)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Env {
            var: "SLURM_JOB_NODELIST",
            value: list.into(),
            expected: "at least one host".into(),
        })
}

/// Every host of a Slurm node list in its compact form: `a[01-03,07],b5,rack[1-2]-n[1-2]`.
/// Ranges keep their zero padding; several bracket groups in one name multiply out.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>> {
    let bad = |why: &str| Error::Env {
        var: "SLURM_JOB_NODELIST",
        value: list.into(),
        expected: format!("a Slurm node list like node[01-04,07] ({why})"),
    };
    let mut hosts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    let bytes = list.as_bytes();
    for (i, &c) in bytes.iter().enumerate() {
        match c {
            b'[' => depth += 1,
            b']' => depth -= 1,
            b',' if depth == 0 => {
                expand_name(&list[start..i], &mut hosts).map_err(|w| bad(&w))?;
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(bad("unbalanced or nested brackets"));
        }
    }
    if depth != 0 {
        return Err(bad("unbalanced brackets"));
    }
    expand_name(&list[start..], &mut hosts).map_err(|w| bad(&w))?;
    Ok(hosts)
}

/// One name with zero or more `[...]` groups, appended to `out` in order.
fn expand_name(name: &str, out: &mut Vec<String>) -> std::result::Result<(), String> {
    let name = name.trim();
    if name.is_empty() {
        return Err("empty host name".into());
    }
    let Some(open) = name.find('[') else {
        out.push(name.to_string());
        return Ok(());
    };
    let close = name[open..]
        .find(']')
        .map(|c| open + c)
        .ok_or("'[' without ']'")?;
    let (prefix, ranges, rest) = (&name[..open], &name[open + 1..close], &name[close + 1..]);
    let mut tails = Vec::new();
    expand_name_or_empty(rest, &mut tails)?;
    for part in ranges.split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let width = lo.len();
        let parse = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("'{part}' is not a number range"))
        };
        let (a, b) = (parse(lo)?, parse(hi)?);
        if a > b {
            return Err(format!("range '{part}' runs backwards"));
        }
        for n in a..=b {
            for tail in &tails {
                out.push(format!("{prefix}{n:0width$}{tail}"));
            }
        }
    }
    Ok(())
}

fn expand_name_or_empty(rest: &str, out: &mut Vec<String>) -> std::result::Result<(), String> {
    if rest.is_empty() {
        out.push(String::new());
        Ok(())
    } else {
        expand_name(rest, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<DistEnv> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        DistEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn nodelists_expand() {
        assert_eq!(
            expand_nodelist("node[01-04,07]").unwrap(),
            ["node01", "node02", "node03", "node04", "node07"]
        );
        assert_eq!(
            expand_nodelist("a[8-10],b5,c").unwrap(),
            ["a8", "a9", "a10", "b5", "c"]
        );
        assert_eq!(
            expand_nodelist("rack[1-2]-n[09-10]").unwrap(),
            ["rack1-n09", "rack1-n10", "rack2-n09", "rack2-n10"]
        );
        assert_eq!(first_host("gpu-[003-005],cpu1").unwrap(), "gpu-003");
        for bad in ["node[1-", "node[3-1]", "node[a-b]", "", "x,,y", "n[[1]]"] {
            let e = expand_nodelist(bad).unwrap_err().to_string();
            assert!(
                e.contains("SLURM_JOB_NODELIST") && e.contains(bad),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn torchrun_env() {
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.7"),
            ("MASTER_PORT", "1234"),
            ("SLURM_PROCID", "0"),
        ])
        .unwrap();
        assert_eq!(
            e,
            DistEnv {
                rank: 3,
                world_size: 4,
                local_rank: 1,
                master_addr: "10.0.0.7".into(),
                master_port: 1234
            }
        );
        assert_eq!(e.master(), "10.0.0.7:1234");
        assert_eq!(env(&[]).unwrap(), DistEnv::single());
    }

    #[test]
    fn slurm_env() {
        let e = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[12-15]"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap();
        assert_eq!(
            e,
            DistEnv {
                rank: 5,
                world_size: 8,
                local_rank: 1,
                master_addr: "gpu12".into(),
                master_port: 23456
            }
        );
        let e = env(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_NODELIST", "a1"),
            ("MASTER_PORT", "4000"),
        ])
        .unwrap();
        assert_eq!((e.master_addr.as_str(), e.master_port), ("a1", 4000));
    }

    #[test]
    fn inconsistent_env_is_refused() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("RANK", "4"), ("WORLD_SIZE", "4")],
                "RANK=\"4\": below WORLD_SIZE=4",
            ),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "0")],
                "WORLD_SIZE=\"0\": at least 1",
            ),
            (&[("RANK", "1")], "WORLD_SIZE=\"\": set"),
            (
                &[("RANK", "x"), ("WORLD_SIZE", "2")],
                "RANK=\"x\": a non-negative integer",
            ),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")],
                "MASTER_PORT=\"70000\": a TCP port",
            ),
            (
                &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")],
                "SLURM_JOB_NODELIST=\"\": set by Slurm",
            ),
        ];
        for (vars, want) in cases {
            let e = env(vars).unwrap_err().to_string();
            assert!(e.starts_with(want), "{vars:?}: {e}");
        }
    }
}
