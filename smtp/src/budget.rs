//! A byte budget shared by every session of a relay: message bodies held in memory at once.
//!
//! Each body reserves what it holds as it grows and gives it back when it is dropped, so a thousand clients
//! each sending the largest allowed message cannot hold more than the budget between them. A body that
//! cannot reserve more is refused (452 4.3.1, try later) instead of pushing the process past its memory
//! limit, where the kernel would kill it with every session in flight.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Reservations grow in steps of this many bytes, so the shared counter is touched once per step rather
/// than once per line.
const STEP: usize = 64 * 1024;

/// The shared budget.
#[derive(Debug)]
pub struct Budget {
    capacity: AtomicUsize,
    used: AtomicUsize,
}

impl Budget {
    pub fn new(capacity: usize) -> Arc<Budget> {
        Arc::new(Budget {
            capacity: AtomicUsize::new(capacity),
            used: AtomicUsize::new(0),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// A new size (a config reload); reservations held beyond it stay until they are given back.
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Relaxed);
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&t| t <= self.capacity())
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// What one body holds of the budget; given back on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    held: usize,
}

impl Reservation {
    pub fn new(budget: Arc<Budget>) -> Reservation {
        Reservation { budget, held: 0 }
    }

    /// Makes sure at least `total` bytes are held; false (and nothing more held) when the budget is spent.
    pub fn grow_to(&mut self, total: usize) -> bool {
        if total <= self.held {
            return true;
        }
        let want = total.div_ceil(STEP).saturating_mul(STEP);
        if self.budget.take(want - self.held) {
            self.held = want;
            true
        } else {
            false
        }
    }

    /// Gives back what is held beyond `total` (in whole steps): the bytes were moved out of memory.
    pub fn shrink_to(&mut self, total: usize) {
        let keep = total.div_ceil(STEP).saturating_mul(STEP);
        if keep < self.held {
            self.budget.give(self.held - keep);
            self.held = keep;
        }
    }

    /// Gives everything back now (the body was refused and freed).
    pub fn release(&mut self) {
        self.budget.give(std::mem::take(&mut self.held));
    }

    pub fn held(&self) -> usize {
        self.held
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_budget_and_give_it_back() {
        let b = Budget::new(4 * STEP);
        let mut one = Reservation::new(b.clone());
        assert!(one.grow_to(1));
        assert_eq!(b.used(), STEP);
        assert!(one.grow_to(3 * STEP));
        let mut two = Reservation::new(b.clone());
        assert!(two.grow_to(STEP));
        assert!(!two.grow_to(STEP + 1), "over the budget");
        assert_eq!(two.held(), STEP, "a refused growth takes nothing");
        drop(one);
        assert_eq!(b.used(), STEP);
        assert!(two.grow_to(4 * STEP));
        two.release();
        assert_eq!(b.used(), 0);
    }
}
