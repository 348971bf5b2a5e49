//! Continuous batching's bookkeeping: which sequence holds which KV cache row (slot), who waits
//! for one, and each step's per-slot token counts under the token budget (Dynamic SplitFuse:
//! decoding rows take one token each, then prompts fill what is left in chunks). No model
//! here; `engine.rs` turns a plan into a `Model::forward_infer` call.

use std::collections::VecDeque;

/// A sequence's id in the engine (one per request choice).
pub type SeqId = u64;

pub struct Scheduler {
    /// The sequence holding each KV cache row.
    slots: Vec<Option<SeqId>>,
    /// Slots in the order their sequences were admitted (prompt chunks are served first-come).
    admitted: Vec<usize>,
    waiting: VecDeque<SeqId>,
    /// Most tokens one step feeds (`--max-num-batched-tokens`).
    budget: usize,
}

impl Scheduler {
    /// `rows` KV cache rows and a step budget of `budget` tokens (at least one per row, so every
    /// decoding sequence advances each step).
    pub fn new(rows: usize, budget: usize) -> Result<Scheduler, String> {
        if rows == 0 {
            return Err("--max-num-seqs 0: at least one sequence must fit".into());
        }
        if budget < rows {
            return Err(format!(
                "--max-num-batched-tokens {budget} is below --max-num-seqs {rows}: each step \
                 feeds one token to every decoding sequence"
            ));
        }
        Ok(Scheduler {
            slots: vec![None; rows],
            admitted: Vec::new(),
            waiting: VecDeque::new(),
            budget,
        })
    }

    /// Queues a sequence for a slot (first come, first served).
    pub fn enqueue(&mut self, id: SeqId) {
        self.waiting.push_back(id);
    }

    /// Moves waiting sequences into free slots; returns each admitted (sequence, slot).
    pub fn admit(&mut self) -> Vec<(SeqId, usize)> {
        let mut out = Vec::new();
        for slot in 0..self.slots.len() {
            if self.slots[slot].is_some() {
                continue;
            }
            let Some(id) = self.waiting.pop_front() else {
                break;
            };
            self.slots[slot] = Some(id);
            self.admitted.push(slot);
            out.push((id, slot));
        }
        out
    }

    /// Drops a sequence (finished, failed or disconnected): frees its slot or its place in the
    /// queue. Returns the slot it held.
    pub fn release(&mut self, id: SeqId) -> Option<usize> {
        self.waiting.retain(|&w| w != id);
        let slot = self.slots.iter().position(|&s| s == Some(id))?;
        self.slots[slot] = None;
        self.admitted.retain(|&s| s != slot);
        Some(slot)
    }

    /// Tokens to feed each slot this step, given each running sequence's tokens not yet in the
    /// cache (`pending`). Sequences with one pending token (decoding) all get it; prompts then
    /// get chunks of what is left of the budget, in admission order (a prompt that does not fit
    /// goes on in later steps).
    pub fn plan(&self, pending: impl Fn(SeqId) -> usize) -> Vec<usize> {
        let mut feed = vec![0; self.slots.len()];
        let mut left = self.budget;
        for (slot, id) in self.slots.iter().enumerate() {
            if let Some(id) = id {
                if pending(*id) == 1 {
                    feed[slot] = 1;
                    left -= 1;
                }
            }
        }
        for &slot in &self.admitted {
            let Some(id) = self.slots[slot] else {
                continue;
            };
            let n = pending(id);
            if n > 1 {
                feed[slot] = n.min(left);
                left -= feed[slot];
            }
        }
        feed
    }

    pub fn slots(&self) -> &[Option<SeqId>] {
        &self.slots
    }

    pub fn running(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_in_order_and_reuses_freed_slots() {
        let mut s = Scheduler::new(2, 8).unwrap();
        for id in [10, 11, 12] {
            s.enqueue(id);
        }
        assert_eq!(s.admit(), vec![(10, 0), (11, 1)]);
        assert_eq!((s.running(), s.waiting()), (2, 1));
        assert_eq!(s.admit(), vec![]);
        assert_eq!(s.release(10), Some(0));
        assert_eq!(s.admit(), vec![(12, 0)]);
        assert_eq!(s.slots(), &[Some(12), Some(11)]);
        // A waiting sequence that goes away leaves the queue without a slot.
        s.enqueue(13);
        assert_eq!(s.release(13), None);
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn decodes_first_then_prompt_chunks_under_the_budget() {
        let mut s = Scheduler::new(4, 10).unwrap();
        for id in [1, 2, 3, 4] {
            s.enqueue(id);
        }
        s.admit();
        // 1 decodes, 2 has a 7-token prompt, 3 a 5-token one, 4 decodes: 2 + 7 + 1 = 10.
        let pending = |id| [0, 1, 7, 5, 1][id as usize];
        assert_eq!(s.plan(pending), vec![1, 7, 1, 1]);
        // Later steps: prompt 3 gets what is left, then everything once it fits.
        let pending = |id| [0, 1, 1, 4, 1][id as usize];
        assert_eq!(s.plan(pending), vec![1, 1, 4, 1]);
        // A prompt longer than the budget is split across steps.
        let mut s = Scheduler::new(2, 4).unwrap();
        s.enqueue(7);
        s.admit();
        assert_eq!(s.plan(|_| 9), vec![4, 0]);
        // Admission order decides which prompt goes first, not the slot index.
        let mut s = Scheduler::new(2, 4).unwrap();
        s.enqueue(1);
        s.enqueue(2);
        s.admit();
        s.release(1);
        s.enqueue(3);
        s.admit();
        assert_eq!(s.slots(), &[Some(3), Some(2)]);
        assert_eq!(s.plan(|_| 3), vec![1, 3]);
    }

    #[test]
    fn budget_below_rows_is_refused() {
        let e = Scheduler::new(8, 4).err().unwrap();
        assert!(e.contains("--max-num-batched-tokens 4"), "{e}");
        assert!(Scheduler::new(0, 4).is_err());
    }
}
