// SPDX-License-Identifier: MIT OR Apache-2.0
//! The writer of FILTER, the datapath's "maybe ours" test (see
//! `datapath_common::filter`): a reference count per bit and direction, over
//! the frontends and backends the maps hold. A bit is set before the first
//! map entry that needs it is written and cleared only after the last one
//! is gone, so a packet of a live flow never finds its bit clear.

use std::collections::HashMap;

use datapath_common::filter::{FlowFilter, WORDS, bit, slot};

use crate::mapped::Mapped;

/// Which half of [`FlowFilter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// A frontend: packets *to* it.
    Dst,
    /// A backend: replies *from* it.
    Src,
}

impl Dir {
    fn offset(self, word: usize) -> usize {
        let half = match self {
            Dir::Dst => std::mem::offset_of!(FlowFilter, dst),
            Dir::Src => std::mem::offset_of!(FlowFilter, src),
        };
        half + word * 8
    }
}

pub struct Filter {
    mem: Mapped,
    /// Map entries per set bit, destination then source.
    refs: [HashMap<u32, u32>; 2],
}

impl Filter {
    /// Takes over the mapped FILTER value, with nothing listed.
    pub fn new(mem: Mapped) -> Self {
        let mut f = Self { mem, refs: [HashMap::new(), HashMap::new()] };
        f.rebuild([], []);
        f
    }

    /// Counts exactly these entries (address and port as the maps hold
    /// them, one per map entry) and writes every word once, so no bit in use
    /// is cleared on the way.
    pub fn rebuild(
        &mut self,
        dst: impl IntoIterator<Item = ([u8; 16], u16)>,
        src: impl IntoIterator<Item = ([u8; 16], u16)>,
    ) {
        self.refs = [HashMap::new(), HashMap::new()];
        for (a, p) in dst {
            *self.refs[Dir::Dst as usize].entry(bit(&a, p)).or_default() += 1;
        }
        for (a, p) in src {
            *self.refs[Dir::Src as usize].entry(bit(&a, p)).or_default() += 1;
        }
        for dir in [Dir::Dst, Dir::Src] {
            let mut words = vec![0u64; WORDS];
            for b in self.refs[dir as usize].keys() {
                let (w, m) = slot(*b);
                words[w] |= m;
            }
            for (w, v) in words.into_iter().enumerate() {
                self.mem.store(dir.offset(w), v);
            }
        }
        self.mem.publish();
    }

    fn flip(&mut self, dir: Dir, b: u32, on: bool) {
        let (w, m) = slot(b);
        let off = dir.offset(w);
        let old: u64 = self.mem.load(off).unwrap_or(0);
        self.mem.store(off, if on { old | m } else { old & !m });
        self.mem.publish();
    }

    /// One more map entry for `addr:port` (network order).
    pub fn add(&mut self, dir: Dir, addr: &[u8; 16], port_be: u16) {
        let b = bit(addr, port_be);
        let n = self.refs[dir as usize].entry(b).or_default();
        *n += 1;
        if *n == 1 {
            self.flip(dir, b, true);
        }
    }

    /// One map entry for `addr:port` fewer.
    pub fn remove(&mut self, dir: Dir, addr: &[u8; 16], port_be: u16) {
        let b = bit(addr, port_be);
        let refs = &mut self.refs[dir as usize];
        let Some(n) = refs.get_mut(&b) else { return };
        *n -= 1;
        if *n == 0 {
            refs.remove(&b);
            self.flip(dir, b, false);
        }
    }

    /// True when packets to (`Dst`) or from (`Src`) `addr:port` get past
    /// the filter, as the datapath reads it.
    pub fn passes(&self, dir: Dir, addr: &[u8; 16], port_be: u16) -> bool {
        let (w, m) = slot(bit(addr, port_be));
        self.mem.load::<u64>(dir.offset(w)).is_some_and(|v| v & m != 0)
    }
}
