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

/// The kept stacks, by connection.
#[derive(Debug)]
pub struct HolderStacks {
    by_conn: HashMap<ConnId, Kept>,
    per_pid: HashMap<u32, usize>,
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
            by_conn: HashMap::new(),
            per_pid: HashMap::new(),
            max_per_pid,
            max_total,
        }
    }

    pub fn len(&self) -> usize {
        self.by_conn.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_conn.is_empty()
    }

    /// Keeps `stack` for the checkout of `conn` that began at
    /// `checkout_ns`, in place of any earlier one of that connection.
    /// `held(conn, checkout_ns)` says whether a kept stack's checkout is
    /// still going on: when the process's share or the whole is taken,
    /// the stacks of ended checkouts are forgotten first, and if that
    /// frees nothing the new stack is refused.
    pub fn keep(
        &mut self,
        conn: ConnId,
        checkout_ns: u64,
        stack: HolderStack,
        held: impl Fn(ConnId, u64) -> bool,
    ) -> Result<(), &'static str> {
        if let Some(kept) = self.by_conn.get_mut(&conn) {
            *kept = Kept { checkout_ns, stack };
            return Ok(());
        }
        let full = |s: &Self| {
            s.by_conn.len() >= s.max_total
                || s.per_pid.get(&conn.pid).copied().unwrap_or(0) >= s.max_per_pid
        };
        if full(self) {
            self.forget_ended(&held);
            if full(self) {
                return Err("stack_limit");
            }
        }
        self.by_conn.insert(conn, Kept { checkout_ns, stack });
        *self.per_pid.entry(conn.pid).or_default() += 1;
        Ok(())
    }

    /// The stack of `conn`'s checkout that began at `checkout_ns`, if one
    /// was kept for that very checkout.
    pub fn of(&self, conn: ConnId, checkout_ns: u64) -> Option<&HolderStack> {
        self.by_conn
            .get(&conn)
            .filter(|kept| kept.checkout_ns == checkout_ns)
            .map(|kept| &kept.stack)
    }

    /// Forgets the stacks whose checkout ended (returned, closed, its
    /// process gone).
    pub fn forget_ended(&mut self, held: &impl Fn(ConnId, u64) -> bool) {
        let per_pid = &mut self.per_pid;
        self.by_conn.retain(|conn, kept| {
            let keep = held(*conn, kept.checkout_ns);
            if !keep {
                if let Some(n) = per_pid.get_mut(&conn.pid) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        per_pid.remove(&conn.pid);
                    }
                }
            }
            keep
        });
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
