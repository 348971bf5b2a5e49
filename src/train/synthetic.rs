//! The built-in synthetic corpus of the default job: a mixture of small string tasks, generated
//! on the fly from a seed (no files), in plain bytes so a byte-level vocabulary (256) covers it.
//! One example is one line `tag:input=answer\n`:
//!   `cp:kqz=kqz`, `rev:kqz=zqk`, `sort:kqz=kqz`, `add:17+5=22`, `bal:([)]=no`.
//! A training sequence packs whole examples from position 0 and supervises only the answer bytes
//! (targets elsewhere are `IGNORE`), so the loss measures how well the tasks are solved.
//! Sequence `i` depends only on (seed, i): the data position is one counter and resumes exactly.
//! Prompts whose hash falls in 1/16 of the space are held out: training never shows them and
//! `SyntheticCorpus::held_out` draws evaluation prompts only from them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Target id the loss ignores (torch's `ignore_index`).
pub const IGNORE: i32 = -100;

/// Vocabulary the corpus needs: raw bytes.
pub const VOCAB: usize = 256;

const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
const BRACKETS: &[u8] = b"()[]";
/// One prompt in `HELD_OUT_MOD` is held out.
const HELD_OUT_MOD: u64 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Copy,
    Reverse,
    Sort,
    Add,
    Brackets,
}

impl Task {
    pub const ALL: [Task; 5] = [
        Task::Copy,
        Task::Reverse,
        Task::Sort,
        Task::Add,
        Task::Brackets,
    ];

    /// The prefix of the task's prompts.
    pub fn tag(self) -> &'static str {
        match self {
            Task::Copy => "cp",
            Task::Reverse => "rev",
            Task::Sort => "sort",
            Task::Add => "add",
            Task::Brackets => "bal",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Task::Copy => "copy",
            Task::Reverse => "reverse",
            Task::Sort => "sort",
            Task::Add => "add",
            Task::Brackets => "brackets",
        }
    }

    /// The correct answer (without the newline) for an input.
    pub fn solve(self, input: &str) -> String {
        match self {
            Task::Copy => input.to_string(),
            Task::Reverse => input.chars().rev().collect(),
            Task::Sort => {
                let mut b = input.as_bytes().to_vec();
                b.sort_unstable();
                String::from_utf8_lossy(&b).into_owned()
            }
            Task::Add => {
                let (a, b) = input.split_once('+').unwrap_or((input, "0"));
                let sum = a.parse::<u64>().unwrap_or(0) + b.parse::<u64>().unwrap_or(0);
                sum.to_string()
            }
            Task::Brackets => {
                let mut stack = Vec::new();
                let balanced = input.bytes().all(|c| match c {
                    b'(' | b'[' => {
                        stack.push(c);
                        true
                    }
                    b')' => stack.pop() == Some(b'('),
                    b']' => stack.pop() == Some(b'['),
                    _ => false,
                }) && stack.is_empty();
                if balanced { "yes" } else { "no" }.to_string()
            }
        }
    }

    /// A random input: strings of `min_len..=max_len` letters; for `add` two numbers of up to
    /// max(1, max_len / 3) digits; for `brackets` an even-length bracket string, balanced half
    /// of the time.
    fn sample_input(self, rng: &mut ChaCha8Rng, min_len: usize, max_len: usize) -> String {
        match self {
            Task::Copy | Task::Reverse | Task::Sort => {
                let n = rng.random_range(min_len..=max_len);
                (0..n)
                    .map(|_| LETTERS[rng.random_range(0..LETTERS.len())] as char)
                    .collect()
            }
            Task::Add => {
                let digits = (max_len / 3).max(1) as u32;
                let max = 10u64.pow(digits);
                format!("{}+{}", rng.random_range(0..max), rng.random_range(0..max))
            }
            Task::Brackets => {
                let most = (max_len / 2).max(1);
                let pairs = rng.random_range(min_len.div_ceil(2).clamp(1, most)..=most);
                if rng.random_bool(0.5) {
                    balanced_brackets(rng, pairs)
                } else {
                    (0..2 * pairs)
                        .map(|_| BRACKETS[rng.random_range(0..BRACKETS.len())] as char)
                        .collect()
                }
            }
        }
    }
}

/// A random balanced string of `pairs` bracket pairs: a random walk that closes the innermost
/// open bracket or opens a new one.
fn balanced_brackets(rng: &mut ChaCha8Rng, pairs: usize) -> String {
    let mut out = String::with_capacity(2 * pairs);
    let mut open = Vec::new();
    let mut left = pairs;
    while left > 0 || !open.is_empty() {
        if left > 0 && (open.is_empty() || rng.random_bool(0.5)) {
            let (o, c) = if rng.random_bool(0.5) {
                ('(', ')')
            } else {
                ('[', ']')
            };
            out.push(o);
            open.push(c);
            left -= 1;
        } else if let Some(c) = open.pop() {
            out.push(c);
        }
    }
    out
}

/// One example: `prompt` = `tag:input=`, `answer` = solution + `\n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub task: Task,
    pub prompt: String,
    pub answer: String,
}

impl Example {
    pub fn new(task: Task, input: &str) -> Example {
        Example {
            task,
            prompt: format!("{}:{input}=", task.tag()),
            answer: format!("{}\n", task.solve(input)),
        }
    }

    /// Whether the prompt belongs to the held-out set (FNV-1a hash of the prompt).
    pub fn is_held_out(&self) -> bool {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.prompt.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h % HELD_OUT_MOD == 0
    }
}

/// Which tasks and how long their inputs are (`[data]` with `source = "synthetic"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticConfig {
    #[serde(default = "all_tasks")]
    pub tasks: Vec<Task>,
    #[serde(default = "default_min_len")]
    pub min_len: usize,
    #[serde(default = "default_max_len")]
    pub max_len: usize,
}

fn all_tasks() -> Vec<Task> {
    Task::ALL.to_vec()
}
fn default_min_len() -> usize {
    1
}
fn default_max_len() -> usize {
    6
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            tasks: all_tasks(),
            min_len: default_min_len(),
            max_len: default_max_len(),
        }
    }
}

impl SyntheticConfig {
    /// Errors name the field, the value and the constraint.
    pub fn validate(&self, seq_len: usize) -> Result<(), String> {
        if self.tasks.is_empty() {
            return Err("data.tasks = []: name at least one task".into());
        }
        if self.min_len == 0 || self.min_len > self.max_len {
            return Err(format!(
                "data.min_len = {}: must be in 1..=max_len ({})",
                self.min_len, self.max_len
            ));
        }
        if self.max_len > 64 {
            return Err(format!("data.max_len = {}: must be <= 64", self.max_len));
        }
        // The longest example (`sort:` + input + `=` + answer + `\n`) must fit a sequence.
        let longest = 6 + 2 * self.max_len + 2;
        if seq_len < longest {
            return Err(format!(
                "train.seq_len = {seq_len}: must be >= {longest} to hold one example of \
                 data.max_len = {}",
                self.max_len
            ));
        }
        Ok(())
    }
}

/// The corpus: sequences of `seq_len` tokens, each a deterministic function of (seed, index).
#[derive(Clone, Debug)]
pub struct SyntheticCorpus {
    cfg: SyntheticConfig,
    seed: u64,
    seq_len: usize,
}

impl SyntheticCorpus {
    pub fn new(cfg: SyntheticConfig, seed: u64, seq_len: usize) -> Result<Self, String> {
        cfg.validate(seq_len)?;
        Ok(SyntheticCorpus { cfg, seed, seq_len })
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// A random training example: never a held-out one.
    fn train_example(&self, rng: &mut ChaCha8Rng) -> Example {
        loop {
            let task = self.cfg.tasks[rng.random_range(0..self.cfg.tasks.len())];
            let e = Example::new(
                task,
                &task.sample_input(rng, self.cfg.min_len, self.cfg.max_len),
            );
            if !e.is_held_out() {
                return e;
            }
        }
    }

    /// Sequence `index`: (tokens [seq_len], targets [seq_len]) with targets[j] = byte j+1 where
    /// that byte is part of an answer, else `IGNORE`.
    pub fn sequence(&self, index: u64) -> (Vec<i32>, Vec<i32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index);
        let mut bytes = Vec::with_capacity(self.seq_len + 32);
        let mut supervised = Vec::with_capacity(self.seq_len + 32);
        while bytes.len() <= self.seq_len {
            let e = self.train_example(&mut rng);
            bytes.extend(e.prompt.bytes());
            supervised.extend(std::iter::repeat_n(false, e.prompt.len()));
            bytes.extend(e.answer.bytes());
            supervised.extend(std::iter::repeat_n(true, e.answer.len()));
        }
        let tokens = bytes[..self.seq_len].iter().map(|&b| b as i32).collect();
        let targets = (0..self.seq_len)
            .map(|j| {
                if supervised[j + 1] {
                    bytes[j + 1] as i32
                } else {
                    IGNORE
                }
            })
            .collect();
        (tokens, targets)
    }

    /// Up to `per_task` held-out examples of each configured task, the same for a given seed.
    /// (A task whose input space is tiny may yield fewer.)
    pub fn held_out(&self, per_task: usize) -> Vec<Example> {
        let mut out = Vec::new();
        for (t, &task) in self.cfg.tasks.iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed_e7a1);
            rng.set_stream(t as u64);
            let mut found: Vec<Example> = Vec::new();
            for _ in 0..200_000 {
                if found.len() == per_task {
                    break;
                }
                let e = Example::new(
                    task,
                    &task.sample_input(&mut rng, self.cfg.min_len, self.cfg.max_len),
                );
                if e.is_held_out() && !found.contains(&e) {
                    found.push(e);
                }
            }
            out.extend(found);
        }
        out
    }
}

/// Accuracy on one task: a completion is correct when it equals the answer up to and including
/// its newline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TaskScore {
    pub task: Task,
    pub correct: usize,
    pub total: usize,
}

/// Scores completions (generated text after each prompt) against the examples' answers.
pub fn score(examples: &[Example], completions: &[String]) -> Vec<TaskScore> {
    let mut scores: Vec<TaskScore> = Vec::new();
    for (e, c) in examples.iter().zip(completions) {
        let line = match c.find('\n') {
            Some(i) => &c[..=i],
            None => c.as_str(),
        };
        let i = match scores.iter().position(|s| s.task == e.task) {
            Some(i) => i,
            None => {
                scores.push(TaskScore {
                    task: e.task,
                    correct: 0,
                    total: 0,
                });
                scores.len() - 1
            }
        };
        scores[i].total += 1;
        scores[i].correct += (line == e.answer) as usize;
    }
    scores
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(Example::new(Task::Reverse, "abc").answer, "cba\n");
        assert_eq!(Example::new(Task::Reverse, "abc").prompt, "rev:abc=");
        assert_eq!(Task::Sort.solve("cab"), "abc");
        assert_eq!(Task::Add.solve("17+5"), "22");
        assert_eq!(Task::Brackets.solve("([])[]"), "yes");
        assert_eq!(Task::Brackets.solve("([)]"), "no");
        assert_eq!(Task::Brackets.solve("(("), "no");
        assert_eq!(Task::Copy.solve("xy"), "xy");
    }

    #[test]
    fn balanced_generator_balances() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for pairs in 1..6 {
            let s = balanced_brackets(&mut rng, pairs);
            assert_eq!(s.len(), 2 * pairs);
            assert_eq!(Task::Brackets.solve(&s), "yes", "{s}");
        }
    }

    #[test]
    fn sequences_are_deterministic_and_supervise_answers_only() {
        let c = SyntheticCorpus::new(SyntheticConfig::default(), 7, 64).unwrap();
        let (t1, y1) = c.sequence(3);
        assert_eq!((t1.clone(), y1.clone()), c.sequence(3));
        assert_ne!(t1, c.sequence(4).0);
        assert_eq!(t1.len(), 64);
        let text: String = t1.iter().map(|&b| b as u8 as char).collect();
        let first = text.lines().next().unwrap();
        let (prompt, answer) = first.split_once('=').unwrap();
        let (tag, input) = prompt.split_once(':').unwrap();
        let task = Task::ALL.iter().find(|t| t.tag() == tag).unwrap();
        assert_eq!(task.solve(input), answer);
        // Targets: the next byte inside answers (and their newline), IGNORE elsewhere.
        for j in 0..63 {
            if y1[j] != IGNORE {
                assert_eq!(y1[j], t1[j + 1]);
            }
        }
        let eq = text.find('=').unwrap();
        assert!(y1[..eq].iter().all(|&y| y == IGNORE));
        assert_eq!(y1[eq], answer.as_bytes()[0] as i32);
    }

    #[test]
    fn held_out_prompts_never_train() {
        let c = SyntheticCorpus::new(SyntheticConfig::default(), 1, 128).unwrap();
        let held = c.held_out(8);
        assert_eq!(held.len(), 8 * Task::ALL.len());
        assert!(held.iter().all(Example::is_held_out));
        for i in 0..200 {
            let (t, _) = c.sequence(i);
            let text: String = t.iter().map(|&b| b as u8 as char).collect();
            for line in text.lines() {
                if let Some((p, _)) = line.split_once('=') {
                    assert!(held.iter().all(|e| e.prompt != format!("{p}=")), "{line}");
                }
            }
        }
    }

    #[test]
    fn scoring() {
        let ex = vec![
            Example::new(Task::Reverse, "ab"),
            Example::new(Task::Reverse, "cd"),
            Example::new(Task::Add, "1+1"),
        ];
        let s = score(&ex, &["ba\nrev".into(), "cd\n".into(), "2\n".into()]);
        assert_eq!(
            s,
            vec![
                TaskScore {
                    task: Task::Reverse,
                    correct: 1,
                    total: 2
                },
                TaskScore {
                    task: Task::Add,
                    correct: 1,
                    total: 1
                }
            ]
        );
    }

    #[test]
    fn validation_names_fields() {
        let mut cfg = SyntheticConfig::default();
        cfg.max_len = 40;
        let e = cfg.validate(64).unwrap_err();
        assert!(e.contains("train.seq_len = 64"), "{e}");
        cfg.min_len = 0;
        assert!(cfg.validate(256).unwrap_err().contains("data.min_len = 0"));
    }
}
