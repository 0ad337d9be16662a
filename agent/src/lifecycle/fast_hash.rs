//! A cheap hasher for maps keyed by numbers the kernel hands us (pids, fds).
//!
//! Every kernel event looks up its connection, its parser and its process
//! in such maps; with the standard SipHash those lookups were about a tenth
//! of the agent's CPU under load. SipHash resists keys chosen to collide,
//! which buys nothing here: a pid comes from the kernel (events, or the
//! credentials of an adapter's datagram) and a key exists only for a socket
//! the kernel reported. Maps keyed by sender-chosen strings (pool names)
//! keep SipHash.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
};

/// The multiply-rotate hash of rustc's FxHasher.
#[derive(Default, Clone, Copy)]
pub struct NumberHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl NumberHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for NumberHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_i32(&mut self, i: i32) {
        self.add(i as u32 as u64);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

/// A `HashMap` for keys made of kernel-given numbers.
pub type NumberMap<K, V> = HashMap<K, V, BuildHasherDefault<NumberHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_by_pid_and_fd_find_what_they_hold() {
        let mut map: NumberMap<(u32, i32), u64> = NumberMap::default();
        for pid in 0..200u32 {
            for fd in -1..50i32 {
                // Wrapping: fd -1 as u64 (debug builds check overflow).
                map.insert((pid, fd), (u64::from(pid) * 1000).wrapping_add(fd as u64));
            }
        }
        assert_eq!(map.len(), 200 * 51);
        assert_eq!(map.get(&(7, 3)), Some(&7003));
        assert_eq!(
            map.get(&(7, -1)),
            Some(&(7000u64.wrapping_add(-1i64 as u64)))
        );
        assert_eq!(map.get(&(200, 0)), None);
    }

    #[test]
    fn neighbouring_keys_hash_apart() {
        let hash = |key: (u32, i32)| {
            let mut h = NumberHasher::default();
            std::hash::Hash::hash(&key, &mut h);
            h.finish()
        };
        assert_ne!(hash((1, 2)), hash((2, 1)));
        assert_ne!(hash((1, 2)), hash((1, 3)));
    }
}
