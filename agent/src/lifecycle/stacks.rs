//! Holder stacks: the code that checked a connection out, as its adapter
//! sent it (`holder_stack`), kept with that one checkout so that its leak
//! report can name the code. Pure and bounded per process and in all:
//! every local process may send stacks, each up to 4 KiB.

use std::collections::HashMap;

use super::ConnId;
use crate::adapter::message::HolderStack;

/// Stacks one process may have kept at a time.
pub const MAX_STACKS_PER_PROCESS: usize = 256;
/// Stacks kept at a time in all (at most 4 KiB each: 16 MiB).
pub const MAX_STACKS: usize = 4096;

#[derive(Debug)]
struct Kept {
    /// When the checkout the stack belongs to began (the tracker's time).
    checkout_ns: u64,
    stack: HolderStack,
}

/// The kept stacks, by process, then connection: making room scans one
/// process's share (at most [`MAX_STACKS_PER_PROCESS`]), never all of
/// them, so a sender whose stacks are refused cannot make each refusal
/// cost the agent a walk over everyone's.
#[derive(Debug)]
pub struct HolderStacks {
    by_pid: HashMap<u32, HashMap<ConnId, Kept>>,
    total: usize,
    max_per_pid: usize,
    max_total: usize,
}

impl Default for HolderStacks {
    fn default() -> Self {
        HolderStacks::new(MAX_STACKS_PER_PROCESS, MAX_STACKS)
    }
}

impl HolderStacks {
    pub fn new(max_per_pid: usize, max_total: usize) -> HolderStacks {
        HolderStacks {
            by_pid: HashMap::new(),
            total: 0,
            max_per_pid,
            max_total,
        }
    }

    pub fn len(&self) -> usize {
        self.total
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Keeps `stack` for the checkout of `conn` that began at
    /// `checkout_ns`, in place of any earlier one of that connection.
    /// `held(conn, checkout_ns)` says whether a kept stack's checkout is
    /// still going on: when the sender's share is taken, its own stacks of
    /// ended checkouts are forgotten first; when all are taken, those of
    /// the process keeping the most. If that frees nothing the new stack
    /// is refused (the housekeeping sweep frees the rest every second).
    pub fn keep(
        &mut self,
        conn: ConnId,
        checkout_ns: u64,
        stack: HolderStack,
        held: impl Fn(ConnId, u64) -> bool,
    ) -> Result<(), &'static str> {
        let kept = Kept { checkout_ns, stack };
        if let Some(old) = self
            .by_pid
            .get_mut(&conn.pid)
            .and_then(|m| m.get_mut(&conn))
        {
            *old = kept;
            return Ok(());
        }
        let share = |s: &Self, pid| s.by_pid.get(&pid).map_or(0, HashMap::len);
        if share(self, conn.pid) >= self.max_per_pid {
            self.forget_ended_of(conn.pid, &held);
        } else if self.total >= self.max_total {
            let heaviest = self
                .by_pid
                .iter()
                .max_by_key(|(_, m)| m.len())
                .map(|(pid, _)| *pid);
            if let Some(pid) = heaviest {
                self.forget_ended_of(pid, &held);
            }
        }
        if share(self, conn.pid) >= self.max_per_pid || self.total >= self.max_total {
            return Err("stack_limit");
        }
        self.by_pid.entry(conn.pid).or_default().insert(conn, kept);
        self.total += 1;
        Ok(())
    }

    /// The stack of `conn`'s checkout that began at `checkout_ns`, if one
    /// was kept for that very checkout.
    pub fn of(&self, conn: ConnId, checkout_ns: u64) -> Option<&HolderStack> {
        self.by_pid
            .get(&conn.pid)?
            .get(&conn)
            .filter(|kept| kept.checkout_ns == checkout_ns)
            .map(|kept| &kept.stack)
    }

    /// Forgets the stacks whose checkout ended (returned, closed, its
    /// process gone).
    pub fn forget_ended(&mut self, held: &impl Fn(ConnId, u64) -> bool) {
        let pids: Vec<u32> = self.by_pid.keys().copied().collect();
        for pid in pids {
            self.forget_ended_of(pid, held);
        }
    }

    fn forget_ended_of(&mut self, pid: u32, held: &impl Fn(ConnId, u64) -> bool) {
        let Some(kept) = self.by_pid.get_mut(&pid) else {
            return;
        };
        let before = kept.len();
        kept.retain(|conn, k| held(*conn, k.checkout_ns));
        self.total -= before - kept.len();
        if kept.is_empty() {
            self.by_pid.remove(&pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(pid: u32, fd: i32) -> ConnId {
        ConnId {
            pid,
            fd,
            generation: 1,
        }
    }

    fn stack(frame: &str) -> HolderStack {
        vec![frame.to_string()].into()
    }

    #[test]
    fn a_stack_belongs_to_one_checkout() {
        let mut stacks = HolderStacks::default();
        let held = |_, _| true;
        stacks
            .keep(conn(1, 5), 100, stack("leak (a.py:1)"), held)
            .expect("kept");
        assert_eq!(
            stacks.of(conn(1, 5), 100).map(|s| &s[0][..]),
            Some("leak (a.py:1)")
        );
        // Another checkout of the same connection, or another connection.
        assert!(stacks.of(conn(1, 5), 200).is_none());
        assert!(stacks.of(conn(1, 6), 100).is_none());
        // A newer stack of the connection takes the place of the old one.
        stacks
            .keep(conn(1, 5), 200, stack("next (a.py:2)"), held)
            .expect("kept");
        assert_eq!(stacks.len(), 1);
        assert!(stacks.of(conn(1, 5), 100).is_none());
        assert!(stacks.of(conn(1, 5), 200).is_some());
    }

    #[test]
    fn bounds_are_per_process_and_in_all_and_ended_checkouts_go_first() {
        let mut stacks = HolderStacks::new(2, 3);
        let all_held = |_, _| true;
        stacks
            .keep(conn(1, 1), 1, stack("a"), all_held)
            .expect("kept");
        stacks
            .keep(conn(1, 2), 1, stack("b"), all_held)
            .expect("kept");
        // Process 1 has its share; process 2 still has room.
        assert_eq!(
            stacks.keep(conn(1, 3), 1, stack("c"), all_held),
            Err("stack_limit")
        );
        stacks
            .keep(conn(2, 1), 1, stack("d"), all_held)
            .expect("kept");
        // All are taken: nobody gets more while every checkout is held.
        assert_eq!(
            stacks.keep(conn(3, 1), 1, stack("e"), all_held),
            Err("stack_limit")
        );
        // Once process 1's first checkout ended, its stack makes room.
        let ended = |c: ConnId, _| c != conn(1, 1);
        stacks.keep(conn(3, 1), 1, stack("e"), ended).expect("kept");
        assert!(stacks.of(conn(1, 1), 1).is_none());
        assert_eq!(stacks.len(), 3);
        // Forgetting counts down: process 1 may keep one more again.
        stacks.forget_ended(&|c: ConnId, _| c.pid != 1);
        assert_eq!(stacks.len(), 2);
        stacks
            .keep(conn(1, 4), 1, stack("f"), all_held)
            .expect("kept");
        stacks
            .keep(conn(1, 5), 9, stack("g"), |_, _| true)
            .expect_err("refused");
    }
}
